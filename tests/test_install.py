"""The installed layout: mmt-fast installs one top-level package, ``mmt_fast``, with the
Triton kernels of the top-level ``kernels/`` folder as ``mmt_fast.kernels`` (setuptools'
``package-dir`` in pyproject.toml, no symbolic link); ``benchmarks/`` is not installed. So
it neither shadows nor is shadowed by another distribution's ``kernels`` (Hugging Face's
kernel hub, which transformers can load) or ``benchmarks``.

The slow test builds the wheel from a clean export of the repository (the files git
tracks, as a checkout without symlink support would have them), finds every kernel file
in it, and installs it (without dependencies) with ``kernels==0.17.2`` from PyPI into one
fresh folder put first on ``PYTHONPATH`` (the running environment supplies torch and
triton). A fresh interpreter outside the repository must then import Hugging Face's
``kernels`` as ``kernels`` and this project's ops as ``mmt_fast.kernels``, each from its
own files, and the fused attention must agree with a float64 brute-force reference. Needs
PyPI (CI has it); about 20-40 s, most of it pip building the wheel.

The other tests take a second or a few: the package list against the folders, no
symbolic link in the repository, ``import kernels.relpos_attention`` from the repository
root refused (no second copy of an op), and the reference path importing and running when
Triton is missing or broken.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
HF_KERNELS = "kernels==0.17.2"
KERNEL_FILES = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))

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


def _tracked_files() -> list[Path]:
    """The repository's files as a clean checkout has them: tracked by git (or not ignored,
    for files added but not yet committed), present in the working tree."""
    r = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [Path(f) for f in r.stdout.split("\0") if f and (ROOT / f).is_file()]


def _export(dest: Path) -> Path:
    """A clean export of the repository: regular files only (as with core.symlinks=false)."""
    for f in _tracked_files():
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / f, dest / f)
    return dest


def _packages_on_disk() -> set[str]:
    pkgs = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "mmt_fast").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    return pkgs | {"mmt_fast.kernels"}


def test_packaging_config_lists_every_package():
    """pyproject.toml lists the packages explicitly (find cannot see mmt_fast.kernels, which
    is the folder kernels/): every package folder is listed, and only those."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(cfg["packages"]) == _packages_on_disk()
    assert cfg["package-dir"] == {"mmt_fast.kernels": "kernels"}
    assert (ROOT / "kernels" / "__init__.py").is_file()
    assert not (ROOT / "mmt_fast" / "kernels").exists()


def test_no_symbolic_link_in_the_repository():
    links = [str(f) for f in _tracked_files() if (ROOT / f).is_symlink()]
    r = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True)
    links += [line.split("\t")[-1] for line in r.stdout.splitlines() if line.startswith("120000")]
    assert not links, links


def test_kernels_cannot_be_imported_a_second_time_from_the_root():
    """From the repository root, ``kernels`` is found as a folder; it refuses to be a
    package of its own, so no second copy of an op (own dispatch state) can exist."""
    code = (
        "import sys\n"
        "try:\n    import kernels.relpos_attention\nexcept ImportError as e:\n"
        "    print('refused:', e)\nelse:\n    print('imported')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('kernels', 'mmt_fast'))))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    first, modules = r.stdout.splitlines()
    assert first.startswith("refused:") and "mmt_fast.kernels" in first, r.stdout
    assert modules == "[]", modules  # nothing of the op was executed


# the reference path without a usable Triton: a blocker on sys.meta_path, or a package
# named triton first on sys.path whose import fails as a broken installation's would
NO_TRITON = {
    "missing": (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('No module named ' + repr(name))\n"
        "sys.meta_path.insert(0, Block())\n"
    ),
    "broken": "",  # a fake triton package on PYTHONPATH (see the test)
}
RUN_REFERENCE = r"""
import json, math, torch
import mmt_fast
from mmt_fast.kernels import dispatch
from mmt_fast.kernels.relpos_attention import relpos_attention
torch.manual_seed(0)
q, k, v = (torch.randn(1, 1, 5, 4, dtype=torch.float64) for _ in range(3))
table = torch.randn(7, 4, dtype=torch.float64)
out = relpos_attention(q, k, v, [table], (4,), (4,), True, 0.5)
model = mmt_fast.create_model("MAT-tiny", num_classes=3).eval()
with torch.no_grad():
    logits = model(torch.randn(1, 1, *model.cfg.input_size))
try:  # forced, the Triton path is refused by name before any launch
    with dispatch.use("triton"):
        relpos_attention(q, k, v, [table], (4,), (4,), True, 0.5)
    refused = ""
except dispatch.KernelUnsupportedError as e:
    refused = str(e)
print(json.dumps({"finite": bool(torch.isfinite(out).all() and torch.isfinite(logits).all()),
                  "shape": list(logits.shape), "refused": "Triton cannot be imported" in refused}))
"""


@pytest.mark.parametrize("how", sorted(NO_TRITON))
def test_reference_path_imports_without_a_usable_triton(tmp_path, how):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if how == "broken":
        fake = tmp_path / "fake" / "triton"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text(
            "raise ImportError('libtriton.so: cannot open shared object file (a broken install)')\n"
        )
        env["PYTHONPATH"] = os.pathsep.join([str(fake.parent), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", NO_TRITON[how] + RUN_REFERENCE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"finite": True, "shape": [1, 3], "refused": True}


def _check(cwd: Path, site: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    r = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_wheel_from_a_clean_export_installs_beside_huggingface_kernels(tmp_path):
    src = _export(tmp_path / "src")
    assert not any(p.is_symlink() for p in src.rglob("*"))
    pip = [sys.executable, "-m", "pip"]
    r = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-input", "--quiet", "-w", str(tmp_path / "dist"), src],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"pip wheel:\n{r.stderr[-3000:]}"
    (wheel,) = (tmp_path / "dist").glob("mmt_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # every kernel file, as mmt_fast/kernels/<file>; every module of the package
    assert {f"mmt_fast/kernels/{f}" for f in KERNEL_FILES} <= names
    ours = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "mmt_fast").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert ours <= names, sorted(ours - names)
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"mmt_fast"}, tops

    site = tmp_path / "site"
    r = subprocess.run(
        [
            *pip,
            "install",
            "--no-deps",
            "--no-input",
            "--quiet",
            "--target",
            site,
            wheel,
            HF_KERNELS,
        ],
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

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    res = _check(outside, site)
    print(res)
    # Hugging Face's package is `kernels`, whole: its own __init__, none of our files
    assert Path(res["kernels"]) == site / "kernels" / "__init__.py", res
    assert not res["kernels_has_project_files"], res
    assert res["hf_names"] == ["LayerRepository", "kernelize", "get_kernel"], res
    # ours is mmt_fast.kernels, from the same mmt_fast as the package
    assert Path(res["mmt_fast"]) == site / "mmt_fast" / "__init__.py", res
    op = Path(res["op"])
    assert op.parent == site / "mmt_fast" / "kernels" and op.name == "relpos_attention.py"
    assert res["max_error"] < 1e-10, res
    assert res["logits"] == [2, 3] and res["finite"], res
    # benchmarks/ is the repository root's only: never installed
    assert res["benchmarks"] is None or not Path(res["benchmarks"]).is_relative_to(site), res
