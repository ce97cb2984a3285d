"""Test-time scaling of grid runs (runtime/evaluate/scaling.py, `hrmspec eval --vote-augment/--trajectories/...`):
symmetries undone exactly, the official vote rule, noise that is reproducible row by row, q-picking, and the CLI."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_grids import GRID_SPEC

import hrmspec
from hrmspec.errors import HrmspecError
from hrmspec.runtime.artifacts.grids import square_symmetry
from hrmspec.runtime.evaluate import scaling
from hrmspec.runtime.evaluate.scaling import (
    HeldOut,
    NoisyTrajectories,
    Options,
    Symmetry,
    candidates,
    dihedral,
    noise_states,
    prefixes,
    solve_chunk,
    symmetries,
    vote,
)
from hrmspec.runtime.execution.supervision import Supervisor
from hrmspec.spec.load import load_spec_text

# ------------------------------------------------------------------ symmetries


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from([("sudoku", 4), ("sudoku", 9), ("square", None)]), side=st.integers(1, 10),
       seed=st.integers(0, 2**32), count=st.integers(1, 12), data=st.data())
def test_the_inverse_undoes_every_symmetry(kind, side, seed, count, data):
    kind, sudoku_side = kind
    side = sudoku_side or side
    vocab = side + 2 if kind == "sudoku" else 6  # sudoku: padding, empty and the digits
    syms = symmetries(kind, side, vocab, count, random.Random(seed))
    assert len(syms) == count and syms[0].is_identity
    tokens = data.draw(st.lists(st.integers(0, vocab - 1), min_size=side * side, max_size=side * side))
    for sym in syms:
        sym = sym.widened(vocab + 3)  # a model's larger vocabulary: the extra tokens stay
        assert sym.inverse().apply(sym.apply(tokens)) == tokens
        assert sym.apply(sym.inverse().apply(tokens)) == tokens
        assert sym.inverse().inverse() == sym


@settings(max_examples=30, deadline=None)
@given(side=st.integers(1, 9), seed=st.integers(0, 2**32))
def test_the_eight_square_symmetries_are_those_training_draws(side, seed):
    ours = {dihedral(side, t, tr).order for t in range(4) for tr in (False, True)}
    rng = random.Random(seed)
    drawn = {tuple(square_symmetry(side, rng, 6)[0]) for _ in range(64)}
    assert drawn <= ours and len(ours) == (8 if side > 1 else 1)


def test_square_copies_differ_from_each_other_up_to_eight():
    syms = symmetries("square", 5, 6, 8, random.Random(0))
    assert len({s.order for s in syms}) == 8


# ------------------------------------------------------------------ the vote


def reference_vote(cands):
    """The official rule written plainly: the most votes, then the highest mean confidence; first seen on a tie."""
    best, best_key = None, None
    seen = []
    for answer, _ in cands:
        if answer not in seen:
            seen.append(answer)
    for answer in seen:
        confs = [c for a, c in cands if a == answer]
        key = (len(confs), sum(confs) / len(confs))
        if best_key is None or key > best_key:
            best, best_key = answer, key
    return best


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from([0.1, 0.5, 0.9, 0.5])), min_size=1, max_size=12))
def test_the_vote_is_the_official_rule(cands):
    assert vote(cands) == reference_vote(cands)


def test_the_vote_counts_before_confidence():
    assert vote([("a", 0.99), ("b", 0.2), ("b", 0.3)]) == "b"
    assert vote([("b", 0.2), ("a", 0.9), ("b", 0.3), ("a", 0.1)]) == "a"  # 2-2: mean 0.5 beats 0.25
    assert vote([("a", 0.5), ("b", 0.5)]) == "a"


def test_prefixes_double_up_to_the_count():
    assert prefixes(1) == [1] and prefixes(2) == [1, 2] and prefixes(6) == [1, 2, 4, 6] and prefixes(8) == [1, 2, 4, 8]


# ------------------------------------------------------------------ noisy trajectories


@pytest.fixture(scope="module")
def model():
    """The micro grid model with a halting head that says different things for different rows."""
    torch.manual_seed(0)
    m = hrmspec.compile(load_spec_text(GRID_SPEC)).eval()
    with torch.no_grad():
        m.halting.weight.normal_(0, 2.0)
        m.halting.bias.zero_()
        batch = _batch(8)
        q = m(batch["input_ids"], puzzle_ids=batch["puzzle_ids"], return_logits=True).q_logits
        m.halting.bias[0] = -(q[:, 0] - q[:, 1]).median()  # about half the rows halt after the first segment
    _, steps = Supervisor(m).solve(_batch(8))
    assert len(set(steps.tolist())) > 1  # rows stop at different segments: the noise follows the rows running
    return m


def _batch(rows=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 6, (rows, 16), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "puzzle_ids": torch.zeros(rows, dtype=torch.long)}


def test_zero_noise_is_the_plain_solve(model):
    batch = _batch(6)
    logits, steps = Supervisor(model).solve(batch)
    noisy = NoisyTrajectories(model, 0.0, ("z",), keys=range(6), scales=[1.0] * 6)
    got, got_steps = noisy.solve(batch)
    assert torch.equal(got, logits) and torch.equal(got_steps, steps)


def test_noise_goes_to_noisy_rows_only_and_is_reproducible(model):
    batch = _batch(6)
    logits, steps = Supervisor(model).solve(batch)
    scales = [0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    first, _ = NoisyTrajectories(model, 0.5, ("z",), keys=range(6), scales=scales).solve(batch)
    again, _ = NoisyTrajectories(model, 0.5, ("z",), keys=range(6), scales=scales).solve(batch)
    assert torch.equal(first, again)
    clean = [0, 2]
    assert torch.allclose(first[clean], logits[clean], atol=1e-6)
    assert not torch.allclose(first[1], logits[1])


def test_q_pick_takes_the_replica_with_the_highest_q_each_computed_alone(model):
    batch = _batch(2, seed=3)
    syms = [[Symmetry.identity(16, 6)] for _ in range(2)]
    keys = [11, 12]
    att = solve_chunk(model, batch, syms, 6, 0.8, ("z",), keys, all_segments=False)
    for p in range(2):
        alone = []
        for r in range(6):  # the same row, solved by itself with its own noise
            row = {k: v[p:p + 1] for k, v in batch.items()}
            q = torch.zeros(1)
            NoisyTrajectories(model, 0.8, ("z",), [scaling._digest(keys[p], 0, r)], [float(r > 0)]).solve(row, q)
            alone.append(float(torch.sigmoid(q.double())))
        assert alone == pytest.approx(att.confidence[p][0], abs=1e-6)
        best = max(range(6), key=lambda r: alone[r])
        (answer, conf), = candidates([att], p, 1, 1, 6, "q")
        assert answer == att.answers[p][0][best] and conf == pytest.approx(alone[best], abs=1e-6)
    assert len(set(att.confidence[0][0])) > 1  # the noise did move the head


def test_noise_states_default_to_the_latent_and_check_names(model):
    assert noise_states(model) == ("z",)
    assert noise_states(model, ["y", "z", "y"]) == ("y", "z")
    with pytest.raises(HrmspecError, match="no such state; its states are z, y"):
        noise_states(model, ["z_L"])


def test_one_copy_one_trajectory_is_the_plain_prediction(model):
    batch = _batch(5, seed=1)
    logits, _ = Supervisor(model).solve(batch)
    att = solve_chunk(model, batch, [[Symmetry.identity(16, 6)]] * 5, 1, 0.0, (), list(range(5)), False)
    assert [a[0][0] for a in att.answers] == [tuple(r) for r in logits.argmax(-1).tolist()]


def test_refusals_before_solving(model):
    with pytest.raises(HrmspecError, match="give --trajectories N with N > 1"):
        Options(noise=0.1).check()
    spec = load_spec_text(GRID_SPEC.replace(", halting: {type: q_learning, exploration: 0.3}", ""))
    plain = hrmspec.compile(spec)
    held = HeldOut(1, None, ["sudoku"], ["mini_sudoku"], 4, 6, ("grids",), "grids")
    with pytest.raises(HrmspecError, match="has no halting head"):
        scaling._refusals(Options(trajectories=2), [plain], ["RUN"], held)
    scaling._refusals(Options(trajectories=2, pick="vote"), [plain], ["RUN"], held)
    arc = HeldOut(1, None, [None], None, 30, 12, ("dataset",), "arc/test", arc=True)
    with pytest.raises(HrmspecError, match="ARC dataset holds augmented copies"):
        scaling._refusals(Options(vote_augment=2), [model], ["RUN"], arc)


# ------------------------------------------------------------------ the CLI on a trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from hrmspec.runtime.training.loop import train

    out = tmp_path_factory.mktemp("scaling") / "run"
    train(load_spec_text(GRID_SPEC.replace("steps: 6", "steps: 2")), out, progress_bar=False)
    return out


def test_cli_scaling_writes_the_curve(run, capsys):
    from hrmspec.cli import main

    assert main(["eval", str(run), "--vote-augment", "3", "--trajectories", "2", "--noise", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "k=3 n=2" in out and "segments / puzzle" in out
    res = json.loads((run / "eval-scaling.json").read_text())
    assert [(s["augment"], s["trajectories"]) for s in res["settings"]] == [(k, n) for k in (1, 2, 3) for n in (1, 2)]
    assert (run / "eval-scaling.png").read_bytes()[:4] == b"\x89PNG"
    by = {(s["augment"], s["trajectories"]): s["segments"] for s in res["settings"]}
    assert by[(3, 2)] > by[(1, 1)] > 0


def test_one_copy_one_trajectory_matches_plain_eval(run, capsys):
    from hrmspec.cli import main

    assert main(["eval", str(run), "--n", "8"]) == 0
    plain = json.loads((run / "eval.json").read_text())
    assert main(["eval", str(run), "--n", "8", "--vote-augment", "1", "--trajectories", "1"]) == 0
    (setting,) = json.loads((run / "eval-scaling.json").read_text())["settings"]
    assert setting["accuracy"] == plain["accuracy"] and setting["segments"] == pytest.approx(plain["segments"])


def test_cli_refusals_exit_2_in_one_line(run, capsys, monkeypatch):
    from hrmspec.cli import main

    for argv, text in ((["--noise", "0.1"], "give --trajectories N"),
                       (["--trajectories", "2", "--exit", "kl:0.1"], "--allow-nonfinite only"),
                       (["--trajectories", "2", "--noise-state", "h"], "no such state"),
                       (["--trajectories", "2", "--ensemble", str(run / "nowhere")], "nowhere")):
        assert main(["eval", str(run), "--n", "2", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hrmspec: error: ") and text in err and err.count("\n") == 1, err
    text_run = SimpleNamespace(objective=SimpleNamespace(type="task_completion"))  # what a text run's spec says
    monkeypatch.setattr(scaling, "load_run", lambda *a, **k: (None, None, text_run, run))
    assert main(["eval", str(run), "--vote-augment", "2"]) == 2
    err = capsys.readouterr().err
    assert "are for grid runs" in err and err.count("\n") == 1
