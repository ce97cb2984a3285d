"""Attention without an S x S tensor: flash-style blocked attention with an autograd Function.

For one (batch, head), scores s = q k^T / sqrt(hd) + bias, bias = 0 on the pairs the Mask allows
and -inf elsewhere, in tiles of `block_q` queries x `block_k` keys:

    forward     per tile t of a query block, o_t = softmax(s_t) v_t and lse_t = log sum exp(s_t);
                the tiles are merged online: lse = log(e^lse + e^lse_t),
                out = out e^(lse_old - lse) + o_t e^(lse_t - lse). Saved: q, k, v, out and lse (+inf
                for a query with no allowed key, whose output is 0)
    backward    per tile, p = exp(s - lse), recomputed from the saved lse, never stored:
                dv = p^T do      dp = do v^T      ds = p * (dp - delta),  delta = rowsum(do * out)
                dq = ds k / sqrt(hd)               dk = ds^T q / sqrt(hd)

Which tiles are computed is the Mask's block plan (`hrmspec.mask.block_states`): SKIP tiles are
never touched, FULL tiles get no bias, and the predicate is evaluated only on PARTIAL tiles.
Besides q, k, v, out and their gradients nothing allocated is larger than batch x heads x one
tile: memory is linear in S. Half-precision inputs are computed in fp32 and rounded once at the
end; fp32 and fp64 stay as they are (float64 gradcheck holds).

A tile runs on one of two engines with the same math: `torch_tile_*` below, in plain torch ops
(the definition, on every device), or on CPU torch's fused flash-attention kernel (the one SDPA
dispatches to there), which keeps each tile in cache. A row of one tile (S <= 256, the demo's
rows) on that kernel is handed to SDPA itself with the tile's bias (memoised on the Mask for the
batch, the size of one tile), so short rows pay no more than SDPA with a dense mask did; the
plain ops (about ten passes over the tile) cannot match it. The tests hold both engines to SDPA
with a mask built by loops, and to torch's FlexAttention under the same rule.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from hrmspec.mask import FULL, SKIP, Mask

# At the demo's lengths (S <= 256) a row is one tile; longer rows are tiled for memory linear in S
# (benchmarks/seq_memory.py measures the time and memory of both sides of this choice).
BLOCK_Q = 256
BLOCK_K = 256
ENGINES = ("torch", "fused")
_FUSED_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


@dataclass(frozen=True)
class Plan:
    """Per query block, the key blocks to visit and whether the predicate must be evaluated there."""

    block_q: int
    block_k: int
    q_len: int
    k_len: int
    rows: tuple[tuple[tuple[int, bool], ...], ...]  # rows[qb] = ((kb, partial), ...)
    memo_bias: bool  # few PARTIAL tiles (at most two per query block): keep their biases for the batch

    @property
    def one_tile(self) -> bool:
        """One query block visiting one key block (S <= one block)."""
        return len(self.rows) == 1 and len(self.rows[0]) == 1 and self.rows[0][0][0] == 0

    def tiles(self, qb: int):
        """(q0, q1, k0, k1, partial) of the tiles of query block qb."""
        q0, q1 = qb * self.block_q, min((qb + 1) * self.block_q, self.q_len)
        for kb, partial in self.rows[qb]:
            yield q0, q1, kb * self.block_k, min((kb + 1) * self.block_k, self.k_len), partial


def plan(mask: Mask, q_len: int, k_len: int, block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> Plan:
    """The tiles one call computes, shared by every row of the batch: a tile is skipped when it is
    SKIP in every row, unbiased when FULL in every row, else the predicate is evaluated (rows where
    it is SKIP then come out all masked). Memoised on the Mask."""
    key = ("reference plan", q_len, k_len, block_q, block_k)
    if key not in mask._memo:
        states = mask.states(q_len, k_len, block_q, block_k)
        lo, hi = states.amin(0).tolist(), states.amax(0).tolist()  # (n_q_blocks, n_k_blocks)
        rows = tuple(tuple((kb, lo_kb != FULL) for kb, (lo_kb, hi_kb) in enumerate(zip(lo_q, hi_q)) if hi_kb != SKIP)
                     for lo_q, hi_q in zip(lo, hi))
        partial = sum(part for row in rows for _, part in row)
        mask._memo[key] = Plan(block_q, block_k, q_len, k_len, rows, partial <= 2 * len(rows))
    return mask._memo[key]


def _bias(mask: Mask, tile: tuple, p: Plan, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """None for a FULL tile; else (bias (B or 1, 1, bq, bk): 0 where allowed, -inf elsewhere, and
    which queries (B or 1, 1, bq) see no key of the tile, None if all see one). One Mask serves
    every layer of every call: when the plan has few partial tiles they are kept for the batch (at
    most two tiles per query block, so memory stays linear in S)."""
    q0, q1, k0, k1, partial = tile
    if not partial:
        return None
    key = ("bias", q0, q1, k0, k1, dtype, device)
    found = mask._memo.get(key)
    if found is None:
        ok = mask.block(q0, q1, k0, k1, device)
        blind = ~ok.any(-1)
        found = (torch.where(ok, 0.0, float("-inf")).to(dtype), blind if bool(blind.any()) else None)
        if p.memo_bias:
            mask._memo[key] = found
    return found


# -- the tile math: plain torch (the definition) -------------------------------------------------------------
def torch_tile_forward(q, k, v, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_t, lse_t) of one tile: softmax(q k^T scale + bias) v and its log-sum-exp (for a query that
    sees no key of the tile o_t = 0; its lse_t is set by the caller)."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if bias is not None:
        s.add_(bias[0])
    m = s.amax(-1)
    m = m.masked_fill(m == float("-inf"), 0.0)  # a query with nothing allowed: exp must stay finite (0)
    e = s.sub_(m[..., None]).exp_()
    l = e.sum(-1)
    o = torch.matmul(e, v).div_(l.clamp_min(torch.finfo(l.dtype).tiny)[..., None])
    return o, m + torch.log(l)


def torch_tile_backward(d_out, q, k, v, out, lse, delta, bias, scale: float) -> tuple[torch.Tensor, ...]:
    """(dq_t, dk_t, dv_t): one tile's share of the gradients, p = exp(s - lse) from the whole row's lse."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if bias is not None:
        s.add_(bias[0])
    p = s.sub_(lse[..., None]).exp_()
    dv = torch.matmul(p.transpose(-1, -2), d_out)
    ds = p.mul_(torch.matmul(d_out, v.transpose(-1, -2)).sub_(delta[..., None]))
    return torch.matmul(ds, k).mul_(scale), torch.matmul(ds.transpose(-1, -2), q).mul_(scale), dv


