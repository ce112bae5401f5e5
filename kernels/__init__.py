"""The fused Triton ops of mmt-fast, installed and imported only as ``mmt_fast.kernels``
(pyproject.toml maps that package name onto this folder; see kernels/README.md).

Imported under any other name (``import kernels.relpos_attention`` from the repository
root) it refuses: a second copy of an op module would register its custom ops again and
keep its own dispatch state.
"""

if __name__ != "mmt_fast.kernels":
    raise ImportError(
        f"{__file__} is the package mmt_fast.kernels: import mmt_fast.kernels.<op> after "
        "`pip install -e .` (this folder is not a top-level package of its own)"
    )
