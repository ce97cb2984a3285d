"""IR autodiff at the points where an op is not smooth or leaves its domain, which random draws never hit:
relu at exactly +-0, max with ties (which elements share the gradient), where and the comparisons at their
boundary, sqrt / rsqrt / log / pow / division at 0 and beyond, and every op at +-inf and NaN.

The reference is torch autograd of the same program through the evaluator (`hrmspec.ir.evaluate`): the
derived backward must give the same gradient, with inf and NaN at the same elements. The same points
then run through the generated backward kernels (Triton in its interpreter, host C).
"""

from __future__ import annotations

import math

import pytest
import torch
from numerics import assert_same_nonfinite

from hrmspec.ir import ProgramBuilder, evaluate, grad, reduce_vector_grads

INF, NAN = math.inf, math.nan
TINY = 5e-324  # the smallest fp64 subnormal: beside 0, on each side
# every point where an op of the IR changes its rule or its domain ends, and a smooth one of each sign
POINTS = (0.0, -0.0, TINY, -TINY, 1.0, -1.0, 2.5, INF, -INF, NAN)


def _autograd(program, inputs, cotangents, wrt):
    leaves = {k: v.clone().requires_grad_(k in wrt) for k, v in inputs.items()}
    outs = evaluate(program, leaves)
    names = [o.name for o in program.outputs if outs[o.name].requires_grad]
    gs = torch.autograd.grad([outs[n] for n in names], [leaves[w] for w in wrt],
                             [cotangents[f"d_{n}"] for n in names], allow_unused=True)
    return {f"d_{w}": torch.zeros_like(leaves[w]) if g is None else g for w, g in zip(wrt, gs)}


def _derived(program, inputs, cotangents, wrt):
    back = grad(program, wrt)
    return reduce_vector_grads(back, evaluate(back, {**inputs, **cotangents}))


def _cotangents(program, inputs, seed):
    """A random cotangent per output, bounded away from 0 (a zero cotangent would hide a wrong rule)."""
    gen = torch.Generator().manual_seed(seed)
    outs = evaluate(program, inputs)
    cot = {}
    for o in program.outputs:
        c = torch.rand(outs[o.name].shape, generator=gen, dtype=torch.float64) + 0.5
        cot[f"d_{o.name}"] = torch.where(torch.rand(c.shape, generator=gen) < 0.5, -c, c)
    return cot


def _same(got, want, what):
    """inf and NaN where the reference has them; the finite elements to fp64 rounding."""
    finite = assert_same_nonfinite(got, want, what)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-12, atol=1e-300, msg=lambda m: f"{what}: {m}")


def _program(build, inputs=(("x", "row"),)):
    b = ProgramBuilder("edge")
    vals = [b.input(n, k) for n, k in inputs]
    b.output("y", build(*vals))
    return b.build()


def _check(program, inputs, seed=0):
    wrt = list(program.input_names)
    cot = _cotangents(program, inputs, seed)
    want = _autograd(program, inputs, cot, wrt)
    got = _derived(program, inputs, cot, wrt)
    for k in want:
        assert got[k].shape == want[k].shape, k
        _same(got[k], want[k], f"{k} at {inputs}")
    return got, cot


def _row(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype).reshape(1, -1)


