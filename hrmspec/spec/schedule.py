"""The `model.schedule` section: a list of statements and nested `{repeat, do}` blocks.

`read_schedule` validates the list shape and the repeat blocks, handing each statement string to
`hrmspec.spec.grammar.parse_statement`; the result is a tuple of `Statement`s and `Repeat`s.
`flatten` lists the statements in call order (ignoring repeat counts), and `check_names` checks
that every name a statement uses is a declared module or state, pointing at the name's column.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from hrmspec.errors import SpecError, close_match
from hrmspec.spec.fields import Fields, describe, near
from hrmspec.spec.grammar import INPUT, Statement, parse_statement
from hrmspec.spec.schema import Curriculum, Repeat, SampleSpec
from hrmspec.spec.source import PathT, Source, dotted


def read_schedule(src: Source, path: PathT, items: Any) -> tuple:
    """The schedule list at `path` (its value `items`) as a tuple of `Statement`s and `Repeat`s."""
    if not isinstance(items, list) or not items:
        raise SpecError(
            f"expected a non-empty list of statements and repeat blocks, found {describe(items)}",
            src.loc(path),
            dotted(path),
            'e.g. [{repeat: 2, do: ["z_L = L(z_L + z_H)", "z_H = H(z_H + z_L)"]}]',
        )
    out: list = []
    for i, item in enumerate(items):
        p = path + (i,)
        if isinstance(item, dict):
            f = Fields(src, p, level="model.schedule (a repeat block)")
            if not (f.has("repeat") or f.has("do")) and not any(
                close_match(str(k), ["repeat"]) for k in item
            ):
                f.fail(
                    p,
                    f"expected a statement string or a repeat block {{repeat, do}}, found {describe(item)}",
                    'quote statements: - "z_H = H(z_H + z_L)"',
                )
            sample = None
            if isinstance(item.get("repeat"), dict):
                f.raw("repeat")
                sample, count = read_sample(src, p + ("repeat",))
            else:
                count = f.integer("repeat", maximum=MAX_REPEAT)
            body = read_schedule(src, p + ("do",), f.raw("do"))
            f.finish()
            out.append(Repeat(count=count, body=body, sample=sample))
        else:
            out.append(parse_statement(item, src.loc(p), dotted(p)))
    return tuple(out)


SAMPLERS = ("lognormal_poisson", "uniform")


def read_sample(src: Source, path: PathT) -> tuple[SampleSpec, int]:
    """A sampled repeat count `{sample, ...}` and the count used at evaluation."""
    f = Fields(src, path, "a count drawn per training step, e.g. {sample: lognormal_poisson, mean: 32, sigma: 0.5}",
               "model.schedule (a sampled repeat)", "or a fixed count: repeat: 4")
    kind = f.choice("sample", SAMPLERS)
    cap = f.integer("max", MAX_REPEAT, maximum=MAX_REPEAT)
    if kind == "lognormal_poisson":
        mean = f.number("mean", lo=1.0, hi=float(cap))
        sigma = f.number("sigma", 0.5, lo=0.0, hi=4.0)
        spec = SampleSpec(kind=kind, mean=mean, sigma=sigma, max=cap)
        default = round(mean)
    else:
        low = f.integer("low", 1, maximum=cap)
        high = f.integer("high", maximum=cap)
        if high < low:
            f.fail(path + ("high",), f"expected 'high' >= 'low' ({low}), found {high}")
        spec = SampleSpec(kind=kind, low=low, high=high, max=cap)
        default = high
    count = f.integer("eval", default, maximum=cap)
    if f.raw("curriculum", None) is not None:
        g = Fields(src, path + ("curriculum",), "a mapping {schedule: linear | 1-sqrt, over: 0.25}",
                   "model.schedule (a sampled repeat's curriculum)")
        spec = replace(spec, curriculum=Curriculum(schedule=g.choice("schedule", CURRICULA, "linear"),
                                                   over=g.number("over", 0.25, lo=0.0, hi=1.0, positive=True)))
        g.finish()
    f.finish()
    return spec, count


CURRICULA = ("linear", "1-sqrt")


def _rise(schedule: str, x: float) -> float:
    return x if schedule == "linear" else 1.0 - math.sqrt(max(0.0, 1.0 - x))


def _rise_inverse(schedule: str, y: float) -> float:
    return y if schedule == "linear" else 1.0 - (1.0 - y) ** 2


def _scaled(sample: SampleSpec) -> float:
    """What a curriculum raises: the mean count (lognormal_poisson) or the highest one (uniform)."""
    return sample.mean if sample.kind == "lognormal_poisson" else float(sample.high)


def sample_at(sample: SampleSpec, progress: float) -> SampleSpec:
    """The sampler at training progress `progress` (0..1): as written, or under its curriculum with the mean
    (high) at ceil(m * w(min(progress / over, 1))), at least 1 (at least `low`)."""
    c = sample.curriculum
    if c is None:
        return sample
    m = _scaled(sample)
    value = max(1, math.ceil(m * _rise(c.schedule, min(max(progress, 0.0) / c.over, 1.0)) - 1e-12))
    if sample.kind == "lognormal_poisson":
        return replace(sample, mean=min(float(value), sample.mean), curriculum=None)
    return replace(sample, high=max(sample.low, min(value, sample.high)), curriculum=None)


def curriculum_breaks(sample: SampleSpec) -> list[float]:
    """The progress values in (0, 1) where the curriculum's value steps up (empty without one)."""
    c = sample.curriculum
    if c is None:
        return []
    m = _scaled(sample)
    breaks = (c.over * _rise_inverse(c.schedule, k / m) for k in range(1, math.ceil(m)))
    return [p for p in breaks if 0.0 < p < 1.0]


