"""Imports go one way (docs/design.md section 3): no cycle in python/fastdfa, and each layer imports
only the layers below it.

The graph is read from the source with ast: every ``import`` and ``from ... import`` statement at any
depth (inside functions too, so a function-level import cannot hide a cycle) and every
``importlib.import_module("...")`` call with a literal name. Importing ``a.b.c`` also runs the
packages ``a.b`` (their ``__init__``), except the top-level ``fastdfa`` front, which every module
would otherwise depend on.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(ROOT, "python", "fastdfa")


def _modules() -> dict[str, str]:
    """module name -> file path, for every .py under python/fastdfa (following the triton_kernels link)."""
    out = {}
    for dirpath, _, files in os.walk(PACKAGE_DIR, followlinks=True):
        rel = os.path.relpath(dirpath, PACKAGE_DIR)
        parts = ["fastdfa"] + ([] if rel == "." else rel.split(os.sep))
        for f in files:
            if f.endswith(".py"):
                name = ".".join(parts if f == "__init__.py" else parts + [f[:-3]])
                out[name] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _package_of(module: str) -> str:
    is_package = MODULES[module].endswith("__init__.py")
    return module if is_package else module.rsplit(".", 1)[0]


def _resolve(module: str, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = _package_of(module).split(".")
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _with_parents(name: str) -> set[str]:
    """``name`` and the packages Python runs to import it, within fastdfa (not the front)."""
    out, parts = set(), name.split(".")
    for i in range(2, len(parts) + 1):
        candidate = ".".join(parts[:i])
        if candidate in MODULES:
            out.add(candidate)
    return out


def imports_of(module: str) -> set[str]:
    tree = ast.parse(open(MODULES[module]).read(), MODULES[module])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found |= _with_parents(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module)
            found |= _with_parents(base)
            for alias in node.names:  # "from pkg import submodule"
                found |= _with_parents(f"{base}.{alias.name}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found |= _with_parents(node.args[0].value)
    # The packages that hold ``module`` run before it anyway: importing a sibling adds no edge to them.
    return {m for m in found if m.startswith("fastdfa.") and m != module and not module.startswith(m + ".")}


GRAPH = {m: imports_of(m) for m in MODULES}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_is_read_from_the_source():
    """The reader sees what the modules import (so the checks below can fail)."""
    assert "fastdfa.engine.recording" in GRAPH["fastdfa.dfa"]
    assert "fastdfa.layers" in GRAPH["fastdfa.engine.fused"]
    assert "fastdfa.backends.triton_ops" in GRAPH["fastdfa.backends"]  # importlib.import_module, lazily
    assert "fastdfa.ops.dfa_project" in GRAPH["fastdfa.triton_kernels.dfa_project"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for nxt in GRAPH.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# What each part may import, at any distance (docs/design.md section 3).
BELOW = {
    "fastdfa.layers": {"fastdfa.activations", "fastdfa.feedback"},
    "fastdfa.ops": {"fastdfa.activations"},
    "fastdfa.backends": {"fastdfa.activations", "fastdfa.config", "fastdfa.ops", "fastdfa.triton_kernels",
                         "fastdfa.backends"},
    "fastdfa.engine": {"fastdfa.activations", "fastdfa.config", "fastdfa.feedback", "fastdfa.layers", "fastdfa.ops",
                       "fastdfa.triton_kernels", "fastdfa.engine"},
    # a front like dfa: the wrapper and the engine below it, the models it knows how to split
    "fastdfa.distributed": {"fastdfa.dfa", "fastdfa.engine", "fastdfa.backends", "fastdfa.config", "fastdfa.layers",
                            "fastdfa.models", "fastdfa.activations", "fastdfa.feedback", "fastdfa.ops",
                            "fastdfa.triton_kernels", "fastdfa.distributed",
                            # the wrapper's from_pretrained re-converts a saved model
                            "fastdfa.pretrained", "fastdfa.targets", "fastdfa.convert", "fastdfa.views"},
    # the options and their choices: a leaf, so that every part may take its choices from it
    "fastdfa.config": set(),
    # what prepare / from_pretrained use to pick the modules to convert; never the wrapper
    "fastdfa.targets": {"fastdfa.convert", "fastdfa.layers", "fastdfa.activations", "fastdfa.feedback"},
    "fastdfa.pretrained": {"fastdfa.config", "fastdfa.targets", "fastdfa.convert", "fastdfa.layers",
                           "fastdfa.activations", "fastdfa.feedback"},
}


@pytest.mark.parametrize("part", sorted(BELOW))
def test_each_part_imports_only_what_lies_below_it(part):
    allowed = BELOW[part]
    for module in MODULES:
        if module == part or module.startswith(part + "."):
            bad = {m for m in _reachable(module)
                   if m != module and not any(m == a or m.startswith(a + ".") for a in allowed | {part})}
            assert not bad, f"{module} reaches {sorted(bad)}"


def test_the_library_never_imports_the_lab():
    for module in MODULES:
        if not module.startswith("fastdfa.lab") and module != "fastdfa.__main__":
            lab = {m for m in _reachable(module) if m.startswith("fastdfa.lab")}
            assert not lab, f"library module {module} reaches the lab: {sorted(lab)}"


MAX_CLASS_LINES = 250  # issue "Layout": an engine split into small parts
# "module.Class": why it may be longer (CONTRIBUTING.md, "Class size"): only a class whose parts would reach
# back into it if split. None needs it today.
LONG_CLASSES: dict[str, str] = {}


def test_no_class_over_250_lines():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(open(path).read(), path)):
            name = f"{module}.{node.name}" if isinstance(node, ast.ClassDef) else None
            if name and name not in LONG_CLASSES and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long.append(f"{name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def test_every_allowed_long_class_exists_and_says_why():
    classes = {f"{module}.{node.name}" for module, path in MODULES.items()
               for node in ast.walk(ast.parse(open(path).read(), path)) if isinstance(node, ast.ClassDef)}
    for name, why in LONG_CLASSES.items():
        assert name in classes and len(why) > 20, name
