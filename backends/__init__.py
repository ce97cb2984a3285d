"""Backends: one folder per target, one op table each, and the registry every caller reads.

    reference/   torch ops: the definition of every op (naive.py) and its table (table.py)
    inductor/    the reference ops, each module call's runs between attention ops compiled by torch.compile
    triton/      RowPrograms printed as Triton kernels, the flash-attention template, linear-CE kernels
    cstyle/      RowPrograms printed as C: CUDA C through CuPy (cuda), OpenCL C on PoCL (opencl) and host C
                 compiled by the system C compiler (c: runs on any CPU)
    common/      what backends share: the op-table contract, the kernel table and its fallbacks, the
                 differentiable row op, row layouts, kernel limits, the source cache, the printer
                 base, the chunked linear + cross-entropy driver

A backend package imports only common/ and hrmspec's core, never another backend. `REGISTRY`
holds one `Backend` per target: what it is, what it needs, whether it can run here, how to build
its op table (backends/common/contract.py: `OpTable`) and how `hrmspec compile --emit` prints its
kernels. `hrmspec.compile`, `--emit`, `hrmspec check` and the CLI all read it. Importing this
module imports no torch and no backend.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hrmspec.errors import HrmspecError, close_match

if TYPE_CHECKING:
    from hrmspec.backends.common.contract import OpTable


@dataclass(frozen=True)
class EmitTarget:
    """How `hrmspec compile --emit` prints a backend's kernels (hrmspec/emit.py)."""

    language: str  # Triton | CUDA C | OpenCL C
    suffix: str  # of the source files
    storage: str | None  # the storage type a C source is specialised for; Triton's comes with the pointers
    printer: Callable[[str | None], Any]  # storage -> the printer (backends/common/expr_printer.py: KernelSource)

    def load(self):
        return self.printer(self.storage)

    def __str__(self) -> str:
        return f"{self.language} {self.suffix}" + (f" {self.storage}" if self.storage else "")


@dataclass(frozen=True)
class Backend:
    name: str
    description: str  # one line
    needs: str  # what it needs beyond hrmspec's own dependencies, with how to install it ('' when nothing)
    missing: Callable[[], str]  # why it cannot run on this machine, or ''
    otherwise: str  # what to use when it cannot
    build: Callable[[], OpTable]  # imports the backend and makes its table
    emit: EmitTarget | None = None  # None: no generated source

    def load(self) -> OpTable:
        """The op table (one per process), or an HrmspecError saying what is missing (asked on every
        call: a device may come and go, as tests make it)."""
        why = self.missing()
        if why:
            raise HrmspecError(f"the {self.name} backend needs {self.needs}, but {why}; {self.otherwise}")
        if self.name not in _tables:
            _tables[self.name] = self.build()
        return _tables[self.name]


_tables: dict[str, OpTable] = {}


def _not_installed(module: str, what: str) -> Callable[[], str]:
    return lambda: "" if importlib.util.find_spec(module) is not None else f"{what} is not installed"


def _cuda_missing() -> str:
    """What the cuda backend lacks on this machine ('' when nothing)."""
    import torch

    missing = [] if torch.cuda.is_available() else ["torch sees no CUDA device"]
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        first_line = (str(e) or type(e).__name__).splitlines()[0]
        missing.append(f"CuPy does not import ({first_line})")
    return " and ".join(missing)


def _reference():
    from hrmspec.backends.reference.table import ReferenceTable

    return ReferenceTable()


def _inductor():
    from hrmspec.backends.inductor.table import InductorTable

    return InductorTable(get_backend("reference"))  # whose ops it runs, and compiles


def _cxx_missing() -> str:
    """Why Inductor cannot build C++ kernels here ('' when it can: a GPU build uses Triton instead)."""
    cxx = os.environ.get("CXX", "g++")
    return "" if shutil.which(cxx) or shutil.which("clang++") else f"no C++ compiler ({cxx}) is on the PATH"


