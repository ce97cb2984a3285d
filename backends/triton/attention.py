"""Flash attention: the mask's block map built on the host, the kernels launched, an autograd Function.

The kernels are printed from the template in `attention_template.py` (the math, the mask
predicate, the cache naming are described there); this module runs them:

    block skipping      per-block summaries -> a state per (query block, key block) -> visit lists
    launching           attention_forward / attention_backward, tile configs per head dim and dtype
    autograd            flash_attention, differentiable in q, k, v
    compile-only        compile_for / compile_many: the real compiler for sm_<arch>, no GPU needed

Which (query block, key block) pairs must be computed is decided on the host from per-block
summaries (position range, min/max doc id over all tokens and over prefix tokens, whether the
block is all prefix), not from the dense mask: a pair is *skipped* when no element can be
allowed, *full* when every element is allowed (the predicate is not evaluated), and *partial*
otherwise. The kernels iterate over index lists of partial then full blocks, as FlexAttention does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from hrmspec.backends.triton import cache
from hrmspec.backends.triton.aot import CompiledInfo, compile_jobs, compile_kernel, interpreting, serve_jobs
from hrmspec.backends.triton.attention_template import CONSTEXPRS, KINDS, PARAMS, MaskSpec, kernel_name, load, render
from hrmspec.errors import KernelError

__all__ = [  # with the names re-exported from the template
    "FULL", "KINDS", "LOG2E", "MAX_HEAD_DIM", "PARTIAL", "SKIP", "BlockMap", "Config", "MaskSpec",
    "attention_backward", "attention_forward", "block_states", "compile_for", "compile_many", "default_config",
    "dot_precision", "flash_attention", "kernel_name", "load", "render", "visit_lists",
]

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


# -- block skipping: host-side summaries -> per-block state and visit lists ---------------------------
SKIP, PARTIAL, FULL = 0, 1, 2
_BIG = 1 << 40


def _summaries(doc: torch.Tensor, prefix: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    """Per block of `block` positions (B, n): position range, doc id range over all tokens and over
    prefix tokens (empty range = (+BIG, -BIG)), and whether every token is a prefix token."""
    B, S = doc.shape
    n = -(-S // block)
    pad = n * block - S
    valid = torch.nn.functional.pad(torch.ones_like(doc, dtype=torch.bool), (0, pad)).view(B, n, block)
    d = torch.nn.functional.pad(doc, (0, pad)).view(B, n, block)
    p = torch.nn.functional.pad(prefix, (0, pad)).view(B, n, block) & valid
    start = torch.arange(n, device=doc.device) * block
    return {
        "start": start, "end": torch.clamp(start + block, max=S) - 1,
        "dmin": torch.where(valid, d, _BIG).amin(-1), "dmax": torch.where(valid, d, -_BIG).amax(-1),
        "pmin": torch.where(p, d, _BIG).amin(-1), "pmax": torch.where(p, d, -_BIG).amax(-1),
        "all_pre": (p | ~valid).all(-1),
    }


def block_states(spec: MaskSpec, batch: int, seq_len: int, prefix: torch.Tensor | None, doc: torch.Tensor | None,
                 block_m: int, block_n: int, device=None) -> torch.Tensor:
    """(B, n_q_blocks, n_k_blocks) int8: SKIP (no allowed element), FULL (all allowed), else PARTIAL.

    Sound by construction (a block with an allowed element is never SKIP, a FULL block has no
    masked element) and exact for causal/bidirectional/window masks and sorted doc ids."""
    doc = torch.zeros(batch, seq_len, dtype=torch.int64, device=device) if doc is None else doc.long()
    pre = prefix.bool() if prefix is not None and spec.kind == "prefix_lm" else torch.zeros_like(doc, dtype=torch.bool)
    Q = {k: (v[:, :, None] if v.dim() == 2 else v[:, None]) for k, v in _summaries(doc, pre, block_m).items()}
    K = {k: (v[:, None, :] if v.dim() == 2 else v[None, :]) for k, v in _summaries(doc, pre, block_n).items()}
    qs, qe, ks, ke = Q["start"], Q["end"], K["start"], K["end"]
    doc_any = (Q["dmin"] <= K["dmax"]) & (K["dmin"] <= Q["dmax"])
    doc_full = (Q["dmin"] == Q["dmax"]) & (K["dmin"] == K["dmax"]) & (Q["dmin"] == K["dmin"])
    if spec.kind == "bidirectional":
        any_, full = doc_any, doc_full
    elif spec.kind == "causal":
        any_, full = doc_any & (ks <= qe), doc_full & (ke <= qs)
    else:  # the k > q part needs a prefix token of the same document on both sides
        prefix_any = (Q["pmin"] <= K["pmax"]) & (K["pmin"] <= Q["pmax"])
        any_ = (doc_any & (ks <= qe)) | prefix_any
        full = doc_full & ((ke <= qs) | (Q["all_pre"] & K["all_pre"]))
    if spec.window:  # nearest pair closer than w / farthest pair closer than w
        w = spec.window
        any_ = any_ & (ks - qe < w) & (qs - ke < w)
        full = full & (qe - ks < w) & (ke - qs < w)
    any_, full = torch.broadcast_tensors(any_, full)
    return torch.where(full, FULL, torch.where(any_, PARTIAL, SKIP)).to(torch.int8).expand(batch, -1, -1).contiguous()


def visit_lists(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For states (B, R, C): counts (B, 2, R) and column indices (B, 2, R, C) int32 of the PARTIAL
    (list 0) and FULL (list 1) blocks of each row, in increasing column order, then padding."""
    num = torch.stack([(states == s).sum(-1) for s in (PARTIAL, FULL)], 1).int()
    idx = torch.stack([torch.sort((states != s).to(torch.int8), dim=-1, stable=True).indices
                       for s in (PARTIAL, FULL)], 1).int()
    return num.contiguous(), idx.contiguous()


