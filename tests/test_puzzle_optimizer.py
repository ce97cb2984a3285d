"""HRM's sparse sign-SGD for the puzzle table (`train.puzzle_optimizer`, runtime/training/optim.py).

The optimizer is held to HRM's algorithm, written out here from its description: gather the rows' gradients
by identifier, sum them, and update only the identifiers in the batch, p <- p * (1 - lr * wd) - lr * sign(g).
A training step under the option moves exactly the puzzle rows its batch used, by that rule, at the
schedule's rate for its own base rate; the main optimizer never sees the table."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_grids import GRID_SPEC

from hrmspec.runtime.artifacts.config import TrainConfig, TrainError
from hrmspec.runtime.training.loop import Trainer, train
from hrmspec.runtime.training.optim import SparseSignSGD, lr_at
from hrmspec.spec import load_spec_text


def hrm_sign_sgd(table: torch.Tensor, ids: torch.Tensor, row_grads: torch.Tensor, lr: float, wd: float) -> torch.Tensor:
    """The update as HRM describes it: per-sample gradient rows, summed per unique identifier, then decoupled
    weight decay and a signed step on those identifiers only."""
    out = table.clone()
    unique, inverse = ids.unique(return_inverse=True)
    summed = torch.zeros(len(unique), table.shape[1], dtype=table.dtype)
    summed.index_add_(0, inverse, row_grads)
    out[unique] = out[unique] * (1 - lr * wd) - lr * summed.sign()
    return out


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), d=st.integers(1, 6), batch=st.integers(1, 10), seed=st.integers(0, 2**31 - 1),
       lr=st.floats(1e-4, 1.0), wd=st.sampled_from([0.0, 0.1, 1.0]))
def test_sign_sgd_is_hrms_update(n, d, batch, seed, lr, wd):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.nn.Embedding(n, d)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(n, d, generator=gen))
    before = emb.weight.detach().clone()
    ids = torch.randint(0, n, (batch,), generator=gen)  # repeats: their gradients add up
    row_grads = torch.randn(batch, d, generator=gen, dtype=torch.float64).float()
    (emb(ids) * row_grads).sum().backward()  # d/d(row) = the sum of its samples' rows
    SparseSignSGD(emb.parameters(), lr=lr, weight_decay=wd).step()
    want = hrm_sign_sgd(before, ids, row_grads, lr, wd)
    torch.testing.assert_close(emb.weight.detach(), want, rtol=0, atol=1e-6)
    unused = torch.ones(n, dtype=torch.bool)
    unused[ids] = False
    assert torch.equal(emb.weight.detach()[unused], before[unused])  # not decayed, not moved


SPEC = GRID_SPEC.replace("puzzle: {identifiers: 1, positions: 2}", "puzzle: {identifiers: 4, positions: 2}")
OPTION = {"type": "sign_sgd", "lr": 0.05, "weight_decay": 0.5}


def test_a_training_step_moves_the_rows_its_batch_used_by_sign_sgd(tmp_path):
    spec = load_spec_text(SPEC, overrides={"train.puzzle_optimizer": OPTION, "train.ema": None})
    trainer = Trainer(spec, tmp_path / "run")
    try:
        table = trainer.model.puzzle.weight
        assert all(p is not table for g in trainer.optimizer.param_groups for p in g["params"])
        seen = []
        step = trainer.puzzle_optimizer.step

        def recorded():  # the table and its gradient as the optimizer gets them
            lr = trainer.puzzle_optimizer.param_groups[0]["lr"]
            seen.append((table.detach().clone(), table.grad.detach().clone(), lr))
            return step()

        trainer.puzzle_optimizer.step = recorded
        cfg = trainer.cfg
        for k in range(2):
            batch = next(trainer.batches)
            batch["puzzle_ids"] = torch.tensor([0, 2] * (len(batch["puzzle_ids"]) // 2))  # rows 1 and 3 unused
            trainer._schedule()
            assert trainer.train_step(batch).loss is not None
            before, grad, lr = seen[k]
            assert lr == pytest.approx(lr_at(k, cfg.steps, OPTION["lr"], int(cfg.warmup * cfg.steps), cfg.schedule,
                                             cfg.min_lr_ratio))
            after = table.detach()
            assert torch.equal(after[[1, 3]], before[[1, 3]])  # no batch used them
            used = [0, 2]
            assert bool(grad[used].ne(0).all(1).all()), "a used row without a gradient: the check would be empty"
            want = before[used] * (1 - lr * OPTION["weight_decay"]) - lr * grad[used].sign()
            torch.testing.assert_close(after[used], want, rtol=0, atol=1e-7)
        assert bool(table[[0, 2]].ne(0).any())
    finally:
        trainer.release()


@pytest.mark.parametrize(("value", "message"), [
    ({"type": "adam", "lr": 1e-2}, r"puzzle_optimizer\.type: expected sign_sgd"),
    ({"type": "sign_sgd", "lr": 0}, r"puzzle_optimizer\.lr: expected a number > 0, found 0"),
    ({"type": "sign_sgd", "lr": "fast"}, r"puzzle_optimizer\.lr: expected a number > 0"),
    ({"type": "sign_sgd", "lr": 1e-2, "weight_decay": -1}, r"puzzle_optimizer\.weight_decay: expected a number >= 0"),
    ({"type": "sign_sgd", "lr": 1e-2, "momentum": 0.9}, r"puzzle_optimizer\.momentum: unknown key"),
    (0.01, r"train\.puzzle_optimizer: expected \{type: sign_sgd"),
])
def test_a_bad_puzzle_optimizer_is_named(value, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig.from_dict({"puzzle_optimizer": value})


def test_yaml_numbers_as_strings_are_read():
    cfg = TrainConfig.from_dict({"puzzle_optimizer": {"type": "sign_sgd", "lr": "1e-2"}})
    assert cfg.puzzle_optimizer == {"type": "sign_sgd", "lr": 0.01, "weight_decay": 0.0}


def test_a_spec_without_a_puzzle_table_is_refused(tmp_path, tiny_text):
    spec = load_spec_text(tiny_text, overrides={"train.puzzle_optimizer": OPTION})
    with pytest.raises(TrainError, match=r"has no puzzle table \(model\.puzzle\)"):
        train(spec, tmp_path / "run", progress_bar=False)
