"""Token losses on logits, per token, for the objectives that supervise whole grids and segments.

    softmax     -log softmax(x)_y, in fp32
    stablemax   -log s(x)_y / sum_j s(x)_j with s(x) = x + 1 for x >= 0 and 1 / (1 - x) below, in
                fp64 (HRM's and TRM's loss: it grows linearly, not exponentially, so large logits
                do not saturate the probabilities)

`token_losses` gives (B, S) losses, 0 where the label is ignored; `row_mean` averages each row over
its counted tokens (HRM's normalisation: every sample weighs the same whatever its length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def stablemax(x: torch.Tensor) -> torch.Tensor:
    """s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0: positive, continuous, linear for large x.

    The branch not taken is computed too, and its gradient multiplied by 0: at x = 1 an unclamped
    1 / (1 - x) would be infinite there, and 0 x inf a NaN gradient."""
    return torch.where(x < 0, 1.0 / (1.0 - x.clamp(max=0.0)), x + 1.0)


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    s = stablemax(x)
    return torch.log(s / s.sum(dim, keepdim=True))


def token_losses(logits: torch.Tensor, labels: torch.Tensor, kind: str = "softmax",
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, S) loss of each token (0 where labels == ignore_index) for logits (B, S, V)."""
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0).long()
    if kind == "stablemax":
        logp = log_stablemax(logits.double())
        picked = logp.gather(-1, target[..., None]).squeeze(-1)
        return torch.where(valid, -picked, torch.zeros_like(picked))
    if kind == "softmax":
        loss = F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), reduction="none").view(labels.shape)
        return torch.where(valid, loss, torch.zeros_like(loss))
    raise ValueError(f"unknown loss {kind!r}; expected softmax or stablemax")


def row_mean(losses: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B,) each row's mean over its counted tokens (0 for a row with none)."""
    counts = (labels != ignore_index).sum(-1)
    return losses.sum(-1) / counts.clamp(min=1).to(losses.dtype)


__all__ = ["IGNORE_INDEX", "log_stablemax", "row_mean", "stablemax", "token_losses"]
