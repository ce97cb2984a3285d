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
from hrmspec.backends.reference import ops as reference
from hrmspec.backends.rowops import RowOpTable, beyond_limits
from hrmspec.backends.triton.launch import MAX_WIDTH

upcast = reference.upcast
rotate_half = reference.rotate_half
rope_tables = reference.rope_tables
rope = reference.rope
attention = reference.attention
cross_entropy = reference.cross_entropy

GENERATED = ("rms_norm", "sigmoid_gate", "swiglu", "gelu", "row_program")
def _unsupported(tensors: list[torch.Tensor], width: int) -> str | None:
    reason = beyond_limits(tensors, width, MAX_WIDTH)
    off_cpu = next((t for t in tensors if t.device.type != "cpu"), None)
    if reason is None and off_cpu is not None:
        reason = f"a tensor on {off_cpu.device}; the OpenCL launcher takes CPU tensors"
    return reason


_table = RowOpTable("opencl", OpenCLRowOp, _unsupported)
row_program = _table.row_program
rms_norm = _table.rms_norm
sigmoid_gate = _table.sigmoid_gate
swiglu = _table.swiglu
gelu = _table.gelu
