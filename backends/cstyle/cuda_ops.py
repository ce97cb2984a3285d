"""The CUDA backend's op table: the functions of `backends/reference/ops.py`, some of them generated.

    generated C-style kernels (CUDA C     rms_norm, sigmoid_gate, swiglu, gelu, and row_program (the
    dialect, compiled by NVRTC through    expression norms a spec declares); the backward kernel of
    CuPy, run on torch CUDA tensors)      each is printed from `hrmspec.ir.grad` of its forward program
    the reference torch ops               attention, rope, rope_tables, cross_entropy, upcast, rotate_half

These are the kernels the OpenCL backend (backends/cstyle/ops.py) runs on PoCL, printed in the
other dialect. Tensors the kernels cannot take (fp64, rows wider than MAX_WIDTH, tensors not on a
CUDA device) run the reference op with a warning, as in every RowProgram backend (backends/rowops.py).
Importing this module imports neither CuPy nor NVRTC: `get_backend("cuda")` checks for them.
"""

from __future__ import annotations

import torch

from hrmspec.backends.cstyle.cuda import CudaRowOp
from hrmspec.backends.rowops import ROW_OPS, RowOpTable, beyond_limits
from hrmspec.backends.triton.launch import MAX_WIDTH

FUSED = True  # module calls run the fusion pass's regions (runtime/execution/stack.py)
GENERATED = ROW_OPS


def _unsupported(tensors: list[torch.Tensor], width: int) -> str | None:
    """Why the CUDA kernels cannot run on these tensors, or None."""
    reason = beyond_limits(tensors, width, MAX_WIDTH)
    not_cuda = next((t for t in tensors if t.device.type != "cuda"), None)
    if reason is None and not_cuda is not None:
        reason = f"a tensor on {not_cuda.device}; the CUDA launcher takes CUDA tensors"
    return reason


_table = RowOpTable("cuda", CudaRowOp, _unsupported)
globals().update(_table.module_functions())  # defines the docstring's ops by name (backends/rowops.py)
