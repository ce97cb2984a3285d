"""Fused linear + cross-entropy: the loss of z = h W^T without the (N, V) logits ever existing at once.

    loss_sum = sum_{i counted} lse_i - z_{i, y_i}        lse_i = log sum_v exp z_iv,  counted: y_i != ignore_index
    dz_iv    = g (softmax(z_i)_v - [v == y_i])           g = d loss / d loss_sum; dz_i = 0 for ignored rows
    dh       = dz W                                      dW = dz^T h   (summed over row chunks, in fp32)

Rows are processed in chunks of C rows by the driver every backend shares
(backends/common/chunked_linear_ce.py): per chunk, z_c = h_c W^T is a torch matmul (cuBLAS on a GPU,
the CPU GEMM here) into one (C, V) buffer reused by every chunk; here the softmax parts are Triton
kernels (`TritonSteps`) with one program per row, looping over the vocabulary in blocks of BLOCK_V:

- `_linear_ce_forward_kernel`: an online max / sum of exp over the vocab blocks
  (m' = max(m, max_b z), s' = s e^(m - m') + sum_b e^(z - m')), then lse = m + log s, the target
  logit and the row loss. Only lse (N floats) is saved for the backward.
- `_linear_ce_backward_kernel`: recomputes nothing but the softmax: it overwrites the chunk's
  logits, recomputed by a second torch matmul, with dz in place; dh_c = dz W and dW += dz^T h_c are
  torch matmuls again.

Recomputing z in the backward costs one GEMM more than keeping the gradients from the forward
(as some fused implementations do) and keeps the backward correct for any upstream gradient.
Storage may be fp32, fp16 or bf16; the kernels compute in fp32 (upcast after load).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hrmspec.backends.common.chunked_linear_ce import IGNORE_INDEX, chunked_linear_cross_entropy, default_chunk_rows
from hrmspec.backends.triton.aot import CompiledInfo, compile_jobs, compile_kernel, serve_jobs
from hrmspec.backends.triton.launch import triton_next_power_of_2
from hrmspec.errors import KernelError

MAX_BLOCK_V = 4096
__all__ = ["IGNORE_INDEX", "TritonSteps", "compile_for", "compile_many", "default_chunk_rows", "linear_cross_entropy"]


@triton.jit
def _linear_ce_forward_kernel(Z, stride_z, LABELS, LSE, LOSS, V, ignore_index, BLOCK_V: tl.constexpr):
    # grid (rows of the chunk,): exact, so rows need no mask; vocab lanes past V do
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    label = tl.load(LABELS + row)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))  # finite: every block has at least one lane < V
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    counted = label != ignore_index
    target = tl.load(z_row + label, mask=counted & (label >= 0) & (label < V), other=0.0).to(tl.float32)
    tl.store(LSE + row, lse)
    tl.store(LOSS + row, tl.where(counted, lse - target, 0.0))


@triton.jit
def _linear_ce_backward_kernel(Z, stride_z, LABELS, LSE, GRAD, V, ignore_index, BLOCK_V: tl.constexpr):
    # overwrites the row's logits z with dz = g (exp(z - lse) - onehot(label)), 0 for an ignored row
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    label = tl.load(LABELS + row)
    lse = tl.load(LSE + row)
    g = tl.where(label != ignore_index, tl.load(GRAD).to(tl.float32), 0.0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < V
        z = tl.load(z_row + cols, mask=inside, other=0.0).to(tl.float32)
        dz = (tl.exp(z - lse) - (cols == label).to(tl.float32)) * g
        tl.store(z_row + cols, dz.to(Z.dtype.element_ty), mask=inside)


def _launch_config(vocab: int, block_v: int | None) -> tuple[int, int]:
    block = block_v or min(MAX_BLOCK_V, triton_next_power_of_2(vocab))
    return block, 8 if block >= 2048 else 4


class TritonSteps:
    """The row steps of the chunked driver as the two kernels above (one program per row)."""

    def __init__(self, vocab: int, block_v: int | None = None):
        self.block, self.warps = _launch_config(vocab, block_v)

    def forward(self, z, labels, lse, loss, ignore_index):
        _linear_ce_forward_kernel[(z.shape[0],)](z, z.stride(0), labels, lse, loss, z.shape[1], ignore_index,
                                                 BLOCK_V=self.block, num_warps=self.warps)

    def backward(self, z, labels, lse, g, ignore_index):
        _linear_ce_backward_kernel[(z.shape[0],)](z, z.stride(0), labels, lse, g, z.shape[1], ignore_index,
                                                  BLOCK_V=self.block, num_warps=self.warps)


def linear_cross_entropy(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                         chunk_rows: int | None = None, block_v: int | None = None) -> tuple[torch.Tensor, ...]:
    """(sum of the token losses of h W^T in fp32, number of counted tokens) — the same pair as
    the reference's `cross_entropy(h @ W.T, labels)`; differentiable in h and W.

    h (N, d), W (V, d), labels (N,) int with `ignore_index` for rows without loss; fp32, fp16 or
    bf16. `chunk_rows` bounds the rows whose logits exist at once (default: the chunk's logits are
    about the size of h); `block_v` is the vocabulary tile of the kernels (default: min(4096,
    next_pow2(V)))."""
    if h.dtype == torch.float64:
        raise KernelError("linear_cross_entropy: the kernels store fp32, fp16 or bf16, got torch.float64")
    return chunked_linear_cross_entropy(h, W, labels, TritonSteps(W.shape[0], block_v), ignore_index, chunk_rows)


# -- compile-only ----------------------------------------------------------------------------------------
def compile_for(direction: str = "fwd", dtype: str = "bf16", arch: int = 80, vocab: int = 65536,
                block_v: int | None = None) -> CompiledInfo:
    """Compile one of the two kernels for sm_<arch> with the real compiler (no GPU needed)."""
    block, warps = _launch_config(vocab, block_v)
    fn = {"fwd": _linear_ce_forward_kernel, "bwd": _linear_ce_backward_kernel}[direction]
    last = {"fwd": {"LSE": "*fp32", "LOSS": "*fp32"}, "bwd": {"LSE": "*fp32", "GRAD": "*fp32"}}[direction]
    signature = {"Z": f"*{dtype}", "stride_z": "i32", "LABELS": "*i64", **last, "V": "i32", "ignore_index": "i32",
                 "BLOCK_V": "constexpr"}
    return compile_kernel(fn, signature, {"BLOCK_V": block}, arch, warps, fn.__name__, block, aligned=True)


def compile_many(jobs: list[dict]) -> list[CompiledInfo]:
    """`compile_for(**job)` for each job; in a process that interprets, in a fresh Python."""
    return compile_jobs(__name__, compile_for, jobs)


if __name__ == "__main__":
    serve_jobs(compile_for)
