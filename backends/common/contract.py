"""The backend contract: the ops the runtime calls on a backend, and the base every op table builds on.

An op table is one object per backend (`get_backend(name)`, backends/__init__.py). The runtime
calls nothing else:

    name                  the backend's name in the registry
    fuses                 True: a module call runs the fusion plan's regions, each one `row_program`
                          (kernel backends); False: the layers run op by op (the reference)
    device_type           the device type its kernels take tensors on ("cpu", "cuda"); None: any
                          (torch ops). What a run's device is checked against before it starts
    row_program           every row op: norms, residual adds, gates, activations, the plan's fused
                          regions, the norms a spec writes as expressions; rows [..., D], vectors [D],
                          per-row scalars [...] in, the program's outputs out, differentiable
    rope_tables           cos, sin (B, 1, S, hd) of positions (B, S)
    rope_qk               q, k (B, S, h, hd) rotated by the tables
    attention             softmax(q k^T / sqrt(hd) + mask) v on (B, h, S, hd); the mask a description
                          (`hrmspec.mask.Mask`: kind, prefix, documents, window), never a tensor
    linear_cross_entropy  (loss sum, counted tokens) of the logits h W^T, without the logits existing
    cross_entropy         (loss sum, counted tokens) of logits
    linear                x W^T + b

`TableBase` gives every table `linear`, and for convenience (tests, interactive use; the runtime
does not call them) the common row ops by name — `rms_norm`, `sigmoid_gate`, `swiglu`, `gelu` —
as the library programs of `hrmspec.ir.library` run through `row_program`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from hrmspec.ir import RowProgram, library
from hrmspec.mask import Mask

IGNORE_INDEX = -100  # a label that counts no loss


@runtime_checkable
class OpTable(Protocol):
    """What a backend gives the runtime (see the module docstring)."""

    name: str
    fuses: bool
    device_type: str | None

    def row_program(self, program: RowProgram, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]: ...

    def rope_tables(self, position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype
                    ) -> tuple[Tensor, Tensor]: ...

    def rope_qk(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]: ...

    def attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Tensor: ...

    def linear_cross_entropy(self, h: Tensor, W: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
                             ) -> tuple[Tensor, Tensor]: ...

    def cross_entropy(self, logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
                      ) -> tuple[Tensor, Tensor]: ...

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor: ...


@functools.cache
def rms_norm_program(eps: float, affine: bool) -> RowProgram:
    return library.rms_norm(eps, affine=affine, name="rms_norm")  # the fusion pass's op program (same kernel)


SIGMOID_GATE, SWIGLU, GELU = library.sigmoid_gate(), library.swiglu(), library.gelu()


class TableBase:
    """`linear`, and the named row ops over `row_program` (see the module docstring)."""

    name: str
    fuses: bool
    device_type: str | None = None  # torch ops run wherever their tensors are

    def row_program(self, program: RowProgram, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.linear(x, weight, bias)

    def rms_norm(self, x: Tensor, eps: float, weight: Tensor | None = None) -> Tensor:
        """x / sqrt(mean(x^2) + eps) * weight."""
        inputs = {"x": x} if weight is None else {"x": x, "w": weight}
        return self.row_program(rms_norm_program(float(eps), weight is not None), inputs)["y"]

    def sigmoid_gate(self, g: Tensor, a: Tensor) -> Tensor:
        """sigmoid(g) * a."""
        return self.row_program(SIGMOID_GATE, {"g": g, "a": a})["y"]

    def swiglu(self, gate: Tensor, up: Tensor) -> Tensor:
        """silu(gate) * up."""
        return self.row_program(SWIGLU, {"a": gate, "b": up})["y"]

    def gelu(self, x: Tensor) -> Tensor:
        """gelu(x), the tanh approximation."""
        return self.row_program(GELU, {"x": x})["y"]

    def __repr__(self) -> str:
        return f"<{self.name} op table>"


class OnReference(TableBase):
    """A table that runs every op on `reference` (another table, given at construction: a backend imports
    no other backend) unless it overrides it: the kernel tables' base, and the inductor backend's."""

    def __init__(self, reference: OpTable):
        self.reference = reference

    def row_program(self, program: RowProgram, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.reference.row_program(program, inputs)

    def rope_qk(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        return self.reference.rope_qk(q, k, cos, sin)

    def rope_tables(self, position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype
                    ) -> tuple[Tensor, Tensor]:
        return self.reference.rope_tables(position_ids, head_dim, theta, dtype)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Tensor:
        return self.reference.attention(q, k, v, mask)

    def linear_cross_entropy(self, h: Tensor, W: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
                             ) -> tuple[Tensor, Tensor]:
        return self.reference.linear_cross_entropy(h, W, labels, ignore_index)

    def cross_entropy(self, logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
                      ) -> tuple[Tensor, Tensor]:
        return self.reference.cross_entropy(logits, labels, ignore_index)


__all__ = ["GELU", "IGNORE_INDEX", "SIGMOID_GATE", "SWIGLU", "OnReference", "OpTable", "TableBase",
           "rms_norm_program"]
