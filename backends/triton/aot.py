"""Compile-only checks: generated kernels through the real Triton compiler, no GPU needed.

`triton.compile` lowers a kernel for a `GPUTarget` (Triton IR -> LLVM -> PTX -> cubin with the
ptxas that ships in the triton wheel) without touching a driver. Resource usage comes from
`ptxas -v` on the PTX: registers per thread and spill bytes. A spill means the row does not fit
in registers at that width and warp count; the tier 3 tests require none.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from hrmspec.backends.triton import cache
from hrmspec.backends.triton.launch import num_warps, triton_next_power_of_2
from hrmspec.backends.triton.printer import render_module, signature
from hrmspec.ir import RowProgram
from hrmspec.ir.kernel import kernel_name


def interpreting() -> bool:
    """True when triton's own jit functions (tl.sum, tl.sigmoid, ...) were built for the interpreter:
    TRITON_INTERPRET is read when triton is imported, and such a process cannot compile."""
    if "triton" not in sys.modules:
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    from triton.language import standard
    from triton.runtime.jit import JITFunction

    return not isinstance(standard.sigmoid, JITFunction)


@dataclass(frozen=True)
class CompiledInfo:
    name: str
    arch: int
    block: int
    num_warps: int
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared: int  # bytes of shared memory (the reductions' scratch)
    seconds: float
    ptx: str

    def __str__(self) -> str:
        return (f"{self.name} sm_{self.arch} BLOCK={self.block} warps={self.num_warps}: {self.registers} registers, "
                f"spills {self.spill_stores}/{self.spill_loads} B, shared {self.shared} B ({self.seconds:.1f} s)")


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) reported by `ptxas -v` for sm_<arch>."""
    from triton import knobs

    # the ptxas Triton itself uses for this arch (the wheel ships one per CUDA generation)
    ptxas = (knobs.nvidia.ptxas if arch < 90 else knobs.nvidia.ptxas_blackwell).path
    found = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)  # what Triton targeted: sm_80, sm_90a, ...
    gpu = found.group(1) if found else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}:\n{res.stderr[-2000:]}")
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stores, loads = (int(spill.group(1)), int(spill.group(2))) if spill else (0, 0)
    return (int(regs.group(1)) if regs else -1, stores, loads)


def compile_kernel(fn, signature: dict[str, str], constexprs: dict, arch: int, warps: int, name: str, block: int,
                   aligned: bool = False, t0: float | None = None) -> CompiledInfo:
    """`triton.compile` one @triton.jit function for sm_<arch> (no GPU needed) and read its
    resource use. `aligned`: pointers are 16-byte aligned, as the jit assumes for freshly
    allocated tensors (vectorized loads). `t0`: when the work being timed began."""
    import triton
    from triton.backends.compiler import GPUTarget

    if interpreting():
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1, so it cannot compile; use compile_many, "
                           "which compiles in a fresh process")
    t0 = time.perf_counter() if t0 is None else t0
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs if aligned else None)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    seconds = time.perf_counter() - t0
    ptx = compiled.asm["ptx"]
    regs, stores, loads = ptxas_usage(ptx, arch)
    return CompiledInfo(name, arch, block, warps, regs, stores, loads, compiled.metadata.shared, seconds, ptx)


def compile_jobs(module: str, compile_for, jobs: list[dict], encode=None) -> list[CompiledInfo]:
    """`compile_for(**job)` for each job; in a process that interprets, in a fresh Python running
    `module` (whose `__main__` is `serve_jobs`), the jobs passed through `encode` to plain data."""
    if not interpreting():
        return [compile_for(**job) for job in jobs]
    return compile_in_fresh_process(module, [encode(job) if encode else job for job in jobs])


def serve_jobs(compile_for, decode=None) -> None:
    """The `__main__` of a module `compile_in_fresh_process` runs: JSON jobs on stdin, one JSON
    line of CompiledInfo out."""
    jobs = json.loads(sys.stdin.read())
    print(json.dumps([asdict(compile_for(**(decode(job) if decode else job))) for job in jobs]))


def compile_for(program: RowProgram, arch: int, width: int = 4096, dtype: str = "bf16", direction: str = "fwd",
                base: str | None = None) -> CompiledInfo:
    """Compile `program` for sm_<arch> (80, 90, ...) at row width `width`, storage type `dtype`
    for every input and output (row partials of vector gradients are fp32)."""
    name = kernel_name(program, direction, base)
    dtypes = {i.name: dtype for i in program.inputs}
    dtypes.update({o.name: "fp32" if o.row_partial else dtype for o in program.outputs})
    block = triton_next_power_of_2(width)
    t0 = time.perf_counter()
    fn = getattr(cache.load_module(cache.write_source(name, render_module(program, name), f"cuda-{arch}-32")), name)
    return compile_kernel(fn, signature(program, dtypes), {"BLOCK": block}, arch, num_warps(block), name, block, t0=t0)


def compile_many(jobs: list[dict]) -> list[CompiledInfo]:
    """Compile several kernels; each job is the keyword arguments of `compile_for` with `program`.
    In a process that interprets, the work runs in a fresh Python with TRITON_INTERPRET unset."""
    return compile_jobs(__name__, compile_for, jobs, lambda job: {**job, "program": job["program"].to_dict()})


# How a child Python starts without the current directory on sys.path: `python -m` puts it first,
# so a json.py lying there would run instead of the standard library's. -P (3.11+) leaves it out and
# keeps everything else; 3.10 has no -P, and isolated mode (-I) also ignores PYTHON* variables and the
# user's site-packages.
SAFE_PATH = "-P" if sys.version_info >= (3, 11) else "-I"


def compile_in_fresh_process(module: str, jobs: list[dict]) -> list[CompiledInfo]:
    """Run `python -P -m module` with TRITON_INTERPRET unset: it reads the JSON jobs on stdin and
    prints one JSON line of CompiledInfo. A process that once interpreted cannot compile for a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, SAFE_PATH, "-m", module], input=json.dumps(jobs), capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"compiling in a subprocess failed:\n{res.stderr[-4000:]}")
    return [CompiledInfo(**d) for d in json.loads(res.stdout.splitlines()[-1])]


if __name__ == "__main__":
    serve_jobs(compile_for, lambda job: {**job, "program": RowProgram.from_dict(job["program"])})
