"""What every module call of one forward pass shares: the attention masks and the rotary tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hrmspec.mask import Mask


@dataclass
class Context:
    """Per-batch inputs shared by every module call: the masks and the rotary tables."""

    mask: dict[str, Mask]  # mask kind -> the batch's mask (a description: attention never builds S x S)
    rope: dict[float, tuple[torch.Tensor, torch.Tensor]]  # rope_theta -> cos, sin (B, 1, S, hd)


__all__ = ["Context"]
