"""The README and the guides in docs/: result tables generated from the committed
JSON, never by hand; the quick start is what CI runs; every relative link resolves."""

import re
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(report.ROOT)
DOCUMENTS = report.documents()


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_readme_tables_match_results(path):
    text = path.read_text()
    assert report.render(text) == text, "run `python -m benchmarks.report`"


def test_every_table_is_in_one_document():
    """Each generated table has its markers in exactly one of the files the report renders."""
    for name in report.SECTIONS:
        holders = [p.name for p in DOCUMENTS if f"<!-- BEGIN {name} -->" in p.read_text()]
        assert len(holders) == 1, f"table {name!r} is in {holders or 'no document'}"


def test_report_check_sees_a_stale_table_in_docs(tmp_path, monkeypatch, capsys):
    (tmp_path / "docs").mkdir()
    for path in DOCUMENTS:
        (tmp_path / path.relative_to(ROOT)).write_text(path.read_text())
    stale = tmp_path / "docs" / "kernels.md"
    text = stale.read_text()
    blanked = re.sub(
        r"(<!-- BEGIN compile_gate -->\n).*?(<!-- END compile_gate -->)", r"\1\2", text, flags=re.S
    )
    assert blanked != text
    stale.write_text(blanked)
    monkeypatch.setattr(report, "ROOT", tmp_path)
    assert report.main(["--check"]) == 1
    assert "docs/kernels.md" in capsys.readouterr().err
    assert report.main([]) == 0
    assert stale.read_text() == text
    assert report.main(["--check"]) == 0


def test_readme_quick_start_matches_ci():
    """The CI script installs exactly as the README's quick start says."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in (
        "pip install torch==2.11.0 torchaudio==2.11.0",
        'pip install -e ".[dev]"',
        "pytest",
    ):
        assert command in readme and command in ci


def test_readme_links_every_guide():
    readme = (ROOT / "README.md").read_text()
    for path in DOCUMENTS[1:]:
        assert f"]({path.relative_to(ROOT)})" in readme, f"the README's docs map lacks {path.name}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _relative_links(markdown: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    """Every relative link points to a file of the repository, and its #anchor to a heading."""
    broken = []
    for target in _relative_links(path.read_text()):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, "\n".join(broken)
