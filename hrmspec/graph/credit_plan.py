"""Warmup deep credit assignment: which module calls carry gradient.

The schedule is unrolled into a list of module calls. A *credit plan* marks each call as
grad-carrying or not; the runtime runs the others under `torch.no_grad()`, so they keep no
activations and gradient stops at their outputs. Six modes:

* ``none`` — every call carries gradient (full backprop through the recurrence).
* ``last: k`` — the last k calls in execution order, whatever their module.
* ``last_cycle`` — every call from the first call of the last iteration of the outermost
  ``repeat`` on (TRM's rule: the whole last outer cycle, n + 1 calls for T x (n z-updates, one
  y-update)); calls after the loop carry gradient too, calls before it do not.
* ``depth: {from, to, warmup}`` with ``priority: [H, L]`` — HRM-Text's rule. The credit depth d
  ramps from `from` to `to` over the first `warmup` fraction of training,
  ``d = from + floor(min(1, progress / warmup) * (to - from))``. The modules in priority order
  each take their trailing calls: the first takes ``min(its calls, d - 1)`` (leaving at least
  one for each later module), the next the remainder, and so on.
* ``truncate: k`` — Huginn's truncated backprop: the calls of the last k iterations of the loop
  (the top-level ``repeat``; with a sampled count, the last k of the count drawn) and every call
  before or after it (a prelude and a coda) carry gradient; the loop's earlier iterations do not.
* ``per_cycle: {L: [n_0, n_1, ...]}`` — transformers' ``L_bp_cycles``: in iteration i of the
  outermost ``repeat``, the trailing ``n_i`` calls of L carry gradient (the list is left-padded
  with 1s to the number of iterations); calls of modules not listed always carry gradient.

For HRM-Text's schedule (2 H cycles of 3 L cycles: 6 L calls, 2 H calls) the depth rule gives:

    ========  ===========  ===========  ============================
    depth d   H grad calls  L grad calls  grad-carrying calls (order)
    ========  ===========  ===========  ============================
    2         1            1            L#5, H#1
    3         2            1            H#0, L#5, H#1
    4         2            2            H#0, L#4, L#5, H#1
    5         2            3            H#0, L#3, L#4, L#5, H#1
    ========  ===========  ===========  ============================

(L#k is the k-th L call, counting from 0; H#0 runs after L#2.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hrmspec.graph.layout import Call, loop_layout
from hrmspec.spec.schema import CreditSpec


def credit_depth(credit: CreditSpec, progress: float) -> int | None:
    """The credit depth at a training progress in [0, 1] (None unless mode is depth)."""
    if credit.mode != "depth":
        return None
    if credit.warmup <= 0:
        return credit.depth_to
    ramp = min(1.0, max(0.0, progress) / credit.warmup)
    return credit.depth_from + math.floor(ramp * (credit.depth_to - credit.depth_from) + 1e-9)


def grad_flags(calls: Sequence[Call], credit: CreditSpec, progress: float = 1.0) -> list[bool]:
    """For each call, whether it carries gradient under `credit` at `progress`."""
    n = len(calls)
    if credit.mode == "none":
        return [True] * n
    if credit.mode == "last":
        return [i >= n - credit.last for i in range(n)]
    if credit.mode == "last_cycle":  # from the first call of the loop's last step on
        layout = loop_layout(calls)
        start = layout.steps[-1][0].index if layout.steps else 0
        return [i >= start for i in range(n)]
    if credit.mode == "truncate":  # every call but those of the loop's steps before its last k
        layout = loop_layout(calls)
        dropped = {c.index for step in layout.steps[:max(0, layout.count - credit.truncate)] for c in step}
        return [c.index not in dropped for c in calls]
    flags = [False] * n
    if credit.mode == "depth":
        remaining = credit_depth(credit, progress)
        k = len(credit.priority)
        for rank, module in enumerate(credit.priority):
            mine = [c.index for c in calls if c.module == module]
            reserve = k - 1 - rank  # at least one call for each module after this one
            take = max(0, min(len(mine), remaining - reserve))
            for i in mine[len(mine) - take :]:
                flags[i] = True
            remaining -= take
        return flags
    if credit.mode == "per_cycle":
        table = dict(credit.per_cycle)
        cycles = sorted({c.cycle[0] if c.cycle else 0 for c in calls})
        for module_calls in _group(calls).items():
            module, mine = module_calls
            if module not in table:
                for c in mine:
                    flags[c.index] = True
                continue
            counts = list(table[module])
            counts = [1] * max(0, len(cycles) - len(counts)) + counts
            for i, cyc in enumerate(cycles):
                in_cycle = [c.index for c in mine if (c.cycle[0] if c.cycle else 0) == cyc]
                keep = counts[i] if i < len(counts) else 1
                for j in in_cycle[max(0, len(in_cycle) - keep) :]:
                    flags[j] = True
        return flags
    raise ValueError(f"unknown credit mode {credit.mode!r}")


@dataclass(frozen=True)
class CreditPlan:
    """The credit plan of one unrolled schedule as a function of training progress: what the runtime
    asks at every step (it runs the calls whose flag is false under no-grad)."""

    calls: tuple[Call, ...]
    credit: CreditSpec

    def flags(self, progress: float) -> list[bool]:
        return grad_flags(self.calls, self.credit, progress)

    def depth(self, progress: float) -> int | None:
        return credit_depth(self.credit, progress)


def _group(calls: Sequence[Call]) -> dict[str, list[Call]]:
    out: dict[str, list[Call]] = {}
    for c in calls:
        out.setdefault(c.module, []).append(c)
    return out


def credit_table(calls: Sequence[Call], credit: CreditSpec) -> list[tuple[int, dict[str, int]]]:
    """(depth, grad calls per module) for every depth the ramp visits: the table above."""
    if credit.mode != "depth":
        return []
    rows = []
    for d in range(credit.depth_from, credit.depth_to + 1):
        fixed = CreditSpec(mode="depth", depth_from=d, depth_to=d, warmup=0.0, priority=credit.priority)
        flags = grad_flags(calls, fixed)
        per = {m: sum(f for c, f in zip(calls, flags) if c.module == m) for m in credit.priority}
        rows.append((d, per))
    return rows
