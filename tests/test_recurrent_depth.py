"""Depth-recurrent LMs (Huginn, RINS, looped Transformers): cat(...) injection through an adapter,
random initial states, a loop count sampled per step with truncated backprop, and their specs."""

import json
import os
import statistics

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train import losses

import hrmspec
from hrmspec.errors import SpecError
from hrmspec.graph import build_graph
from hrmspec.graph.analysis import analyse
from hrmspec.runtime.training.loop import train
from hrmspec.runtime.training.recurrence import draw_count, expected_count
from hrmspec.spec import load_spec, load_spec_text
from hrmspec.spec.schema import SampleSpec

SPEC = """
name: micro-huginn
model:
  d_model: 32
  ffn: 64
  heads: 2
  vocab: 320
  max_seq_len: 96
  block:
    norm: {type: rms, eps: 1.0e-6, affine: true, place: pre_post}
    attention: {type: plain, rope_theta: 10000, mask: causal}
    mlp: swiglu
  final_norm: true
  modules:
    P: {layers: 1, exit_norm: none}
    R: {layers: 1, exit_norm: none}
    C: {layers: 1, exit_norm: none}
  states: {e: {init: embed}, s: {init: random, std: 0.5}, h: {init: zeros}}
  schedule:
    - "e = P(e)"
    - repeat: {sample: lognormal_poisson, mean: 3, sigma: 0.5, max: 8}
      do: ["s = R(cat(s, e))"]
    - "h = C(s)"
  output: h
  head: tied
  credit: {truncate: 2}
objective: lm
data: {source: reasoning_gym, tasks: [basic_arithmetic], size: 120, eval_size: 8}
train: {steps: 6, batch_size: 4, seq_len: 96, log_every: 1, save_every: 3, keep: 5, lr: 3.0e-3, max_new_tokens: 8}
"""


def spec(**overrides):
    return load_spec_text(SPEC, overrides=overrides or None)


def model_and_context(seed=0):
    torch.manual_seed(seed)
    m = hrmspec.compile(spec())
    m.reset_parameters(seed=seed)
    ctx = m.context(2, 7, None, None, None)
    return m, ctx


# ------------------------------------------------------------------ cat(...) injection


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1e-2, 1.0, 3.0]))
def test_cat_injection_is_the_adapter_on_the_concatenation(seed, scale):
    """R(cat(s, e)) == R's layers on adapter([s; e]), computed here with F.linear on torch.cat;
    the gradients of s, e and the adapter weight agree too."""
    m, ctx = model_and_context(seed)
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(2, 7, 32, generator=g)).requires_grad_()
    e = (scale * torch.randn(2, 7, 32, generator=g)).requires_grad_()
    stack = m.stacks["R"]
    W = stack.adapter.weight
    assert W.shape == (32, 64)
    ours = stack([s, e], ctx)
    ref = stack([F.linear(torch.cat([s, e], -1), W)], ctx)  # the arity-1 body: the layers alone
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    w = torch.randn(ours.shape, generator=g)
    got = torch.autograd.grad((ours * w).sum(), (s, e, W))
    want = torch.autograd.grad((ref * w).sum(), (s, e, W))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cat_errors_name_the_place():
    bad = SPEC.replace('"h = C(s)"', '"h = C(s)"\n    - "s = R(s + e)"')
    with pytest.raises(SpecError, match=r"module R is called with cat\(s, e\) and with 's = R\(s \+ e\)'"):
        load_spec_text(bad)
    with pytest.raises(SpecError, match=r"expected at least two states in cat\(\.\.\.\)"):
        load_spec_text(SPEC.replace("cat(s, e)", "cat(s)"))
    with pytest.raises(SpecError, match=r"expected cat\(\.\.\.\) as the whole input of a call"):
        load_spec_text(SPEC.replace("R(cat(s, e))", "R(s + cat(s, e))"))


# ------------------------------------------------------------------ random initial states


def test_random_state_is_drawn_per_forward_and_zero_at_init_scale_0():
    m, _ = model_and_context()
    m.eval()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        a, b = m(ids, init_scale=0.0).logits, m(ids, init_scale=0.0).logits
        c, d = m(ids).logits, m(ids).logits
    assert torch.equal(a, b) and not torch.equal(c, d)
    draw = m.initial_states(torch.zeros(64, 64, 32))["s"]
    assert draw.abs().max() <= 3 * 0.5 + 1e-6  # truncated at 3 std
    assert abs(float(draw.std()) - 0.5 * 0.986) < 0.02  # a normal truncated at 3 std keeps 98.6% of its std


