"""Credit assignment: which module calls of the unrolled schedule carry gradient.

The reference is HRM-Text: 2 H cycles of 3 L cycles (L L L H L L L H), depth ramped from 2 to 5
over the first 20% of training with priority [H, L], and transformers' `L_bp_cycles`.
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hrmspec.errors import Location, SpecError
from hrmspec.graph import credit_depth, credit_table, grad_flags, unroll
from hrmspec.spec import CreditSpec, Repeat, load_spec, load_spec_text, parse_statement

HERE = Location("<test>")

HRM = """\
model:
  vocab: 64
  d_model: 32
  heads: 4
  ffn: 64
  modules: {L: {layers: 1}, H: {layers: 1}}
  states: {z_H: {init: embed}, z_L: {init: buffer}}
  schedule:
    - repeat: 2
      do:
        - repeat: 3
          do: ["z_L = L(z_L + z_H)"]
        - "z_H = H(z_H + z_L)"
  output: z_H
"""


def hrm(credit: str) -> tuple[list, CreditSpec]:
    spec = load_spec_text(HRM + f"  credit: {credit}\n")
    return unroll(spec.model.schedule), spec.model.credit


def grad_calls(calls, credit, progress=1.0) -> list[int]:
    return [c.index for c, f in zip(calls, grad_flags(calls, credit, progress)) if f]


def test_the_unrolled_hrm_text_schedule():
    calls, _ = hrm("none")
    assert [c.module for c in calls] == list("LLLHLLLH")
    assert [c.cycle for c in calls] == [(0, 0), (0, 1), (0, 2), (0,), (1, 0), (1, 1), (1, 2), (1,)]
    assert [c.index for c in calls] == list(range(8))


# L#k is the k-th L call (k from 0) and H#k the k-th H call; in execution order the calls are
# L#0 L#1 L#2 H#0 L#3 L#4 L#5 H#1 = indices 0..7.
L = {k: i for k, i in enumerate([0, 1, 2, 4, 5, 6])}
H = {0: 3, 1: 7}


@pytest.mark.parametrize(
    "depth, grad, per_module",
    [
        (2, [L[5], H[1]], {"H": 1, "L": 1}),
        (3, [H[0], L[5], H[1]], {"H": 2, "L": 1}),
        (4, [H[0], L[4], L[5], H[1]], {"H": 2, "L": 2}),
        (5, [H[0], L[3], L[4], L[5], H[1]], {"H": 2, "L": 3}),
    ],
)
def test_hrm_text_credit_table(depth, grad, per_module):
    calls, credit = hrm(f"{{depth: {depth}, priority: [H, L]}}")
    assert grad_calls(calls, credit) == grad
    assert credit_table(calls, credit) == [(depth, per_module)]


def test_hrm_text_credit_table_over_the_ramp():
    calls, credit = hrm("{depth: {from: 2, to: 5, warmup: 0.2}, priority: [H, L]}")
    assert credit_table(calls, credit) == [
        (2, {"H": 1, "L": 1}),
        (3, {"H": 2, "L": 1}),
        (4, {"H": 2, "L": 2}),
        (5, {"H": 2, "L": 3}),
    ]


def test_the_shipped_hrm_text_specs_use_the_paper_credit():
    for name in ("hrm-text-1b", "hrm-text-tiny"):
        credit = load_spec(name).model.credit
        assert (credit.mode, credit.depth_from, credit.depth_to, credit.warmup) == ("depth", 2, 5, 0.2)
        assert credit.priority == ("H", "L")


def formula(credit: CreditSpec, p: float) -> int:
    """d = from + floor(min(1, p / warmup) * (to - from))."""
    return credit.depth_from + math.floor(min(1.0, p / credit.warmup) * (credit.depth_to - credit.depth_from))


@pytest.mark.parametrize("progress, depth", [(0.0, 2), (0.1, 3), (0.2, 5), (1.0, 5)])
def test_the_depth_ramp(progress, depth):
    calls, credit = hrm("{depth: {from: 2, to: 5, warmup: 0.2}, priority: [H, L]}")
    assert credit_depth(credit, progress) == depth == formula(credit, progress)
    assert sum(grad_flags(calls, credit, progress)) == depth


@settings(max_examples=200, deadline=None)
@given(
    lo=st.integers(1, 6),
    span=st.integers(0, 6),
    warmup=st.floats(0.01, 1.0),
    p=st.floats(0.0, 1.0),
)
def test_the_ramp_is_monotone_and_bounded(lo, span, warmup, p):
    credit = CreditSpec(mode="depth", depth_from=lo, depth_to=lo + span, warmup=warmup)
    d = credit_depth(credit, p)
    assert lo <= d <= lo + span
    assert credit_depth(credit, min(1.0, p + 0.01)) >= d
    assert credit_depth(credit, warmup) == lo + span and credit_depth(credit, 0.0) == lo
    # the formula, up to rounding at the exact steps
    assert formula(credit, p) <= d <= formula(credit, p * (1 + 1e-9) + 1e-12)


def test_zero_warmup_means_full_depth_from_the_start():
    credit = CreditSpec(mode="depth", depth_from=2, depth_to=5, warmup=0.0)
    assert credit_depth(credit, 0.0) == 5


def test_no_depth_outside_depth_mode():
    assert credit_depth(CreditSpec(mode="none"), 0.5) is None
    assert credit_table(unroll(()), CreditSpec(mode="last", last=2)) == []


@pytest.mark.parametrize(
    "k, grad", [(1, [7]), (2, [6, 7]), (3, [5, 6, 7]), (8, list(range(8))), (20, list(range(8)))]
)
def test_last_k(k, grad):
    calls, credit = hrm(f"{{last: {k}}}")
    assert (credit.mode, credit.last) == ("last", k)
    assert grad_calls(calls, credit, progress=0.0) == grad


def test_none():
    calls, credit = hrm("none")
    assert credit == CreditSpec(mode="none")
    assert grad_flags(calls, credit, 0.0) == [True] * 8
    calls, credit = hrm("null")
    assert credit.mode == "none"


# ---------------------------------------------------------------------- per_cycle = L_bp_cycles


def l_bp_reference(H_cycles: int, L_cycles: int, L_bp_cycles: list[int]) -> list[bool]:
    """Grad flags of transformers' HrmTextModel.forward, call by call (L_cycles L calls, then H)."""
    padded = [1] * max(0, H_cycles - len(L_bp_cycles)) + list(L_bp_cycles)
    flags = []
    for h in range(H_cycles):
        n = padded[h] if h < len(padded) else 1
        flags += [l >= L_cycles - n for l in range(L_cycles)]
        flags.append(True)  # the H call is never under no_grad
    return flags


