"""The comparisons the kernel tests rely on (tests/numerics.py) catch what they are for."""

import pytest
import torch
from numerics import assert_same_nonfinite, assert_within, rel_rms


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
