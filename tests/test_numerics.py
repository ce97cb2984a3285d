"""The comparisons the kernel tests rely on (tests/numerics.py) catch what they are for."""

import pytest
import torch
from numerics import assert_same_nonfinite, assert_within, check_row_op, reduction_lengths, rel_rms


def _weighted_means(n: int, seed: int) -> torch.Tensor:
    """(50, 50) softmax-weighted means over n values each, in fp32: what attention's output is."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(50, 50, n, generator=g) * 3, -1)
    return (p * torch.randn(n, generator=g)).sum(-1)


@pytest.mark.parametrize("n", [7, 100, 250])
def test_rounding_to_bf16_passes_and_one_wrong_element_in_2500_fails(n):
    # reductions of up to a few hundred terms (attention's keys and head dim here): an element off by 0.8 of
    # the result's RMS fails; longer ones allow 4 eps sqrt(n) of it (numerics.elementwise_bound)
    ref = _weighted_means(n, n)
    stored = ref.to(torch.bfloat16)  # the only error a correct kernel makes: storage rounding
    assert_within(stored, ref, torch.bfloat16, n, "rounded")
    truncated = (ref.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)  # the interpreter's store
    assert_within(truncated, ref, torch.bfloat16, n, "truncated")
    wrong = stored.clone()
    wrong[17, 31] += 0.8 * float(ref.pow(2).mean().sqrt())  # one element off by most of the RMS
    assert rel_rms(wrong.float(), ref) < 2e-2  # the RMS alone cannot tell
    with pytest.raises(AssertionError, match=r"1 element\(s\) outside .* first at \(17, 31\)"):
        assert_within(wrong, ref, torch.bfloat16, n, "one wrong")


def test_a_nan_that_vanishes_or_appears_is_named():
    ref = torch.tensor([1.0, float("nan"), float("inf")])
    assert torch.equal(assert_same_nonfinite(ref.clone(), ref, "same"), torch.tensor([True, False, False]))
    with pytest.raises(AssertionError, match=r"NaN at 0 element\(s\), the reference at 1"):
        assert_same_nonfinite(torch.tensor([1.0, 0.0, float("inf")]), ref, "vanished")
    with pytest.raises(AssertionError, match=r"-inf"):
        assert_same_nonfinite(torch.tensor([1.0, float("nan"), float("-inf")]), ref, "sign")


# -- check_row_op: each result is held to the bound of its own reduction length -----------------------------
def test_reduction_lengths_follow_the_program():
    from hrmspec.ir import ProgramBuilder, add_rms_norm, swiglu

    rows, width = 3, 4097
    # h = x + r is elementwise; y = rms_norm(h) is downstream of mean(h * h); every row gradient reads the
    # mean (and the dot product of the backward); w's gradient sums per-row partials
    assert reduction_lengths(add_rms_norm(), rows, width) == ({"h": 1, "y": width},
                                                              {"x": width, "r": width, "w": rows})
    assert reduction_lengths(swiglu(), rows, width) == ({"y": 1}, {"a": 1, "b": 1})
    b = ProgramBuilder("mixed")
    x, s, w = b.row("x"), b.scalar("s"), b.vector("w")
    b.output("y", x * s + w)  # elementwise of its row, a per-row scalar and a weight
    b.output("m", (x * w).max() * s)  # a per-row scalar output: a reduction
    outs, grads = reduction_lengths(b.build(), rows, width)
    # x's gradient meets max's tie mask, a row reduction; s's sums over the row; w's over the rows
    assert outs == {"y": 1, "m": width} and grads == {"x": width, "s": width, "w": rows}
    b = ProgramBuilder("scaled")
    x, s = b.row("x"), b.scalar("s")
    b.output("y", x * s * b.width())  # the width as a number is no reduction
    assert reduction_lengths(b.build(), rows, width) == ({"y": 1}, {"x": 1, "s": width})


class _WrongValue(torch.autograd.Function):
    """One element of the value wrong (`_one_wrong`); the gradient handed on unchanged."""

    @staticmethod
    def forward(ctx, t, how):
        return _one_wrong(t, how)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _WrongGradient(torch.autograd.Function):
    """The value unchanged; one element of the gradient wrong (`_one_wrong`)."""

    @staticmethod
    def forward(ctx, t, how):
        ctx.how = how
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return _one_wrong(g, ctx.how), None


def _one_wrong(t: torch.Tensor, how: str) -> torch.Tensor:
    """t with one element wrong: moved by 1.9 times the RMS of t, or sign-flipped (an element of size
    about the RMS, where a flip moves it by twice that)."""
    t = t.clone()
    flat = t.view(-1)
    f = flat.float()
    rms = float(f.pow(2).mean().sqrt())
    candidates = ((f.abs() > 0.6 * rms) & (f.abs() < rms)).nonzero()[:, 0]  # elements of size 0.6-1 RMS
    i = int(candidates[len(candidates) // 2])
    flat[i] = (f[i] + 1.9 * rms) if how == "shift" else -f[i]
    return t


def _evaluator_op(program, output: str | None = None, grad_of: str | None = None, how: str = "shift"):
    """The evaluator as a kernel backend's op, with one element of `output` (or of `grad_of`'s
    gradient) wrong."""
    from hrmspec.ir import evaluate

    def op(**leaves):
        if grad_of is not None:
            leaves = {**leaves, grad_of: _WrongGradient.apply(leaves[grad_of], how)}
        out = evaluate(program, leaves)
        if output is not None:
            out[output] = _WrongValue.apply(out[output], how)
        return out

    return op


@pytest.mark.parametrize("how", ["shift", "flip"])
def test_one_wrong_element_of_an_elementwise_result_fails_at_width_4097(how):
    # at width 4097 the bound of a reduction allows 4 eps sqrt(4097) = 2 RMS in bf16: one element off by
    # 1.9 RMS or sign-flipped passed it; an elementwise result is now held to its own length, 1
    from hrmspec.ir import add_rms_norm, swiglu

    rows, width, dtype = 3, 4097, torch.bfloat16
    for program, kwargs, what in ((add_rms_norm(), {"output": "h"}, "h:"),
                                  (swiglu(), {"output": "y"}, "y:"),
                                  (swiglu(), {"grad_of": "a"}, "d_a:")):
        check_row_op(_evaluator_op(program), program, rows, width, dtype, seed=1)  # the plain evaluator passes
        with pytest.raises(AssertionError, match=rf"{what} .*1 element\(s\) outside"):
            check_row_op(_evaluator_op(program, how=how, **kwargs), program, rows, width, dtype, seed=1)