def hrm_schedule(H_cycles: int, L_cycles: int) -> tuple:
    """HRM-Text's schedule with any cycle counts, built without YAML."""
    return (
        Repeat(
            H_cycles,
            (
                Repeat(L_cycles, (parse_statement("z_L = L(z_L + z_H)", HERE),)),
                parse_statement("z_H = H(z_H + z_L)", HERE),
            ),
        ),
    )


BP_LISTS = [list(bp) for n in range(4) for bp in itertools.product(range(5), repeat=n)]


@pytest.mark.parametrize("bp", BP_LISTS, ids=str)
def test_per_cycle_matches_l_bp_cycles(bp):
    calls, credit = hrm(f"{{per_cycle: {{L: {bp}}}}}")
    assert credit.per_cycle == (("L", tuple(bp)),)
    assert grad_flags(calls, credit) == l_bp_reference(2, 3, bp)


@settings(max_examples=100, deadline=None)
@given(
    H_cycles=st.integers(1, 4),
    L_cycles=st.integers(1, 4),
    bp=st.lists(st.integers(0, 5), max_size=5),
)
def test_per_cycle_matches_l_bp_cycles_for_any_cycle_counts(H_cycles, L_cycles, bp):
    calls = unroll(hrm_schedule(H_cycles, L_cycles))
    credit = CreditSpec(mode="per_cycle", per_cycle=(("L", tuple(bp)),))
    assert grad_flags(calls, credit) == l_bp_reference(H_cycles, L_cycles, bp)