# -- the same math, torch's fused CPU kernel ---------------------------------------------------------------------
def fused_tile_forward(q, k, v, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _FUSED_FWD(q, k, v, 0.0, False, attn_mask=None if bias is None else bias[0], scale=scale)


def fused_tile_backward(d_out, q, k, v, out, lse, delta, bias, scale: float) -> tuple[torch.Tensor, ...]:
    # the kernel reads delta = rowsum(do * out) off the whole row's out and p off its lse, so a
    # tile's call gives that tile's share
    return _FUSED_BWD(d_out, q, k, v, out, lse, 0.0, False, attn_mask=None if bias is None else bias[0], scale=scale)


TILES = {"torch": (torch_tile_forward, torch_tile_backward), "fused": (fused_tile_forward, fused_tile_backward)}


def default_engine(q: torch.Tensor) -> str:
    """'fused' for CPU tensors when this torch has the kernel, else 'torch'."""
    return "fused" if q.device.type == "cpu" and _FUSED_FWD is not None and _FUSED_BWD is not None else "torch"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


# -- the blocked driver ------------------------------------------------------------------------------------------
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, p: Plan, engine: str = "torch"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in q's dtype, lse (B, h, q_len) in the compute dtype; +inf for a query that sees no key)
    for q (B, h, Sq, hd), k, v (B, h, Sk, hd)."""
    tile_forward = TILES[engine][0]
    dtype, ct = q.dtype, _compute_dtype(q.dtype)
    q, k, v = _to(q, ct), _to(k, ct), _to(v, ct)
    B, H, Sq, hd = q.shape
    scale = 1.0 / math.sqrt(hd)
    if p.one_tile:  # S <= one block: the tile's result is the output
        tile = next(p.tiles(0))
        bias = _bias(mask, tile, p, ct, q.device)
        out, lse = tile_forward(q, k, v, bias, scale)
        # in place: the kernel's lse keeps the layout its backward reads without a copy
        return _to(out, dtype), lse if bias is None or bias[1] is None else lse.masked_fill_(bias[1], float("inf"))
    out = torch.zeros(B, H, Sq, v.shape[-1], dtype=ct, device=q.device)
    lse = torch.full((B, H, Sq), float("inf"), dtype=ct, device=q.device)
    for qb in range(len(p.rows)):
        acc = row_lse = None
        for tile in p.tiles(qb):
            q0, q1, k0, k1, _ = tile
            bias = _bias(mask, tile, p, ct, q.device)
            o, t_lse = tile_forward(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], bias, scale)
            if bias is not None and bias[1] is not None:  # a query that sees nothing here adds nothing
                t_lse = t_lse.masked_fill_(bias[1], float("-inf"))  # (the fused kernel says lse 0)
            if acc is None:
                acc, row_lse = o, t_lse
                continue
            new = torch.logaddexp(row_lse, t_lse)
            ref = new.masked_fill(new == float("-inf"), 0.0)  # nothing allowed so far: weights 0, not NaN
            acc = acc * torch.exp(row_lse - ref)[..., None] + o * torch.exp(t_lse - ref)[..., None]
            row_lse = new
        if acc is not None:  # else no key block to visit: output 0, lse +inf
            out[:, :, q0:q1] = acc
            lse[:, :, q0:q1] = row_lse.masked_fill(row_lse == float("-inf"), float("inf"))
    return _to(out, dtype), lse


def attention_backward(q, k, v, out, lse, d_out, mask: Mask, p: Plan, engine: str = "torch"
                       ) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) in the compute dtype, recomputing each tile's probabilities from lse."""
    tile_backward = TILES[engine][1]
    ct = lse.dtype
    q, k, v, out, d_out = (_to(t, ct) for t in (q, k, v, out, d_out))
    scale = 1.0 / math.sqrt(q.shape[-1])
    # rowsum(do * out) = sum_k p dp, (B, h, Sq); the fused kernel computes it itself
    delta = (d_out * out).sum(-1) if engine == "torch" else None
    if p.one_tile:  # the tile's gradients are the gradients
        return tile_backward(d_out, q, k, v, out, lse, delta, _bias(mask, next(p.tiles(0)), p, ct, q.device), scale)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qb in range(len(p.rows)):
        for tile in p.tiles(qb):
            q0, q1, k0, k1, _ = tile
            rows, keys = slice(q0, q1), slice(k0, k1)
            dq_t, dk_t, dv_t = tile_backward(d_out[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys],
                                             out[:, :, rows], lse[:, :, rows], None if delta is None else
                                             delta[:, :, rows], _bias(mask, tile, p, ct, q.device), scale)
            dq[:, :, rows] += dq_t
            dk[:, :, keys] += dk_t
            dv[:, :, keys] += dv_t
    return dq, dk, dv


def _no_autocast(device: str):
    """The tiles choose their precision themselves: autocast, if on, is switched off around them."""
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()


class BlockedAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(hd) + mask) v, keeping q, k, v, out and lse for backward."""

    @staticmethod
    def forward(ctx, q, k, v, mask: Mask, p: Plan, engine: str):
        with _no_autocast(q.device.type):
            out, lse = attention_forward(q, k, v, mask, p, engine)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.plan, ctx.engine = mask, p, engine
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        with _no_autocast(q.device.type):
            dq, dk, dv = attention_backward(q, k, v, out, lse, d_out, ctx.mask, ctx.plan, ctx.engine)
        needs = ctx.needs_input_grad
        return (_to(dq, q.dtype) if needs[0] else None, _to(dk, k.dtype) if needs[1] else None,
                _to(dv, v.dtype) if needs[2] else None, None, None, None)


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, block_q: int = BLOCK_Q,
                      block_k: int = BLOCK_K, engine: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v for q (B, h, Sq, hd), k, v (B, h, Sk, hd), Sk = mask.q_offset
    + Sq; differentiable in q, k, v, with memory linear in S. `engine`: 'torch' or 'fused' tiles
    (default: `default_engine(q)`). Under autocast q, k, v are cast to its dtype first, as SDPA does."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or tuple(q.shape[:2]) != tuple(k.shape[:2]) \
            or tuple(k.shape[:3]) != tuple(v.shape[:3]) or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q (B, h, Sq, hd), k and v (B, h, Sk, hd) expected, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    fused = _FUSED_FWD is not None and q.device.type == "cpu"
    engine = engine or ("fused" if fused else "torch")
    if engine not in ENGINES or (engine == "fused" and not fused):
        raise ValueError(f"attention: engine {engine!r} is not available for {q.device.type} tensors; "
                         f"'torch' runs anywhere")
    B, _, Sq, _ = q.shape
    mask.check(B, Sq, k.shape[2])
    device = q.device.type
    if torch.is_autocast_enabled(device):  # as SDPA under autocast: q, k, v in the autocast dtype
        q, k, v = (t.to(torch.get_autocast_dtype(device)) for t in (q, k, v))
    p = plan(mask, Sq, k.shape[2], block_q, block_k)
    if engine == "fused" and p.one_tile and _compute_dtype(q.dtype) == q.dtype:
        # one tile (S <= a block) on the CPU kernel: SDPA itself runs it, with the tile's bias (memoised
        # on the Mask for the batch, no larger than a tile), which spares the Function's per-call cost at
        # the demo's short rows; a query that sees no key needs the Function's convention (output 0)
        bias = _bias(mask, next(p.tiles(0)), p, q.dtype, q.device)
        if bias is None or bias[1] is None:
            with _no_autocast(device):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=None if bias is None else bias[0])
    return BlockedAttention.apply(q, k, v, mask, p, engine)
