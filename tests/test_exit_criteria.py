"""The value each inference exit criterion computes (runtime/execution/adaptive.py, CRITERIA), on hand-made
distributions and latent states, against its definition written out here (docs/training.md, "adaptive
depth"; Huginn's exit evaluators in seal-rg/recurrent-pretraining, raven_modeling_minimal.py,
generate_with_adaptive_compute):

    kl        KL(p_{t-1} || p_t) = sum_v p_{t-1}(v) log(p_{t-1}(v) / p_t(v))
              (Huginn: F.kl_div(log p_t, log p_{t-1}, log_target=True), which is that direction)
    entropy   |H(p_t) - H(p_{t-1})|,  H(p) = -sum_v p(v) log p(v)
    latent    ||s_t - s_{t-1}|| / ||s_t||        (relative to the new state)
    cosine    1 - cos(s_t, s_{t-1})
    argmax    the number of steps the argmax has stayed the same; exit at N

Each criterion sees (B, S, ...) readings one step at a time (`Criterion.step`); a position exits when the
change is below the threshold (strictly), never at the first step. The pairs are chosen so that a wrong
direction, a wrong normalisation or a missing absolute value gives a clearly different number, and each
threshold sits between the right value and the wrong one.
"""

from __future__ import annotations

import math

import pytest
import torch

from hrmspec.runtime.execution.adaptive import CRITERIA, Argmax, Cosine, Entropy, Latent, Never, parse_exit


def _logits(probs) -> torch.Tensor:
    """(B, S, V) logits whose softmax is `probs` (nested lists, each row summing to 1)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def _kl(p, q) -> float:
    """KL(p || q) of two lists of probabilities, in fp64."""
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _entropy(p) -> float:
    return -sum(a * math.log(a) for a in p if a > 0)


def _two_steps(crit, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `crit` says after each of two steps: (stops after step 1, stops after step 2)."""
    crit.start()
    return crit.step(first), crit.step(second)


# (p_{t-1}, p_t) per position: the two directions of KL differ by 30% or more in each, the first larger,
# the others smaller than its reverse
PAIRS = [
    ([0.49, 0.49, 0.01, 0.01], [0.9, 0.08, 0.01, 0.01]),
    ([0.7, 0.2, 0.09, 0.01], [0.25, 0.25, 0.25, 0.25]),
    ([0.96, 0.02, 0.01, 0.01], [0.6, 0.2, 0.1, 0.1]),
]


def _pairs():
    """(B=1, S, V) logits of the previous and the current step, and their probabilities."""
    prev, cur = [p for p, _ in PAIRS], [q for _, q in PAIRS]
    return _logits([prev]), _logits([cur]), prev, cur


def test_kl_is_the_previous_distribution_against_the_current():
    a, b, prev, cur = _pairs()
    forward = [_kl(p, q) for p, q in zip(prev, cur)]
    reverse = [_kl(q, p) for p, q in zip(prev, cur)]
    assert all(abs(f - r) > 0.3 * max(f, r) for f, r in zip(forward, reverse))  # the directions differ
    kl = CRITERIA["kl"]()
    got = kl.change(kl.signal(a), kl.signal(b))[0]
    torch.testing.assert_close(got.double(), torch.tensor(forward, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    # a threshold between the two directions: exits exactly where KL(p_{t-1} || p_t) is the smaller one
    for i, (f, r) in enumerate(zip(forward, reverse)):
        crit = parse_exit(f"kl:{(f + r) / 2}")
        first, second = _two_steps(crit, a, b)
        assert not first.any()  # nothing to compare with at the first step
        assert bool(second[0, i]) == (f < r), (i, f, r)


def test_kl_of_a_distribution_that_does_not_move_is_zero_and_exits():
    a, _, _, _ = _pairs()
    first, second = _two_steps(parse_exit("kl:1e-6"), a, a + 3.0)  # a shift of every logit: the same p
    assert not first.any() and second.all()


def test_entropy_change_is_the_absolute_difference_of_the_entropies():
    # entropy falling (uniform -> peaked) and rising (peaked -> uniform) by the same amount: both exit or
    # neither, whatever the sign
    uniform, peaked = [0.25] * 4, [0.7, 0.1, 0.1, 0.1]
    a, b = _logits([[uniform, peaked, [0.4, 0.3, 0.2, 0.1]]]), _logits([[peaked, uniform, [0.4, 0.3, 0.2, 0.1]]])
    h = [_entropy(p) for p in (uniform, peaked)]
    want = [abs(h[1] - h[0]), abs(h[0] - h[1]), 0.0]
    ent = Entropy()
    got = ent.change(ent.signal(a), ent.signal(b))[0]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent.signal(a)[0, :2].double(), torch.tensor(h, dtype=torch.float64), rtol=1e-6,
                               atol=0)
    _, second = _two_steps(Entropy(want[0] * 1.01), a, b)
    assert second[0].tolist() == [True, True, True]
    _, second = _two_steps(Entropy(want[0] * 0.99), a, b)
    assert second[0].tolist() == [False, False, True]


def test_latent_change_is_relative_to_the_new_state():
    # s_{t-1} -> s_t with |s_t| = 4 |s_{t-1}|: relative to the new state 3/4, to the old one 3
    prev = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]])
    cur = torch.tensor([[[4.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0], [1.0, 1.0, 1.0, 1.02]]])
    diff = (cur - prev).norm(dim=-1)
    want = diff / cur.norm(dim=-1)  # [3/4, 1.5/0.5 = 3, 0.02/2.01]
    got = Latent().change(prev, cur)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert got[0, 0] == pytest.approx(0.75) and got[0, 1] == pytest.approx(3.0)
    _, second = _two_steps(Latent(1.0), prev, cur)  # 0.75 < 1 < 3 (relative to the old state: 3 and 0.75)
    assert second[0].tolist() == [True, False, True]


