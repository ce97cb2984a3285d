"""Deep supervision and halting (runtime/execution/supervision.py): the carry, the halting rules and
their bounds, the Q-learning target against HRM's through the last segment, stablemax against float64 by hand,
inference that stops rows, and a non-finite head named by row and segment."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hrmspec
from hrmspec.runtime.execution.losses import row_mean, stablemax, token_losses
from hrmspec.runtime.execution.rules import HaltingError
from hrmspec.runtime.execution.supervision import Supervisor
from hrmspec.spec import load_spec_text

SPEC = """
name: probe
model:
  vocab: 7
  d_model: 16
  heads: 2
  expansion: 2
  max_seq_len: 9
  block:
    norm: {type: rms, eps: 1.0e-5, place: post}
    attention: {type: plain, mask: bidirectional, rope_theta: 10000}
    mlp: swiglu
  modules:
    L: {layers: 1, exit_norm: none}
    H: {layers: 1, exit_norm: none}
  states:
    z_H: {init: buffer}
    z_L: {init: buffer}
  schedule:
    - repeat: 2
      do:
        - repeat: 2
          do: ["z_L = L(z_L + z_H + x)"]
        - "z_H = H(z_H + z_L)"
  output: z_H
  head: untied
  credit: {last: 2}
  puzzle: {identifiers: 3, positions: 2}
objective: {type: grid, loss: stablemax}
supervision: {segments: 5, halting: {type: HALTING, exploration: EXPLORE}}
"""


def model_for(halting="q_learning", explore=0.1, seed=0):
    spec = load_spec_text(SPEC.replace("HALTING", halting).replace("EXPLORE", str(explore)))
    torch.manual_seed(seed)
    m = hrmspec.compile(spec)
    with torch.no_grad():  # a head that says something: random weights, logits around 0
        m.halting.weight.normal_(0, 1.0)
        m.halting.bias.zero_()
    return m


def batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 7, (B, 9), generator=g)
    return {"input_ids": x, "labels": torch.randint(1, 7, (B, 9), generator=g),
            "puzzle_ids": torch.randint(0, 3, (B,), generator=g)}


# -- the carry ---------------------------------------------------------------------------------------------
def test_halted_rows_take_fresh_samples_and_initial_states_the_others_keep_theirs():
    m = model_for()
    sup = Supervisor(m)
    b0, b1 = batch(seed=0), batch(seed=1)
    carry, _ = sup.step(sup.initial_carry(b0), b0)
    assert torch.equal(carry.data["input_ids"], b0["input_ids"]) and (carry.steps == 1).all()
    carry.halted = torch.tensor([True, False, True, False, False, True])
    before = {k: v.clone() for k, v in carry.states.items()}
    new, _ = sup.step(carry, b1)
    reset = carry.halted
    assert torch.equal(new.data["input_ids"][reset], b1["input_ids"][reset])
    assert torch.equal(new.data["input_ids"][~reset], b0["input_ids"][~reset])
    assert torch.equal(new.steps, torch.where(reset, 1, 2))
    # a kept row starts from its carried states: the same as running from them by hand
    keep = (~reset).nonzero()[0].item()
    data = {k: v[keep:keep + 1] for k, v in new.data.items()}
    by_hand = m(data["input_ids"], puzzle_ids=data["puzzle_ids"],
                states={k: v[keep:keep + 1] for k, v in before.items()})
    torch.testing.assert_close(new.states["z_H"][keep:keep + 1], by_hand.states["z_H"])
    for v in new.states.values():
        assert not v.requires_grad  # carried detached: no gradient crosses a segment


@settings(max_examples=15, deadline=None)
@given(halting=st.sampled_from(["q_learning", "bce"]), explore=st.sampled_from([0.0, 0.5, 1.0]),
       seed=st.integers(0, 1000))
def test_every_row_halts_by_the_last_segment_and_exploration_keeps_at_least_two(halting, explore, seed):
    m = model_for(halting, explore, seed)
    sup = Supervisor(m)
    torch.manual_seed(seed)
    carry = sup.initial_carry(batch(seed=seed))
    for step in range(12):
        prev = carry.steps.clone()
        carry, out = sup.step(carry, batch(seed=seed + step + 1))
        assert (carry.steps <= 5).all()
        assert carry.halted[carry.steps == 5].all()  # at the last segment every row halts
        q_says = out.q_halt > out.q_continue if halting == "q_learning" else out.q_halt > 0
        # halting before the last segment only where the head says so (exploration can only delay it)
        early = carry.halted & (carry.steps < 5)
        assert (q_says[early]).all()
        if explore == 1.0:  # every row drew a minimum of 2..5 segments
            assert (carry.steps[carry.halted] >= 2).all()
        assert ((carry.steps == prev + 1) | (carry.steps == 1)).all()


def hrm_target(q_halt_next: float, q_continue_next: float, last: bool) -> float:
    """HRM's target for q_continue, from the next segment's Q values (q_halt', q_continue'): going on is worth
    the better of the next segment's two choices, sigmoid(max(q_halt', q_continue')); after the last segment
    the sample can only halt, so it is worth sigmoid(q_halt')."""
    x = q_halt_next if last else max(q_halt_next, q_continue_next)
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("head", ["continues", "random"])
def test_the_q_learning_target_follows_hrm_through_the_last_segment(head):
    m = model_for("q_learning", 0.0)
    if head == "continues":  # q_halt far below q_continue: no row halts before the last segment
        with torch.no_grad():
            m.halting.weight.mul_(0.05)
            m.halting.bias.copy_(torch.tensor([-3.0, 3.0]))
    sup = Supervisor(m)
    b = batch()
    carry, _ = sup.step(sup.initial_carry(b), b)
    carry.halted = torch.tensor([True, False, True, False, False, True])  # rows a segment apart from here on
    mixed = before = halt_is_max = 0
    for _ in range(8):
        carry, out = sup.step(carry, b)
        with torch.no_grad():  # the next segment's forward, from the states this one ended in
            nxt = m(carry.data["input_ids"], puzzle_ids=carry.data["puzzle_ids"], states=carry.states)
        last = [int(n) == 5 for n in carry.steps]
        for r, (q_halt, q_cont) in enumerate(nxt.q_logits.tolist()):
            assert out.target_q_continue[r].item() == pytest.approx(hrm_target(q_halt, q_cont, last[r]), rel=1e-5)
            before += not last[r]
            halt_is_max += not last[r] and q_halt > q_cont
        mixed += any(last) and not all(last)
    assert before
    if head == "continues":  # the last segment reached, beside rows that go on in the same step
        assert mixed
    else:  # the max took q_halt' somewhere
        assert halt_is_max


def test_bce_halting_has_no_continue_target():
    m = model_for("bce", 0.0)
    sup = Supervisor(m)
    b = batch()
    _, out = sup.step(sup.initial_carry(b), b)
    assert out.target_q_continue is None


# -- losses ------------------------------------------------------------------------------------------------
def _stablemax_by_hand(row: list[float], label: int) -> float:
    s = [x + 1.0 if x >= 0 else 1.0 / (1.0 - x) for x in row]
    return -math.log(s[label] / math.fsum(s))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.floats(-50, 50, width=32), min_size=3, max_size=3), min_size=1, max_size=4),
       st.data())
