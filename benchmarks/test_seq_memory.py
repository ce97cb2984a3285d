"""The two attention paths of seq_memory.py on a training step: the dense mask with SDPA (the old
reference attention, benchmark-local) and the blocked attention.

Short rows keep the smoke run fast; seq_memory.py measures peak RSS at S = 512 .. 8192 and times
both paths in alternation at the demo config.
"""

from __future__ import annotations

import pytest
import torch
from seq_memory import PATHS, memory_workload, model_for, step
from workloads import make_batch, saved_activation_bytes

SEQ_LEN = 300  # more than one tile of 256: the blocked path merges tiles


@pytest.fixture(scope="module")
def seq_case():
    w = memory_workload(SEQ_LEN, batch=2)
    models = {p: model_for(w, p) for p in PATHS}
    models["dense"].load_state_dict(models["blocked"].state_dict())
    return models, make_batch(w, models["blocked"].spec.model.vocab)


def test_same_loss_and_gradients(seq_case):
    models, b = seq_case
    losses = {p: step(models[p], b) for p in PATHS}
    torch.testing.assert_close(losses["blocked"], losses["dense"], rtol=1e-5, atol=1e-6)
    for (n, p_d), (_, p_b) in zip(models["dense"].named_parameters(), models["blocked"].named_parameters()):
        rel = (p_b.grad - p_d.grad).norm() / p_d.grad.norm().clamp(min=1e-30)
        assert rel < 1e-4, (n, rel.item())


def test_blocked_saves_linear_memory_and_dense_its_mask_too():
    """Past one tile (S > 256), doubling S doubles what the blocked path keeps for backward; the dense
    path keeps the same and its (B, 1, S, S) fp32 mask (one storage, shared by every call), which
    quadruples. A row of one tile runs SDPA on the tile's bias, which is that mask: the same bytes."""
    saved = {}
    for S in (256, 512, 1024):
        w = memory_workload(S, batch=2)
        for p in PATHS:
            model = model_for(w, p)
            saved[p, S] = saved_activation_bytes(model, make_batch(w, model.spec.model.vocab), return_logits=False)
    assert saved["dense", 256] == saved["blocked", 256], saved
    for S in (512, 1024):
        assert saved["dense", S] - saved["blocked", S] == 2 * S * S * 4, saved
    assert 1.9 < saved["blocked", 1024] / saved["blocked", 512] < 2.1, saved


@pytest.mark.parametrize("path", PATHS)
def test_train_step_at_s(benchmark, path, seq_case):
    models, b = seq_case
    benchmark.group = f"train step, attention path, S {SEQ_LEN}"
    benchmark.extra_info.update(tokens=b.tokens, threads=torch.get_num_threads(),
                                saved_bytes=saved_activation_bytes(models[path], b, return_logits=False))
    loss = benchmark.pedantic(step, args=(models[path], b), rounds=3, warmup_rounds=1)
    assert torch.isfinite(loss)
