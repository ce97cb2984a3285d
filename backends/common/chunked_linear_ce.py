"""Linear + cross-entropy in row chunks: the loss of z = h W^T without the (N, V) logits ever existing.

    loss_sum = sum_{i counted} lse_i - z_{i, y_i}        lse_i = log sum_v exp z_iv,  counted: y_i != ignore_index
    dz_iv    = g (softmax(z_i)_v - [v == y_i])           g = d loss / d loss_sum; dz_i = 0 for ignored rows
    dh       = dz W                                      dW = dz^T h   (summed over row chunks, in fp32)

`chunked_linear_cross_entropy` is the driver every backend shares; it knows no backend, the steps
are given. Rows go in chunks of C; per chunk z_c = h_c W^T is a matmul into one (C, V) buffer
reused by every chunk, and a `RowSteps` does the per-row softmax work on it:

    forward(z_c, labels_c, lse_c, loss_c)   fills lse (the only thing kept for backward: N floats)
                                            and the row losses
    backward(z_c, labels_c, lse_c, g)       overwrites z_c with dz, in place

after which dh_c = dz_c W and dW += dz_c^T h_c are matmuls again. The backward recomputes z_c (one
GEMM more than keeping gradients from the forward) and so is right for any upstream gradient.
The reference backend's steps are torch ops (backends/reference/linear_ce.py; every backend
without kernels for them runs the reference's loss); the Triton backend's are kernels
(backends/triton/linear_ce.py).
"""

from __future__ import annotations

from typing import Protocol

import torch

from hrmspec.backends.common.contract import IGNORE_INDEX
from hrmspec.errors import KernelError
from hrmspec.graph.loss_chunks import MIN_CHUNK_ROWS, default_chunk_rows, next_power_of_2


class RowSteps(Protocol):
    def forward(self, z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, loss: torch.Tensor,
                ignore_index: int) -> None: ...

    def backward(self, z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                 ignore_index: int) -> None: ...


def check_inputs(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    if h.dim() != 2 or W.dim() != 2 or h.shape[1] != W.shape[1] or tuple(labels.shape) != (h.shape[0],):
        raise KernelError(f"linear_cross_entropy: expected h (N, d), W (V, d), labels (N,), got h {tuple(h.shape)}, "
                          f"W {tuple(W.shape)}, labels {tuple(labels.shape)}")
    if h.dtype != W.dtype or h.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise KernelError(f"linear_cross_entropy: h and W must share one float dtype, got {h.dtype}, {W.dtype}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= W.shape[0]))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise KernelError(f"linear_cross_entropy: labels[{i}] = {int(labels[i])} is outside the vocabulary "
                          f"0..{W.shape[0] - 1} and is not ignore_index ({ignore_index})")


def _chunks(n_rows: int, chunk: int):
    for start in range(0, n_rows, chunk):
        yield start, min(start + chunk, n_rows)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, labels, steps: RowSteps, ignore_index: int, chunk_rows: int | None):
        check_inputs(h, W, labels, ignore_index)
        N, V = h.shape[0], W.shape[0]
        h, labels = h.contiguous(), labels.contiguous()
        chunk = chunk_rows or default_chunk_rows(N, V, h.shape[1])
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        lse = torch.empty(N, dtype=acc, device=h.device)
        loss = torch.empty(N, dtype=acc, device=h.device)
        z = torch.empty(min(chunk, N), V, dtype=h.dtype, device=h.device)
        for a, b in _chunks(N, chunk):
            zc = torch.matmul(h[a:b], W.t(), out=z[: b - a])
            steps.forward(zc, labels[a:b], lse[a:b], loss[a:b], ignore_index)
        ctx.save_for_backward(h, W, labels, lse)
        ctx.config = (steps, ignore_index, chunk)
        n_tokens = (labels != ignore_index).sum()
        ctx.mark_non_differentiable(n_tokens)
        return loss.sum(), n_tokens

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_loss, _d_count):
        h, W, labels, lse = ctx.saved_tensors
        steps, ignore_index, chunk = ctx.config
        need_h, need_w = ctx.needs_input_grad[:2]
        N, V = h.shape[0], W.shape[0]
        g = d_loss.detach().to(lse.dtype).reshape(1).contiguous()
        dh = torch.empty_like(h) if need_h else None
        dW = torch.zeros(W.shape, dtype=lse.dtype, device=W.device) if need_w else None
        z = torch.empty(min(chunk, N), V, dtype=h.dtype, device=h.device)
        for a, b in _chunks(N, chunk):
            zc = torch.matmul(h[a:b], W.t(), out=z[: b - a])
            steps.backward(zc, labels[a:b], lse[a:b], g, ignore_index)
            if need_h:
                torch.matmul(zc, W, out=dh[a:b])
            if need_w and h.dtype == dW.dtype:
                dW.addmm_(zc.t(), h[a:b])
            elif need_w:  # a half-precision GEMM (fp32 accumulate inside) per chunk, summed in fp32
                dW.add_(zc.t() @ h[a:b])
        return dh, None if dW is None else dW.to(W.dtype), None, None, None, None


def chunked_linear_cross_entropy(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, steps: RowSteps,
                                 ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None) -> tuple:
    """(sum of the token losses of h W^T in fp32, number of counted tokens) — the same pair as
    `cross_entropy(h @ W.T, labels)`; differentiable in h and W.

    h (N, d), W (V, d), labels (N,) int with `ignore_index` for rows without loss; `steps` do the
    per-row softmax work (see the module docstring). `chunk_rows`
    bounds the rows whose logits exist at once (default: the chunk's logits are about the size of h)."""
    return _ChunkedLinearCrossEntropy.apply(h, W, labels, steps, ignore_index, chunk_rows)


__all__ = ["IGNORE_INDEX", "MIN_CHUNK_ROWS", "RowSteps", "check_inputs", "chunked_linear_cross_entropy",
           "default_chunk_rows", "next_power_of_2"]
