"""The two loss paths of a training step at a large vocabulary: full logits (`return_logits=True`)
and the chunked linear + cross-entropy of training (`return_logits=False`).

A smaller batch than loss_memory.py keeps the smoke run fast; loss_memory.py measures peak RSS
and times both paths in alternation at 8 x 512 tokens and 32k-65k vocabularies.
"""

from __future__ import annotations

import pytest
import torch
from workloads import hrmspec_model, loss_workload, make_batch, saved_activation_bytes, train_step_hrmspec

VOCAB = 32768
SMALL = {"batch": 2, "seq_len": 256}
PATHS = {"full": True, "chunked": False}  # name -> return_logits


@pytest.fixture(scope="module")
def loss_case():
    w = loss_workload(VOCAB, **SMALL)
    model = hrmspec_model(w)
    return model, make_batch(w, VOCAB)


def test_same_loss_and_gradients(loss_case):
    model, b = loss_case
    losses, grads = {}, {}
    for name, return_logits in PATHS.items():
        losses[name] = train_step_hrmspec(model, b, return_logits=return_logits)
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses["chunked"], losses["full"], rtol=1e-5, atol=1e-5)
    assert grads["chunked"].keys() == grads["full"].keys()
    for n, ref in grads["full"].items():
        rel = (grads["chunked"][n] - ref).norm() / ref.norm().clamp(min=1e-30)
        assert rel < 1e-4, (n, rel.item())


def test_chunked_keeps_no_logits(loss_case):
    """The full path keeps the (tokens, vocab) log-softmax for backward; the chunked one only h and
    one log-sum-exp per token."""
    model, b = loss_case
    saved = {name: saved_activation_bytes(model, b, return_logits=rl) for name, rl in PATHS.items()}
    logits = b.tokens * VOCAB * 4
    assert saved["full"] - saved["chunked"] >= 0.95 * logits, saved
    assert saved["chunked"] < logits, saved


@pytest.mark.parametrize("path", list(PATHS))
def test_train_step_loss_path(benchmark, path, loss_case):
    model, b = loss_case
    benchmark.group = f"train step, loss path, vocab {VOCAB}"
    benchmark.extra_info.update(
        tokens=b.tokens, threads=torch.get_num_threads(), saved_bytes=saved_activation_bytes(
            model, b, return_logits=PATHS[path]
        )
    )
    loss = benchmark.pedantic(train_step_hrmspec, args=(model, b), kwargs={"return_logits": PATHS[path]},
                              rounds=3, warmup_rounds=1)
    assert torch.isfinite(loss)
