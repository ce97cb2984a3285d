"""One training step, the same for every objective and every caller (the trainer, the benchmarks).

    forward     the objective's loss of the batch (autocast as the placement says)
    average     the loss summed over what it counts, divided by the global count: under torchrun the
                counts and loss sums are all-reduced, and the loss is scaled by the number of ranks,
                because DDP averages gradients over them; N processes follow one process's loss curve
    skip        a loss that is not finite: no update (`StepResult.loss` is None)
    update      backward, clip the gradient norm, every optimizer's step, zero the gradients, the EMA

`TrainState` is what a step needs; `train_step(state, batch)` returns a `StepResult` with the loss, the
gradient norm, the tokens computed, the objective's metrics and how long each phase took.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class TrainState:
    model: torch.nn.Module  # what the gradients are zeroed on and the EMA follows
    objective: Callable  # batch -> StepLoss (runtime/training/objective.py)
    optimizers: tuple  # the main optimizer first, then any other (the puzzle table's sign-SGD)
    clipped: list  # the parameters whose gradient norm is clipped (what the main optimizer steps)
    grad_clip: float | None = None
    ema: object | None = None
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass
class StepResult:
    loss: float | None  # the mean over the global count; None when it was not finite (nothing updated)
    grad_norm: torch.Tensor | None
    tokens: int  # computed on every rank together
    metrics: dict[str, float]  # the objective's, this rank's
    phases: tuple[float, float, float] = (0.0, 0.0, 0.0)  # forward, backward, update (seconds)


def train_step(state: TrainState, batch: dict[str, torch.Tensor]) -> StepResult:
    """Forward, average, and unless the loss is not finite backward, clip, step, EMA (see the module docstring)."""
    t0 = time.perf_counter()
    with state.autocast():
        out = state.objective(batch)
    n_global = out.count.detach().clone()
    total = torch.tensor([float(out.loss_sum.detach())], device=state.device)
    if state.world > 1:
        dist.all_reduce(n_global)
        dist.all_reduce(total)
    loss = out.loss_sum * state.world / n_global.clamp(min=1)  # DDP averages gradients: sum / the global count
    value = float(total) / max(float(n_global), 1.0)
    t1 = time.perf_counter()
    if not math.isfinite(value):
        state.model.zero_grad(set_to_none=True)
        return StepResult(None, None, out.tokens * state.world, out.metrics, (t1 - t0, 0.0, 0.0))
    loss.backward()
    t2 = time.perf_counter()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.clipped, state.grad_clip if state.grad_clip else 1e30)
    for opt in state.optimizers:
        opt.step()
    state.model.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update(state.model)
    return StepResult(value, grad_norm, out.tokens * state.world, out.metrics, (t1 - t0, t2 - t1,
                                                                             time.perf_counter() - t2))


def param_groups(model: torch.nn.Module, weight_decay: float, embed_prefix: str = "embed",
                 skip: tuple[str, ...] = ()) -> list[dict]:
    """Weight decay on matrices; none on vectors (norms, biases, states) and the embedding; `skip`: parameters
    another optimizer steps. The parameters as they are after sharding (DTensors under FSDP)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if n in skip or not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or n.startswith(embed_prefix) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


__all__ = ["StepResult", "TrainState", "param_groups", "train_step"]
