"""The inductor backend: a module call cut at its attention ops, each run of ops between them compiled
by torch.compile once and reused by every call of the module; the same losses, gradients and logits as
the reference to float rounding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hrmspec
from hrmspec.backends import REGISTRY
from hrmspec.graph.build import build_graph
from hrmspec.graph.plan import execution_plan
from hrmspec.runtime.execution.stack import segments
from hrmspec.spec import load_spec
from hrmspec.spec.shipped import shipped_specs_dir

SHIPPED = sorted(p.stem for p in shipped_specs_dir().glob("*.yaml"))

# small enough to compile in seconds; the schedule and credit ramp are hrm-text-tiny's own
SMALL = {"model.vocab": 96, "model.d_model": 32, "model.heads": 2, "model.ffn": 64, "model.max_seq_len": 32,
         "model.modules": {"L": {"layers": 1}, "H": {"layers": 1}}}

needs_cxx = pytest.mark.skipif(bool(REGISTRY["inductor"].missing()), reason=REGISTRY["inductor"].missing())


@pytest.mark.parametrize("name", SHIPPED)
def test_segments_cut_every_body_at_its_attention_ops(name):
    """Every body of every shipped spec: the segments are its ops in order; each reads only what is in the
    call's environment by then, leaves what later ones read, and the last leaves the call's output."""
    plan = execution_plan(build_graph(load_spec(name)), fused=False)
    for (module, arity), body in plan.bodies.items():
        segs = segments(body, ops=None)
        ops = [op for s in segs for op in (s.ops if s.attention is None else (s.attention,))]
        assert ops == list(body.ops), (name, module, arity)
        env, done = set(body.inputs), 0
        for s in segs:
            assert set(s.reads) <= env, (name, s.label, set(s.reads) - env)
            done += len(s.ops) or 1
            later = {t for o in body.ops[done:] for t in o.reads}
            assert set(s.writes) <= later | {body.output}, (name, s.label)
            if s.attention is None:
                assert all(op.kind != "attention" for op in s.ops)
                assert s.consumed <= set(s.reads) and not s.consumed & later
                env = (env - s.consumed) | set(s.writes)
            else:
                env = (env | set(s.writes)) - set(s.drops[0])
        assert body.output in env, (name, module, arity)


def _pair(progress: float):
    ref = hrmspec.compile("hrm-text-tiny", overrides=SMALL, progress=progress)
    fast = hrmspec.compile("hrm-text-tiny", backend="inductor", overrides=SMALL, progress=progress)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _batch(B: int, S: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMALL["model.vocab"], (B, S), generator=gen)
    cut = torch.randint(1, S, (B, 1), generator=gen)
    pos = torch.arange(S)[None]
    prefix = pos < cut // 2  # two packed documents per row: an instruction, then its response
    doc = (pos >= cut).long()
    positions = torch.where(pos >= cut, pos - cut, pos)
    prefix |= (doc == 1) & (positions < 2)
    labels = torch.where(prefix, -100, torch.roll(ids, -1, 1))
    return dict(input_ids=ids, prefix_mask=prefix, doc_ids=doc, position_ids=positions, labels=labels)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@needs_cxx
def test_training_steps_match_the_reference_and_compile_once_per_segment():
    """Forward + backward at credit depth 2 (no-grad and grad calls of both modules): the loss and every
    gradient equal the reference's; a second step compiles nothing new, whatever the number of calls; a
    new batch shape and an evaluation forward agree as well."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # graphs other tests compiled
    ref, fast = _pair(progress=0.0)
    calls = {(c.module, flag) for c, flag in zip(ref.calls, ref.grad_flags)}
    assert len(ref.calls) == 8 and len(calls) == 4  # both modules run with and without gradient

    def step(model, batch):
        model.zero_grad(set_to_none=True)
        out = model(**batch, return_logits=False)
        out.loss.backward()
        return out.loss.detach()

    for i, (B, S) in enumerate([(3, 16), (3, 16), (2, 24)]):
        batch = _batch(B, S, seed=i)
        want, got = step(ref, batch), step(fast, batch)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        a, b = _grads(ref), _grads(fast)
        assert a.keys() == b.keys() and a
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
        if i == 0:  # compiled per op segment and variant (grad mode, an expanded initial state), not per call
            segs = sum(s.attention is None for m in ("L", "H") for s in fast.stacks[m]._segments[2])
            executed = sum(s.attention is None for c in ref.calls for s in fast.stacks[c.module]._segments[2])
            first = counters["stats"]["unique_graphs"]
            assert segs <= first <= 3 * segs < executed, (segs, first, executed)
        if i == 1:
            assert counters["stats"]["unique_graphs"] == first, "the same shapes compiled again"
    with torch.no_grad():
        batch = _batch(2, 24, seed=5)
        batch.pop("labels")
        torch.testing.assert_close(fast.eval()(**batch).logits, ref.eval()(**batch).logits, rtol=1e-4, atol=1e-5)


@needs_cxx
@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 4), S=st.integers(2, 32), progress=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 99))
def test_random_batches_and_credit_points_match_the_reference(B, S, progress, seed):
    ref, fast = _pair(progress)
    batch = _batch(B, S, seed)
    losses = []
    for model in (ref, fast):
        out = model(**batch, return_logits=False)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    a, b = _grads(ref), _grads(fast)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_a_cxx_compiler_it_says_what_to_install(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(hrmspec.HrmspecError, match=r"the inductor backend needs a C\+\+ compiler .*apt install g\+\+"
                                                  r".*no C\+\+ compiler \(no-such-compiler\) is on the PATH"):
        hrmspec.compile("hrm-text-tiny", backend="inductor", overrides=SMALL)
