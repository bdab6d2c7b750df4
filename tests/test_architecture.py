"""The package's import structure (CONTRIBUTING.md, "Layout"): imports point one way through the
layers, no module imports another module's private names, there are no import circles, and
imports inside functions are kept for the optional heavy dependencies (Triton through
`kvbudget.kernels`, FastAPI through `kvbudget.serve.app`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kvbudget

ROOT = Path(kvbudget.__file__).parent
# Lower layers first: a module may import its own layer and the ones before it.
LAYERS = ["errors", "fileio", "transfer", "kernels", "kv", "compress", "methods", "runtime", "eval", "serve",
          "distributed", "cli", "__init__"]
# Packages whose import pulls in an optional heavy dependency (Triton, FastAPI): the only ones
# imported inside functions.
LAZY = ("kvbudget.kernels", "kvbudget.serve")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = (ast.parse(path.read_text(encoding="utf-8")), path.name == "__init__.py")
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, list[str], bool]]:
    """(target module, imported names, inside a function) for each kvbudget import of ``name``."""
    tree, is_pkg = MODULES[name]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = name.split(".") if is_pkg else name.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target == "kvbudget" or target.startswith("kvbudget."):
            found.append((target, [a.name for a in node.names], node.col_offset > 0))
    return found


def _resolve(target: str, names: list[str]) -> list[str]:
    """The modules an import reads: ``from . import x`` names submodules."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    return subs or [target]


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1] if len(parts) > 1 else "__init__")


def test_every_module_belongs_to_a_layer():
    assert all(m.split(".")[1] in LAYERS for m in MODULES if "." in m)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_the_layers(name):
    if name == "kvbudget":
        return
    for target, names, _ in _imports(name):
        for module in _resolve(target, names):
            assert _layer(module) <= _layer(name), f"{name} imports {module}, a layer above it"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_names_across_modules(name):
    for target, names, _ in _imports(name):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private or target == name, f"{name} imports private {private} from {target}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_function_level_imports_only_for_optional_dependencies(name):
    for target, names, inside in _imports(name):
        if inside:
            modules = _resolve(target, names)
            assert all(m in LAZY or m.startswith(tuple(p + "." for p in LAZY)) for m in modules), \
                f"{name} imports {modules} inside a function"


def test_no_import_circles():
    graph = {m: {t for target, names, inside in _imports(m) if not inside for t in _resolve(target, names)
                 if t in MODULES and t != m} for m in MODULES}
    # A package's __init__ importing its own submodules is not a circle through them.
    for m, targets in graph.items():
        graph[m] = {t for t in targets if not m.startswith(t + ".")}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
