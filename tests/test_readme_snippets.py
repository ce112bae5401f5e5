"""Every ```python block of the README and of the guides in docs/ runs.

Blocks are executed in order, each in a fresh namespace, with the substitutions
below applied (each must match some block, so that a changed snippet cannot
silently escape them). They shrink inputs so the suite stays fast; the text
beside each snippet says which.
"""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# (documented text, text run by the test): the MAT snippet (docs/models.md) with
# 32 frames, not 1024
SUBSTITUTIONS = [("torch.randn(2, 1, 128, 1024)", "torch.randn(2, 1, 128, 32)")]


def python_blocks() -> list[tuple[str, str]]:
    """(name, code) of every python block: ``FILE python block I``, I counted per file."""
    blocks = []
    for path in DOCUMENTS:
        found = re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)
        name = path.relative_to(ROOT)
        blocks += [(f"{name} python block {i}", code) for i, code in enumerate(found)]
    return blocks


def test_substitutions_match_the_readme():
    blocks = [code for _, code in python_blocks()]
    assert blocks, "the README and docs/ have python snippets"
    for old, _ in SUBSTITUTIONS:
        assert any(old in b for b in blocks), f"stale substitution: {old!r} in no snippet"


@pytest.mark.parametrize(
    ("name", "code"),
    python_blocks(),
    ids=[n.replace(" python block ", ":") for n, _ in python_blocks()],
)
def test_readme_python_block_runs(name, code):
    for old, new in SUBSTITUTIONS:
        code = code.replace(old, new)
    ns: dict = {"__name__": "doc_block"}
    torch.manual_seed(0)
    exec(compile(code, name, "exec"), ns)
    if "MAT" in ns and "mat" in ns:  # the MAT snippet: the shapes its comments give
        assert ns["logits"].shape == (2, 309)
        assert ns["cls"].shape == (2, 768)
        assert ns["tokens"].shape == (2, 1 + 8 * 1, 768)  # 32 frames -> 1 time token
        assert torch.isfinite(ns["loss"]) and ns["opt"].state, "the training step ran"


def test_mat_snippet_comments_hold():
    """What the snippet's comments say: feats.cls is mat.embed(x), mat.head(cls) is
    mat(x) in eval mode (checked on the tiny preset)."""
    from mmt_fast import create_model

    torch.manual_seed(0)
    mat = create_model("MAT-tiny", num_classes=5).eval()
    x = torch.randn(2, 1, *mat.cfg.input_size)
    with torch.no_grad():
        feats = mat.forward_features(x)
        torch.testing.assert_close(feats.cls, mat.embed(x), rtol=0, atol=0)
        torch.testing.assert_close(mat.head(feats.cls), mat(x), rtol=0, atol=0)
