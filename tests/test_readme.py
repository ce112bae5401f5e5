"""The README's result tables are generated from the committed JSON, never by hand."""

from pathlib import Path

from benchmarks import report


def test_readme_tables_match_results():
    readme = (Path(report.ROOT) / "README.md").read_text()
    assert report.render(readme) == readme, "run `python -m benchmarks.report`"


def test_readme_quick_start_matches_ci():
    """The CI script installs exactly as the README's quick start says."""
    root = Path(report.ROOT)
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    for command in (
        "pip install torch==2.11.0 torchaudio==2.11.0",
        'pip install -e ".[dev]"',
        "pytest",
    ):
        assert command in readme and command in ci