@dataclass
class BlockMap:
    states: torch.Tensor  # (B, N_QB, N_KB) int8
    kv_num: torch.Tensor  # (B, 2, N_QB): per query block, the key blocks to visit
    kv_idx: torch.Tensor  # (B, 2, N_QB, N_KB)
    q_num: torch.Tensor  # (B, 2, N_KB): per key block, the query blocks that see it
    q_idx: torch.Tensor  # (B, 2, N_KB, N_QB)

    @classmethod
    def build(cls, states: torch.Tensor) -> BlockMap:
        kv = visit_lists(states)
        qv = visit_lists(states.transpose(1, 2))
        return cls(states, *kv, *qv)


# -- launching -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4


def default_config(head_dim: int, direction: str = "fwd", dtype: torch.dtype = torch.bfloat16,
                   interpret: bool | None = None) -> Config:
    """Tiles without register spills on sm_80 and sm_90 in bf16/fp16 (see the compile-only tests): the
    backward holds more tiles (k, v, dk, dv or q, do, dq, and the score tiles), so it takes smaller ones.
    fp32 storage (for tests) gets small tiles; at head dim 128 its tf32x3 dots still spill."""
    if interpreting() if interpret is None else interpret:  # bigger tiles: fewer (slow) interpreted programs
        return Config(32, 32, 4)
    if dtype == torch.float32:
        return Config(32, 32, 4)
    if direction == "fwd":
        return Config(64, 64, 4) if head_dim <= 64 else Config(128, 64, 8)
    return Config(64, 32, 4) if head_dim <= 64 else Config(32, 64, 8)


def dot_precision(dtype: torch.dtype, interpret: bool) -> str:
    """fp32 storage on a GPU: three tf32 products (about fp32 accuracy on tensor cores; an exact
    "ieee" dot runs on the FMA units and spills). The interpreter computes exactly; half-precision
    operands ignore the setting."""
    return "tf32x3" if dtype == torch.float32 and not interpret else "ieee"


def _padded_head_dim(hd: int) -> int:
    return max(16, 1 << (hd - 1).bit_length())  # tl.dot needs K >= 16 and a power of two


