"""Autodiff on the Kernel IR: derived backward programs against torch autograd of the evaluator (float64)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hrmspec.ir import (
    IRError,
    ProgramBuilder,
    add_rms_norm,
    builtin_programs,
    evaluate,
    grad,
    kept_tensors,
    mean,
    reduce_vector_grads,
    rms_norm,
    save_plan,
)
from hrmspec.ir.strategies import random_cotangents, random_inputs, row_programs

WIDTHS = (1, 3, 127, 1000)
SCALES = (1e-3, 1.0, 4.0)


def _autograd(program, inputs, cotangents, wrt):
    leaves = {k: v.clone().requires_grad_(k in wrt) for k, v in inputs.items()}
    outs = evaluate(program, leaves)
    names = [o.name for o in program.outputs if outs[o.name].requires_grad]
    if not names:
        return {f"d_{w}": torch.zeros_like(leaves[w]) for w in wrt}, outs
    gs = torch.autograd.grad([outs[n] for n in names], [leaves[w] for w in wrt],
                             [cotangents[f"d_{n}"] for n in names], allow_unused=True)
    return {f"d_{w}": torch.zeros_like(leaves[w]) if g is None else g for w, g in zip(wrt, gs)}, outs


def _derived(program, inputs, cotangents, wrt, saved=()):
    back = grad(program, wrt, saved=saved)
    declared = program.input_names + tuple(saved) + tuple(cotangents)
    assert set(back.input_names) <= set(declared)  # the ones it reads (or one row, for the shape)
    stored = {k: v for k, v in evaluate(program, inputs).items() if k in saved}
    return reduce_vector_grads(back, evaluate(back, {**inputs, **stored, **cotangents}))


def _check(program, inputs, cotangents, wrt=None, saved=()):
    wrt = list(program.input_names if wrt is None else wrt)
    ref, outs = _autograd(program, inputs, cotangents, wrt)
    got = _derived(program, inputs, cotangents, wrt, saved)
    scale = max([1.0] + [float(t.abs().max()) for t in ref.values() if t.numel()])
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        torch.testing.assert_close(got[k], ref[k], rtol=1e-7, atol=1e-9 * scale, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("name", sorted(builtin_programs()))
@pytest.mark.parametrize("width", WIDTHS)
def test_builtin_backward_matches_autograd(name, width):
    p = builtin_programs()[name]
    _check(p, random_inputs(p, 3, width, 1.0, seed=width), random_cotangents(p, 3, width, seed=width))


def test_grad_of_a_subset_and_names():
    p = rms_norm()
    back = grad(p, ["w"])
    assert back.output_names == ("d_w",) and back.outputs[0].row_partial
    assert grad(p).output_names == ("d_x", "d_w")
    assert grad(p).name == "rms_norm_bwd"
    with pytest.raises(IRError, match="no input named 'q'"):
        grad(p, ["q"])


def test_unused_input_gets_a_zero_gradient():
    b = ProgramBuilder("unused")
    x, _ = b.row("x"), b.scalar("s")
    b.output("y", (x < 0.0).where(1.0, 2.0))  # piecewise constant in x: zero gradient too
    p = b.build()
    inputs, cot = random_inputs(p, 2, 5, 1.0, 0), random_cotangents(p, 2, 5, 0)
    out = _derived(p, inputs, cot, ["x", "s"])
    assert out["d_x"].shape == (2, 5) and not out["d_x"].any()
    assert out["d_s"].shape == (2,) and not out["d_s"].any()


def test_scalar_and_vector_inputs_through_reductions():
    b = ProgramBuilder("mixed")
    x, s, w = b.row("x"), b.scalar("s"), b.vector("w")
    m = (x * w).max() + mean(w) * s
    b.output("y", (x - m) * s + w.sum())
    b.output("m", m)
    p = b.build()
    for width in WIDTHS:
        _check(p, random_inputs(p, 4, width, 1.0, width), random_cotangents(p, 4, width, width))


def test_scalar_broadcast_through_a_uniform_adjoint():
    # y = sum(x + sum(x)): the adjoint of x + sum(x) is uniform along the row (held as a scalar),
    # and sum(x) is broadcast over the row, so it receives D times that adjoint
    b = ProgramBuilder("uniform")
    x = b.row("x")
    b.output("y", (x + x.sum()).sum())
    p = b.build()
    _check(p, random_inputs(p, 2, 3, 1.0, 0), random_cotangents(p, 2, 3, 0))


def test_max_ties_share_the_gradient_like_amax():
    b = ProgramBuilder("ties")
    x = b.row("x")
    b.output("y", x.relu().max())  # all-negative rows: every entry ties at 0
    p = b.build()
    inputs = {"x": -torch.rand(2, 7, dtype=torch.float64)}
    inputs["x"][1, 3] = 1.0
    _check(p, inputs, random_cotangents(p, 2, 7, 0))


def test_backward_programs_stay_small():
    sizes = {name: (len(p.nodes), len(grad(p).nodes)) for name, p in builtin_programs().items()}
    for name, (fwd, bwd) in sizes.items():
        assert bwd <= 3 * fwd + 4, (name, fwd, bwd)
    # rms_norm backward: one reduction for the forward mean, one for the dot product, nothing repeated
    ops = [n.op for n in grad(rms_norm()).nodes]
    assert ops.count("mean") == 1 and ops.count("sum") == 1 and ops.count("rsqrt") == 1


def test_backward_is_deterministic():
    p = builtin_programs()["add_rms_norm"]
    assert grad(p).hash == grad(p).hash and str(grad(p)) == str(grad(p))


@settings(max_examples=150, deadline=None)
@given(program=row_programs(), width=st.sampled_from(WIDTHS), rows=st.integers(1, 3),
       scale=st.sampled_from(SCALES), seed=st.integers(0, 2**16))
def test_random_programs_backward_matches_autograd(program, width, rows, scale, seed):
    inputs = random_inputs(program, rows, width, scale, seed)
    cot = random_cotangents(program, rows, width, seed)
    _check(program, inputs, cot)


@settings(max_examples=20, deadline=None)
@given(program=row_programs(max_inputs=3, max_ops=4), seed=st.integers(0, 2**16))
def test_random_programs_grad_wrt_each_input(program, seed):
    inputs = random_inputs(program, 2, 3, 1.0, seed)
    cot = random_cotangents(program, 2, 3, seed)
    for name in program.input_names:
        _check(program, inputs, cot, [name])


@settings(max_examples=100, deadline=None)
@given(program=row_programs(), width=st.sampled_from(WIDTHS), rows=st.integers(1, 3),
       scale=st.sampled_from(SCALES), seed=st.integers(0, 2**16), data=st.data())
def test_backward_reading_saved_outputs_matches_autograd(program, width, rows, scale, seed, data):
    """Any set of saved forward outputs gives the same gradients (fp64: stored = exact values)."""
    saved = data.draw(st.lists(st.sampled_from(program.output_names), unique=True))
    _check(program, random_inputs(program, rows, width, scale, seed), random_cotangents(program, rows, width, seed),
           saved=tuple(saved))


def test_save_plan_keeps_the_sum_not_the_terms():
    p = add_rms_norm(1e-6)  # h = x + r, y = rms_norm(h) * w
    assert save_plan(p) == ("h",)
    assert kept_tensors(p, ("h",)) == (("w",), ("h",))
    # nothing to gain for a plain norm: its output is not what the backward reads
    assert save_plan(rms_norm()) == ()
    assert kept_tensors(rms_norm(), ()) == (("x", "w"), ())


def test_save_plan_recomputes_on_a_tie():
    b = ProgramBuilder("softplus_like")
    x = b.row("x")
    e = x.exp()
    b.output("e", e)
    b.output("y", (e + 1.0).log())
    p = b.build()
    # exp's derivative is its value: reading e instead of x is a tie, so x is kept (recompute)
    assert save_plan(p) == ()
    with pytest.raises(IRError, match="cannot save 'z'"):
        grad(p, saved=("z",))