# ------------------------------------------------------------------ the sampled loop


@settings(max_examples=25, deadline=None)
@given(mean=st.floats(1.0, 40.0), sigma=st.floats(0.0, 1.0), cap=st.integers(1, 64), seed=st.integers(0, 10**6),
       step=st.integers(0, 10**6))
def test_draws_are_bounded_and_a_function_of_seed_and_step(mean, sigma, cap, seed, step):
    sample = SampleSpec("lognormal_poisson", mean=mean, sigma=sigma, max=cap)
    torch.manual_seed(step)  # the global RNG plays no part
    a = draw_count(sample, seed, step)
    torch.manual_seed(step + 1)
    assert 1 <= a <= cap and a == draw_count(sample, seed, step)


@pytest.mark.parametrize("sample", [SampleSpec("lognormal_poisson", mean=8.0, sigma=0.5),
                                    SampleSpec("lognormal_poisson", mean=32.0, sigma=0.5),
                                    SampleSpec("uniform", low=2, high=5)])
def test_draws_have_the_stated_law(sample):
    counts = [draw_count(sample, 7, step) for step in range(4000)]
    mean = statistics.fmean(counts)
    # Huginn: E[count] = mean + 1; the standard error of 4,000 draws is < 0.2 at mean 32
    assert abs(mean - expected_count(sample)) < (1.0 if sample.mean > 10 else 0.4)
    if sample.kind == "uniform":
        assert set(counts) == {2, 3, 4, 5}
    else:  # the rate is log-normal: the count's spread exceeds a Poisson's of the same mean
        assert statistics.pvariance(counts) > 1.1 * expected_count(sample)


