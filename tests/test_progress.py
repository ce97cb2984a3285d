"""Progress lines for the slow steps before a run starts: off for library calls, on for `train`."""

import re

from hrmspec import progress
from hrmspec.runtime.artifacts.data import reasoning_gym_samples
from hrmspec.runtime.artifacts.tokenizer import train_tokenizer


def test_off_by_default_a_library_call_prints_nothing(capsys):
    assert not progress.enabled()
    reasoning_gym_samples(["basic_arithmetic"], 5)
    assert capsys.readouterr().out == ""


def test_on_each_slow_step_is_one_timed_line_on_stdout(capsys):
    with progress.shown():
        samples, _, _ = reasoning_gym_samples(["basic_arithmetic"], 6)
        train_tokenizer([s.instruction for s in samples], 300)
    assert not progress.enabled()
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert re.fullmatch(r"generating 6 train samples of basic_arithmetic: \d+\.\d s", lines[0]), out
    assert re.fullmatch(r"training a byte-level BPE tokenizer of up to 300 tokens: \d+\.\d s", lines[1]), out
    assert err == ""


def test_a_failing_step_prints_no_timing_line(capsys):
    with progress.shown():
        try:
            with progress.step("a step that fails"):
                raise ValueError("boom")
        except ValueError:
            pass
    assert capsys.readouterr().out == ""
