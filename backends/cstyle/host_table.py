"""The c backend's op table: generated C-style kernels compiled by the system C compiler, the reference elsewhere.

    generated C-style kernels (host-C     row_program (the fusion plan's regions, norms, gates,
    dialect: cc, called through ctypes,   activations, expression norms) and rope_qk; the backward
    on any CPU)                           kernel of each is printed from `hrmspec.ir.grad` of its program
    the reference table                   attention, rope_tables, the losses, linear

The same kernels the cuda and opencl backends run, printed in the third dialect (backends/cstyle/
dialects.py: HOST), with a row's work-items run one after another between barriers. Its purpose is
to execute the C-style kernel logic on every CPU (PoCL's LLVM does not know every processor); it is
single-threaded, so slower than the reference. Tensors the kernels cannot take (fp64, rows wider
than MAX_WIDTH, non-CPU tensors) run the reference op, reported as a fallback.
"""

from __future__ import annotations

from hrmspec.backends.common.kernel_table import KernelTable
from hrmspec.backends.cstyle.host import HostRowOp


class HostTable(KernelTable):
    """The c backend (see the module docstring)."""

    name = "c"
    op_class = HostRowOp
    device_type = "cpu"
    launcher = "the host-C launcher"


__all__ = ["HostTable"]
