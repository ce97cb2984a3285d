"""Training memory grows with the credit depth, not with the number of cycles.

Measured as the bytes of the tensors autograd saves for backward (unique storages, parameters
excluded): deterministic, so the shape of the curve can be asserted. A small batch keeps the
smoke run fast; report.py measures at the benchmark batch and plots the curves.
"""

from __future__ import annotations

import pytest
from workloads import Workload, hrmspec_model, make_batch, saved_activation_bytes, train_step_hrmspec

CYCLES = [(1, 2), (2, 3), (3, 4), (4, 6)]  # (H_cycles, L_cycles): 3, 8, 15 and 28 module calls
SMALL = {"batch": 2, "seq_len": 64}


def saved(h: int, l: int, credit) -> int:
    w = Workload(h, l, credit, **SMALL)
    model = hrmspec_model(w)
    return saved_activation_bytes(model, make_batch(w, model.spec.model.vocab))


def test_fixed_depth_memory_is_flat_in_cycles():
    sizes = [saved(h, l, {"last": 3}) for h, l in CYCLES]
    assert max(sizes) <= 1.02 * min(sizes), sizes


def test_full_backprop_memory_grows_with_cycles():
    sizes = [saved(h, l, "none") for h, l in CYCLES]
    calls = [h * (l + 1) for h, l in CYCLES]
    assert sizes == sorted(sizes) and sizes[-1] > 5 * sizes[0], sizes
    per_call = [(b - a) / (m - n) for a, b, n, m in zip(sizes, sizes[1:], calls, calls[1:])]
    assert max(per_call) <= 1.05 * min(per_call), per_call  # linear in the number of calls


def test_memory_grows_linearly_with_depth():
    sizes = [saved(2, 3, {"last": k}) for k in range(1, 9)]
    steps = [b - a for a, b in zip(sizes, sizes[1:])]
    assert all(s > 0 for s in steps), sizes
    # one more grad-carrying call costs one call's activations (L and H calls are the same size here)
    assert max(steps) <= 1.1 * min(steps), steps


@pytest.mark.parametrize("cycles", CYCLES, ids=[f"{h}x{l}" for h, l in CYCLES])
def test_step_at_fixed_depth(benchmark, cycles):
    """Step time at credit `last: 3`: the extra cycles run under no-grad and cost forward FLOPs only."""
    w = Workload(*cycles, {"last": 3}, **SMALL)
    model = hrmspec_model(w)
    b = make_batch(w, model.spec.model.vocab)
    benchmark.group = "train step at credit last 3"
    benchmark.extra_info.update(calls=w.calls, saved_bytes=saved_activation_bytes(model, b))
    benchmark.pedantic(train_step_hrmspec, args=(model, b), rounds=3, warmup_rounds=1)
