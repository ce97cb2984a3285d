"""The Triton backend's op table: generated kernels where there are some, the reference elsewhere.

    generated RowProgram kernels      row_program (the fusion plan's regions, norms, gates,
    (TritonRowOp: forward kernel,     activations, expression norms) and rope_qk; the backward
    backward by IR autodiff)          kernel of each is printed from `hrmspec.ir.grad` of its program
    the flash-attention template      attention, when backends/triton/attention.py imports: the
    (backends/triton/attention.py)    Mask's kind, documents and window printed in, its prefix and
                                      doc ids read per token, over equal query and key lengths
    the chunked linear-CE driver      linear_cross_entropy (the training loss), its softmax steps as
    with Triton kernels               Triton kernels (backends/triton/linear_ce.py)
    the reference table               rope_tables, cross_entropy, linear; attention otherwise
                                      (decoding with a cache, head dims over 128): the blocked
                                      reference attention

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by the registry
before triton is imported). Whatever a kernel cannot run — a row wider than MAX_WIDTH, fp64, a
tensor on a device the kernels are not built for — runs the reference op instead, reported as a
fallback (backends/common/fallback.py): never silent, and never a wrong result.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from hrmspec.backends.common.contract import IGNORE_INDEX
from hrmspec.backends.common.kernel_table import KernelTable
from hrmspec.backends.common.limits import MAX_WIDTH, beyond_limits
from hrmspec.backends.triton.aot import interpreting
from hrmspec.backends.triton.launch import TritonRowOp
from hrmspec.mask import Mask


class TritonTable(KernelTable):
    """The Triton backend (see the module docstring)."""

    name = "triton"
    op_class = TritonRowOp

    @property
    def device_type(self) -> str:  # type: ignore[override]
        """The interpreter takes CPU tensors; compiled kernels CUDA ones."""
        return "cpu" if interpreting() else "cuda"

    def unsupported(self, tensors: list[Tensor], width: int) -> str | None:
        """Why generated kernels cannot run on these tensors, or None."""
        reason = beyond_limits(tensors, width, MAX_WIDTH)
        misplaced = next((t for t in tensors if (t.device.type == "cpu") != interpreting()), None)
        if reason is None and misplaced is not None:
            where = "the interpreter (CPU tensors)" if interpreting() else "a GPU"
            reason = f"a tensor on {misplaced.device} while the kernels run on {where}"
        return reason

    def attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Tensor:
        return attention(q, k, v, mask, self)  # the module's function (below)

    def linear_cross_entropy(self, h: Tensor, W: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
                             ) -> tuple[Tensor, Tensor]:
        """cross_entropy(h @ W.T, labels) in row chunks, the softmax steps as Triton kernels
        (backends/triton/linear_ce.py); the reference's torch steps where the kernels cannot take the tensors."""
        reason = self.unsupported([h, W], 0)
        if reason is not None:
            self.fallback("linear_cross_entropy", reason)
            return self.reference.linear_cross_entropy(h, W, labels, ignore_index)
        from hrmspec.backends.triton.linear_ce import linear_cross_entropy as fused

        return fused(h, W, labels, ignore_index)


# --------------------------------------------------------------------------- attention


@functools.lru_cache(maxsize=1)
def _flash_attention():
    """(the flash-attention template's entry point, None), or (None, why it does not import)."""
    try:
        from hrmspec.backends.triton.attention import flash_attention
    except ImportError as e:
        return None, f"the flash-attention template does not import ({e})"
    return flash_attention, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, table: TritonTable) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v on (B, h, S, hd): the template, with the Mask's fields
    as its inputs; the reference attention where the template cannot run."""
    reference, _unsupported, _fallback = table.reference, table.unsupported, table.fallback  # what it falls back to
    flash, reason = _flash_attention()
    if reason is None:
        reason = _unsupported([q, k, v], 0)
    if reason is None and (q.shape != k.shape or mask.q_offset):
        reason = "query and key lengths differ (decoding with a cache)"
    elif reason is None and q.shape[-1] > 128:
        reason = f"head dim {q.shape[-1]} > 128"
    if reason is not None:
        _fallback("attention", reason)
        return reference.attention(q, k, v, mask)
    return flash(q, k, v, mask)


__all__ = ["TritonTable", "attention"]