MAX_REPEAT = 4096  # iterations of one repeat block
MAX_CALLS = 65536  # module calls of the whole unrolled schedule


def unrolled_calls(schedule: tuple) -> int:
    """How many module calls the schedule makes, without unrolling it."""
    return sum(item.count * unrolled_calls(item.body) if isinstance(item, Repeat) else 1 for item in schedule)


def sampled_loop(schedule: tuple) -> Repeat | None:
    """The top-level repeat whose count is drawn per training step, if the schedule has one."""
    return next((item for item in schedule if isinstance(item, Repeat) and item.sample is not None), None)


def with_recurrence(schedule: tuple, count: int, item: int | None = None) -> tuple:
    """The schedule with its sampled loop (or the top-level repeat at index `item`) run `count` times;
    unchanged without one."""
    return tuple(replace(x, count=count) if isinstance(x, Repeat) and (x.sample is not None if item is None
                                                                       else i == item) else x
                 for i, x in enumerate(schedule))


def flatten(schedule: tuple) -> list[Statement]:
    """The statements of a schedule in the order they are written, each repeat body listed once."""
    out: list[Statement] = []
    for item in schedule:
        out.extend(flatten(item.body) if isinstance(item, Repeat) else [item])
    return out


def check_names(st: Statement, modules: list[str], states: list[str]) -> None:
    """Every name in a statement is a declared module or state; errors point at the name's column."""
    target_loc, module_loc, *input_locs = st.name_locs or (st.loc,) * (2 + len(st.inputs))
    if st.module not in modules:
        hint = near(st.module, modules)
        if not hint:
            what = "a state" if st.module in states else "the input" if st.module == INPUT else ""
            declared = f"declared modules: {', '.join(modules)}"
            hint = f"'{st.module}' is {what}; {declared}" if what else declared
        raise SpecError(f"unknown module '{st.module}'", module_loc, st.path, hint)
    if st.target not in states:
        hint = near(st.target, states) or (
            f"'{st.target}' is a module; assign to a state"
            if st.target in modules
            else f"declare it under model.states (states: {', '.join(states)})"
        )
        raise SpecError(f"unknown state '{st.target}' on the left of '='", target_loc, st.path, hint)
    for name, loc in zip(st.inputs, input_locs):
        if name != INPUT and name not in states:
            hint = near(name, states + [INPUT]) or (
                f"'{name}' is a module, not a state"
                if name in modules
                else f"states: {', '.join(states)}; '{INPUT}' is the input embedding"
            )
            raise SpecError(f"unknown state '{name}'", loc, st.path, hint)