def test_latent_of_a_state_that_stays_at_zero_exits():
    zero, one = torch.zeros(1, 2, 3), torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    got = Latent().change(zero, zero)
    assert torch.equal(got, torch.zeros(1, 2))  # 0 / tiny, not NaN
    assert Latent().change(one, zero)[0, 1] > 1e30  # moving to zero is no convergence
    _, second = _two_steps(Latent(0.03), zero, zero)
    assert second.all()


def test_cosine_change_is_one_minus_the_cosine():
    prev = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 2.0]]])
    cur = torch.tensor([[[0.5, math.sqrt(3) / 2], [0.0, 3.0], [-1.0, 0.0], [5.0, 5.0]]])  # 60, 90, 180, 0 degrees
    want = torch.tensor([[0.5, 1.0, 2.0, 0.0]])
    got = Cosine().change(prev, cur)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    _, second = _two_steps(Cosine(0.6), prev, cur)
    assert second[0].tolist() == [True, False, False, True]


def test_argmax_counts_the_steps_its_argmax_has_held():
    # one position per row of argmaxes over 6 steps; the count is how many consecutive steps before this
    # one had the same argmax, exit at N = 2
    seqs = [[0, 0, 0, 1, 1, 1], [2, 1, 2, 1, 2, 1], [1, 1, 2, 2, 2, 2]]
    crit = Argmax(2)
    crit.start()
    for t in range(6):
        logits = torch.full((1, len(seqs), 3), -1.0)
        for p, s in enumerate(seqs):
            logits[0, p, s[t]] = 5.0
        stops = crit.step(logits)[0]
        for p, s in enumerate(seqs):
            held = 0
            while held < t and s[t - held - 1] == s[t]:
                held += 1
            assert int(crit.count[0, p]) == held, (t, p)
            assert bool(stops[p]) == (held >= 2), (t, p)


@pytest.mark.parametrize("name", ["kl", "entropy", "latent", "cosine"])
def test_rows_still_running_are_compared_and_the_others_keep_their_reading(name):
    # after the first step only rows 0 and 2 of three run on: their new readings are compared with their own
    # previous ones, row 1 keeps its reading (a change of 0)
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(3, 2, 5, generator=gen)
    second = torch.randn(2, 2, 5, generator=gen)
    crit = parse_exit(name)
    crit.start()
    crit.step(first)
    prev = crit.signal(first)
    crit.step(second, rows=torch.tensor([0, 2]))
    cur = crit.prev
    assert torch.equal(cur[1], prev[1])
    for i, r in enumerate((0, 2)):
        torch.testing.assert_close(cur[r], crit.signal(second)[i])
    change = crit.change(prev, cur)
    torch.testing.assert_close(change[1], torch.zeros_like(change[1]), rtol=0, atol=1e-6)  # cosine: rounding


def test_the_threshold_is_strict_and_none_never_exits():
    # a change exactly at the threshold does not exit: cosine of orthogonal vectors is exactly 1
    prev, cur = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])
    assert not _two_steps(Cosine(1.0), prev, cur)[1].any()
    assert _two_steps(Cosine(1.0 + 1e-6), prev, cur)[1].all()
    never = parse_exit("none")
    assert isinstance(never, Never) and never.reads is None
