"""The import graph of the package: no cycles, late imports only where they buy something, layers kept.

Every first-party module is found through the package-dir mapping of pyproject.toml (backends/ is
`hrmspec.backends`, runtime/ is `hrmspec.runtime`), and every `import` / `from ... import` in it is
an edge — at module level or inside a function alike, since a function-level import is a cycle
that waits for its first call. `from pkg import name` is an edge to `pkg.name` when that is a
module, else to `pkg`. Importing `a.b.c` runs the `__init__` of `a.b` first, so it is an edge to
`a.b` too, unless the importer lives in `a.b` itself (then that package is already being
initialised, and Python does not run it again).

A late import (inside a function or class body) is allowed only when it defers a dependency
that is optional (a GPU toolchain, transformers, tensorboard) or costs a noticeable share of a
CLI command's start (torch, matplotlib, reasoning-gym), or a first-party module that needs one of
those at import time: so `hrmspec validate` and `hrmspec show` start without torch, and the
package imports without triton or pyopencl.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
# imports worth deferring: optional dependencies, and required ones that are slow to import
DEFERRABLE = {"torch", "triton", "pyopencl", "cupy", "cuda", "nvidia", "transformers", "matplotlib",
              "reasoning_gym", "tensorboard", "wandb", "numpy", "safetensors", "tokenizers"}


def package_dirs() -> dict[str, Path]:
    """Package name -> folder, from pyproject.toml's [tool.setuptools.package-dir]."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {pkg: ROOT / folder for pkg, folder in cfg["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every first-party module name -> its file."""
    out: dict[str, Path] = {}
    dirs = package_dirs()
    for pkg, folder in dirs.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            # a folder mapped to a package of its own belongs to that package, not to its parent
            owner = max((p for p in dirs if name == p or name.startswith(p + ".")), key=len)
            if owner == pkg:
                out[name] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Imports(ast.NodeVisitor):
    """(target, line, late) for every import in a module; late: inside a function or class body."""

    def __init__(self, module: str, is_package: bool, known: set[str]):
        self.module, self.is_package, self.known = module, is_package, known
        self.found: list[tuple[str, int, bool]] = []
        self.depth = 0
        self.type_checking = 0

    def _scope(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _scope

    def visit_If(self, node: ast.If):
        guard = isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        self.type_checking += guard
        for child in node.body:
            self.visit(child)
        self.type_checking -= guard
        for child in node.orelse:
            self.visit(child)

    def _add(self, target: str, line: int):
        if not self.type_checking:  # annotations only: never executed
            self.found.append((target, line, self.depth > 0))

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom):
        base = _resolve(self.module, self.is_package, node)
        for alias in node.names:
            full = f"{base}.{alias.name}"
            self._add(full if full in self.known else base, node.lineno)


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _inside(module: str, package: str) -> bool:
    """Whether `package` is `module`'s own package or one above it (already initialising when it runs)."""
    return module.startswith(package + ".")


def import_graph() -> tuple[nx.DiGraph, list[tuple[str, str, int]]]:
    """The first-party import graph, and every late import as (module, target, line)."""
    mods = modules()
    known = set(mods)
    g = nx.DiGraph()
    g.add_nodes_from(known)
    late = []
    for name, path in mods.items():
        v = _Imports(name, path.name == "__init__.py", known)
        v.visit(ast.parse(path.read_text(), str(path)))
        for target, line, is_late in v.found:
            for t in (target, *_parents(target)):
                if t in known and t != name and not _inside(name, t):
                    g.add_edge(name, t, line=line)
            if is_late:
                late.append((name, target, line))
    return g, late


