"""Row ops as generated kernels: the part of an op table that any RowProgram backend shares.

A backend that can run RowPrograms (Triton, OpenCL, CUDA C) gets rms_norm, sigmoid_gate, swiglu,
gelu and `row_program` (the expression norms a spec declares) from one `RowOpTable`, given its
differentiable op class and a check of which tensors its kernels can take. Whatever a kernel
cannot run falls back to the reference op with a warning (once per op and reason): a fallback is
reported, never silent, and never a wrong result.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from hrmspec.backends.reference import ops as reference
from hrmspec.ir import RowProgram, evaluate, library

WIDE_ROW = 8192  # the widest row the built-in kernels hold without register spills (sm_80 / sm_90)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def beyond_limits(tensors: list[torch.Tensor], width: int, max_width: int) -> str | None:
    """Why a one-block row kernel cannot take these tensors whatever the device, or None."""
    if width > max_width:
        return f"rows of width {width} exceed the {max_width} a one-block row kernel holds"
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            return f"{t.dtype} is computed in fp32 by the kernels; the reference keeps its precision"
    return None


@functools.cache
def rms_norm_program(eps: float, affine: bool) -> RowProgram:
    return library.rms_norm(eps, affine=affine, name="rms_norm")  # the fusion pass's op program (same kernel)


_SIGMOID_GATE, _SWIGLU, _GELU = library.sigmoid_gate(), library.swiglu(), library.gelu()


class RowOpTable:
    """rms_norm, sigmoid_gate, swiglu, gelu and row_program on `op_class` kernels.

    `unsupported(tensors, width)` says why the kernels cannot take these tensors, or None."""

    def __init__(self, backend: str, op_class, unsupported: Callable[[list[torch.Tensor], int], str | None]):
        self.backend, self.op_class, self.unsupported = backend, op_class, unsupported
        self._ops: dict[str, object] = {}
        self._warned: set[tuple[str, str]] = set()

    def fallback(self, op: str, reason: str) -> None:
        if (op, reason) not in self._warned:
            self._warned.add((op, reason))
            warnings.warn(f"{self.backend} backend: {op}: {reason}; running the reference op instead", stacklevel=4)

    def row_program(self, program: RowProgram, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run a forward RowProgram as a generated, differentiable kernel: rows [..., D], vectors [D]."""
        rows = [inputs[n] for n in program.kinds_of("row")]
        reason = self.unsupported(list(inputs.values()), rows[0].shape[-1] if rows else 0)
        if reason is not None:
            self.fallback(program.name, reason)
            return evaluate(program, inputs)
        if program.hash not in self._ops:
            self._ops[program.hash] = self.op_class(program)
        return self._ops[program.hash](**inputs)

    def rms_norm(self, x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) * weight."""
        inputs = {"x": x} if weight is None else {"x": x, "w": weight}
        reason = self.unsupported(list(inputs.values()), x.shape[-1])
        if reason is not None:
            self.fallback("rms_norm", reason)
            return reference.rms_norm(x, eps, weight)
        return self.row_program(rms_norm_program(float(eps), weight is not None), inputs)["y"]

    def elementwise(self, name: str, program: RowProgram, ref, **inputs: torch.Tensor) -> torch.Tensor:
        first = next(iter(inputs.values()))
        reason = self.unsupported(list(inputs.values()), first.shape[-1])
        if reason is not None:
            self.fallback(name, reason)
            return ref(*inputs.values())
        shape = first.shape
        if first.dim() > 2 and all(t.shape == shape for t in inputs.values()) and shape[-1] * shape[-2] <= WIDE_ROW:
            # elementwise: (B, S, h, hd) as B*S rows of h*hd, fewer and fuller program instances
            inputs = {k: t.flatten(-2) for k, t in inputs.items()}
        return self.row_program(program, inputs)["y"].view(shape)

    def sigmoid_gate(self, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.elementwise("sigmoid_gate", _SIGMOID_GATE, reference.sigmoid_gate, g=g, a=a)

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.elementwise("swiglu", _SWIGLU, reference.swiglu, a=gate, b=up)

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        return self.elementwise("gelu", _GELU, reference.gelu, x=x)
