"""Halting inside one forward (`model.halting`) and the loss over the loop's steps (`objective.steps`).

A *step* is one iteration of the schedule's outermost `repeat`: the states after it are what a
halting head reads and what a per-step loss scores. Both therefore need a schedule of that shape,

    schedule: ["h = P(h)",                  # statements before the loop run once (optional)
               {repeat: 8, do: [...]}]      # the loop: the output state is assigned inside it

and `loop_index` checks it, each failure a `SpecError` at the piece that breaks it with the fix.

The rules, their parameters and defaults are the table in hrmspec/halting.py, shared with
`supervision.halting`: the step rules (act, exit_gate, ponder) stop positions between steps of one
forward (here), the segment rules (q_learning, bce) stop whole samples between segments
(`supervision:`); a type written in the other place is pointed to where it belongs.

    model.halting: {type: act, threshold: 0.99, weight: 0.01}             Graves' ACT (Universal Transformer)
    model.halting: {type: exit_gate, threshold: 0.5, weight: 0.1}         Ouro's exit gate
    model.halting: {type: ponder, threshold: 0.5, weight: 0.01, prior: 0.2}   PonderNet
    objective: {type: lm, steps: last | sum | expected}
"""

from __future__ import annotations

from typing import Any

from hrmspec.halting import HALTING, SEGMENT_TYPES, STEP_TYPES
from hrmspec.spec.fields import Fields, describe, near
from hrmspec.spec.schedule import flatten
from hrmspec.spec.schema import CreditSpec, HaltingSpec, Repeat, StepHaltingSpec
from hrmspec.spec.source import PathT, Source

STEP_LOSSES = ("last", "sum", "expected")


def halting_type(f: Fields, key: str, mine: tuple[str, ...]) -> str:
    """The `type` (or shorthand) at `key` of `f`, one of `mine`; a type of the other kind of halting is
    an error that says where it is written."""
    v = f.data.get(key)
    where = f.path + (key,)
    if v in SEGMENT_TYPES and mine == STEP_TYPES:
        f.fail(where, f"'{v}' halts whole samples between segments, not positions between steps of the loop",
               f"write it under supervision: supervision: {{segments: 16, halting: {v}}}")
    if v in STEP_TYPES and mine == SEGMENT_TYPES:
        f.fail(where, f"'{v}' halts positions between steps of the schedule's loop, inside one forward",
               f"write it under model: halting: {{type: {v}}}")
    return f.choice(key, mine)


def read_rule(src: Source, path: PathT, f: Fields, key: str, types: tuple[str, ...], what: str
              ) -> tuple[str, dict[str, float]]:
    """The halting rule at `key` of `f` (its name alone, or a mapping {type, <its parameters>}), one of
    `types`: (its name, every parameter's value, defaults filled in from hrmspec/halting.py)."""
    node = f.raw(key, None)
    if isinstance(node, str):
        kind = halting_type(f, key, types)
        return kind, HALTING[kind].defaults()
    names = sorted({p.name for t in types for p in HALTING[t].params})
    g = Fields(src, path, f"{' or '.join(types)}, or a mapping {{type, {', '.join(names)}}}", what,
               f"e.g. halting: {{type: {types[0]}, " + ", ".join(f"{p.name}: {p.default:g}"
                                                             for p in HALTING[types[0]].params) + "}")
    kind = halting_type(g, "type", types)
    values = {p.name: g.number(p.name, p.default, lo=p.lo, hi=p.hi, positive=p.positive)
              for p in HALTING[kind].params}
    mine = {p.name for p in HALTING[kind].params}
    takes = f"{kind} takes {', '.join(p.name for p in HALTING[kind].params)}"
    for key in g.data:
        others = [t for t in types if t != kind and key in {p.name for p in HALTING[t].params}]
        if key not in mine and others:
            g.fail(path + (key,), f"'{key}' is a parameter of {' and '.join(others)}, not of {kind}", takes,
                   key=True)
        # a misspelt parameter is matched against the rules' own parameters, never another section's keys
        if key not in mine and key != "type" and not near(key, sorted(mine)):
            hint = near(key, names)
            if hint:
                owners = [t for t in types if hint.split("'")[1] in {p.name for p in HALTING[t].params}]
                g.fail(path + (key,), f"unknown key '{key}'", f"{hint} (a parameter of {' and '.join(owners)}); "
                       f"{takes}", key=True)
    g.finish()
    return kind, values


