"""The package's layering, read from the source (every import statement, at module level
or inside functions; docs/design.md, "Layers"): each module sits on a floor and imports
only from its own floor or below; the trainer and inference share the run layer and never
import each other; only the ``train`` command reaches the trainer; no module imports
another's private names; and no import is deferred into a function to dodge a cycle."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PKG = ROOT / "mmt_fast"
KERNELS = ROOT / "kernels"  # installed as mmt_fast.kernels (pyproject.toml, package-dir)
MODULES = sorted([*PKG.rglob("*.py"), *KERNELS.glob("*.py")])

# bottom to top; a module's floor is that of the longest prefix that names it
FLOORS = (
    ("mmt_fast.errors",),
    ("mmt_fast.kernels",),
    ("mmt_fast.layers", "mmt_fast.losses"),
    ("mmt_fast", "mmt_fast.config", "mmt_fast.registry", "mmt_fast.models"),
    ("mmt_fast.data", "mmt_fast.pretrained", "mmt_fast.profiling"),
    ("mmt_fast.run",),
    ("mmt_fast.train", "mmt_fast.inference"),
    ("mmt_fast.tools",),
    ("mmt_fast.commands",),
    ("mmt_fast.cli",),
)


def _name(path: Path) -> str:
    if path.parent == KERNELS:
        parts = ("mmt_fast", "kernels", path.stem)
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


NAMES = {_name(p) for p in MODULES}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _walk(node: ast.AST, in_function: bool, in_type_checking: bool):
    for child in ast.iter_child_nodes(node):
        fn = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        tc = in_type_checking or _is_type_checking(child)
        yield child, fn, tc
        yield from _walk(child, fn, tc)


def _imports(path: Path) -> list[tuple[str, list[str], str]]:
    """(module, names, where) of each import in ``path``, relative imports resolved and
    ``from package import submodule`` read as an import of the submodule; ``where`` is
    "module", "function" or "type_checking"."""
    out = []
    me = _name(path)
    for node, in_function, in_tc in _walk(ast.parse(path.read_text()), False, False):
        where = "type_checking" if in_tc else "function" if in_function else "module"
        if isinstance(node, ast.Import):
            out += [(a.name, [], where) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = me.split(".")
                base = base[: len(base) - node.level + (path.name == "__init__.py")]
                mod = ".".join([*base, mod] if mod else base)
            names = [a.name for a in node.names]
            subs = [n for n in names if f"{mod}.{n}" in NAMES]
            out += [(f"{mod}.{n}", [], where) for n in subs]
            if len(subs) < len(names):
                out.append((mod, [n for n in names if n not in subs], where))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            if node.args and isinstance(node.args[0], ast.Constant):
                out.append((node.args[0].value, [], where))
    return out


IMPORTS = {_name(p): _imports(p) for p in MODULES}


def _floor(module: str) -> int:
    best, floor = -1, None
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, floor = len(p), i
    assert floor is not None, f"{module} is on no floor: add it to FLOORS and docs/design.md"
    return floor


def _project(mod: str) -> bool:
    return mod == "mmt_fast" or mod.startswith("mmt_fast.")


def _loaded_by_import(module: str) -> set[str]:
    """What ``import module`` executes: the module, its parent packages, and everything
    they import at module level, transitively (TYPE_CHECKING blocks do not run)."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        parts = m.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name in NAMES and name not in seen:
                seen.add(name)
                todo += [t for t, _, w in IMPORTS[name] if w == "module" and _project(t)]
    return seen


def test_the_scan_sees_the_imports():
    assert {"mmt_fast.inference", "mmt_fast.commands.predict", "mmt_fast.kernels.dispatch"} <= NAMES
    imports = {m: (ns, w) for m, ns, w in IMPORTS["mmt_fast.tools.predict"]}
    assert "clip_dataset" in imports["mmt_fast.inference"][0]
    assert imports["mmt_fast.inference"][1] == "module"
    # a function-level import, and `from package import submodule`
    assert ("mmt_fast.train.trainer", ["train"], "function") in IMPORTS["mmt_fast.commands.train"]
    assert ("mmt_fast.losses", [], "module") in IMPORTS["mmt_fast.models.mmt"]
    assert ("mmt_fast.kernels.dispatch", [], "module") in IMPORTS["mmt_fast.kernels.tuning"]
    assert any(w == "type_checking" for _, _, w in IMPORTS["mmt_fast.commands.plan"])
    # what an import executes follows the package __init__s
    assert "mmt_fast.run.checkpoint" in _loaded_by_import("mmt_fast.run.config")


