"""The OpenCL backend's op table: the functions of `backends/reference/ops.py`, some of them generated.

    generated C-style kernels (OpenCL    rms_norm, sigmoid_gate, swiglu, gelu, and row_program (the
    dialect, run on PoCL's CPU device    expression norms a spec declares); the backward kernel of
    without a GPU)                       each is printed from `hrmspec.ir.grad` of its forward program
    the reference torch ops              attention, rope, rope_tables, cross_entropy

Tensors the kernels cannot take (fp64, rows wider than MAX_WIDTH, non-CPU tensors) run the
reference op with a warning, as in every RowProgram backend (backends/rowops.py).
"""

from __future__ import annotations

import torch

from hrmspec.backends.cstyle.opencl import OpenCLRowOp
from hrmspec.backends.rowops import ROW_OPS, RowOpTable, beyond_limits
from hrmspec.backends.triton.launch import MAX_WIDTH

FUSED = True  # module calls run the fusion pass's regions (runtime/execution/stack.py)
GENERATED = ROW_OPS


def _unsupported(tensors: list[torch.Tensor], width: int) -> str | None:
    reason = beyond_limits(tensors, width, MAX_WIDTH)
    off_cpu = next((t for t in tensors if t.device.type != "cpu"), None)
    if reason is None and off_cpu is not None:
        reason = f"a tensor on {off_cpu.device}; the OpenCL launcher takes CPU tensors"
    return reason


_table = RowOpTable("opencl", OpenCLRowOp, _unsupported)
# defines rms_norm, sigmoid_gate, swiglu, gelu, row_program (the table's kernels) and upcast,
# rotate_half, rope_tables, rope, attention, cross_entropy (the reference's): see backends/rowops.py
globals().update(_table.module_functions())
