"""The package's layering, read from the source (every import statement, at module level
or inside functions): the commands reach the trainer only through the public inference
module, no module imports another's private names, and the library never imports the
commands (docs/design.md, "Layers")."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).parents[1] / "mmt_fast"
MODULES = sorted(p for p in PKG.rglob("*.py") if "kernels" not in p.relative_to(PKG).parts)


def _name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of each import in ``path``, relative imports resolved."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = _name(path).split(".")
                base = base[: len(base) - node.level + (path.name == "__init__.py")]
                mod = ".".join([*base, mod] if mod else base)
            out.append((mod, [a.name for a in node.names]))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            if node.args and isinstance(node.args[0], ast.Constant):
                out.append((node.args[0].value, []))
    return out


def test_the_scan_sees_the_imports():
    names = [_name(p) for p in MODULES]
    assert "mmt_fast.inference" in names and "mmt_fast.commands.predict" in names
    imports = dict(_imports(PKG / "commands" / "predict.py"))
    assert "mmt_fast.inference" in imports and "load_run" in imports["mmt_fast.inference"]
    assert ("mmt_fast.commands.plan", []) in _imports(PKG / "cli.py")  # __import__("...")


@pytest.mark.parametrize("path", sorted((PKG / "commands").glob("*.py")), ids=lambda p: p.stem)
def test_commands_use_the_inference_module_not_the_trainer(path):
    bad = [m for m, _ in _imports(path) if m == "mmt_fast.train" or m.startswith("mmt_fast.train.")]
    bad += [
        f"mmt_fast.train.{n}"
        for m, ns in _imports(path)
        if m == "mmt_fast"
        for n in ns
        if n == "train"
    ]
    assert not bad, f"{path.name} imports {bad}: use mmt_fast.inference"


def test_no_private_names_across_modules():
    found = []
    for path in MODULES:
        for mod, names in _imports(path):
            if mod.startswith("mmt_fast") and mod != _name(path):
                found += [f"{_name(path)}: {mod}.{n}" for n in names if n.startswith("_")]
    assert not found, found


def test_the_library_does_not_import_the_commands():
    found = []
    for path in MODULES:
        me = _name(path)
        if me == "mmt_fast.cli" or me.startswith("mmt_fast.commands"):
            continue
        found += [f"{me}: {m}" for m, _ in _imports(path) if m.startswith("mmt_fast.commands")]
    assert not found, found


# the layers under the trainer (docs/design.md, "Layers"): data, models, layers, losses,
# configs and the kernels know nothing of mmt_fast.train
BELOW_TRAIN = ("mmt_fast.data", "mmt_fast.models", "mmt_fast.layers", "mmt_fast.losses",
               "mmt_fast.config", "mmt_fast.registry", "mmt_fast.errors")  # fmt: skip


def test_the_layers_below_the_trainer_do_not_import_it():
    found = []
    for path in MODULES:
        me = _name(path)
        if not me.startswith(BELOW_TRAIN):
            continue
        found += [f"{me}: {m}" for m, _ in _imports(path) if m.startswith("mmt_fast.train")]
    assert not found, found
