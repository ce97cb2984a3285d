"""What the OpenCL and CUDA launchers share: checking and flattening tensors, allocating outputs.

A `CRowKernel` is one RowProgram; its source is specialised at launch for the storage types of
the tensors it is given (pointer types differ) and the threads per row (`block_size(D)`). A
launcher subclass supplies the `dialect`, a `tag` for the cache key and `launch`. `CRowOp`
is a `RowOp` (backends/common/rowops.py) on a launcher's kernels: the differentiable op.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hrmspec.backends.common import source_cache
from hrmspec.backends.common.limits import C_MAX_WIDTH as MAX_WIDTH
from hrmspec.backends.common.rowlayout import output_allocator, row_views
from hrmspec.backends.common.rowops import RowOp
from hrmspec.backends.cstyle.printer import Dialect, block_size, parameters, render_source
from hrmspec.errors import KernelError
from hrmspec.ir import RowProgram
from hrmspec.ir.interpret import row_shapes
from hrmspec.ir.kernel import kernel_name

STORAGE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@dataclass
class Launch:
    """One launch, ready for a device: its tensors as the kernel sees them (rows as [n_outer,
    n_inner, D] views with unit stride along D, vectors [D] and per-row scalars [n_rows]
    contiguous: backends/common/rowlayout.py), their storage types and the source."""

    n_rows: int
    n_inner: int  # rows per outer index (backends/common/rowlayout.py)
    width: int
    block: int
    tensors: dict[str, torch.Tensor]
    dtypes: dict[str, str]
    path: Path  # the cache file of the specialised source


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes [start, end) a flattened tensor can touch."""
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return (t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size())


def _row_period(t: torch.Tensor) -> int | None:
    """The element distance that repeats every row of a [n_outer, n_inner, D] row view, or None."""
    if t.dim() != 3 or t.stride(2) != 1:
        return None
    (n_outer, n_inner, _), (so, si, _) = t.shape, t.stride()
    if n_inner == 1 or n_outer == 1:
        return so if n_inner == 1 else si
    return si if si and so % si == 0 else None


def _disjoint_bands(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two row views that repeat with one period s cover disjoint column bands of it (e.g.
    the two halves of each row): then no element is shared, however their byte spans interleave."""
    s = _row_period(a)
    if s is None or s != _row_period(b) or a.element_size() != b.element_size():
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    d = (b.storage_offset() - a.storage_offset()) % s  # where b's band starts, within a's row
    return a.shape[-1] <= d and d + b.shape[-1] <= s


class CRowKernel:
    """A RowProgram printed as a C-style kernel; subclasses run it on a device."""

    dialect: Dialect

    def __init__(self, program: RowProgram, direction: str = "fwd", base: str | None = None):
        self.program = program
        self.name = kernel_name(program, direction, base)

    def tag(self) -> str:
        """The toolchain the source is compiled by (part of the cache key)."""
        return ""

    def source(self, dtypes: dict[str, str], block: int) -> str:
        return render_source(self.program, self.name, self.dialect, dtypes, block)

    def path(self, dtypes: dict[str, str], block: int) -> Path:
        d = self.dialect
        return source_cache.write_source(self.name, self.source(dtypes, block), d.suffix, (d.name, self.tag()))

    def launch(self, job: Launch) -> None:
        raise NotImplementedError

    def __call__(self, inputs: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None = None,
                 out_dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
        """Run over all rows. `out` may hold preallocated outputs (rows [..., D] with unit stride
        along D, scalars [...] contiguous, none overlapping an input); the others are allocated, in
        `out_dtypes[name]` or the dtype of the first row input (row partials: fp32)."""
        p = self.program
        lead, width = row_shapes(p, inputs)
        if width > MAX_WIDTH:
            raise KernelError(f"{p.name}: rows of width {width} exceed the int32 column index ({MAX_WIDTH})")
        for name, t in inputs.items():
            if name in p.input_names and t.dtype not in STORAGE:
                raise KernelError(f"{p.name}: input '{name}' is {t.dtype}; C-style kernels store fp32, fp16 or bf16")
        device, allocate = output_allocator(p, inputs, out_dtypes)
        for name, t in (out or {}).items():
            if t.dtype not in STORAGE or t.device != device:
                raise KernelError(f"{p.name}: output '{name}' is {t.dtype} on {t.device}; expected fp32, fp16 or "
                                  f"bf16 on {device}")
        views = row_views(p, inputs, lead, width, dict(out or {}), allocate)
        flat = views.tensors
        self._check_overlap(flat)
        if views.n_rows == 0:
            return views.results
        dtypes = {name: STORAGE[t.dtype] for name, t in flat.items()}
        block = block_size(width)
        self.launch(Launch(views.n_rows, views.n_inner, width, block, flat, dtypes, self.path(dtypes, block)))
        return views.results

    def _check_overlap(self, flat: dict[str, torch.Tensor]) -> None:
        # inputs are declared restrict, and a later pass over the row rereads them after stores
        spans = {name: _span(t) for name, t in flat.items()}
        names = self.program.output_names
        for o in names:
            for other, (a, b) in spans.items():
                if other != o and a < spans[o][1] and spans[o][0] < b and not _disjoint_bands(flat[o], flat[other]):
                    raise KernelError(f"{self.program.name}: output '{o}' overlaps "
                                      f"{'output' if other in names else 'input'} '{other}' in memory")

    def arguments(self, job: Launch, pointer, offset) -> list:
        """Kernel arguments in parameter order; `pointer(t)` and `offset(t)` give what the device
        wants for a buffer, strides and sizes are 64-bit and 32-bit integers."""
        import numpy as np

        args = []
        for q in parameters(self.program, self.dialect):
            t = job.tensors.get(q.ref)
            kind = q.what.split("_")[0]
            if kind == "ptr":
                args.append(pointer(t))
            elif kind == "offset":
                args.append(np.int64(offset(t)))
            elif kind == "stride":
                args.append(np.int64(t.stride(0)))
            elif kind == "istride":
                args.append(np.int64(t.stride(1)))
            else:
                args.append(np.int32({"n_rows": job.n_rows, "n_inner": job.n_inner, "n_cols": job.width}[q.what]))
        return args


class CRowOp(RowOp):
    """A forward RowProgram as a differentiable op backed by generated C-style kernels of the
    subclass's `kernel_class` (see RowOp)."""
