"""Optimizers and learning-rate schedules for training HRMs.

AdamATan2 is Adam with the division m / (sqrt(v) + eps) replaced by a * atan2(m, b * sqrt(v)):
bounded (|update| <= a * pi / 2), scale-invariant in the gradient, and with no eps to tune. Weight
decay is decoupled (AdamW style): p <- p * (1 - lr * wd) before the update.
"""

from __future__ import annotations

import math

import torch


def _closure_loss(closure) -> torch.Tensor | None:
    """torch's optimizer protocol: the loss a `closure` recomputes (with gradients) before the step, if given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class AdamATan2(torch.optim.Optimizer):
    """p <- p * (1 - lr * wd) - lr * a * atan2(m_hat, b * sqrt(v_hat)), with bias-corrected moments."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.0,
                 a: float = 1.27, b: float = 1.0):
        if lr < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"invalid AdamATan2 hyper-parameters lr={lr}, betas={betas}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, a=a, b=b))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), wd, a, b = group["lr"], group["betas"], group["weight_decay"], group["a"], group["b"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(torch.atan2(m_hat, b * v_hat.sqrt()), alpha=-lr * a)
        return loss


class SparseSignSGD(torch.optim.Optimizer):
    """HRM's optimizer for the puzzle table: the rows a step's batch used move by -lr * sign(grad), after
    decoupled weight decay p <- p * (1 - lr * wd); every other row stays as it is. With thousands of
    identifiers and a few per batch the gradient is very sparse, and then Adam is about sign-SGD on the
    rows used, with momentum that would keep moving rows no batch has seen for a while.

    The rows used are those with a gradient that is not all zero: under DDP the gradient is already summed
    over the ranks, so these are the rows of the global batch, as HRM's all-gather of the identifiers gives.
    A DTensor (FSDP2) is updated shard by shard. No state: nothing to checkpoint but the learning rate,
    which the schedule sets every step."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        if not lr > 0 or weight_decay < 0:
            raise ValueError(f"invalid sparse sign-SGD hyper-parameters lr={lr}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                w, g = (p.to_local(), p.grad.to_local()) if hasattr(p, "to_local") else (p, p.grad)
                rows = g.reshape(g.shape[0], -1).ne(0).any(1).nonzero().squeeze(1)
                if rows.numel():
                    used = w.index_select(0, rows).mul_(1 - lr * wd).add_(g.index_select(0, rows).sign(), alpha=-lr)
                    w.index_copy_(0, rows, used)
        return loss


def make_optimizer(name: str, params, lr: float, betas, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam_atan2":
        return AdamATan2(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_at(step: int, total: int, base: float, warmup: int, schedule: str, min_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then constant or cosine decay to min_ratio * base."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


class EMA:
    """An exponential moving average of parameters (evaluation and export use it).

    The decay warms up as min(decay, (1 + t) / (10 + t)) after t updates, so early in training the
    average follows the weights instead of lingering at their initial values."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.steps = 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        self.steps += 1
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach(), 1 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in state.items():
            self.shadow[n].copy_(t)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n])