def _draw_on_rank(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(1000 + rank)  # each rank's own RNG differs, as under torchrun with per-rank streams
    sample = SampleSpec("lognormal_poisson", mean=32.0, sigma=0.5)
    mine = torch.tensor([draw_count(sample, 3, step) for step in range(50)])
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if rank == 0:
        torch.save(torch.stack(every), out)
    dist.destroy_process_group()


def test_ranks_draw_in_lockstep_under_gloo(tmp_path):
    from test_train import free_port

    out = tmp_path / "draws.pt"
    torch.multiprocessing.spawn(_draw_on_rank, args=(2, free_port(), str(out)), nprocs=2)
    draws = torch.load(out, weights_only=True)
    assert torch.equal(draws[0], draws[1]) and len(set(draws[0].tolist())) > 5


def test_truncated_backprop_flags_and_gradients_match_a_detached_loop():
    """At count 5 with truncate 2: prelude and coda carry gradient, the first 3 core iterations do
    not; every parameter's gradient equals a loop written here with the first 3 iterations detached."""
    m, ctx = model_and_context(3)
    calls, flags = m.schedule_at(5)
    assert [c.module for c in calls] == ["P"] + ["R"] * 5 + ["C"]
    assert flags == [True, False, False, False, True, True, True]
    ids = torch.randint(0, 300, (2, 7))
    torch.manual_seed(11)
    out = m(ids, labels=ids, num_steps=5, return_logits=False)
    got = torch.autograd.grad(out.loss, list(m.parameters()), allow_unused=True)

    torch.manual_seed(11)
    x = m.embed_inputs(ids)
    z = m.initial_states(x)
    e = m.stacks["P"]([z["e"]], ctx)
    s = z["s"]
    for i in range(5):
        s = m.stacks["R"]([s, e], ctx)
        if i < 3:
            s = s.detach()  # no gradient through the first count - k iterations
    h = m.stacks["C"]([s], ctx)
    loss = F.cross_entropy(m.logits_of(h).reshape(-1, 320), ids.reshape(-1))  # labels[t]: what t predicts
    want = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
    for (name, _), a, b in zip(m.named_parameters(), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_a_sampled_run_logs_its_draws_and_resumes_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(spec(), full, progress_bar=False)
    train(spec(), part, progress_bar=False, stop_after=3)
    train(spec(), part, resume=True, progress_bar=False)
    assert losses(part) == losses(full)
    recs = [r for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    loop = spec().model.schedule[1].sample
    assert [r["recurrence"] for r in recs] == [draw_count(loop, 0, step) for step in range(6)]


# ------------------------------------------------------------------ the language's checks and the specs


@pytest.mark.parametrize("edit, message", [
    (("    - repeat: {sample: lognormal_poisson, mean: 3, sigma: 0.5, max: 8}\n      do: [\"s = R(cat(s, e))\"]",
      "    - repeat: 2\n      do:\n        - repeat: {sample: uniform, high: 3}\n          do: [\"s = R(cat(s, e))\"]"),
     "a sampled repeat count must be a loop of the schedule's top level"),
    (('    - "h = C(s)"', '    - repeat: {sample: uniform, high: 2}\n      do: ["h = C(s)"]'),
     "only one repeat of the schedule can have a sampled count"),
    (("mean: 3, sigma", "mean: 3, eval: 0, sigma"), "expected a positive integer, found 0"),
    (("sample: lognormal_poisson", "sample: poisson"), "expected one of lognormal_poisson | uniform"),
    (("credit: {truncate: 2}", "credit: {truncate: 2}\n  halting: {type: act, threshold: 0.99, weight: 0.01}"),
     "cannot be combined with a sampled repeat"),
])
def test_sampled_loop_errors(edit, message):
    assert edit[0] in SPEC
    text = SPEC.replace(*edit)
    with pytest.raises(SpecError, match=message):
        load_spec_text(text)


def test_shipped_specs():
    huginn = analyse(build_graph(load_spec("huginn")), seq_len=4096)
    assert 3.4e9 < huginn.params < 3.7e9  # Huginn-0125: 3.5B
    deeper = analyse(build_graph(load_spec("huginn"), recurrence=64), seq_len=4096)
    assert deeper.params == huginn.params and deeper.forward_flops_per_token > 1.8 * huginn.forward_flops_per_token
    for name in ("huginn-tiny", "rins", "looped-transformer"):
        s = load_spec(name)
        model = hrmspec.compile(s)
        ids = torch.randint(0, s.model.vocab, (1, 12))
        out = model(ids, labels=ids, return_logits=False)
        assert torch.isfinite(out.loss), name


def test_show_prices_the_sampled_loop(capsys):
    from hrmspec.cli import main

    assert main(["show", "huginn", "--recurrence", "64", "--seq-len", "4096"]) == 0
    text = capsys.readouterr().out
    assert "Sampled loop: count ~ Poisson(LogNormal(ln 32" in text
    assert "33 (expected 33)" in text and "32 (evaluation)" in text and "64 (shown above)" in text


# ------------------------------------------------------------------ pricing a sampled loop


@pytest.mark.parametrize("sample", [SampleSpec("lognormal_poisson", mean=32.0, sigma=0.5),
                                    SampleSpec("lognormal_poisson", mean=3.0, sigma=0.5, max=8),
                                    SampleSpec("uniform", low=1, high=3)])
def test_the_cost_models_count_law_is_the_samplers(sample):
    from hrmspec.cost import count_distribution

    law = count_distribution(sample)
    assert abs(sum(p for _, p in law) - 1) < 1e-9 and all(1 <= c <= sample.max for c, _ in law)
    draws = [draw_count(sample, 11, step) for step in range(4000)]
    cdf = emp = 0.0
    worst = 0.0
    for c, p in law:  # Kolmogorov distance between the law and 4,000 draws (critical value at 1%: 0.026)
        cdf += p
        emp = sum(d <= c for d in draws) / len(draws)
        worst = max(worst, abs(cdf - emp))
    assert worst < 0.026


def test_training_flops_of_a_sampled_spec_are_the_expectation_over_draws():
    """RunFlops extrapolates past a few iterations; checked against the exact graph at every count drawn."""
    from hrmspec.cost import RunFlops

    s = load_spec_text(SPEC.replace("mean: 3, sigma: 0.5, max: 8", "mean: 12, sigma: 0.5, max: 40"))
    run = RunFlops(s, seq_len=96)
    draws = [draw_count(s.model.schedule[1].sample, 5, step) for step in range(3000)]
    exact = {n: analyse(build_graph(s, 1.0, recurrence=n), seq_len=96).train_flops_per_token for n in set(draws)}
    empirical = statistics.fmean(exact[n] for n in draws)
    assert abs(run.mean - empirical) / empirical < 0.02
