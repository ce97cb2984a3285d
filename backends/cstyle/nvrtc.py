"""Compile-only checks of the CUDA dialect with NVRTC, no GPU and no driver needed.

`cuda.bindings.nvrtc` (pip: cuda-bindings + nvidia-cuda-nvrtc) compiles the generated source
straight to a cubin for a real architecture (sm_80, sm_90). With `--ptxas-options=-v` NVRTC's
log carries ptxas's resource report, which is where the numbers come from:

    ptxas info    : Function properties for hrm_rms_norm_fwd_8bd3f7fb
    ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 18 registers, used 1 barriers, 512 bytes smem, 408 bytes cmem[0]

A kernel's code does not depend on D (the threads loop over the row), only its block size does,
so no spill at one width means none at any width with the same block size. `cuobjdump_usage`
reads the same numbers back from the cubin with the `cuobjdump` the triton wheel ships, when
it is installed (a cross-check of the log parsing).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from hrmspec.backends.common import source_cache
from hrmspec.backends.cstyle.printer import CUDA, block_size, render_source
from hrmspec.errors import KernelError
from hrmspec.ir import RowProgram
from hrmspec.ir.kernel import kernel_name

ARCHS = (80, 90)


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise KernelError("NVRTC compilation needs cuda-bindings and the NVRTC library: "
                          "pip install cuda-bindings nvidia-cuda-nvrtc") from e
    return nvrtc


def _check(result, what: str):
    """cuda.bindings returns (status, *values); raise on a bad status, return the values."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        raise KernelError(f"NVRTC {what} failed: {status}")
    return values[0] if len(values) == 1 else values


def nvrtc_version() -> str:
    major, minor = _check(_nvrtc().nvrtcVersion(), "version")
    return f"{major}.{minor}"


@dataclass(frozen=True)
class CompiledInfo:
    name: str
    arch: int
    block: int
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame (local memory) per thread
    shared: int  # bytes of static shared memory (the reductions' scratch)
    seconds: float
    log: str = field(repr=False)
    cubin: bytes = field(repr=False)

    def __str__(self) -> str:
        return (f"{self.name} sm_{self.arch} block={self.block}: {self.registers} registers, spills "
                f"{self.spill_stores}/{self.spill_loads} B, stack {self.stack} B, shared {self.shared} B "
                f"({self.seconds:.2f} s)")


def compile_source(source: str, name: str, arch: int, options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """(cubin, log) of CUDA `source` compiled for sm_<arch>, with ptxas's verbose report in the log."""
    nvrtc = _nvrtc()
    prog = _check(nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], []), "create")
    try:
        opts = [f"--gpu-architecture=sm_{arch}", "--ptxas-options=-v", *CUDA.compile_options, *options]
        status = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])[0]
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
        buf = b" " * size
        _check(nvrtc.nvrtcGetProgramLog(prog, buf), "log")
        log = buf.rstrip(b"\0 ").decode(errors="replace")
        if int(status) != 0:
            raise KernelError(f"NVRTC could not compile {name} for sm_{arch}:\n{log[-4000:]}")
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "cubin")
        return cubin, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _number(pattern: str, log: str) -> int:
    found = re.search(pattern, log)
    return int(found.group(1)) if found else 0


def compile_for(program: RowProgram, arch: int, width: int = 4096, dtype: str = "bf16", direction: str = "fwd",
                base: str | None = None) -> CompiledInfo:
    """Compile `program` for sm_<arch> with the block size used at row width `width`, every input
    and output stored as `dtype` (f32, f16, bf16; row partials of vector gradients as f32)."""
    name = kernel_name(program, direction, base)
    dtypes = {i.name: dtype for i in program.inputs}
    dtypes.update({o.name: "f32" if o.row_partial else dtype for o in program.outputs})
    block = block_size(width)
    source = render_source(program, name, CUDA, dtypes, block)
    path = source_cache.write_source(name, source, CUDA.suffix, (CUDA.name, f"nvrtc-{nvrtc_version()}-sm_{arch}"))
    t0 = time.perf_counter()
    cubin, log = compile_source(source_cache.verified_text(path), name, arch)
    seconds = time.perf_counter() - t0
    if not re.search(r"Used \d+ registers", log):
        raise KernelError(f"NVRTC's log for {name} has no ptxas resource report:\n{log}")
    return CompiledInfo(
        name=name, arch=arch, block=block,
        registers=_number(r"Used (\d+) registers", log),
        spill_stores=_number(r"(\d+) bytes spill stores", log),
        spill_loads=_number(r"(\d+) bytes spill loads", log),
        stack=_number(r"(\d+) bytes stack frame", log),
        shared=_number(r"(\d+) bytes smem", log),
        seconds=seconds, log=log, cubin=cubin,
    )


def cuobjdump_path() -> str | None:
    """The cuobjdump shipped in the triton wheel (CUDA's own, when installed, is not assumed)."""
    try:
        from triton import knobs

        path = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")
    except Exception:
        return None
    return path if os.path.exists(path) else None


def cuobjdump_usage(cubin: bytes) -> dict[str, dict[str, int]] | None:
    """Per kernel {REG, STACK, SHARED, LOCAL, ...} from `cuobjdump -res-usage`, or None without cuobjdump."""
    tool = cuobjdump_path()
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True)
    if res.returncode != 0:
        raise KernelError(f"cuobjdump failed: {res.stderr[-2000:]}")
    usage: dict[str, dict[str, int]] = {}
    for fn, fields in re.findall(r"Function (\w+):\s*\n\s*(.+)", res.stdout):
        usage[fn] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", fields)}
    return usage
