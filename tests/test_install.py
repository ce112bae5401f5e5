"""The installed layout: mmt-fast installs one top-level package, ``mmt_fast`` (the
Triton kernels as ``mmt_fast.kernels``; ``benchmarks/`` is not installed), so it
neither shadows nor is shadowed by another distribution's ``kernels`` (Hugging
Face's kernel hub, which transformers can load) or ``benchmarks``.

The test builds this project from a copy of its sources and installs it (not
editable, without dependencies) with ``kernels==0.17.2`` from PyPI into one
fresh folder put first on ``PYTHONPATH`` (the running environment supplies
torch and triton). A fresh interpreter, started outside the repository and at
its root, must then import Hugging Face's ``kernels`` as ``kernels`` and this
project's ops as ``mmt_fast.kernels``, each from its own files, and the fused
attention must agree with a float64 brute-force reference. Needs PyPI (CI has
it); about 20-40 s, most of it pip building the wheel.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
HF_KERNELS = "kernels==0.17.2"

CHECK = r"""
import importlib.util, json, math, sys
import torch
import kernels
import mmt_fast
from mmt_fast.kernels.relpos_attention import relpos_attention

# the project's op against a brute-force float64 reference, one axis of n tokens,
# a CLS token and a relative-position table: bias[i, j] = q_i . R[i - j + n - 1]
torch.manual_seed(0)
n, d, scale = 6, 8, 0.3
q, k, v = (torch.randn(1, 2, n + 1, d, dtype=torch.float64) for _ in range(3))
table = torch.randn(2 * n - 1, d, dtype=torch.float64)
out = relpos_attention(q, k, v, [table], (n,), (n,), True, scale)
ref = torch.empty_like(out)
for h in range(2):
    for i in range(n + 1):
        s = [float(q[0, h, i] @ k[0, h, j]) * scale for j in range(n + 1)]
        for j in range(1, n + 1):
            if i > 0:
                s[j] += float(q[0, h, i] @ table[(i - 1) - (j - 1) + n - 1])
        m = max(s)
        w = [math.exp(x - m) for x in s]
        ref[0, h, i] = sum(wj * v[0, h, j] for j, wj in enumerate(w)) / sum(w) + q[0, h, i]
err = float((out - ref).abs().max())

model = mmt_fast.create_model("MAT-tiny", num_classes=3).eval()
with torch.no_grad():
    logits = model(torch.randn(2, 1, *model.cfg.input_size))

print(json.dumps({
    "kernels": kernels.__file__,
    "kernels_has_project_files": importlib.util.find_spec("kernels.relpos_attention") is not None,
    "hf_names": [n for n in ("LayerRepository", "kernelize", "get_kernel") if hasattr(kernels, n)],
    "mmt_fast": mmt_fast.__file__,
    "op": sys.modules["mmt_fast.kernels.relpos_attention"].__file__,
    "benchmarks": getattr(importlib.util.find_spec("benchmarks"), "origin", None),
    "max_error": err,
    "logits": list(logits.shape),
    "finite": bool(torch.isfinite(logits).all()),
}))
"""


def _copy_sources(dest: Path) -> Path:
    """What a wheel is built from: pyproject.toml, README.md, mmt_fast/ (its kernels
    link kept as a link) and kernels/."""
    dest.mkdir()
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / f).exists():
            shutil.copy(ROOT / f, dest / f)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "mmt_fast", dest / "mmt_fast", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "kernels", dest / "kernels", ignore=ignore)
    assert (dest / "mmt_fast" / "kernels").is_symlink()
    return dest


def _check(cwd: Path, site: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    r = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_installs_beside_huggingface_kernels(tmp_path):
    src = _copy_sources(tmp_path / "src")
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--quiet"]
    r = subprocess.run(
        [*pip, "--target", str(site), str(src), HF_KERNELS],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"pip install (needs PyPI for {HF_KERNELS}):\n{r.stderr[-3000:]}"
    top = {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))}
    # one top-level package of ours (no `kernels` or `benchmarks` of ours); HF's kernels
    assert top - {"bin"} == {"mmt_fast", "kernels"}, top
    assert (site / "kernels" / "__init__.py").is_file()  # Hugging Face's, a regular package
    assert (site / "mmt_fast" / "kernels" / "relpos_attention.py").is_file()
    assert not (site / "mmt_fast" / "kernels" / "__init__.py").exists()

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for where, cwd, ours in (("outside", outside, site), ("repository root", ROOT, ROOT)):
        res = _check(cwd, site)
        bench = res["benchmarks"]
        print(where, res)
        # Hugging Face's package is `kernels`, whole: its own __init__, none of our files
        assert Path(res["kernels"]) == site / "kernels" / "__init__.py", (where, res)
        assert not res["kernels_has_project_files"], (where, res)
        assert res["hf_names"] == ["LayerRepository", "kernelize", "get_kernel"], (where, res)
        # ours is mmt_fast.kernels, from the same mmt_fast as the package
        assert Path(res["mmt_fast"]) == ours / "mmt_fast" / "__init__.py", (where, res)
        op = Path(res["op"])
        assert op.parent == ours / "mmt_fast" / "kernels" and op.name == "relpos_attention.py"
        assert res["max_error"] < 1e-10, (where, res)
        assert res["logits"] == [2, 3] and res["finite"], (where, res)
        # benchmarks/ is the repository root's only: never installed
        if cwd == ROOT:
            assert Path(bench) == ROOT / "benchmarks" / "__init__.py", (where, res)
        else:
            assert bench is None or not Path(bench).is_relative_to(site), (where, res)
