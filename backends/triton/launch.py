"""Launching generated Triton kernels over rows.

`RowKernel` is one program printed, cached, imported and launched over rows. `TritonRowOp` is a
`RowOp` (backends/common/rowops.py) on RowKernels: a forward kernel, and the kernel of the program's
backward (`hrmspec.ir.grad`), whose per-row partials of weight gradients are summed over rows.
"""

from __future__ import annotations

import torch

from hrmspec.backends.common.limits import TRITON_MAX_WIDTH as MAX_WIDTH
from hrmspec.backends.common.rowlayout import output_allocator, row_views
from hrmspec.backends.common.rowops import RowOp
from hrmspec.backends.triton import cache
from hrmspec.backends.triton.printer import parameters, render_module
from hrmspec.errors import KernelError
from hrmspec.ir import RowProgram
from hrmspec.ir.interpret import row_shapes
from hrmspec.ir.kernel import kernel_name


def num_warps(block: int) -> int:
    """More warps for wider rows, so each thread holds at most ~16 fp32 values of the row."""
    return 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4


class RowKernel:
    """A RowProgram compiled to a Triton kernel (cached source file, imported function)."""

    def __init__(self, program: RowProgram, direction: str = "fwd", base: str | None = None):
        self.program = program
        self.name = kernel_name(program, direction, base)
        self.source = render_module(program, self.name)
        self.path = cache.write_source(self.name, self.source)
        self.fn = getattr(cache.load_module(self.path), self.name)

    def __call__(self, inputs: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None = None,
                 out_dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
        """Run over all rows. `out` may hold preallocated outputs (rows [..., D] with unit stride
        along D, scalars [...] contiguous; see backends/common/rowlayout.py); the others are allocated,
        in `out_dtypes[name]` or the dtype of the first row input."""
        p = self.program
        lead, width = row_shapes(p, inputs)
        if width > MAX_WIDTH:
            raise KernelError(f"{p.name}: rows of width {width} exceed the limit of {MAX_WIDTH} for a one-block "
                              "row kernel; split the row or use the reference backend")
        _, allocate = output_allocator(p, inputs, out_dtypes)
        job = row_views(p, inputs, lead, width, dict(out or {}), allocate)
        if job.n_rows == 0:
            return job.results
        args = []
        for _, what, ref in parameters(p):
            t = job.tensors.get(ref)
            if what.startswith("ptr"):
                args.append(t)
            elif what.startswith("stride"):
                args.append(t.stride(0))
            elif what.startswith("istride"):
                args.append(t.stride(1))
            else:
                args.append({"n_rows": job.n_rows, "n_inner": job.n_inner, "n_cols": width}[what])
        block = triton_next_power_of_2(width)
        self.fn[(job.n_rows,)](*args, BLOCK=block, num_warps=num_warps(block))
        return job.results


def triton_next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


class TritonRowOp(RowOp):
    """A forward RowProgram as a differentiable op backed by generated Triton kernels (see RowOp)."""

    kernel_class = RowKernel
