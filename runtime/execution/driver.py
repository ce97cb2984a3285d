"""The driver: one walk through the schedule for every way a compiled model runs it.

The plan's `LoopLayout` (hrmspec/graph/layout.py) says where the loop is; the driver walks it:

    before   the calls before the loop, once
    steps    the loop, step by step; after each step the stop rule says which running positions stop
    after    the calls after the loop, once, on every position's state at its exit

What differs from one regime to another is what is passed in, never the walk:

    regime                              stop rule                               cache policy
    training and evaluation forward     none, or the spec's halting rule        none
    prefill of `generate`               the same                                KVCache (grows)
    a decode step                       the same                                KVCache, or the static
                                                                                cache (compiled decoding)
    exits at inference (`--exit`)       the criterion's rule (adaptive.py)      KVCache
    one segment of deep supervision     none (the Supervisor carries the states between segments)

Without a stop rule the calls simply run in order, each with gradient where the credit plan says:
the static forward, for a schedule of any shape. With one, a position that stopped is computed no
more: its states keep their values, a step runs only the rows that still have a running position (on
their own masks and rotary tables), and at every attention op of a call of a later step it has the keys
and values it had at the same op of the same call of the step it stopped at (the "latest" KV policy:
`StepSlot`). A KV cache slot of that later call stores those copies, so tokens that stopped at different
depths share one cache, and decoding with the cache equals running the whole sequence again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from hrmspec.runtime.execution.context import Context
from hrmspec.runtime.execution.stack import KVCache, KVSlot

# ---------------------------------------------------------------------------------- cache policies


class NoCache:
    """Every call on the whole sequence, nothing kept."""

    def slots(self, index: int) -> list[KVSlot] | None:
        return None

    def run(self, stack, terms: list[torch.Tensor], ctx: Context, index: int, slots=None) -> torch.Tensor:
        return stack(terms, ctx, slots)


class Growing(NoCache):
    """A `KVCache`: each (call, attention op) appends the keys and values it computes to its slot and attends
    to all of them (a prefill, then one token at a time)."""

    def __init__(self, cache: KVCache):
        self.cache = cache

    def slots(self, index):
        return self.cache.slots[index]


class Static(NoCache):
    """The static cache of compiled decoding (runtime/execution/decode.py): one token per row, its key and
    value written at `slot` of preallocated buffers, attention over the slots `mask` marks valid."""

    def __init__(self, cache, slot: torch.Tensor, mask: torch.Tensor):
        self.cache, self.slot, self.mask = cache, slot, mask

    def run(self, stack, terms, ctx, index, slots=None):
        return stack.decode(terms, ctx.rope, self.cache.slots[index], self.slot, self.mask)


def policy_of(cache) -> NoCache:
    """The cache policy of what a forward is given: None, a KVCache, or a policy already."""
    if cache is None:
        return NoCache()
    return Growing(cache) if isinstance(cache, KVCache) else cache


# ---------------------------------------------------------------------------------- the walk


def run_calls(model, calls, flags, z: dict, ctx: Context, policy: NoCache) -> None:
    """Run `calls` in order on the states `z` (updated in place), each with gradient where its flag says
    (`flags` None: every call as the grad mode is)."""
    track = torch.is_grad_enabled()
    for call in calls:
        terms = [z[name] for name in call.inputs]  # summed by the call (fused with its first norm)
        frozen = track and flags is not None and not flags[call.index]
        with torch.no_grad() if frozen else contextlib.nullcontext():
            z[call.target] = policy.run(model.stacks[call.module], terms, ctx, call.index, policy.slots(call.index))


def walk(model, layout, flags, z: dict, ctx: Context, rule=None, cache=None,
         context_of: Callable[[torch.Tensor], Context] | None = None) -> torch.Tensor | None:
    """Walk `layout` (a `LoopLayout`) from the states `z` (the input under 'x'; updated in place), the calls
    with gradient where `flags` say. `rule` (None: every call in order) is asked after every step which
    running positions stop (`rule.after(t, loop)`); `context_of(rows)` gives the masks and rotary tables of
    a subset of rows; `cache` is None, a KVCache or a cache policy. With a rule, returns the steps each
    position ran (B, N)."""
    policy = policy_of(cache)
    if rule is None:
        run_calls(model, layout.calls, flags, z, ctx, policy)
        return None
    run_calls(model, layout.before, flags, z, ctx, policy)
    loop = StepLoop(model, z, ctx, context_of, policy, flags)
    rule.start(loop)
    out = model.spec.model.output
    depth = torch.zeros(z[out].shape[:2], dtype=torch.long, device=z[out].device)
    for t, calls in enumerate(layout.steps, 1):
        loop.begin_step()
        for offset, call in enumerate(calls):
            loop.call(call, offset)
        depth += loop.running.long()
        loop.running = loop.running & ~rule.after(t, loop)
        if not bool(loop.running.any()):
            loop.fill_cache(layout.steps[t:])
            break
    rule.end(loop)
    run_calls(model, layout.after, flags, z, ctx, policy)
    return depth


class StepSlot(KVSlot):
    """One attention op of one call inside the loop: applies the latest KV policy (see the module
    docstring) to the call's new keys and values, then extends the cache's slot, if there is one."""

    def __init__(self, loop: StepLoop, key: tuple[int, int], inner: KVSlot | None):
        super().__init__()
        self.loop, self.key, self.inner = loop, key, inner

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loop = self.loop
        latest = loop.latest.get(self.key)  # every row's keys and values of its latest computed step
        if latest is not None and loop.some_halted:
            keep = loop.running_rows[:, None, :, None]
            k = torch.where(keep, k, loop.pick(latest[0]))
            v = torch.where(keep, v, loop.pick(latest[1]))
        if loop.rows is not None:
            k, v = latest[0].index_copy(0, loop.rows, k), latest[1].index_copy(0, loop.rows, v)
        loop.latest[self.key] = (k, v)
        if self.inner is not None:
            k, v = self.inner.extend(k, v)
        return loop.pick(k), loop.pick(v)


class StepLoop:
    """One walk through the loop: the states, which rows and positions still compute, the KV policy's keys.
    A stop rule reads it: `h` (the output state), `running`, `rows`, `z`."""

    def __init__(self, model, z: dict, ctx, context_of, policy: NoCache, flags):
        self.model, self.z, self.policy, self.ctx, self.context_of = model, z, policy, ctx, context_of
        self.flags = flags
        self.full_ctx, self.contexts = ctx, {}
        self.track = torch.is_grad_enabled()
        h = z[model.spec.model.output]
        self.running = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)  # (B, N)
        self.rows: torch.Tensor | None = None  # the rows this step computes (None: all)
        self.running_rows = self.running
        self.some_halted = False
        self.latest: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def h(self) -> torch.Tensor:
        """The output state (B, N, d) after the last step."""
        return self.z[self.model.spec.model.output]

    def pick(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t.index_select(0, self.rows)

    def begin_step(self) -> None:
        """Compute only the rows with a running position, on their own masks and rotary tables."""
        live = self.running.any(-1)
        self.some_halted = not bool(self.running.all())
        if bool(live.all()):
            self.rows, self.ctx = None, self.full_ctx
        else:
            self.rows = live.nonzero().squeeze(-1)
            key = tuple(self.rows.tolist())
            if key not in self.contexts:
                self.contexts[key] = self.context_of(self.rows)
            self.ctx = self.contexts[key]
        self.running_rows = self.pick(self.running)

    def call(self, call, offset: int) -> None:
        """Run `call` (at `offset` in its step) on the computed rows; positions that stopped keep their states."""
        model, z = self.model, self.z
        inner = self.policy.slots(call.index)
        n = model.stacks[call.module].attention_ops
        slots = [StepSlot(self, (offset, i), None if inner is None else inner[i]) for i in range(n)]
        with torch.set_grad_enabled(self.track and self.flags[call.index]):
            new = self.policy.run(model.stacks[call.module], [self.pick(z[name]) for name in call.inputs], self.ctx,
                                  call.index, slots)
            old = z[call.target].to(new.dtype)
            if self.some_halted:
                new = torch.where(self.running_rows[..., None], new, self.pick(old))
            z[call.target] = new if self.rows is None else old.index_copy(0, self.rows, new)

    def fill_cache(self, steps: tuple[tuple, ...]) -> None:
        """Steps no position reached: their cache slots take every position's latest keys and values."""
        for calls in steps:
            for offset, call in enumerate(calls):
                slots = self.policy.slots(call.index)
                for i, slot in enumerate(slots or ()):
                    slot.extend(*self.latest[(offset, i)])


def context_of(model, S: int, past: int, prefix_mask, doc_ids, position_ids) -> Callable[[torch.Tensor], Context]:
    """The masks and rotary tables of a subset of rows of a batch (what `walk` builds for the rows still running)."""

    def of(rows: torch.Tensor) -> Context:
        pick = [None if t is None else t.index_select(0, rows) for t in (prefix_mask, doc_ids, position_ids)]
        return model.context(len(rows), S, *pick, past)

    return of


__all__ = ["Growing", "NoCache", "Static", "StepLoop", "StepSlot", "context_of", "policy_of", "run_calls",
           "walk"]
