"""The full training step of throughput.py (forward, backward, clip, optimizer, EMA) on the tiny
spec's training configuration: the workload is what it claims to be, and its timings."""

from __future__ import annotations

import math

import pytest
import torch
from throughput import (
    DTYPES,
    GROUPS,
    SPEC,
    Cell,
    build_group,
    hf_batch,
    hf_credit,
    hf_model_for,
    hf_trainer,
    hrmspec_trainer,
    matmul_peak,
    packed_batches,
    plot,
    table,
    train_config,
)

import hrmspec


def _model(progress: float = 1.0, overrides=None):
    model = hrmspec.compile(SPEC, overrides=overrides, progress=progress)
    model.reset_parameters(0)
    return model.train()


@pytest.fixture(scope="module")
def cfg():
    return train_config(hrmspec.compile(SPEC))


@pytest.fixture(scope="module")
def batches(cfg):
    vocab = hrmspec.compile(SPEC).spec.model.vocab
    return packed_batches(vocab, cfg.batch_size, cfg.seq_len, n_batches=2)


def _rows(batch, n: int = 8):
    return {k: v[:n] for k, v in batch.items()}


def test_training_configuration(cfg, batches):
    """The tiny spec's `train:` section: 32 packed rows of 64 tokens, about a third instruction."""
    assert (cfg.batch_size, cfg.seq_len) == (32, 64)
    rows, fill = batches
    b = rows[0]
    assert b["input_ids"].shape == (32, 64)
    assert fill > 0.9
    assert 0.25 < b["prefix_mask"].float().mean() < 0.42
    assert int(b["doc_ids"].max()) >= 1  # several samples per row
    labelled = b["labels"] != -100
    assert labelled.any() and not labelled[b["doc_ids"] < 0].any()  # no loss on padding


def test_credit_plans():
    """Full depth is exactly transformers' L_bp_cycles [0, 3]; progress 0 (depth 2) has no
    transformers equivalent, whose nearest plan [0, 1] hrmspec runs exactly with per_cycle."""
    assert hf_credit(_model(1.0)) == ([0, 3], True)
    start = _model(0.0)
    assert sum(start.grad_flags) == 2
    assert hf_credit(start) == ([0, 1], False)
    same = _model(overrides={"model.credit": {"per_cycle": {"L": [0, 1]}}})
    assert hf_credit(same) == ([0, 1], True) and sum(same.grad_flags) == 3


def test_same_loss_and_gradients_on_packed_rows(batches):
    """transformers, given the 4-D packed-PrefixLM mask and per-sample positions, computes our loss
    and gradients at full depth: the comparison is like for like."""
    from hrmspec.runtime.interop.convert import to_hf_tensors

    ours = _model(1.0)
    hf = hf_model_for(ours, hf_credit(ours)[0])
    b = _rows(batches[0][0])
    loss_ours = ours(**b).loss
    loss_hf = hf(**hf_batch(b)).loss
    torch.testing.assert_close(loss_ours, loss_hf, rtol=1e-5, atol=1e-5)
    loss_ours.backward()
    loss_hf.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    hf_params = dict(hf.named_parameters())
    for name, g in to_hf_tensors(ours.spec, grads, layout="module").items():
        ref = hf_params[name].grad
        assert ref is not None, name
        assert (g - ref).norm() / ref.norm().clamp(min=1e-30) < 1e-4, name


def test_full_step_updates_parameters_optimizer_and_ema(cfg, batches):
    ours = _model(1.0)
    trainer = hrmspec_trainer(ours, cfg, torch.float32)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    loss = trainer.step(_rows(batches[0][0]))
    assert math.isfinite(loss)
    assert type(trainer.optimizer).__name__ == "AdamATan2"
    assert all(p.grad is None for p in ours.parameters())
    for n, p in ours.named_parameters():
        assert not torch.equal(p, before[n]), n
        moved, step = trainer.ema.shadow[n] - before[n], p.detach() - before[n]
        assert moved.abs().sum() > 0, n  # the EMA moved from the initial weights towards the new ones
        assert (moved * step >= 0).all() and (moved.abs() <= step.abs() + 1e-7).all(), n
    assert all(t > 0 for t in trainer.phases)


def test_matmul_peak_is_a_rate():
    assert 1e6 < matmul_peak(torch.float32, n=128, reps=2) < 1e14


def test_table_and_plot(cfg, tmp_path):
    cells = []
    for group, _ in GROUPS:
        for dtype in DTYPES:
            for impl, speed in (("hrmspec", 1.0), ("transformers", 0.9)):
                c = Cell(group, impl, dtype, "H#0, H#1", 2, 1e7, 2048, "AdamW")
                c.wall, c.cpu, c.phases = [0.5 / speed] * 3, [1.0] * 3, [(0.2, 0.25, 0.05)] * 3
                cells.append(c)
    res = {
        "cells": cells,
        "peak": {"fp32": 1e11, "bf16": 5e10},
        "peak_samples": 5,
        "loads": [1.0, 2.0],
        "cfg": cfg,
        "fill": 0.96,
        "prefix": 0.32,
        "threads": 2,
        "reps": 3,
        "credit": hrmspec.compile(SPEC).spec.model.credit,
        "model": "hrm-text-tiny",
    }
    md = table(res, "test machine", "python benchmarks/throughput.py")
    assert "| **0.90** |" in md and "4,096" in md and "41.0%" in md
    plot(res, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", ["hrmspec", "transformers"])
def test_full_train_step(benchmark, impl, dtype, cfg, batches):
    """One full training step at full credit depth, 32 x 64 tokens."""
    trainers = {c.impl: t for c, t in build_group("full depth", 1.0, dtype, cfg, cfg.seq_len)}
    trainer = trainers[impl]
    rows = batches[0]
    benchmark.group = f"full train step, {dtype}"
    benchmark.extra_info.update(tokens=rows[0]["input_ids"].numel(), threads=torch.get_num_threads())
    loss = benchmark.pedantic(trainer.step, args=(rows[0],), rounds=3, warmup_rounds=1)
    assert math.isfinite(loss)


def test_hf_trainer_uses_adamw(cfg):
    ours = _model(1.0)
    trainer = hf_trainer(hf_model_for(ours, [0, 3]), cfg, torch.float32)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0.0
    assert any(p is trainer.model.model.embed_tokens.weight for p in no_decay["params"])
