"""What every module call of one forward pass shares: the attention masks and the rotary tables."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Context:
    """Per-batch tensors shared by every module call: the mask and the rotary tables."""

    mask: dict[str, torch.Tensor | None]  # mask kind -> (B, 1, S, T) bool, None = no masking
    rope: dict[float, tuple[torch.Tensor, torch.Tensor]]  # rope_theta -> cos, sin (B, 1, S, hd)
    _additive: dict = field(default_factory=dict)

    def attn_mask(self, kind: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask as an additive 0 / -inf tensor of `dtype`, made once per batch: a boolean
        mask would be converted (and kept for backward) anew in every layer of every call."""
        m = self.mask[kind]
        if m is None:
            return None
        key = (kind, dtype)
        if key not in self._additive:
            self._additive[key] = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))
        return self._additive[key]


__all__ = ["Context"]