@pytest.mark.parametrize("module", sorted(NAMES))
def test_imports_go_down_the_floors(module):
    mine = _floor(module)
    up = [t for t, _, _ in IMPORTS[module] if _project(t) and _floor(t) > mine]
    assert not up, f"{module} (floor {mine}) imports from above: {up}"


def test_trainer_and_inference_do_not_import_each_other():
    found = []
    for me, imports in IMPORTS.items():
        if me == "mmt_fast.train" or me.startswith("mmt_fast.train."):
            found += [f"{me}: {t}" for t, _, _ in imports if t.startswith("mmt_fast.inference")]
            found += [f"{me}: {t}" for t, _, _ in imports if t.startswith("mmt_fast.commands")]
        if me == "mmt_fast.inference":
            found += [f"{me}: {t}" for t, _, _ in imports if t.startswith("mmt_fast.train")]
    assert not found, found


def test_only_the_train_command_reaches_the_trainer():
    found = [
        f"{me}: {t}"
        for me, imports in IMPORTS.items()
        if not me.startswith("mmt_fast.train") and me != "mmt_fast.commands.train"
        for t, _, _ in imports
        if t == "mmt_fast.train" or t.startswith("mmt_fast.train.")
    ]
    assert not found, f"{found}: the commands use mmt_fast.inference and mmt_fast.run"


def test_no_import_is_deferred_to_dodge_a_cycle():
    """A function-level import of a project module is fine (the commands import torch only
    when they run, so that --help answers at once), unless importing that module at the top
    would import this one: then the import only hides a cycle."""
    found = []
    for me, imports in IMPORTS.items():
        for t, _, w in imports:
            if w == "function" and _project(t) and me in _loaded_by_import(t):
                found.append(f"{me} defers importing {t}, which imports {me}")
    assert not found, found


def test_no_private_names_across_modules():
    """(The kernels' private helpers, such as ``_relq``, are shared inside their package.)"""
    found = []
    for me, imports in IMPORTS.items():
        if me.startswith("mmt_fast.kernels"):
            continue
        for mod, names, _ in imports:
            if _project(mod) and mod != me:
                found += [f"{me}: {mod}.{n}" for n in names if n.startswith("_")]
    assert not found, found


def test_the_library_does_not_import_the_commands():
    found = []
    for me, imports in IMPORTS.items():
        if me == "mmt_fast.cli" or me.startswith("mmt_fast.commands"):
            continue
        found += [f"{me}: {m}" for m, _, _ in imports if m.startswith("mmt_fast.commands")]
    assert not found, found


def test_the_cli_dispatches_every_command_module():
    """cli.py builds its parser from the command modules (each with HELP, DESCRIPTION,
    add_arguments and run) and holds no command of its own."""
    from mmt_fast import cli

    modules = {p.stem for p in (PKG / "commands").glob("*.py") if p.stem != "__init__"}
    assert {c.replace("-", "_") for c in cli.COMMANDS} == modules
    for name in cli.COMMANDS:
        mod = cli.command_module(name)
        assert callable(mod.run) and callable(mod.add_arguments) and mod.HELP, name
    tree = ast.parse((PKG / "cli.py").read_text())
    defs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert set(defs) <= {"command_module", "build_parser", "_run", "error_exit_code", "main"}, defs


def test_command_modules_import_only_the_standard_library_at_the_top():
    """The parser is built from every command module, so ``mmt-fast --help`` imports them
    all: at module level they import the standard library and mmt_fast.errors only (torch
    and the library inside ``run``)."""
    import sys

    found = []
    for me, imports in IMPORTS.items():
        if not me.startswith("mmt_fast.commands") and me != "mmt_fast.cli":
            continue
        for t, _, w in imports:
            top = t.split(".")[0]
            ok = t == "mmt_fast.errors" or top == "__future__" or top in sys.stdlib_module_names
            if w == "module" and not ok:
                found.append(f"{me}: {t}")
    assert not found, found
