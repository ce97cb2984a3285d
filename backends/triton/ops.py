"""The Triton backend's op table: the functions of `backends/reference/ops.py`, some of them generated.

    generated RowProgram kernels      rms_norm, sigmoid_gate, swiglu, gelu, rope_qk, and row_program
    (TritonRowOp: forward kernel,     (the fusion plan's regions, expression norms); the backward
    backward by IR autodiff)          kernel of each is printed from `hrmspec.ir.grad` of its program
    the flash-attention template      attention, when backends/triton/attention.py imports: the
    (backends/triton/attention.py)    Mask's kind, documents and window printed in, its prefix and
                                      doc ids read per token, over equal query and key lengths
    the chunked linear-CE driver      linear_cross_entropy (the training loss), its softmax steps as
    with Triton kernels               Triton kernels (backends/triton/linear_ce.py)
    the reference torch ops           rope_tables, cross_entropy; attention otherwise (decoding with
                                      a cache, head dims over 128): the blocked reference attention

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by `get_backend`
before triton is imported). Whatever a kernel cannot run — a row wider than MAX_WIDTH, fp64, a
tensor on a device the kernels are not built for — runs the reference op instead, with a warning
(once per op and reason): a fallback is reported, never silent, and never a wrong result.
"""

from __future__ import annotations

import functools

import torch

from hrmspec.backends.reference import ops as reference
from hrmspec.backends.rowops import RowOpTable, beyond_limits
from hrmspec.backends.triton.aot import interpreting
from hrmspec.backends.triton.launch import MAX_WIDTH, TritonRowOp
from hrmspec.mask import Mask

upcast = reference.upcast
rotate_half = reference.rotate_half
rope_tables = reference.rope_tables
rope = reference.rope
cross_entropy = reference.cross_entropy

FUSED = True  # a Stack runs the fusion pass's regions (runtime/fused.py)
GENERATED = ("rms_norm", "sigmoid_gate", "swiglu", "gelu", "rope_qk", "row_program")  # and attention, the loss
def _unsupported(tensors: list[torch.Tensor], width: int) -> str | None:
    """Why generated kernels cannot run on these tensors, or None."""
    reason = beyond_limits(tensors, width, MAX_WIDTH)
    misplaced = next((t for t in tensors if (t.device.type == "cpu") != interpreting()), None)
    if reason is None and misplaced is not None:
        where = "the interpreter (CPU tensors)" if interpreting() else "a GPU"
        reason = f"a tensor on {misplaced.device} while the kernels run on {where}"
    return reason


_table = RowOpTable("triton", TritonRowOp, _unsupported)
_fallback = _table.fallback
row_program = _table.row_program
rms_norm = _table.rms_norm
sigmoid_gate = _table.sigmoid_gate
swiglu = _table.swiglu
gelu = _table.gelu
rope_qk = _table.rope_qk


# --------------------------------------------------------------------------- attention


@functools.lru_cache(maxsize=1)
def _flash_attention():
    """The flash-attention template's entry point, or None while it is not importable."""
    try:
        from hrmspec.backends.triton.attention import flash_attention
    except ImportError:
        return None
    return flash_attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v on (B, h, S, hd): the template, with the Mask's fields
    as its inputs; the reference attention where the template cannot run."""
    flash = _flash_attention()
    if flash is None:
        return reference.attention(q, k, v, mask)  # the template is not part of this build: nothing to report
    reason = _unsupported([q, k, v], 0)
    if reason is None and (q.shape != k.shape or mask.q_offset):
        reason = "query and key lengths differ (decoding with a cache)"
    elif reason is None and q.shape[-1] > 128:
        reason = f"head dim {q.shape[-1]} > 128"
    if reason is not None:
        _fallback("attention", reason)
        return reference.attention(q, k, v, mask)
    return flash(q, k, v, mask)


# --------------------------------------------------------------------------- the loss


def linear_cross_entropy(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple:
    """cross_entropy(h @ W.T, labels) in row chunks, the softmax steps as Triton kernels
    (backends/triton/linear_ce.py); the torch steps where the kernels cannot take the tensors."""
    reason = _unsupported([h, W], 0)
    if reason is not None:
        _fallback("linear_cross_entropy", reason)
        return reference.linear_cross_entropy(h, W, labels, ignore_index)
    from hrmspec.backends.triton.linear_ce import linear_cross_entropy as fused

    return fused(h, W, labels, ignore_index)
