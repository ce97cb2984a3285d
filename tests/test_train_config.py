"""The train: section's values are checked against one table (runtime/artifacts/config.py) before anything runs."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hrmspec.runtime.artifacts.config import INTEGERS, NUMBERS, TrainConfig, TrainError


@given(name=st.sampled_from(sorted(INTEGERS)), value=st.integers(-(10**20), 10**20))
def test_every_integer_is_taken_exactly_within_its_range(name, value):
    low, high = INTEGERS[name]
    if low <= value <= high:
        assert getattr(TrainConfig.from_dict({name: value}), name) == value
    else:
        with pytest.raises(TrainError, match=rf"train\.{name}: expected an integer of at least {low}"):
            TrainConfig.from_dict({name: value})


@given(name=st.sampled_from(sorted(NUMBERS)), value=st.floats(allow_nan=True, allow_infinity=True))
def test_every_number_is_finite_and_within_its_range(name, value):
    low, high, _ = NUMBERS[name]
    ok = math.isfinite(value) and value >= low and (high is None or value <= high)
    ok = ok and not (name == "lr" and value == 0) and not (name == "ema" and value == 1)
    if ok:
        assert getattr(TrainConfig.from_dict({name: value}), name) == value
    else:
        with pytest.raises(TrainError, match=rf"train\.{name}: expected a finite number"):
            TrainConfig.from_dict({name: value})


@pytest.mark.parametrize("value, ok", [("1e3", True), (1000.0, True), (1e3 + 0.5, False), ("abc", False),
                                       (True, False), ([1], False), (float("nan"), False)])
def test_integers_written_as_yaml_reads_them(value, ok):
    if ok:
        assert TrainConfig.from_dict({"steps": value}).steps == 1000
    else:
        with pytest.raises(TrainError, match="train.steps: expected an integer"):
            TrainConfig.from_dict({"steps": value})


@pytest.mark.parametrize("betas", [[2, 3], [0.9], [0.9, 1.0], "0.9,0.95", [0.9, float("nan")], {"a": 1}])
def test_betas_are_two_numbers_below_one(betas):
    with pytest.raises(TrainError, match=r"train.betas: expected two numbers in \[0, 1\)"):
        TrainConfig.from_dict({"betas": betas})
    assert TrainConfig.from_dict({"betas": [0.9, 0.999]}).betas == (0.9, 0.999)


def test_a_huge_value_is_never_echoed_whole():
    with pytest.raises(TrainError) as e:
        TrainConfig.from_dict({"optimizer": "x" * 5_000_000})
    assert len(str(e.value)) < 200