def read_halting(src: Source, path: PathT, f: Fields, schedule: tuple, output: str, credit: CreditSpec
                 ) -> StepHaltingSpec | None:
    """model.halting at `path` (`f` reads model), checked against the schedule, output and credit plan."""
    node = f.raw("halting", None)
    if node is None or node == "none":
        return None
    kind, values = read_rule(src, path, f, "halting", STEP_TYPES, "model.halting")
    i = loop_index(f, path, schedule, output, "halting")
    loop = schedule[i]
    if loop.count < 2:
        f.fail(path[:-1] + ("schedule", i, "repeat"),
               f"expected at least 2 iterations for halting to stop between, found {loop.count}",
               "raise the repeat count to the most steps a position may take, e.g. repeat: 8")
    if credit.mode in ("last", "depth", "last_cycle"):
        f.fail(path[:-1] + ("credit",),
               f"'{credit.mode}' credit gives gradient to the calls at the end of the schedule, which a halting "
               "loop may never reach", "use credit: none (or per_cycle, which counts within each step)")
    return StepHaltingSpec(kind, values["threshold"], values["weight"], tuple(values.items()))


def read_segment_halting(src: Source, f: Fields) -> HaltingSpec | None:
    """supervision.halting (`f` reads supervision): a segment rule, or None."""
    node = f.raw("halting", None)
    if node is None or node == "none":
        return None
    kind, values = read_rule(src, ("supervision", "halting"), f, "halting", SEGMENT_TYPES, "supervision.halting")
    return HaltingSpec(kind, values["exploration"], values["weight"])


def loop_index(f: Fields, asked: PathT, schedule: tuple, output: str, what: str) -> int:
    """The index of the loop in `schedule`: one outermost repeat, only statements before it, the output
    assigned inside it. `asked` is the key that needs it (the error points there when there is no loop)."""
    model: PathT = ("model",)
    loops = [i for i, item in enumerate(schedule) if isinstance(item, Repeat)]
    statements = [str(s) for s in flatten(schedule)]
    if not loops:
        f.fail(asked, f"{what} works per iteration of the schedule's loop, but the schedule has no repeat block",
               f"wrap the recurrence in one: schedule: [{{repeat: 8, do: {_flow(statements)}}}]", key=True)
    first = loops[0]
    if len(loops) > 1:
        f.fail(model + ("schedule", loops[1]),
               f"expected one outermost loop for {what}, found a second repeat block",
               "merge the loops into one repeat, or nest one inside the other")
    if first != len(schedule) - 1:
        f.fail(model + ("schedule", first + 1),
               f"{what} reads the output state after each iteration of the loop, but this statement runs after it",
               "move it inside the loop (or before it, to run once)")
    if output not in {s.target for s in flatten(schedule[first].body)}:
        where = model + ("output",) if f.has("output") else model
        f.fail(where, f"{what} reads the output state after each iteration of the loop, but '{output}' is not "
               "assigned inside it", "make the output a state the loop assigns", key=not f.has("output"))
    return first


def read_steps(g: Fields | None, top: Fields, model, supervised: bool, grid: bool) -> str:
    """objective.steps (`g` reads the objective mapping, None for the short form): its default is
    `expected` with an exit gate, else `last`; the combinations that make no sense are errors."""
    halting = model.halting.type if model.halting is not None else None
    required = HALTING[halting].steps if halting is not None else None  # what the rule trains with
    if g is None or not g.has("steps"):
        return required or "last"
    steps = g.choice("steps", STEP_LOSSES)
    at = g.path + ("steps",)
    if steps == "expected" and required != "expected":
        g.fail(at, "steps: expected is the expectation under an exit distribution, and the model has none",
               "add model.halting: {type: exit_gate} (or ponder), or use steps: last | sum")
    if required is not None and steps != required:
        why = ("it trains the halting distribution" if required == "expected"
               else "its output is the halting-weighted state")
        g.fail(at, f"expected steps: {required} with {halting} ({why}), found {describe(steps)}")
    if steps == "sum":
        if supervised or grid:
            g.fail(at, "a per-step loss is for the task_completion and lm objectives without supervision:")
        loop_index(Fields(top.src, ("model",), level="model"), at, model.schedule, model.output, "steps: sum")
    return steps


def check_combinations(top: Fields, model, supervised: bool, grid: bool) -> None:
    """model.halting with deep supervision, or with the grid objective, is an error at model.halting."""
    if model.halting is None:
        return
    at = ("model", "halting")
    if supervised:
        top.fail(at, "per-step halting (model.halting) and deep supervision (supervision:) cannot be combined",
                 "keep one: model.halting stops positions inside a forward, supervision.halting whole samples",
                 key=True)
    if grid:
        top.fail(at, "per-step halting trains with the task_completion or lm objective, found grid",
                 "grids are supervised over segments: supervision: {segments: 16, halting: bce}", key=True)


def _flow(items: list[Any]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in items) + "]"


__all__ = ["SEGMENT_TYPES", "STEP_LOSSES", "STEP_TYPES", "check_combinations", "halting_type", "loop_index",
           "read_halting", "read_rule", "read_segment_halting", "read_steps"]
