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
from hrmspec.backends.rowops import RowOpTable
from hrmspec.backends.triton.launch import MAX_WIDTH

upcast = reference.upcast
rotate_half = reference.rotate_half
rope_tables = reference.rope_tables
rope = reference.rope
attention = reference.attention
cross_entropy = reference.cross_entropy

GENERATED = ("rms_norm", "sigmoid_gate", "swiglu", "gelu", "row_program")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _unsupported(tensors: list[torch.Tensor], width: int) -> str | None:
    if width > MAX_WIDTH:
        return f"rows of width {width} exceed the {MAX_WIDTH} a one-block row kernel holds"
    for t in tensors:
        if t.dtype not in _KERNEL_DTYPES:
            return f"{t.dtype} is computed in fp32 by the kernels; the reference keeps its precision"
        if t.device.type != "cpu":
            return f"a tensor on {t.device}; the OpenCL launcher takes CPU tensors"
    return None


_table = RowOpTable("opencl", OpenCLRowOp, _unsupported)
row_program = _table.row_program
rms_norm = _table.rms_norm
sigmoid_gate = _table.sigmoid_gate
swiglu = _table.swiglu
gelu = _table.gelu