def test_stablemax_cross_entropy_against_float64_by_hand(rows, data):
    labels = [data.draw(st.integers(0, 2)) for _ in rows]
    logits = torch.tensor([rows], dtype=torch.float32)
    got = token_losses(logits, torch.tensor([labels]), "stablemax")
    assert got.dtype == torch.float64
    for i, (row, y) in enumerate(zip(rows, labels)):
        assert got[0, i].item() == pytest.approx(_stablemax_by_hand(row, y), rel=1e-12, abs=1e-12)


def test_stablemax_is_continuous_with_finite_gradients_at_the_seams():
    x = torch.tensor([-1e-12, 0.0, 1e-12, 1.0, -1.0], dtype=torch.float64, requires_grad=True)
    s = stablemax(x)
    torch.testing.assert_close(s[:3], torch.ones(3, dtype=torch.float64))
    s.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_ignored_labels_count_nothing_and_rows_average_their_own_tokens():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, -100, -100], [3, 3, 3, 3]])
    per_token = token_losses(logits, labels, "softmax")
    assert (per_token[0, 2:] == 0).all()
    torch.testing.assert_close(row_mean(per_token, labels), torch.stack([per_token[0, :2].mean(), per_token[1].mean()]))


# -- inference ---------------------------------------------------------------------------------------------
def test_solve_stops_each_row_where_its_head_says_and_computes_only_running_rows():
    m = model_for("bce", 0.0).eval()
    sup = Supervisor(m)
    b = batch(B=8)
    logits, steps = sup.solve(b)
    # by hand: every row runs every segment; its answer is that of the first segment its head says halt
    states, first, answers = None, torch.full((8,), 5), [None] * 8
    for seg in range(1, 6):
        with torch.no_grad():
            out = m(b["input_ids"], puzzle_ids=b["puzzle_ids"], states=states)
        states = out.states
        for r in range(8):
            if answers[r] is None and (seg == 5 or out.q_logits[r, 0] > 0):
                answers[r], first[r] = out.logits[r], seg
    assert torch.equal(steps, first)
    torch.testing.assert_close(logits, torch.stack(answers))
    _, every = sup.solve(b, all_segments=True)
    assert (every == 5).all()


def test_a_non_finite_halting_head_names_the_row_and_the_segment():
    m = model_for()
    with torch.no_grad():
        m.halting.bias[0] = float("nan")
    sup = Supervisor(m)
    b = batch()
    with pytest.raises(HaltingError, match=r"not finite at segment 1 of row 0"):
        sup.step(sup.initial_carry(b), b)
