"""One training step (forward + backward, no optimizer) of hrmspec's reference runtime and of
transformers' HrmTextForCausalLM: same config, weights, batch and credit plan."""

from __future__ import annotations

import pytest
import torch
from workloads import DTYPES, STEPS, train_step_hf, train_step_hrmspec


def test_same_workload(models, batch):
    """Both sides compute the same loss and the same gradients: the timings compare like with like."""
    from hrmspec.runtime.interop.convert import to_hf_tensors

    ours, hf = models["hrmspec"], models["transformers"]
    assert ours.grad_flags == [False, False, True, True, False, True, True, True]
    loss_ours, loss_hf = train_step_hrmspec(ours, batch), train_step_hf(hf, batch)
    torch.testing.assert_close(loss_ours, loss_hf, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    hf_params = dict(hf.named_parameters())
    for name, g in to_hf_tensors(ours.spec, grads, layout="module").items():
        ref = hf_params[name].grad
        assert ref is not None, name
        rel = (g - ref).norm() / ref.norm().clamp(min=1e-30)
        assert rel < 1e-4, (name, rel.item())


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", list(STEPS))
def test_train_step(benchmark, impl, dtype, models, batch):
    benchmark.group = f"train step, {dtype}"
    benchmark.extra_info.update(tokens=batch.tokens, threads=torch.get_num_threads())
    loss = benchmark.pedantic(STEPS[impl], args=(models[impl], batch, DTYPES[dtype]), rounds=5, warmup_rounds=1)
    assert torch.isfinite(loss)