def _triton():
    if "triton" not in sys.modules:
        import torch

        # without a GPU the kernels run in Triton's interpreter, which must be chosen before
        # triton is first imported (its own jit functions are built then)
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    from hrmspec.backends.triton.table import TritonTable

    return TritonTable(get_backend("reference"))  # the reference is what its kernels fall back to


def _opencl():
    from hrmspec.backends.cstyle.opencl_table import OpenCLTable

    return OpenCLTable(get_backend("reference"))


def _opencl_missing() -> str:
    """Why OpenCL kernels cannot run here: pyopencl missing, no platform, or one that cannot build a
    trivial kernel for its device ('' when it can)."""
    if importlib.util.find_spec("pyopencl") is None:
        return "pyopencl is not installed"
    from hrmspec.backends.cstyle.opencl import probe

    return probe()


def _c():
    from hrmspec.backends.cstyle.host_table import HostTable

    return HostTable(get_backend("reference"))


def _c_missing() -> str:
    from hrmspec.backends.cstyle.host import missing

    return missing()


def _cuda():
    from hrmspec.backends.cstyle.cuda_table import CudaTable

    return CudaTable(get_backend("reference"))


def _triton_printer(storage: str | None):
    from hrmspec.backends.triton.printer import TritonSource

    return TritonSource()


def _c_printer(dialect: str) -> Callable[[str | None], Any]:
    def load(storage: str | None):
        from hrmspec.backends.cstyle.printer import DIALECTS, CSource

        return CSource(DIALECTS[dialect], storage)

    return load


REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("reference", "torch ops, op by op: the definition of every op", "", lambda: "", "", _reference),
    Backend("inductor", "reference ops, the runs between attention ops compiled by torch.compile (Inductor)",
            "a C++ compiler for Inductor's CPU kernels (apt install g++)", _cxx_missing,
            "or use --backend reference", _inductor),
    Backend("triton", "generated Triton kernels (the interpreter on a CPU), flash attention, the loss's softmax",
            "the triton package (pip install triton)", _not_installed("triton", "it"),
            "or use --backend reference", _triton,
            EmitTarget("Triton", ".py", None, _triton_printer)),
    Backend("opencl", "generated OpenCL C row kernels, on PoCL's CPU device without a GPU",
            "pyopencl and an OpenCL platform that builds kernels for its device (pip install pyopencl "
            "pocl-binary-distribution)", _opencl_missing,
            "--backend c runs the same generated kernels, compiled by the system C compiler", _opencl,
            EmitTarget("OpenCL C", ".cl", "f32", _c_printer("opencl"))),
    Backend("c", "generated C row kernels (the C-style printer's host dialect), compiled by the system C compiler",
            "a C compiler (apt install gcc)", _c_missing, "or use --backend reference", _c,
            EmitTarget("C", ".c", "f32", _c_printer("c"))),
    Backend("cuda", "generated CUDA C row kernels through CuPy, on a CUDA device",
            "a CUDA device and CuPy (pip install cupy-cuda12x, or cupy-cuda13x for CUDA 13)", _cuda_missing,
            "--backend c runs the same generated C-style kernels on the CPU", _cuda,
            EmitTarget("CUDA C", ".cu", "bf16", _c_printer("cuda"))),
)}
BACKENDS = tuple(REGISTRY)


def get_backend(name: str) -> OpTable:
    """The op table of backend `name` (see REGISTRY); an HrmspecError for an unknown name or a
    backend that cannot run here."""
    if name not in REGISTRY:
        hint = close_match(name, BACKENDS)
        raise HrmspecError(f"unknown backend '{name}'; available: {', '.join(BACKENDS)}"
                           + (f" ({hint})" if hint else ""))
    return REGISTRY[name].load()


__all__ = ["BACKENDS", "REGISTRY", "Backend", "EmitTarget", "get_backend"]
