"""What the generated row kernels can take, whatever the backend.

A row kernel runs one block per row. Triton keeps the whole row in that block's registers, so its
rows are bounded (`TRITON_MAX_WIDTH`); a C-style block loops over its row, so only the int column
index bounds it (`C_MAX_WIDTH`). The op tables send rows up to `MAX_WIDTH` to their kernels and run
the reference beyond, so every kernel backend takes the same tensors.
"""

from __future__ import annotations

import torch

TRITON_MAX_WIDTH = 65536  # one row lives in one block of registers; wider rows need a split-row kernel
C_MAX_WIDTH = 2**31 - 1  # columns are int indices; rows any width (the threads loop over the row)
MAX_WIDTH = TRITON_MAX_WIDTH  # the widest row an op table hands its kernels
WIDE_ROW = 8192  # the widest row the built-in kernels hold without register spills (sm_80 / sm_90)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # storage types; computed in fp32


def beyond_limits(tensors: list[torch.Tensor], width: int, max_width: int = MAX_WIDTH) -> str | None:
    """Why a one-block row kernel cannot take these tensors whatever the device, or None."""
    if width > max_width:
        return f"rows of width {width} exceed the {max_width} a one-block row kernel holds"
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            return f"{t.dtype} is computed in fp32 by the kernels; the reference keeps its precision"
    return None


__all__ = ["C_MAX_WIDTH", "KERNEL_DTYPES", "MAX_WIDTH", "TRITON_MAX_WIDTH", "WIDE_ROW", "beyond_limits"]
