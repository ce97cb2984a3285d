"""Fused linear + cross-entropy: the loss of z = h W^T without the (N, V) logits ever existing at once.

    loss_sum = sum_{i counted} lse_i - z_{i, y_i}        lse_i = log sum_v exp z_iv,  counted: y_i != ignore_index
    dz_iv    = g (softmax(z_i)_v - [v == y_i])           g = d loss / d loss_sum; dz_i = 0 for ignored rows
    dh       = dz W                                      dW = dz^T h   (summed over row chunks, in fp32)

Rows are processed in chunks of C rows. Per chunk, z_c = h_c W^T is a torch matmul (cuBLAS on a GPU,
the CPU GEMM here) into one (C, V) buffer reused by every chunk; the softmax parts are Triton
kernels with one program per row, looping over the vocabulary in blocks of BLOCK_V:

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

import json
import sys
import time
from dataclasses import asdict

import torch
import triton
import triton.language as tl

from hrmspec.backends.triton.aot import CompiledInfo, compile_in_fresh_process, interpreting, ptxas_usage
from hrmspec.backends.triton.launch import KernelError, triton_next_power_of_2

IGNORE_INDEX = -100
MAX_BLOCK_V = 4096


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


def default_chunk_rows(n_rows: int, vocab: int, d_model: int) -> int:
    """Rows per chunk such that the chunk's logits (C, V) are about as large as h (N, d)."""
    per_row = -(-vocab // max(1, d_model))
    return max(1, min(n_rows, triton_next_power_of_2(-(-n_rows // per_row))))


def _launch_config(vocab: int, block_v: int | None) -> tuple[int, int]:
    block = block_v or min(MAX_BLOCK_V, triton_next_power_of_2(vocab))
    return block, 8 if block >= 2048 else 4


def _check(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    if h.dim() != 2 or W.dim() != 2 or h.shape[1] != W.shape[1] or tuple(labels.shape) != (h.shape[0],):
        raise KernelError(f"linear_cross_entropy: expected h (N, d), W (V, d), labels (N,), got h {tuple(h.shape)}, "
                          f"W {tuple(W.shape)}, labels {tuple(labels.shape)}")
    if h.dtype != W.dtype or h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelError(f"linear_cross_entropy: h and W must share one of fp32/fp16/bf16, got {h.dtype}, {W.dtype}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= W.shape[0]))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise KernelError(f"linear_cross_entropy: labels[{i}] = {int(labels[i])} is outside the vocabulary "
                          f"0..{W.shape[0] - 1} and is not ignore_index ({ignore_index})")


def _chunks(n_rows: int, chunk: int):
    for start in range(0, n_rows, chunk):
        yield start, min(start + chunk, n_rows)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, labels, ignore_index: int, chunk_rows: int | None, block_v: int | None):
        _check(h, W, labels, ignore_index)
        N, V = h.shape[0], W.shape[0]
        h, labels = h.contiguous(), labels.contiguous()
        chunk = chunk_rows or default_chunk_rows(N, V, h.shape[1])
        block, warps = _launch_config(V, block_v)
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        loss = torch.empty(N, dtype=torch.float32, device=h.device)
        z = torch.empty(min(chunk, N), V, dtype=h.dtype, device=h.device)
        for a, b in _chunks(N, chunk):
            zc = torch.matmul(h[a:b], W.t(), out=z[: b - a])
            _linear_ce_forward_kernel[(b - a,)](zc, zc.stride(0), labels[a:b], lse[a:b], loss[a:b], V, ignore_index,
                                               BLOCK_V=block, num_warps=warps)
        ctx.save_for_backward(h, W, labels, lse)
        ctx.config = (ignore_index, chunk, block, warps)
        n_tokens = (labels != ignore_index).sum()
        ctx.mark_non_differentiable(n_tokens)
        return loss.sum(), n_tokens

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_loss, _d_count):
        h, W, labels, lse = ctx.saved_tensors
        ignore_index, chunk, block, warps = ctx.config
        need_h, need_w = ctx.needs_input_grad[:2]
        N, V = h.shape[0], W.shape[0]
        g = d_loss.detach().float().reshape(1).contiguous()
        dh = torch.empty_like(h) if need_h else None
        dW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_w else None
        z = torch.empty(min(chunk, N), V, dtype=h.dtype, device=h.device)
        for a, b in _chunks(N, chunk):
            zc = torch.matmul(h[a:b], W.t(), out=z[: b - a])
            _linear_ce_backward_kernel[(b - a,)](zc, zc.stride(0), labels[a:b], lse[a:b], g, V, ignore_index,
                                                BLOCK_V=block, num_warps=warps)
            if need_h:
                torch.matmul(zc, W, out=dh[a:b])
            if need_w and h.dtype == torch.float32:
                dW.addmm_(zc.t(), h[a:b])
            elif need_w:  # a half-precision GEMM (fp32 accumulate inside) per chunk, summed in fp32
                dW.add_(zc.t() @ h[a:b])
        return dh, None if dW is None else dW.to(W.dtype), None, None, None, None


def linear_cross_entropy(h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                         chunk_rows: int | None = None, block_v: int | None = None) -> tuple[torch.Tensor, ...]:
    """(sum of the token losses of h W^T in fp32, number of counted tokens) — the same pair as
    `backends.reference.ops.cross_entropy(h @ W.T, labels)`; differentiable in h and W.

    h (N, d), W (V, d), labels (N,) int with `ignore_index` for rows without loss. `chunk_rows`
    bounds the rows whose logits exist at once (default: the chunk's logits are about the size of
    h); `block_v` is the vocabulary tile of the kernels (default: min(4096, next_pow2(V)))."""
    return _LinearCrossEntropy.apply(h, W, labels, ignore_index, chunk_rows, block_v)


# -- compile-only ----------------------------------------------------------------------------------------
def compile_for(direction: str = "fwd", dtype: str = "bf16", arch: int = 80, vocab: int = 65536,
                block_v: int | None = None) -> CompiledInfo:
    """Compile one of the two kernels for sm_<arch> with the real compiler (no GPU needed)."""
    from triton.backends.compiler import GPUTarget

    if interpreting():
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1; use compile_many (a fresh process)")
    block, warps = _launch_config(vocab, block_v)
    fn = {"fwd": _linear_ce_forward_kernel, "bwd": _linear_ce_backward_kernel}[direction]
    last = {"fwd": {"LSE": "*fp32", "LOSS": "*fp32"}, "bwd": {"LSE": "*fp32", "GRAD": "*fp32"}}[direction]
    signature = {"Z": f"*{dtype}", "stride_z": "i32", "LABELS": "*i64", **last, "V": "i32", "ignore_index": "i32",
                 "BLOCK_V": "constexpr"}
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
    t0 = time.perf_counter()
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs={"BLOCK_V": block}, attrs=aligned)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    seconds = time.perf_counter() - t0
    ptx = compiled.asm["ptx"]
    regs, stores, loads = ptxas_usage(ptx, arch)
    return CompiledInfo(fn.__name__, arch, block, warps, regs, stores, loads, compiled.metadata.shared, seconds, ptx)


def compile_many(jobs: list[dict]) -> list[CompiledInfo]:
    """`compile_for(**job)` for each job; in a process that interprets, in a fresh Python."""
    if not interpreting():
        return [compile_for(**job) for job in jobs]
    return compile_in_fresh_process(__name__, jobs)


if __name__ == "__main__":
    print(json.dumps([asdict(compile_for(**job)) for job in json.loads(sys.stdin.read())]))
