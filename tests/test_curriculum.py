"""A recurrence curriculum (`repeat: {sample: ..., curriculum: {schedule, over}}`): the mean count rises from 1
to its value over the first part of training, as the retrofitted-recurrence recipe schedules it; the draw of a
step is a function of the seed and the step (exact on resume), the log shows the mean reached, and cost
integrates it."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hrmspec.cost import RunFlops
from hrmspec.errors import SpecError
from hrmspec.runtime.training.recurrence import draw_count, expected_count
from hrmspec.spec import load_spec
from hrmspec.spec.schedule import curriculum_breaks, sample_at, sampled_loop
from hrmspec.spec.schema import Curriculum, SampleSpec


def reference_mean(m: float, schedule: str, over: float, p: float) -> int:
    """ceil(m * w(p / over)), at least 1: w linear or 1 - sqrt(1 - x), written out here."""
    x = min(p / over, 1.0)
    w = x if schedule == "linear" else 1 - math.sqrt(1 - x)
    return max(1, math.ceil(round(m * w, 9)))


@given(m=st.integers(1, 64), schedule=st.sampled_from(["linear", "1-sqrt"]), over=st.floats(0.05, 1.0),
       p=st.floats(0.0, 1.0))
def test_the_mean_follows_the_schedule_and_never_falls(m, schedule, over, p):
    s = SampleSpec("lognormal_poisson", mean=float(m), curriculum=Curriculum(schedule, over))
    got = sample_at(s, p).mean
    assert got == reference_mean(m, schedule, over, p)
    assert sample_at(s, min(1.0, p + 0.01)).mean >= got and sample_at(s, 1.0).mean == m
    u = SampleSpec("uniform", low=2, high=m + 2, curriculum=Curriculum(schedule, over))
    assert sample_at(u, p).high == max(2, reference_mean(m + 2, schedule, over, p))


def test_breaks_are_where_the_value_steps_up():
    s = SampleSpec("lognormal_poisson", mean=8.0, curriculum=Curriculum("1-sqrt", 0.5))
    breaks = curriculum_breaks(s)
    assert len(breaks) == 7 and breaks == sorted(breaks) and breaks[-1] < 0.5
    for b in breaks:
        assert sample_at(s, b + 1e-9).mean == sample_at(s, b - 1e-9).mean + 1


def test_draws_depend_on_seed_and_step_only_and_rise_with_progress():
    s = SampleSpec("lognormal_poisson", mean=16.0, sigma=0.3, curriculum=Curriculum("linear", 0.5))
    assert [draw_count(s, 3, k, k / 100) for k in range(100)] == [draw_count(s, 3, k, k / 100) for k in range(100)]
    early = sum(draw_count(s, 0, k, 0.01) for k in range(200)) / 200
    late = sum(draw_count(s, 0, k, 0.9) for k in range(200)) / 200
    assert early < 3 < 12 < late  # E[count] = mean + 1: 2 early, 17 late
    assert expected_count(s, 0.0) == 2 and expected_count(s, 1.0) == 17


def test_the_spec_reads_it_and_cost_integrates_it():
    spec = load_spec("huginn-tiny", {"model.schedule[1].repeat.curriculum": {"schedule": "1-sqrt", "over": 0.5}})
    loop = sampled_loop(spec.model.schedule)
    assert loop.sample.curriculum == Curriculum("1-sqrt", 0.5)
    run, flat = RunFlops(spec, 64), RunFlops(load_spec("huginn-tiny"), 64)
    grid = 4000  # the mean over training by a fine midpoint rule, against the phases' exact sum
    numeric = sum(run.at((i + 0.5) / grid) for i in range(grid)) / grid
    assert run.mean == pytest.approx(numeric, rel=2e-3)
    assert run.at(0.0) < flat.at(0.0) and run.at(1.0) == pytest.approx(flat.at(1.0)) and run.mean < flat.mean
    steps = 1000
    assert sum(n for n, _ in run.phases(steps)) == steps
    assert run.summed(steps) == pytest.approx(sum(run.per_step(steps)), rel=1e-9)
    with pytest.raises(SpecError, match="over"):
        load_spec("huginn-tiny", {"model.schedule[1].repeat.curriculum": {"over": 0}})
    with pytest.raises(SpecError, match="schedule"):
        load_spec("huginn-tiny", {"model.schedule[1].repeat.curriculum": {"schedule": "cosine"}})


def test_training_logs_the_mean_reached(tmp_path):
    import json

    from test_readout import _text_folder

    from hrmspec.runtime.training.loop import train
    folder = _text_folder(tmp_path)
    spec = load_spec("huginn-tiny", {
        "model.schedule[1].repeat.curriculum": {"schedule": "linear", "over": 1.0}, "model.d_model": 32,
        "model.heads": 2, "model.ffn": 64, "model.embed_scale": 5.66, "model.max_seq_len": 64,
        "data": {"source": "jsonl", "path": str(folder / "train.jsonl"), "eval_path": str(folder / "eval.jsonl")},
        "train.steps": 4, "train.batch_size": 2, "train.log_every": 1, "train.save_every": 4, "train.threads": 1,
        "train.eval_n": 2, "train.max_new_tokens": 2, "train.readout_rows": 0})
    train(spec, tmp_path / "run", progress_bar=False)
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    means = [r["recurrence_mean"] for r in logged if "recurrence_mean" in r]
    # linear over the whole run, mean 4: ceil(4 p) at p = 0, 1/4, 2/4, 3/4 -> 1, 1, 2, 3; E[count] = mean + 1
    assert means == [2.0, 2.0, 3.0, 4.0]
