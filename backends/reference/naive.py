"""Reference ops: the math of every op a ModelGraph contains, in plain torch.

Each function is the definition other backends are checked against, so clarity beats speed;
where torch has a fused op with the same math (rms_norm) we use it. Attention reads the mask as
a description (`hrmspec.mask.Mask`) and runs blocked, never building an S x S tensor
(backends/reference/attention.py). The reference backend's op table (backends/reference/table.py)
runs these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hrmspec.backends.reference import attention as _attention

if TYPE_CHECKING:
    from hrmspec.mask import Mask


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors are computed in fp32; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, computed in at least fp32 and cast back."""
    y = F.rms_norm(upcast(x), (x.shape[-1],), None if weight is None else upcast(weight), eps)
    return y.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, 1, S, head_dim): frequency theta^(-2i/head_dim), halves repeated."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, S, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, S, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, h, S, hd)."""
    return x * cos + rotate_half(x) * sin


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """Rotary embedding of q and k in projection layout (B, S, h, hd), tables (B, 1, S, hd)."""
    cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, S, 1, hd): broadcast over heads
    return rope(q, cos, sin), rope(k, cos, sin)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v for q (B, h, Sq, hd), k, v (B, h, Sk, hd) with Sk = Sq +
    mask.q_offset: flash-style blocks with an online softmax, memory linear in S."""
    return _attention.blocked_attention(q, k, v, mask)


def add(*terms: torch.Tensor) -> torch.Tensor:
    """A residual add x + r, or the sum x0 + x1 + ... of the states injected into a module call."""
    h = terms[0]
    for t in terms[1:]:
        h = h + t
    return h


def sigmoid_gate(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(g) * a


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def linear_cross_entropy(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple:
    """cross_entropy(h @ W.T, labels) for h (N, d), W (V, d), labels (N,), in row chunks: the (N, V)
    logits never exist at once (backends/common/chunked_linear_ce.py, with the torch steps)."""
    from hrmspec.backends.common.chunked_linear_ce import chunked_linear_cross_entropy
    from hrmspec.backends.reference.linear_ce import TORCH_STEPS

    return chunked_linear_cross_entropy(h, W, labels, TORCH_STEPS, ignore_index)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple:
    """(sum of token losses in fp32, number of counted tokens)."""
    total = F.cross_entropy(
        upcast(logits.reshape(-1, logits.shape[-1])), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return total, (labels != ignore_index).sum()