def cycles(g: nx.DiGraph) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (largest first)."""
    return sorted((sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1), key=len, reverse=True)


def top_level_needs(g: nx.DiGraph, mods: dict[str, Path]) -> dict[str, set[str]]:
    """Per first-party module, the deferrable third-party packages it imports at module level,
    itself or through the first-party modules it imports at module level."""
    direct: dict[str, set[str]] = {}
    top_edges = nx.DiGraph()
    for name, path in mods.items():
        v = _Imports(name, path.name == "__init__.py", set(mods))
        v.visit(ast.parse(path.read_text(), str(path)))
        direct[name] = {t.split(".")[0] for t, _, late in v.found if not late and t.split(".")[0] in DEFERRABLE}
        top_edges.add_node(name)
        for target, _, late in v.found:
            for t in (target, *_parents(target)):  # a package's __init__ runs before its modules
                if not late and t in mods and t != name and not _inside(name, t):
                    top_edges.add_edge(name, t)
    return {n: set().union(direct[n], *(direct[d] for d in nx.descendants(top_edges, n))) for n in mods}


def test_the_package_dir_mapping_finds_the_modules():
    mods = modules()
    for name in ("hrmspec.cli", "hrmspec.backends", "hrmspec.runtime.execution.compiled", "hrmspec.graph.body"):
        assert name in mods, name
    assert all(n == "hrmspec" or n.startswith("hrmspec.") for n in mods)


def test_no_import_cycles():
    g, _ = import_graph()
    found = cycles(g)
    shown = "\n".join(" <-> ".join(c) for c in found)
    assert not found, f"{len(found)} group(s) of modules import each other:\n{shown}"


def test_late_imports_only_defer_what_is_worth_deferring():
    g, late = import_graph()
    needs = top_level_needs(g, modules())
    bad = []
    for module, target, line in late:
        # what importing `target` from `module` loads: the target, and the packages above it that
        # `module` is not inside (their __init__ runs first)
        loads = set().union(*(needs.get(t, set()) for t in (target, *_parents(target))
                              if not _inside(module, t)))
        if target.split(".")[0] in DEFERRABLE or loads:
            continue
        what = "which needs nothing deferrable" if target.startswith("hrmspec") else "a cheap dependency"
        bad.append(f"{module}:{line} imports {target} inside a function, {what}")
    assert not bad, "\n".join(bad)


def test_the_runtime_imports_no_compiler_pass():
    """The runtime runs the plan `hrmspec.compile` hands it: it never builds graphs or fuses."""
    g, _ = import_graph()
    passes = {n for n in g if n.startswith("hrmspec.graph")} | {"hrmspec.compile"}
    execution = [n for n in g if n.startswith("hrmspec.runtime.execution")]
    reached = {t for n in execution for t in nx.descendants(g, n)} & passes
    assert not reached, sorted(reached)


def test_the_core_imports_no_backend_or_runtime():
    """spec -> IR -> graph: the language and the compiler know nothing of backends or training."""
    g, _ = import_graph()
    core = [n for n in g if n.startswith(("hrmspec.spec", "hrmspec.ir", "hrmspec.graph", "hrmspec.kinds"))]
    for n in core:
        above = {t for t in nx.descendants(g, n) if t.startswith(("hrmspec.backends", "hrmspec.runtime"))}
        assert not above, (n, sorted(above))


@pytest.mark.skipif(sys.platform == "win32", reason="fresh-interpreter check")
def test_validate_and_show_start_without_torch(tmp_path):
    """The commands that only read a spec never import torch (about a second of start-up), the roofline included."""
    import subprocess

    code = ("import sys; from hrmspec.cli import main; main(['validate', 'hrm-text-tiny']); "
            "main(['show', 'hrm-text-tiny', '--seq-len', '64']); "
            "main(['show', 'hrm-text-tiny', '--seq-len', '64', '--roofline', 'h100', '--json']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# runtime/ reads bottom-up; each layer imports only the layers below it (and itself), never a peer
LAYERS = (
    ("hrmspec.runtime.execution",),                          # the model, its driver, where it runs
    ("hrmspec.runtime.artifacts",),                          # checkpoints, run folders, tokenizers, data
    ("hrmspec.runtime.evaluate", "hrmspec.runtime.interop"),  # held-out evaluation | other tools' formats
    ("hrmspec.runtime.training",),                           # the loop, objectives, optimizers, compare
    ("hrmspec.cli",),                                        # every command, in one package
)


def layer_of(module: str) -> tuple[int, str] | None:
    for rank, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                return rank, name
    return None


def layer_violations(g: nx.DiGraph) -> list[str]:
    bad = []
    for src, dst, data in g.edges(data=True):
        a, b = layer_of(src), layer_of(dst)
        if a is None or b is None or a[1] == b[1]:
            continue
        if b[0] >= a[0]:
            how = "a peer" if b[0] == a[0] else "a layer above"
            bad.append(f"{src}:{data['line']} imports {dst}, {how}")
    return sorted(bad)


def test_every_runtime_module_sits_in_a_layer():
    loose = [m for m in modules() if m.startswith("hrmspec.runtime.") and layer_of(m) is None]
    assert loose == [], f"modules outside execution / artifacts / evaluate / interop / training: {loose}"


def test_the_runtime_layers_import_only_downward():
    g, _ = import_graph()
    bad = layer_violations(g)
    assert not bad, "\n".join(bad)


def test_the_layer_check_sees_an_upward_import():
    """The check itself can fail: an edge from the model up to interop, and one between peers, are named."""
    g = nx.DiGraph()
    g.add_edge("hrmspec.runtime.execution.compiled", "hrmspec.runtime.interop.export", line=7)
    g.add_edge("hrmspec.runtime.interop.convert", "hrmspec.runtime.evaluate.heldout", line=3)
    g.add_edge("hrmspec.runtime.training.loop", "hrmspec.runtime.artifacts.data", line=1)  # downward: fine
    assert layer_violations(g) == [
        "hrmspec.runtime.execution.compiled:7 imports hrmspec.runtime.interop.export, a layer above",
        "hrmspec.runtime.interop.convert:3 imports hrmspec.runtime.evaluate.heldout, a peer",
    ]