# -- one op at every point --------------------------------------------------------------------------
UNARY = {
    "relu": lambda x: x.relu(),
    "sqrt": lambda x: x.sqrt(),
    "rsqrt": lambda x: x.rsqrt(),
    "log": lambda x: x.log(),
    "exp": lambda x: x.exp(),
    "tanh": lambda x: x.tanh(),
    "sigmoid": lambda x: x.sigmoid(),
    "silu": lambda x: x.silu(),
    "square": lambda x: x.square(),
    "neg": lambda x: -x,
    "reciprocal": lambda x: 1.0 / x,
    "div_by_self_minus_1": lambda x: x / (x - 1.0),  # 0 / 0 at neither point, x / 0 at x = 1
    **{f"pow_{c:g}".replace(".", "_").replace("-", "m"): (lambda x, c=c: x**c)
       for c in (2.0, 3.0, 0.5, -0.5, 1.5, -1.0, -1.5, 1.3)},
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_each_op_at_its_edges_matches_autograd(name):
    _check(_program(UNARY[name]), {"x": _row(POINTS)})


def test_relu_passes_no_gradient_at_zero_of_either_sign():
    # torch's rule: relu'(x) = 0 for x <= 0, so 0 and -0 pass nothing, the smallest positive passes g,
    # and NaN passes g (autograd's threshold_backward: NaN <= 0 is false)
    got, cot = _check(_program(lambda x: x.relu()), {"x": _row(POINTS)})
    g, d = cot["d_y"][0], got["d_x"][0]
    #        0      -0     tiny  -tiny  1     -1     2.5   inf   -inf   NaN
    want = [False, False, True, False, True, False, True, True, False, True]
    assert [bool(d[i] == g[i]) for i in range(len(POINTS))] == want
    assert not d[[i for i, w in enumerate(want) if not w]].any()


def test_relu_kink_reached_through_arithmetic():
    # relu(x - s) is at its kink where x equals the per-row scalar s exactly; s gets minus the row sum of
    # what passes, so a kink counted as open changes d_s as well as d_x
    p = _program(lambda x, s: (x - s).relu(), (("x", "row"), ("s", "scalar")))
    x = torch.tensor([[1.0, 2.0, 3.0, 2.0], [-1.0, -1.0, 0.0, 5.0]], dtype=torch.float64)
    got, cot = _check(p, {"x": x, "s": torch.tensor([2.0, -1.0], dtype=torch.float64)})
    torch.testing.assert_close(got["d_x"], torch.where(x > torch.tensor([[2.0], [-1.0]], dtype=torch.float64),
                                                       cot["d_y"], 0.0), rtol=0, atol=0)
    torch.testing.assert_close(got["d_s"], -got["d_x"].sum(-1), rtol=1e-15, atol=0)


# -- max: which elements share the gradient ------------------------------------------------------------
TIES = {
    "three_way_tie": [1.0, 3.0, 3.0, -2.0, 3.0],
    "single_max": [1.0, 3.0, 2.0],
    "plus_and_minus_zero": [0.0, -0.0, -1.0, 0.0],
    "all_equal": [2.0] * 7,
    "tie_at_inf": [INF, 1.0, INF],
    "all_minus_inf": [-INF, -INF, -INF],
    "nan_in_the_row": [1.0, NAN, 3.0],
    "tie_below_zero": [-5.0, -0.5, -0.5],
}


@pytest.mark.parametrize("row", sorted(TIES))
def test_max_ties_share_the_gradient_as_amax(row):
    values = TIES[row]
    got, cot = _check(_program(lambda x: x.max()), {"x": _row(values)})
    if any(math.isnan(v) for v in values):
        assert got["d_x"].isnan().all()  # amax's rule: no element equals NaN, so g * 0 / 0
        return
    top = max(values)
    ties = torch.tensor([v == top for v in values])
    want = torch.where(ties, cot["d_y"][0] / ties.sum(), 0.0)  # g / (number of ties) each, nothing elsewhere
    torch.testing.assert_close(got["d_x"][0], want.double(), rtol=1e-15, atol=0)


def test_max_ties_through_relu_and_a_vector():
    # relu of an all-negative row: every entry ties at 0, and relu passes nothing there; max(x * w) with a
    # vector w ties in two columns: both get half, and w's partials are summed over the rows
    p = _program(lambda x: x.relu().max())
    _check(p, {"x": _row([-1.0, -2.0, 0.0, -0.0])})
    p = _program(lambda x, w: (x * w).max() + (x - w).relu().sum(), (("x", "row"), ("w", "vector")))
    x = torch.tensor([[1.0, 2.0, 4.0, 2.0], [3.0, 1.0, 1.0, 0.5]], dtype=torch.float64)
    w = torch.tensor([2.0, 1.0, 0.5, 1.0], dtype=torch.float64)  # x * w ties: 2, 2, 2, 2 and 6, 1, 0.5, 0.5
    _check(p, {"x": x, "w": w})


def test_softmax_of_a_row_with_ties_and_minus_inf():
    # the shape every attention-like expression has: x - max(x), exp, normalised
    def softmax(x):
        e = (x - x.max()).exp()
        return e / e.sum()

    _check(_program(softmax), {"x": _row([1.0, 3.0, 3.0, -INF, 0.0])})


# -- where and the comparisons at their boundary ---------------------------------------------------------
CONDITIONS = {
    "lt": lambda a, c: a < c,
    "le": lambda a, c: a <= c,
    "gt": lambda a, c: a > c,
    "ge": lambda a, c: a >= c,
    "eq": lambda a, c: a.eq(c),
}


@pytest.mark.parametrize("cmp", sorted(CONDITIONS))
def test_where_at_the_boundary_takes_the_selected_branch(cmp):
    # abs-like: where(x op 0, -3x, 2x); at x = 0 exactly (and -0) the condition decides which branch's
    # derivative is the gradient, -3g or 2g, as autograd of torch.where does
    p = _program(lambda x: CONDITIONS[cmp](x, 0.0).where(-3.0 * x, 2.0 * x))
    got, cot = _check(p, {"x": _row(POINTS)})
    taken = {"lt": lambda v: v < 0, "le": lambda v: v <= 0, "gt": lambda v: v > 0, "ge": lambda v: v >= 0,
             "eq": lambda v: v == 0}[cmp]
    for i, v in enumerate(POINTS):
        if not math.isnan(v):
            assert float(got["d_x"][0, i]) == float((-3.0 if taken(v) else 2.0) * cot["d_y"][0, i]), (cmp, v)


@pytest.mark.parametrize("cmp", sorted(CONDITIONS))
def test_a_comparison_of_two_inputs_at_equality_routes_only_the_branches(cmp):
    # where(a op b, a * b, b - a): a and b equal in some columns; the comparison itself has no gradient,
    # so a and b get exactly the selected branch's partials
    p = _program(lambda a, b: CONDITIONS[cmp](a, b).where(a * b, b - a), (("a", "row"), ("b", "row")))
    a = _row([1.0, 2.0, -0.0, INF, 3.0, NAN])
    b = _row([1.0, 3.0, 0.0, INF, 2.0, 1.0])
    _check(p, {"a": a, "b": b})


def test_a_step_has_no_gradient_through_its_condition():
    # cast(x > 0, f32) * v: v gets the step, x gets nothing, also at x = 0 where the step jumps
    p = _program(lambda x, v: (x > 0.0).cast("f32") * v + (v >= x).cast("f32"), (("x", "row"), ("v", "row")))
    x = _row(POINTS)
    got, cot = _check(p, {"x": x, "v": torch.ones_like(x)})
    assert not got["d_x"].any()
    torch.testing.assert_close(got["d_v"], torch.where(x > 0, cot["d_y"], 0.0), rtol=0, atol=0)


def test_rounding_casts_at_ties_pass_the_gradient_straight_through():
    # a tie of bf16 and one of fp16 (1 + 2^-8, 1 + 2^-11): the value rounds, the gradient is g, unscaled
    for dtype in ("bf16", "f16"):
        p = _program(lambda x, dtype=dtype: x.cast(dtype) * 3.0)
        got, cot = _check(p, {"x": _row([1.0 + 2.0**-8, 1.0 + 2.0**-11, 65520.0, 0.0, -1.0])})
        torch.testing.assert_close(got["d_x"], 3.0 * cot["d_y"], rtol=0, atol=0)


# -- the same points through the generated backward kernels ---------------------------------------------
KERNEL_CASES = {
    "relu": (lambda x: x.relu(), [0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, INF, -INF, NAN]),
    "max_ties": (lambda x: x.max(), [1.0, 3.0, 3.0, -2.0, 3.0]),
    "max_zero_ties": (lambda x: x.max(), [0.0, -0.0, -1.0, 0.0]),
    "max_of_relu": (lambda x: x.relu().max(), [-1.0, -2.0, 0.0, -0.0]),
    "max_inf_ties": (lambda x: x.max(), [INF, 1.0, INF]),
    "abs_by_where": (lambda x: (x < 0.0).where(-x, x), [0.0, -0.0, 1.0, -1.0, INF, -INF, NAN]),
    "step": (lambda x: (x >= 0.0).cast("f32") * x, [0.0, -0.0, 1.0, -1.0, INF, -INF]),
    "sqrt": (lambda x: x.sqrt(), [0.0, 1e-30, 4.0, INF, -1.0]),
    "rsqrt": (lambda x: x.rsqrt(), [0.0, 1e-30, 4.0, INF, -1.0]),
    "log": (lambda x: x.log(), [0.0, 1e-30, 4.0, INF, -1.0]),
}


def _kernel_op(backend: str):
    """The differentiable row op class of a kernel backend."""
    if backend == "triton":
        pytest.importorskip("triton")
        from hrmspec.backends.triton import TritonRowOp

        return TritonRowOp
    from hrmspec.backends.cstyle.host import HostRowOp

    return HostRowOp


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HRMSPEC_CACHE", str(tmp_path_factory.mktemp("kernels")))
        yield


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns at the IEEE edges it meets
@pytest.mark.parametrize("backend", [pytest.param("triton"), pytest.param("c", marks=pytest.mark.needs_cc)])
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_backward_kernels_at_the_edges_match_autograd(case, backend, kernel_device):
    build, values = KERNEL_CASES[case]
    p = _program(build)
    device = kernel_device if backend == "triton" else torch.device("cpu")
    # two rows: the edge row, and the same row reversed (a tie's position must not matter)
    x = torch.tensor([values, values[::-1]], dtype=torch.float32)
    cot = _cotangents(p, {"x": x.double()}, seed=len(values))["d_y"].float()
    leaf_k, leaf_r = x.to(device).requires_grad_(), x.clone().requires_grad_()
    y_k = _kernel_op(backend)(p)(leaf_k)["y"]
    y_r = evaluate(p, {"x": leaf_r})["y"]
    got = y_k.detach().cpu()
    finite = assert_same_nonfinite(got, y_r.detach(), f"{backend} {case} y")
    torch.testing.assert_close(got[finite], y_r.detach()[finite], rtol=1e-5, atol=0)
    (d_k,) = torch.autograd.grad(y_k, leaf_k, cot.to(device))
    (d_r,) = torch.autograd.grad(y_r, leaf_r, cot)
    d_k = d_k.cpu()
    finite = assert_same_nonfinite(d_k, d_r, f"{backend} {case} d_x")
    torch.testing.assert_close(d_k[finite], d_r[finite], rtol=1e-5, atol=1e-30,
                               msg=lambda m: f"{backend} {case} d_x: {m}")
