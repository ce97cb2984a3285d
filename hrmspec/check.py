"""`hrmspec check SPEC`: every kernel the spec needs, tested and compiled.

The kernels are those of the fusion plan (`hrmspec.graph.fusion.fuse_model`): each fused region's
forward program and its backward (`hrmspec.ir.grad`), plus the op-by-op kernels the triton backend
launches today. For each one:

  numerics   a few random draws (rows, scale, seed) at the spec's row width: the forward kernel
             against the IR interpreter (`hrmspec.ir.evaluate`) in float64, the backward kernel
             against torch autograd of that evaluation; the error is
             max |kernel - reference| / max(1, max |reference|), and the kernel passes below 1e-4
             (the kernels store fp32 here)
  compile    `triton.compile` for sm_80 and sm_90 at the spec's width, bf16 storage, in a fresh
             process (one that interprets cannot compile; started with `python -P`, so nothing in
             the current directory is imported), with registers and spills from ptxas

Without a GPU the numerics run in Triton's interpreter. A row wider than a one-block kernel holds
is reported as a reference fallback (what the triton backend does with it), not tested as if it fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from hrmspec.backends.common.source_cache import CacheError
from hrmspec.graph.fusion import KernelInfo
from hrmspec.ir import evaluate, reduce_vector_grads
from hrmspec.ir.kernel import trainable

TOLERANCE = 1e-4
ARCHS = (80, 90)
SCALES = (1.0, 0.05, 4.0)  # input scales, cycled over draws: small rows test eps, large ones overflow


@dataclass
class KernelCheck:
    kernel: KernelInfo
    error: float | None = None  # the largest relative error over the draws
    fallback: str = ""  # why the kernel is not used (the reference op runs instead)
    problem: str = ""  # an exception raised while testing
    compiled: dict[int, object] = field(default_factory=dict)  # arch -> CompiledInfo, or an error message

    @property
    def numerics_ok(self) -> bool:
        return bool(self.fallback) or (not self.problem and self.error is not None and self.error <= TOLERANCE)

    @property
    def compile_ok(self) -> bool:
        return all(not isinstance(c, str) for c in self.compiled.values())

    @property
    def ok(self) -> bool:
        return self.numerics_ok and self.compile_ok


def _random(shape: tuple[int, ...], gen: torch.Generator, scale: float) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def _inputs(program, rows: int, width: int, gen: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
    shapes = {"row": (rows, width), "vector": (width,), "scalar": (rows,)}
    return {i.name: _random(shapes[i.kind], gen, scale) for i in program.inputs}


def _error(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double()
    return float((got.double() - ref).abs().max()) / max(1.0, float(ref.abs().max())) if ref.numel() else 0.0


def check_numerics(k: KernelInfo, draws: int = 3, max_rows: int = 3, device: str = "cpu") -> float:
    """The largest relative error of kernel `k` over `draws` random draws (see the module docstring)."""
    if draws < 1:  # no draw would test nothing and report an error of 0
        raise ValueError(f"draws must be at least 1, found {draws}")
    from hrmspec.backends.triton.launch import RowKernel

    fwd = k.forward
    kernel = RowKernel(k.program, k.direction, fwd.name)
    if kernel.name != k.name:
        raise RuntimeError(f"kernel {k.name} was generated under another name ({kernel.name})")
    worst = 0.0
    for draw in range(draws):
        gen = torch.Generator().manual_seed(draw)
        rows, scale = 1 + draw % max_rows, SCALES[draw % len(SCALES)]
        x = _inputs(fwd, rows, k.width, gen, scale)
        ref = evaluate(fwd, {n: t.requires_grad_(n in trainable(fwd)) for n, t in x.items()})
        on = {n: t.detach().float().to(device) for n, t in x.items()}
        if k.direction == "fwd":
            got = kernel(on)
            worst = max([worst] + [_error(got[o].cpu(), ref[o]) for o in ref])
            continue
        cot = {f"d_{o.name}": _random(tuple(ref[o.name].shape), gen, 1.0) for o in fwd.outputs}
        wrt = [n for n in trainable(fwd) if n in x]
        expect = torch.autograd.grad([ref[o] for o in fwd.output_names], [x[n] for n in wrt],
                                     [cot[f"d_{o}"] for o in fwd.output_names], allow_unused=True)
        # the forward outputs the backward reads instead of recomputing them (its save plan)
        stored = {o: ref[o].detach().float().to(device) for o in fwd.output_names if o in k.program.input_names}
        got = kernel({**on, **stored, **{n: t.float().to(device) for n, t in cot.items()}})
        got = reduce_vector_grads(k.program, got)
        for n, e in zip(wrt, expect):
            e = torch.zeros_like(x[n]) if e is None else e
            worst = max(worst, _error(got[f"d_{n}"].cpu(), e))
    return worst


def _compile(checks: list[KernelCheck], archs: tuple[int, ...]) -> None:
    """Fill `compiled` of every testable kernel: all in one fresh process, or one by one to find
    which fails when the batch does."""
    from hrmspec.backends.triton.aot import compile_many

    jobs, owners = [], []
    for c in checks:
        if c.fallback:
            continue
        for arch in archs:
            jobs.append({"program": c.kernel.program, "arch": arch, "width": c.kernel.width, "dtype": "bf16",
                         "direction": c.kernel.direction, "base": c.kernel.forward.name})
            owners.append((c, arch))
    if not jobs:
        return
    try:
        infos = compile_many(jobs)
    except RuntimeError:
        infos = []
        for job in jobs:
            try:
                infos.append(compile_many([job])[0])
            except RuntimeError as e:
                infos.append(str(e).strip().splitlines()[-1][:200] or "compile failed")
    for (c, arch), info in zip(owners, infos):
        c.compiled[arch] = info


def ptxas_available() -> bool:
    try:
        from triton import knobs

        return os.path.exists(knobs.nvidia.ptxas.path)
    except Exception:  # no NVIDIA backend in this triton build: compile-only checks cannot run
        return False


def check_kernels(kernels: list[KernelInfo], draws: int = 3, max_rows: int = 3, archs: tuple[int, ...] = ARCHS,
                  compile: bool = True) -> list[KernelCheck]:
    """Test (and compile) each kernel; see the module docstring."""
    from hrmspec.backends.common.limits import MAX_WIDTH
    from hrmspec.backends.triton.aot import interpreting

    device = "cpu" if interpreting() or not torch.cuda.is_available() else "cuda"
    checks = []
    for k in kernels:
        c = KernelCheck(k)
        if k.width > MAX_WIDTH:
            c.fallback = f"width {k.width} > {MAX_WIDTH}: the reference op runs"
        else:
            try:
                c.error = check_numerics(k, draws, max_rows, device)
            except CacheError:  # the kernel cache cannot be written: every kernel would fail the same way
                raise
            except Exception as e:  # reported in the table, and the check fails
                c.problem = f"{type(e).__name__}: {e}"
        checks.append(c)
    if compile and archs:
        _compile(checks, archs)
    return checks


def report(checks: list[KernelCheck], archs: tuple[int, ...], console=None, title: str = "") -> None:
    """The table: kernel, fwd/bwd, width, max error, compile per arch, registers, spills."""
    console = console or Console()
    t = Table(title=title or "Kernels", box=box.SIMPLE_HEAD)
    t.add_column("kernel", no_wrap=True)
    t.add_column("fwd/bwd")
    t.add_column("width", justify="right")
    t.add_column("max error", justify="right")
    for arch in archs:
        t.add_column(f"sm_{arch}")
    t.add_column("registers", justify="right")
    t.add_column("spills (B)", justify="right")
    for c in checks:
        k = c.kernel
        if c.fallback:
            err = f"[yellow]{c.fallback}[/yellow]"
        elif c.problem:
            err = f"[red]{c.problem[:60]}[/red]"
        else:
            err = f"[green]{c.error:.1e}[/green]" if c.numerics_ok else f"[red]{c.error:.1e} FAIL[/red]"
        cells, regs, spills = [], [], []
        for arch in archs:
            info = c.compiled.get(arch)
            if info is None:
                cells.append("[dim]-[/dim]")
            elif isinstance(info, str):
                cells.append("[red]FAIL[/red]")
            else:
                cells.append("[green]ok[/green]")
                regs.append(str(info.registers))
                spill = info.spill_stores + info.spill_loads
                spills.append(f"[yellow]{spill}[/yellow]" if spill else "0")
        t.add_row(k.name, k.direction, str(k.width), err, *cells, "/".join(regs) or "-", "/".join(spills) or "-")
    console.print(t)
    for c in checks:
        for arch, info in c.compiled.items():
            if isinstance(info, str):
                console.print(f"[red]{c.kernel.name} sm_{arch}:[/red] {info}")
