"""The CUDA backend's op table: generated C-style kernels where there are some, the reference elsewhere.

    generated C-style kernels (CUDA C     row_program (the fusion plan's regions, norms, gates,
    dialect, compiled by NVRTC through    activations, expression norms) and rope_qk; the backward
    CuPy, run on torch CUDA tensors)      kernel of each is printed from `hrmspec.ir.grad` of its program
    the reference table                   attention, rope_tables, the losses, linear

These are the kernels the OpenCL backend (backends/cstyle/opencl_table.py) runs on PoCL, printed in
the other dialect. Tensors the kernels cannot take (fp64, rows wider than MAX_WIDTH, tensors not on
a CUDA device) run the reference op, reported as a fallback (backends/common/kernel_table.py).
Importing this module imports neither CuPy nor NVRTC: the registry checks for them.
"""

from __future__ import annotations

from hrmspec.backends.common.kernel_table import KernelTable
from hrmspec.backends.cstyle.cuda import CudaRowOp


class CudaTable(KernelTable):
    """The CUDA backend (see the module docstring)."""

    name = "cuda"
    op_class = CudaRowOp
    device_type = "cuda"
    launcher = "the CUDA launcher"


__all__ = ["CudaTable"]