def _inputs(q, k, v, spec, prefix, doc):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise KernelError(f"flash_attention: q, k, v must have one shape (B, h, S, hd), got {tuple(q.shape)}, "
                          f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelError(f"flash_attention: q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, "
                          f"{v.dtype}")
    B, _, S, hd = q.shape
    if not 1 <= hd <= MAX_HEAD_DIM:
        raise KernelError(f"flash_attention: head dim {hd} is outside 1..{MAX_HEAD_DIM}")
    for what, t in (("prefix", prefix), ("doc", doc)):
        if t is not None and tuple(t.shape) != (B, S):
            raise KernelError(f"flash_attention: {what} must be (B, S) = {(B, S)}, got {tuple(t.shape)}")
    pre = (prefix if prefix is not None and spec.kind == "prefix_lm" else torch.zeros(B, S, device=q.device))
    pre = pre.to(device=q.device, dtype=torch.int8).contiguous()
    d = (doc if doc is not None else torch.zeros(B, S, device=q.device)).to(device=q.device, dtype=torch.int32)
    return pre, d.contiguous()


def _launch(spec: MaskSpec, direction: str, grid: tuple[int, int], args: list, q: torch.Tensor, cfg: Config,
            record: bool) -> None:
    if grid[0] and grid[1]:
        load(spec, direction)[grid](
            *args, HEAD_DIM=q.shape[-1], HD=_padded_head_dim(q.shape[-1]), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            DOT_F32=q.dtype == torch.float32 or interpreting(), PRECISION=dot_precision(q.dtype, interpreting()),
            RECORD=record, num_warps=cfg.num_warps)


def attention_forward(q, k, v, spec: MaskSpec, prefix=None, doc=None, config: Config | None = None,
                      record: bool = False):
    """(out, lse (B, h, S) fp32 base 2, BlockMap, visited) — visited (B*h, N_QB, N_KB) int8 holds
    the state of every block the kernel computed when `record`, else None."""
    pre, d = _inputs(q, k, v, spec, prefix, doc)
    B, H, S, hd = q.shape
    cfg = config or default_config(hd, "fwd", q.dtype)
    bmap = BlockMap.build(block_states(spec, B, S, prefix, doc, cfg.block_m, cfg.block_n, q.device))
    n_qb, n_kb = bmap.states.shape[1:]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    visit = torch.zeros(B * H * n_qb * n_kb if record else 1, dtype=torch.int8, device=q.device)
    _launch(spec, "fwd", (n_qb, B * H), [q, k, v, out, lse, pre, d, bmap.kv_num, bmap.kv_idx, visit, H, S, n_qb, n_kb,
                                         LOG2E / math.sqrt(hd)], q, cfg, record)
    return out, lse, bmap, visit.view(B * H, n_qb, n_kb) if record else None


def attention_backward(q, k, v, out, lse, d_out, spec: MaskSpec, prefix=None, doc=None,
                       config: Config | None = None, record: bool = False):
    """(dq, dk, dv, BlockMap, visited); visited (B*h, 2, N_QB, N_KB): [:, 0] by the dq programs,
    [:, 1] by the dk/dv programs. The block map is rebuilt for the backward's own tile sizes."""
    pre, d = _inputs(q, k, v, spec, prefix, doc)
    B, H, S, hd = q.shape
    cfg = config or default_config(hd, "bwd", q.dtype)
    bmap = BlockMap.build(block_states(spec, B, S, prefix, doc, cfg.block_m, cfg.block_n, q.device))
    n_qb, n_kb = bmap.states.shape[1:]
    q, k, v, d_out = q.contiguous(), k.contiguous(), v.contiguous(), d_out.contiguous()
    delta = (d_out.float() * out.float()).sum(-1).contiguous()  # rowsum(do * out) = sum_k p dp
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    visit = torch.zeros(B * H * 2 * n_qb * n_kb if record else 1, dtype=torch.int8, device=q.device)
    _launch(spec, "bwd", (n_kb + n_qb, B * H), [q, k, v, d_out, lse, delta, dq, dk, dv, pre, d, bmap.kv_num,
                                                bmap.kv_idx, bmap.q_num, bmap.q_idx, visit, H, S, n_qb, n_kb,
                                                LOG2E / math.sqrt(hd), 1.0 / math.sqrt(hd)], q, cfg, record)
    return dq, dk, dv, bmap, visit.view(B * H, 2, n_qb, n_kb) if record else None


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prefix, doc, spec: MaskSpec, config: Config | None):
        out, lse, _, _ = attention_forward(q, k, v, spec, prefix, doc, config)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.config, ctx.tokens = spec, config, (prefix, doc)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, _, _ = attention_backward(q, k, v, out, lse, d_out, ctx.spec, *ctx.tokens, ctx.config)
        return dq, dk, dv, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, prefix: torch.Tensor | None = None,
                    doc: torch.Tensor | None = None, window: int | None = None,
                    config: Config | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v for q, k, v (B, h, S, hd); differentiable in q, k, v.

    The mask is `kind` (causal | prefix_lm | bidirectional) with `prefix` (B, S) bool for
    prefix_lm, and-ed with same-document when `doc` (B, S) ids are given and with |q - k| < window
    when `window` is given; it equals `runtime.masks.dense_mask(kind, B, S, prefix, doc)`."""
    spec = MaskSpec(kind, doc is not None, window)
    return _FlashAttention.apply(q, k, v, prefix, doc, spec, config)


# -- compile-only ----------------------------------------------------------------------------------------
def compile_for(kind: str, documents: bool = False, window: int | None = None, direction: str = "fwd",
                head_dim: int = 64, dtype: str = "bf16", arch: int = 80, block_m: int | None = None,
                block_n: int | None = None, num_warps: int | None = None) -> CompiledInfo:
    """Compile one attention kernel for sm_<arch> with the real compiler (no GPU needed)."""
    spec = MaskSpec(kind, documents, window)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    default = default_config(head_dim, direction, torch_dtype, interpret=False)
    cfg = Config(block_m or default.block_m, block_n or default.block_n, num_warps or default.num_warps)
    name = kernel_name(spec, direction)
    t0 = time.perf_counter()
    fn = getattr(cache.load_module(cache.write_source(name, render(spec, direction, name), f"cuda-{arch}-32")), name)
    signature = {p: (f"*{dtype}" if t == "x" else t) for p, t in PARAMS[direction].items()}
    constexprs = {"HEAD_DIM": head_dim, "HD": _padded_head_dim(head_dim), "BLOCK_M": cfg.block_m,
                  "BLOCK_N": cfg.block_n, "DOT_F32": dtype == "fp32", "PRECISION": dot_precision(torch_dtype, False),
                  "RECORD": False}
    signature.update(dict.fromkeys(CONSTEXPRS, "constexpr"))
    return compile_kernel(fn, signature, constexprs, arch, cfg.num_warps,
                          f"{name}[hd={head_dim},{cfg.block_m}x{cfg.block_n}]", cfg.block_m, aligned=True, t0=t0)


def compile_many(jobs: list[dict]) -> list[CompiledInfo]:
    """`compile_for(**job)` for each job; in a process that interprets, in a fresh Python."""
    return compile_jobs(__name__, compile_for, jobs)


if __name__ == "__main__":
    serve_jobs(compile_for)
