"""The backend contract: package boundaries, the registry every caller reads, the op tables, and
fallbacks observed per call."""

import ast
import dataclasses
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import hrmspec
from hrmspec.backends import BACKENDS, REGISTRY, get_backend
from hrmspec.backends.common import fallback
from hrmspec.backends.common.contract import OpTable
from hrmspec.backends.common.kernel_table import KernelTable, flattens
from hrmspec.cli import build_parser
from hrmspec.emit import TARGETS
from hrmspec.ir import library

BACKENDS_DIR = Path(hrmspec.backends.__file__).parent
# the backend packages; common is shared, __init__ the registry
PACKAGES = ("reference", "inductor", "triton", "cstyle")


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at any depth (inside functions too), relative ones
    resolved to their absolute hrmspec.backends name."""
    package = ["hrmspec", "backends", *path.relative_to(BACKENDS_DIR).parent.parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # `from hrmspec.backends import triton` imports the package triton
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names] + [(node.lineno, base)]
    return found


def _backend_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["hrmspec", "backends"] and len(parts) > 2:
        return parts[2]
    return None


def test_no_backend_package_imports_another():
    crossings = set()
    for path in sorted(BACKENDS_DIR.rglob("*.py")):
        own = path.relative_to(BACKENDS_DIR).parts[0]
        if own == "__init__.py":
            continue  # the registry builds every backend
        for line, module in _imported(path):
            other = _backend_of(module)
            # a backend package imports common only; common imports no backend package
            if other in PACKAGES and other != own and (own in PACKAGES or own == "common"):
                crossings.add(f"backends/{path.relative_to(BACKENDS_DIR)}:{line} imports backends/{other}")
    assert not crossings, "\n".join(sorted(crossings))


def test_the_boundary_check_sees_nested_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "cstyle"
    pkg.mkdir()
    (pkg / "x.py").write_text("def f():\n    from ..triton import launch\n"
                              "    import hrmspec.backends.reference.naive\n")
    monkeypatch.setattr(sys.modules[__name__], "BACKENDS_DIR", tmp_path)
    assert {_backend_of(m) for _, m in _imported(pkg / "x.py")} >= {"triton", "reference"}


def test_importing_the_registry_imports_no_torch():
    probe = "import sys, hrmspec.backends, hrmspec.backends.common, hrmspec.cli; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr


# -- the registry ---------------------------------------------------------------------------------------
def test_every_caller_reads_the_registry():
    assert BACKENDS == tuple(REGISTRY) == ("reference", "inductor", "triton", "opencl", "c", "cuda")
    assert set(TARGETS) == {name for name, b in REGISTRY.items() if b.emit is not None} == {"triton", "opencl", "c",
                                                                                           "cuda"}
    assert {t: (TARGETS[t].suffix, REGISTRY[t].emit.storage) for t in TARGETS} == {
        "triton": (".py", None), "opencl": (".cl", "f32"), "c": (".c", "f32"), "cuda": (".cu", "bf16")}
    compile_cmd = build_parser()._subparsers._group_actions[0].choices["compile"]
    backend = next(a for a in compile_cmd._actions if a.dest == "backend")
    assert tuple(backend.choices) == BACKENDS
    for b in REGISTRY.values():
        assert b.description in backend.help and "\n" not in b.description
        assert isinstance(b.missing(), str)


def test_reference_is_always_there_and_a_missing_backend_says_what_it_needs(monkeypatch):
    assert REGISTRY["reference"].missing() == "" and get_backend("reference").name == "reference"
    broken = dataclasses.replace(REGISTRY["triton"], missing=lambda: "it is not installed")
    monkeypatch.setitem(REGISTRY, "triton", broken)
    with pytest.raises(hrmspec.HrmspecError, match=r"^the triton backend needs the triton package \(pip install "
                       r"triton\), but it is not installed; or use --backend reference$"):
        get_backend("triton")


def _tables():
    tables = [get_backend("reference")]
    for name in ("triton", "opencl", "c"):
        if not REGISTRY[name].missing():
            tables.append(get_backend(name))
    return tables


@pytest.mark.parametrize("table", _tables(), ids=lambda t: t.name)
def test_tables_keep_the_contract(table):
    assert isinstance(table, OpTable) and get_backend(table.name) is table  # one table per process
    assert table.fuses == isinstance(table, KernelTable)
    if isinstance(table, KernelTable):
        assert table.reference is get_backend("reference")  # handed over by the registry, not imported
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    torch.testing.assert_close(table.linear(x, w), x @ w.T)
    torch.testing.assert_close(table.rms_norm(x, 1e-6), torch.nn.functional.rms_norm(x, (8,), eps=1e-6))


# -- fallbacks, per call ---------------------------------------------------------------------------------
@pytest.mark.fallback
def test_every_fallback_is_recorded_and_the_first_one_warned(monkeypatch):
    monkeypatch.setattr(fallback, "_warned", set())
    with fallback.record_fallbacks() as outer:
        with pytest.warns(UserWarning, match="demo backend: op: why; running the reference op instead"):
            fallback.report_fallback("demo", "op", "why")
        with fallback.record_fallbacks() as inner, warnings.catch_warnings():
            warnings.simplefilter("error")  # already warned: only recorded
            fallback.report_fallback("demo", "op", "why")
    fallback.report_fallback("demo", "op", "why")  # no recorder open: nothing kept
    assert outer == [fallback.Fallback("demo", "op", "why")] * 2 and inner == outer[1:]


@pytest.mark.fallback
def test_a_closed_recorder_stops_recording_even_beside_an_equal_one(monkeypatch):
    # recorders are told apart by identity: an empty inner one closing must not close the outer one
    monkeypatch.setattr(fallback, "_warned", {fallback.Fallback("demo", "op", "why")})  # recorded, not warned
    with fallback.record_fallbacks() as outer:
        with fallback.record_fallbacks() as inner:
            pass
        fallback.report_fallback("demo", "op", "why")
    assert outer == [fallback.Fallback("demo", "op", "why")] and inner == []


@pytest.mark.fallback
def test_a_kernel_table_records_each_fallback_call():
    name = next((n for n in ("c", "opencl") if not REGISTRY[n].missing()), None)
    if name is None:
        pytest.skip(REGISTRY["c"].missing())
    table = get_backend(name)
    x = torch.randn(2, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an earlier test may or may not have warned about it
        with fallback.record_fallbacks() as fell:
            for _ in range(2):
                y = table.gelu(x)
    assert [(f.backend, f.op) for f in fell] == [(name, "gelu")] * 2
    torch.testing.assert_close(y, torch.nn.functional.gelu(x, approximate="tanh"))


# -- what a kernel table flattens -----------------------------------------------------------------------
def test_only_elementwise_programs_on_head_rows_are_flattened():
    q = torch.zeros(2, 5, 3, 8)  # (B, S, h, hd)
    assert flattens(library.swiglu(), {"a": q, "b": q}) and flattens(library.gelu(), {"x": q})
    assert not flattens(library.swiglu(), {"a": q, "b": q[:, :4]})  # shapes differ
    assert not flattens(library.gelu(), {"x": q[0, 0]})  # plain rows: nothing to gain
    assert not flattens(library.rms_norm(affine=False), {"x": q})  # a reduction: the row is the head
    assert not flattens(library.rms_norm(), {"x": q, "w": q[0, 0, 0]})  # a weight of one head's width
    assert not flattens(library.gelu(), {"x": torch.zeros(2, 5, 8, 2048)})  # wider than WIDE_ROW
