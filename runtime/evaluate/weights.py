"""Which weights an evaluation runs with."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def ema_weights(model: torch.nn.Module, ema):
    """Temporarily evaluate with the EMA weights (`ema`: the trainer's EMA, or None: the model's own)."""
    if ema is None:
        yield model
        return
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.copy_to(model)
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])


__all__ = ["ema_weights"]
