"""Flash attention: the mask's block map built on the host, the kernels launched, an autograd Function.

The kernels are printed from the template in `attention_template.py` (the math, the mask
predicate, the cache naming are described there); this module runs them:

    block skipping      per-block summaries -> a state per (query block, key block) -> visit lists
    launching           attention_forward / attention_backward, tile configs per head dim and dtype
    autograd            flash_attention, differentiable in q, k, v
    compile-only        compile_for / compile_many: the real compiler for sm_<arch>, no GPU needed

Which (query block, key block) pairs must be computed is the mask's block plan,
`hrmspec.mask.block_states` (shared by every backend): a pair is *skipped* when no element can be
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
from hrmspec.mask import FULL, PARTIAL, SKIP, Mask, block_states

__all__ = [  # with the names re-exported from the template
    "FULL", "KINDS", "LOG2E", "MAX_HEAD_DIM", "PARTIAL", "SKIP", "BlockMap", "Config", "MaskSpec",
    "attention_backward", "attention_forward", "block_states", "compile_for", "compile_many", "default_config",
    "dot_precision", "flash_attention", "kernel_name", "load", "render", "visit_lists",
]

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


# -- block skipping: the mask's block states -> visit lists --------------------------------------------
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


def _inputs(q, k, v, mask: Mask):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise KernelError(f"flash_attention: q, k, v must have one shape (B, h, S, hd), got {tuple(q.shape)}, "
                          f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelError(f"flash_attention: q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, "
                          f"{v.dtype}")
    B, _, S, hd = q.shape
    if not 1 <= hd <= MAX_HEAD_DIM:
        raise KernelError(f"flash_attention: head dim {hd} is outside 1..{MAX_HEAD_DIM}")
    if mask.q_offset:
        raise KernelError(f"flash_attention: queries start at key {mask.q_offset}; the template takes q_offset 0 "
                          "(equal query and key lengths)")
    for what, t in (("prefix", mask.prefix), ("doc", mask.doc)):
        if t is not None and tuple(t.shape) not in ((B, S), (1, S)):
            raise KernelError(f"flash_attention: the mask's {what} must be (B, S) = {(B, S)}, got {tuple(t.shape)}")
    pre = mask.prefix if mask.prefix is not None and mask.kind == "prefix_lm" else torch.zeros(1, S, device=q.device)
    d = mask.doc if mask.doc is not None else torch.zeros(1, S, device=q.device)
    pre, d = pre.to(device=q.device, dtype=torch.int8), d.to(device=q.device, dtype=torch.int32)
    return pre.expand(B, S).contiguous(), d.expand(B, S).contiguous()


def _block_map(mask: Mask, B: int, S: int, cfg: Config, device) -> BlockMap:
    states = mask.states(S, S, cfg.block_m, cfg.block_n, device)
    return BlockMap.build(states.to(device).expand(B, -1, -1).contiguous())


def _launch(spec: MaskSpec, direction: str, grid: tuple[int, int], args: list, q: torch.Tensor, cfg: Config,
            record: bool) -> None:
    if grid[0] and grid[1]:
        load(spec, direction)[grid](
            *args, HEAD_DIM=q.shape[-1], HD=_padded_head_dim(q.shape[-1]), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            DOT_F32=q.dtype == torch.float32 or interpreting(), PRECISION=dot_precision(q.dtype, interpreting()),
            RECORD=record, num_warps=cfg.num_warps)


def attention_forward(q, k, v, mask: Mask, config: Config | None = None, record: bool = False):
    """(out, lse (B, h, S) fp32 base 2, BlockMap, visited) — visited (B*h, N_QB, N_KB) int8 holds
    the state of every block the kernel computed when `record`, else None."""
    pre, d = _inputs(q, k, v, mask)
    B, H, S, hd = q.shape
    cfg = config or default_config(hd, "fwd", q.dtype)
    bmap = _block_map(mask, B, S, cfg, q.device)
    n_qb, n_kb = bmap.states.shape[1:]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    visit = torch.zeros(B * H * n_qb * n_kb if record else 1, dtype=torch.int8, device=q.device)
    _launch(MaskSpec.of(mask), "fwd", (n_qb, B * H), [q, k, v, out, lse, pre, d, bmap.kv_num, bmap.kv_idx, visit, H,
                                                      S, n_qb, n_kb, LOG2E / math.sqrt(hd)], q, cfg, record)
    return out, lse, bmap, visit.view(B * H, n_qb, n_kb) if record else None


def attention_backward(q, k, v, out, lse, d_out, mask: Mask, config: Config | None = None, record: bool = False):
    """(dq, dk, dv, BlockMap, visited); visited (B*h, 2, N_QB, N_KB): [:, 0] by the dq programs,
    [:, 1] by the dk/dv programs. The block map is rebuilt for the backward's own tile sizes."""
    pre, d = _inputs(q, k, v, mask)
    B, H, S, hd = q.shape
    cfg = config or default_config(hd, "bwd", q.dtype)
    bmap = _block_map(mask, B, S, cfg, q.device)
    n_qb, n_kb = bmap.states.shape[1:]
    q, k, v, d_out = q.contiguous(), k.contiguous(), v.contiguous(), d_out.contiguous()
    delta = (d_out.float() * out.float()).sum(-1).contiguous()  # rowsum(do * out) = sum_k p dp
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    visit = torch.zeros(B * H * 2 * n_qb * n_kb if record else 1, dtype=torch.int8, device=q.device)
    _launch(MaskSpec.of(mask), "bwd", (n_kb + n_qb, B * H), [q, k, v, d_out, lse, delta, dq, dk, dv, pre, d,
                                                             bmap.kv_num, bmap.kv_idx, bmap.q_num, bmap.q_idx, visit,
                                                             H, S, n_qb, n_kb, LOG2E / math.sqrt(hd),
                                                             1.0 / math.sqrt(hd)], q, cfg, record)
    return dq, dk, dv, bmap, visit.view(B * H, 2, n_qb, n_kb) if record else None


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask: Mask, config: Config | None):
        out, lse, _, _ = attention_forward(q, k, v, mask, config)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.config = mask, config
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, _, _ = attention_backward(q, k, v, out, lse, d_out, ctx.mask, ctx.config)
        return dq, dk, dv, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask,
                    config: Config | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v for q, k, v (B, h, S, hd); differentiable in q, k, v.

    The mask's kind, documents and window choose the printed kernel (`MaskSpec.of`); its prefix
    and doc ids (B, S) are the kernel's per-token inputs. It takes q_offset 0 only."""
    if not isinstance(mask, Mask):
        raise KernelError(f"flash_attention: the mask must be a hrmspec.mask.Mask, got {type(mask).__name__}")
    return _FlashAttention.apply(q, k, v, mask, config)


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
