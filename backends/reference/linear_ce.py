"""The reference's steps of the chunked linear + cross-entropy (backends/common/chunked_linear_ce.py),
in torch: per row of a chunk's logits z,

    forward   lse = log sum_v exp z_v,  loss = lse - z_label (0 for an ignored row)
    backward  z <- g (exp(z - lse) - onehot(label)), in place (0 for an ignored row)

Half types are computed in fp32, fp32 and fp64 as they are.
"""

from __future__ import annotations

import torch


def _upcast(z: torch.Tensor) -> torch.Tensor:
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


class TorchSteps:
    """The row steps in torch (see the module docstring)."""

    def forward(self, z, labels, lse, loss, ignore_index):
        zf = _upcast(z)
        lse.copy_(torch.logsumexp(zf, dim=-1))
        counted = labels != ignore_index
        target = zf.gather(1, torch.where(counted, labels, 0)[:, None])[:, 0]
        loss.copy_(torch.where(counted, lse - target, 0.0))

    def backward(self, z, labels, lse, g, ignore_index):
        counted = labels != ignore_index
        dz = (_upcast(z) - lse[:, None]).exp_()  # a new tensor: z stays as it was until the copy
        dz.scatter_add_(1, torch.where(counted, labels, 0)[:, None], -torch.ones_like(lse)[:, None])
        z.copy_(dz.mul_(torch.where(counted, g, 0.0)[:, None]))


TORCH_STEPS = TorchSteps()

__all__ = ["TORCH_STEPS", "TorchSteps"]
