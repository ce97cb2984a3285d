"""The unrolled schedule (`unroll`: one `Call` per module call) and where its loop is, described once.

    before   the calls before the loop, run once (Huginn's prelude)
    steps    the calls of each iteration of the loop, in order: a *step*, what halting, exits at
             inference, per-step losses and truncated credit act between
    after    the calls after the loop, run once on the states the loop ends in (Huginn's coda)

The loop is the last top-level `repeat` that makes calls; a schedule without one has no steps (every
call is `before`). `repeat` is the loop as written: its fixed count, or the law it is drawn from per
training step with its evaluation count. `states` are the states the loop assigns (its latent, what a
warm start carries), and `injects` says whether it reads anything else (the input x, or a state set
before it), without which a warm-started position would never see its own input.

The plan holds the layout of the schedule as compiled (`ExecutionPlan.layout`) and makes the layout
at another loop count (`ExecutionPlan.layout_at`). The credit plan, the runtime's driver, cost and
`show` read it; none of them works out from the calls' cycle indices where the loop is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hrmspec.spec.schedule import flatten
from hrmspec.spec.schema import Repeat


@dataclass(frozen=True)
class Call:
    """One module call of the unrolled schedule."""

    index: int  # position in execution order
    module: str
    target: str
    inputs: tuple[str, ...]
    cycle: tuple[int, ...]  # iteration index of each enclosing repeat, outermost first
    text: str  # the statement as written
    top: int = 0  # the schedule item (counting from 0) it comes from: a statement or an outermost repeat


def unroll(schedule: tuple, _cycle: tuple[int, ...] = ()) -> list[Call]:
    """Flatten nested repeats into the list of module calls, in execution order."""
    out: list[Call] = []

    def rec(items: tuple, cycle: tuple[int, ...], top: int) -> None:
        for k, item in enumerate(items):
            where = k if top < 0 else top
            if isinstance(item, Repeat):
                for i in range(item.count):
                    rec(item.body, cycle + (i,), where)
            else:
                out.append(Call(len(out), item.module, item.target, item.inputs, cycle, str(item), where))

    rec(schedule, _cycle, -1)
    return out


@dataclass(frozen=True)
class LoopLayout:
    calls: tuple[Call, ...]  # every call, in order (`Call.index` is the position here)
    before: tuple[Call, ...]
    steps: tuple[tuple[Call, ...], ...]
    after: tuple[Call, ...]
    item: int | None = None  # the loop's index among the schedule's items (None: no loop)
    loops: int = 0  # top-level repeats in the schedule (halting and exits need exactly one)
    repeat: Repeat | None = None  # the loop as written: count, or sample and evaluation count
    states: tuple[str, ...] = ()  # the states the loop assigns
    injects: bool = False  # the loop reads a name it does not assign (x, or a state set before it)

    @property
    def count(self) -> int:
        """The loop's iterations in this unrolling (0: no loop)."""
        return len(self.steps)

    @property
    def per_step(self) -> int:
        """Module calls in one iteration of the loop."""
        return len(self.steps[0]) if self.steps else 0

    @property
    def ends_in_loop(self) -> bool:
        """Nothing runs after the loop: the output of the last step is the schedule's."""
        return not self.after


def loop_item(calls: Sequence[Call]) -> int:
    """The schedule item that is the loop: the last top-level repeat that makes calls (-1: none)."""
    return max((c.top for c in calls if c.cycle), default=-1)


def loop_layout(calls: Sequence[Call], schedule: tuple | None = None) -> LoopLayout:
    """The layout of the unrolled `calls`; with the `schedule` they were unrolled from, also the loop as
    written and the states it assigns."""
    calls = tuple(calls)
    item = loop_item(calls)
    if item < 0:
        return LoopLayout(calls, calls, (), (), loops=_loops(schedule))
    inside = [c for c in calls if c.top == item]
    count = 1 + max(c.cycle[0] for c in inside)
    steps = tuple(tuple(c for c in inside if c.cycle[0] == t) for t in range(count))
    before = tuple(c for c in calls if c.top < item)
    after = tuple(c for c in calls if c.top > item)
    if schedule is None:
        return LoopLayout(calls, before, steps, after, item)
    repeat = schedule[item]
    body = flatten(repeat.body)
    states = tuple(dict.fromkeys(st.target for st in body))
    injects = any(name not in states for st in body for name in st.inputs)
    return LoopLayout(calls, before, steps, after, item, _loops(schedule), repeat, states, injects)


def _loops(schedule: tuple | None) -> int:
    return 0 if schedule is None else sum(isinstance(item, Repeat) for item in schedule)


__all__ = ["Call", "LoopLayout", "loop_item", "loop_layout", "unroll"]