def test_per_cycle_against_transformers():
    """The same flags as transformers' own forward pass, observed with hooks on a tiny model."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    transformers.utils.logging.set_verbosity_error()
    calls = unroll(hrm_schedule(2, 3))
    for bp in ([2], [0, 3], [1, 0], []):
        config = transformers.HrmTextConfig(
            vocab_size=8, hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
            head_dim=4, H_cycles=2, L_cycles=3, L_bp_cycles=bp,
        )
        model = transformers.HrmTextForCausalLM(config).train()
        seen: list[bool] = []
        for stack in (model.model.L_module, model.model.H_module):
            stack.register_forward_pre_hook(lambda *_, seen=seen: seen.append(torch.is_grad_enabled()))
        model(torch.zeros(1, 2, dtype=torch.long))
        credit = CreditSpec(mode="per_cycle", per_cycle=(("L", tuple(bp)),))
        assert grad_flags(calls, credit) == seen, bp


@pytest.mark.parametrize(
    "bp, grad",
    [
        ([0, 3], [H[0], L[3], L[4], L[5], H[1]]),
        ([2], [L[2], H[0], L[4], L[5], H[1]]),  # transformers' default, padded to [1, 2]
        ([3, 3], list(range(8))),
    ],
)
def test_per_cycle_examples(bp, grad):
    calls, credit = hrm(f"{{per_cycle: {{L: {bp}}}}}")
    assert grad_calls(calls, credit) == grad


def test_per_cycle_leaves_unlisted_modules_with_gradient():
    calls, credit = hrm("{per_cycle: {L: [0, 0]}}")
    assert grad_calls(calls, credit) == [H[0], H[1]]


# ---------------------------------------------------------------------- properties of depth credit


@st.composite
def schedules(draw, modules=("A", "B", "C", "D")):
    """A random nested schedule over 1..4 modules, each called at least once."""
    used = draw(st.lists(st.sampled_from(modules), min_size=1, max_size=4, unique=True))
    order = used + draw(st.lists(st.sampled_from(used), max_size=5))
    order = draw(st.permutations(order))
    items: list = [parse_statement(f"z = {m}(z)", HERE) for m in order]

    def nest(items: list, depth: int) -> tuple:
        if depth == 0 or len(items) < 2 or not draw(st.booleans()):
            return tuple(items)
        i = draw(st.integers(0, len(items) - 1))
        j = draw(st.integers(i + 1, len(items)))
        inner = Repeat(draw(st.integers(1, 3)), nest(items[i:j], depth - 1))
        return tuple(items[:i]) + (inner,) + tuple(items[j:])

    return nest(items, 2), used


@settings(max_examples=150, deadline=None)
@given(data=st.data(), sched=schedules())
def test_depth_credit_counts_and_trailing_flags(data, sched):
    schedule, used = sched
    calls = unroll(schedule)
    priority = tuple(data.draw(st.permutations(used)))
    depth = data.draw(st.integers(len(priority), len(calls) + 3))
    credit = CreditSpec(mode="depth", depth_from=depth, depth_to=depth, warmup=0.0, priority=priority)
    flags = grad_flags(calls, credit)
    assert sum(flags) == min(depth, len(calls))
    for m in used:
        mine = [f for c, f in zip(calls, flags) if c.module == m]
        assert any(mine), "every module keeps at least one grad-carrying call"
        assert mine == sorted(mine), f"no grad call of {m} precedes one of its no-grad calls: {mine}"
    # a deeper credit keeps every grad call of a shallower one
    deeper = CreditSpec(mode="depth", depth_from=depth + 1, depth_to=depth + 1, priority=priority, warmup=0.0)
    assert all(d or not f for f, d in zip(flags, grad_flags(calls, deeper)))


def outer(call) -> int:
    """The iteration of the outermost repeat a call runs in (0 outside any repeat)."""
    return call.cycle[0] if call.cycle else 0


@settings(max_examples=100, deadline=None)
@given(sched=schedules(), data=st.data())
def test_per_cycle_flags_are_trailing_within_each_cycle(sched, data):
    schedule, used = sched
    calls = unroll(schedule)
    cycles = sorted({outer(c) for c in calls})
    listed = data.draw(st.lists(st.sampled_from(used), unique=True))
    table = tuple((m, tuple(data.draw(st.lists(st.integers(0, 4), max_size=4)))) for m in listed)
    flags = grad_flags(calls, CreditSpec(mode="per_cycle", per_cycle=table))
    for m in used:
        for cyc in cycles:
            mine = [f for c, f in zip(calls, flags) if c.module == m and outer(c) == cyc]
            assert mine == sorted(mine)
            if m not in listed:
                assert all(mine)


@settings(max_examples=60, deadline=None)
@given(sched=schedules(), k=st.integers(1, 30))
def test_last_k_is_a_suffix(sched, k):
    calls = unroll(sched[0])
    flags = grad_flags(calls, CreditSpec(mode="last", last=k))
    assert flags == [False] * max(0, len(calls) - k) + [True] * min(k, len(calls))


@settings(max_examples=80, deadline=None)
@given(sched=schedules(), k=st.integers(1, 3), tail=st.integers(0, 2))
def test_last_cycle_is_the_last_iteration_of_the_last_outer_repeat_and_what_follows(sched, k, tail):
    body = sched[0]
    # a final outer repeat of k iterations, then `tail` plain calls after it
    after = tuple(parse_statement("z = A(z)", HERE) for _ in range(tail))
    schedule = body + (Repeat(k, body),) + after
    calls = unroll(schedule)
    flags = grad_flags(calls, CreditSpec(mode="last_cycle"))
    want = len(unroll(body)) + tail  # one iteration of the last repeat, and the calls after it
    assert flags == [False] * (len(calls) - want) + [True] * want


def test_last_cycle_is_trm_s_rule_and_needs_a_loop():
    calls, credit = hrm("last_cycle")
    assert grad_calls(calls, credit) == [4, 5, 6, 7]  # the second H cycle: L L L H
    with pytest.raises(SpecError, match="'last_cycle' credit needs a repeat in the schedule"):
        load_spec_text(HRM.replace("""    - repeat: 2
      do:
        - repeat: 3
          do: ["z_L = L(z_L + z_H)"]
        - "z_H = H(z_H + z_L)\"""", """    - "z_L = L(z_L + z_H)"
    - "z_H = H(z_H + z_L)\"""") + "  credit: last_cycle\n")
    spec = load_spec("trm")
    calls = unroll(spec.model.schedule)
    assert sum(grad_flags(calls, spec.model.credit)) == 7  # n + 1 = 6 z-updates and one y-update
