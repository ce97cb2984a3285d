"""`hrmspec cost`: training FLOPs from the graph against a hand count, the credit ramp integrated over a
run, the HRM-Text paper's run, and bad input as one line."""

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hrmspec.cli import main
from hrmspec.cost import DEFAULT_MFU, GPUS, CostError, RunFlops, credit_phases, estimate, parse_count, training_seq_len
from hrmspec.graph.credit_plan import credit_depth
from hrmspec.spec import load_spec, load_spec_text
from hrmspec.spec.schema import CreditSpec
from hrmspec.spec.shipped import shipped_specs_dir


def hrm_token_flops(d, heads, ffn, vocab, layers, seq_len, grad_calls, calls=8):
    """HRM-Text's training FLOPs per token by hand: gated attention (q, k, v and gate: 4 d x d), output
    d x d, SwiGLU (gate and up: 2 ffn x d, down d x ffn), 2 FLOPs per multiply-add; QK^T and AV over the
    (S + 1) / 2 keys a PrefixLM query sees on average; the head d x vocab. Every call runs forward,
    the grad calls backward too (2x), the head always forward and backward."""
    matmuls = 2 * d * (4 * d) + 2 * d * d + 2 * d * (2 * ffn) + 2 * ffn * d
    attention = 2 * 2 * heads * (d // heads) * (seq_len + 1) / 2
    call = layers * (matmuls + attention)
    head = 2 * d * vocab
    return calls * call + 2 * grad_calls * call + 3 * head, calls * call + head


def test_tiny_spec_matches_a_hand_count(tiny_text):
    spec = load_spec_text(tiny_text)  # d 32, 4 heads, ffn 48, vocab 61, 1 layer each; depth 2 -> 5 over 20%
    run = RunFlops(spec, seq_len=16)
    count = lambda grad: hrm_token_flops(32, 4, 48, 61, 1, 16, grad)  # noqa: E731
    assert run.forward == count(0)[1]
    assert run.start == count(2)[0] and run.end == count(5)[0]
    # depths 2, 3, 4 each over a third of the first 20%, then 5: 4.6 grad calls on average
    assert run.mean == pytest.approx(count(4.6)[0], rel=1e-12)
    # steps at progress s / 10: 0 -> depth 2, 0.1 -> 2 + floor(0.5 * 3) = 3, from 0.2 on depth 5
    assert run.per_step(10) == [count(g)[0] for g in (2, 3, 5, 5, 5, 5, 5, 5, 5, 5)]
    assert run.params == 61 * 32 * 2 + 2 * (4 * 32 * 32 + 32 * 32 + 2 * 48 * 32 + 48 * 32)


def test_hrm_text_1b_at_40b_tokens_lands_near_the_papers_16_h100_for_46_hours():
    spec = load_spec("hrm-text-1b")
    e = estimate(spec, 40e9, GPUS["h100"], DEFAULT_MFU, gpus=16)
    assert e.seq_len == 4096  # model.max_seq_len: the spec has no train: section
    per_token, forward = hrm_token_flops(1536, 12, 4096, 65536, 16, 4096, 4.6)
    assert e.flops_per_token == pytest.approx(per_token, rel=1e-12)
    assert e.forward_flops_per_token == pytest.approx(forward, rel=1e-12)
    hours = 40e9 * per_token / (989e12 * DEFAULT_MFU) / 3600 / 16
    assert e.hours == pytest.approx(hours, rel=1e-12)
    assert abs(e.hours - 46) / 46 < 0.15, e.hours
    assert e.dollars == pytest.approx(e.gpu_hours * 2.0)


# warmups of a billionth of training at least: below that a phase is shorter than float resolution
@given(lo=st.integers(1, 6), extra=st.integers(0, 6), warmup=st.one_of(st.just(0.0), st.floats(1e-9, 1.0)))
def test_credit_phases_hold_one_depth_each_and_cover_the_run(lo, extra, warmup):
    credit = CreditSpec(mode="depth", depth_from=lo, depth_to=lo + extra, warmup=warmup, priority=("H",))
    phases = credit_phases(credit)
    assert phases[0][0] == 0.0 and phases[-1][1] == 1.0
    assert all(a < b and b == c for (a, b), (c, _) in zip(phases, phases[1:]))
    depths = []
    for a, b in phases:
        inside = {credit_depth(credit, a + (b - a) * t) for t in (0.0, 0.25, 0.5, 0.75, 0.999)}
        assert len(inside) == 1
        depths += inside
    assert depths == sorted(set(depths))  # every phase its own depth, ramping up


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture is a constant
@given(lo=st.integers(2, 4), extra=st.integers(0, 3), warmup=st.one_of(st.just(0.0), st.floats(1e-9, 1.0)))
def test_the_run_mean_is_the_integral_over_progress(tiny_text, lo, extra, warmup):
    depth = {"from": lo, "to": lo + extra, "warmup": warmup}
    spec = load_spec_text(tiny_text, overrides={"model.credit.depth": depth})
    run = RunFlops(spec, seq_len=8)
    grid = 4000  # midpoint rule: off by at most one cell per phase edge
    riemann = sum(run.at((i + 0.5) / grid) for i in range(grid)) / grid
    assert run.mean == pytest.approx(riemann, rel=(extra + 1) * 4 / grid)
    assert run.start <= run.mean <= run.end


@pytest.mark.parametrize("name", sorted(p.stem for p in shipped_specs_dir().glob("*.yaml")))
def test_every_shipped_spec_is_priced(name):
    spec = load_spec(name)
    e = estimate(spec, 1e9, GPUS["a100"])
    assert e.seq_len == training_seq_len(spec)
    assert 0 < e.forward_flops_per_token < e.flops_per_token <= e.flops_per_token_end
    assert e.flops == pytest.approx(1e9 * e.flops_per_token)
    assert e.gpu_hours == pytest.approx(e.flops / (312e12 * DEFAULT_MFU) / 3600)


@pytest.mark.parametrize("text, value", [("40B", 40e9), ("500M", 500e6), ("1e9", 1e9), ("2.5T", 2.5e12),
                                         ("1_000", 1000), ("3k", 3000), ("1.5P", 1.5e15), (" 7 ", 7)])
def test_counts(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["banana", "-5", "0", "inf", "nan", "", "B", "40BB", "-1e9"])
def test_bad_counts(text):
    with pytest.raises(CostError, match="expected a positive count"):
        parse_count(text)


def test_cli_json_and_table(capsys):
    assert main(["cost", "hrm-text-1b", "--tokens", "40B", "--gpus", "16", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert {"flops", "gpu_hours", "hours", "dollars"} <= set(e)
    assert e["gpus"] == 16 and e["hours"] == pytest.approx(e["gpu_hours"] / 16)
    assert main(["cost", "hrm-text-1b", "--tokens", "40B", "--gpu", "b200", "--mfu", "0.5", "--price", "6",
                 "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert b["gpu_hours"] == pytest.approx(e["flops"] / (2250e12 * 0.5) / 3600) and b["dollars"] == b["gpu_hours"] * 6
    assert main(["cost", "transformer", "--tokens", "1e9", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "sequence length (attention)" in out


@pytest.mark.parametrize("args, message", [
    (["--tokens", "banana"], "--tokens: expected a positive count"),
    (["--tokens", "-5"], "--tokens: expected a positive count"),
    (["--tokens", "40B", "--gpu", "h10"], "unknown GPU 'h10'; known: a100, h100, h200, b200"),
    (["--tokens", "40B", "--mfu", "1.5"], "--mfu: expected a number in (0, 1]"),
    (["--tokens", "40B", "--gpus", "-2"], "--gpus: expected a positive integer"),
    (["--tokens", "40B", "--price", "free"], "--price: expected a positive number"),
    ([], "--tokens is required"),
])
def test_bad_input_is_one_line_exit_2(capsys, args, message):
    assert main(["cost", "hrm-text-tiny", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cost_starts_without_torch():
    code = ("import sys; from hrmspec.cli import main; main(['cost', 'hrm-text-1b', '--tokens', '40B', '--json']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
