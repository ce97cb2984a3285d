"""The OpenCL backend's op table: generated C-style kernels where there are some, the reference elsewhere.

    generated C-style kernels (OpenCL    row_program (the fusion plan's regions, norms, gates,
    dialect, run on PoCL's CPU device    activations, expression norms) and rope_qk; the backward
    without a GPU)                       kernel of each is printed from `hrmspec.ir.grad` of its program
    the reference table                  attention, rope_tables, the losses, linear

Tensors the kernels cannot take (fp64, rows wider than MAX_WIDTH, non-CPU tensors) run the
reference op, reported as a fallback (backends/common/kernel_table.py).
"""

from __future__ import annotations

from hrmspec.backends.common.kernel_table import KernelTable
from hrmspec.backends.cstyle.opencl import OpenCLRowOp


class OpenCLTable(KernelTable):
    """The OpenCL backend (see the module docstring)."""

    name = "opencl"
    op_class = OpenCLRowOp
    device_type = "cpu"
    launcher = "the OpenCL launcher"


__all__ = ["OpenCLTable"]
