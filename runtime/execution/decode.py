"""The decode loop: a preallocated KV cache and one step function per token.

`generate` runs here for a schedule with a fixed unrolling (no per-step halting, no exit rule):

    prefill   the prompts (B, S), left-padded to one length, in one forward with the ordinary KV
              cache: padding has document id -1 (it sees, and is seen by, nothing real) and each
              row's positions start at its first real token. The keys and values are then copied
              into the static cache: per (module call, attention op) K and V of (B, h, S + new, hd)
    step      one token per row: its embedding, the calls of the schedule in order, each call's
              ops segment by segment (the same `Segment.run` a forward runs) and each attention
              op writing its key and value into the cache at the step's slot and reading every
              slot marked `valid`: the row's real prompt tokens and the tokens decoded so far

A decoded token sits after every key already in the cache, so the mask rule (`hrmspec.mask`:
a response token sees the keys before it in its document) reduces to the `valid` slots. Nothing in
a step depends on the step's index but two tensors (the slot and the positions), so the step is
the same function of the same shapes every token: with `compile=True` torch.compile turns it into
one compiled program, reused for every token. Compiled, the cache is allocated for a whole number of
BUCKET positions (the slots past the last token are never valid), so batches of neighbouring prompt
lengths, as `eval` makes them, share one program. The first program is built for its shapes; a batch
of another size or bucket makes torch.compile build one more that takes that size as a variable
(automatic dynamic shapes), so however many sizes an evaluation has, it builds a few programs, never
one per shape (which would also stop at dynamo's recompile limit).
"""

from __future__ import annotations

import functools

import torch

from hrmspec.caches import private_inductor_cache
from hrmspec.runtime.execution.context import Context
from hrmspec.runtime.execution.driver import Static, walk
from hrmspec.spec.grammar import INPUT

BUCKET = 64  # compiled decoding: cache lengths are rounded up to a multiple of this


class StaticCache:
    """Keys and values of every (module call, attention op) for T positions, allocated once."""

    def __init__(self, slots: list[list[tuple[torch.Tensor, torch.Tensor]]], valid: torch.Tensor):
        self.slots = slots  # slots[call][op] = (K, V), each (B, h, T, hd)
        self.valid = valid  # (B, T) bool: the keys a new token may read

    @classmethod
    def from_prefill(cls, cache, attention_mask: torch.Tensor, total: int) -> StaticCache:
        """The prompts' keys and values (an ordinary `KVCache` after the prefill) in buffers of `total`
        positions; `attention_mask` (B, S) marks the real prompt tokens."""
        B, S = attention_mask.shape
        slots = []
        for call in cache.slots:
            row = []
            for slot in call:
                k = slot.k.new_zeros(*slot.k.shape[:2], total, slot.k.shape[-1])
                v = torch.zeros_like(k)
                k[:, :, :S], v[:, :, :S] = slot.k, slot.v
                row.append((k, v))
            slots.append(row)
        valid = torch.zeros(B, total, dtype=torch.bool, device=attention_mask.device)
        valid[:, :S] = attention_mask.bool()
        return cls(slots, valid)


def decode_step(model, layout, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                cache: StaticCache, drawn: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, vocab) of the next token after `tokens` (B,) at `positions` (B,), written to cache
    slot `slot` (a 1-element long tensor): the driver's walk of `layout` (the model's loop layout) with no
    stop rule and the static cache as its cache policy. `drawn`: the random initial states
    (`model.random_states`, (B, 1, d) each), drawn by the caller, so the step itself draws nothing."""
    m = model.spec.model
    x = model.embed_inputs(tokens[:, None], position_ids=positions[:, None])
    z = {INPUT: x, **model.initial_states(x, 0.0), **drawn}
    cache.valid.index_fill_(1, slot, True)
    mask = cache.valid[:, None, None, :]  # (B, 1, 1, T)
    rope = {theta: model.ops.rope_tables(positions[:, None], m.head_dim, theta, x.dtype)
            for theta in {mod.block.attention.rope_theta for mod in m.modules} - {None}}
    walk(model, layout, None, z, Context(mask={}, rope=rope), cache=Static(cache, slot, mask))
    return model.logits_of(z[m.output][:, -1])


@functools.cache
def compiled_step():
    """`decode_step` under torch.compile, made once per process: the programs it builds serve every later
    `generate(..., compile=True)`. `dynamic=None`: static shapes first, a size that changes becomes a
    variable of the next program."""
    private_inductor_cache()  # generated code kept under the user's home, not in /tmp
    return torch.compile(decode_step, fullgraph=True, dynamic=None)


def cache_length(total: int, compiled: bool) -> int:
    """Positions to allocate for `total` tokens: `total` eager, the next multiple of BUCKET compiled."""
    return -(-total // BUCKET) * BUCKET if compiled else total


def left_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row's real tokens end at the last position (padding only on the left)."""
    m = attention_mask.bool()
    return bool(m[:, -1].all()) and bool((m[:, 1:] >= m[:, :-1]).all())


__all__ = ["BUCKET", "StaticCache", "cache_length", "compiled_step", "decode_step", "left_padded"]
