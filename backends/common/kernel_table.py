"""The op table of a kernel backend: row ops as generated kernels, everything else the reference.

A kernel backend (Triton, OpenCL, CUDA C) subclasses `KernelTable` with its name, its
differentiable op class (`RowOp` on its launcher's kernels) and the device type its launcher
takes (or its own `unsupported`: which tensors its kernels can take). It then runs

    row_program   as a generated kernel, forward and backward (the op class), one op per program
    rope_qk       as the rope program's kernel on whole q and k (RopeFunction)

and whatever its kernels cannot take, or it has no kernels for, on the reference table.

The reference table is handed to the kernel table when the registry builds it, rather than
imported: a backend package imports only backends/common and hrmspec's core, so the definitions
live in one place (backends/reference) and a kernel table names nothing but the contract it
falls back to. A fallback is reported per call (backends/common/fallback.py).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from hrmspec.backends.common.contract import OnReference, OpTable
from hrmspec.backends.common.fallback import report_fallback
from hrmspec.backends.common.limits import WIDE_ROW, beyond_limits
from hrmspec.backends.common.rowops import RopeFunction, RowOp
from hrmspec.ir import RowProgram, library
from hrmspec.ir.opset import REDUCE

ROPE = library.rope()


def flattens(program: RowProgram, inputs: Mapping[str, Tensor]) -> bool:
    """Whether rows (B, S, h, hd) may run as B*S rows of h*hd: fewer and fuller program instances.
    True for a purely elementwise program (rows in, rows out, no reduction, no width) on inputs of
    one shape with at least three dims and a flattened row no wider than WIDE_ROW."""
    p = program
    if p.kinds_of("vector") or p.kinds_of("scalar") or any(o.kind != "row" for o in p.outputs):
        return False
    if p.uses_width or any(n.op in REDUCE for n in p.nodes):
        return False
    shapes = {tuple(t.shape) for t in inputs.values()}
    if len(shapes) != 1:
        return False
    shape = shapes.pop()
    return len(shape) > 2 and shape[-1] * shape[-2] <= WIDE_ROW


class KernelTable(OnReference):
    """Row ops on `op_class` kernels, the rest on `reference` (see the module docstring)."""

    fuses = True
    op_class: type[RowOp]
    device_type = "cpu"  # where the tensors the launcher takes live
    launcher = ""  # what launches the kernels, as a fallback's reason names it

    def __init__(self, reference: OpTable):
        super().__init__(reference)  # what it has no kernels for runs there
        self._ops: dict[str, RowOp] = {}  # program hash -> op, built once

    def unsupported(self, tensors: list[Tensor], width: int) -> str | None:
        """Why this backend's kernels cannot take these tensors, or None: beyond the kernel limits,
        or on another device than the launcher's."""
        reason = beyond_limits(tensors, width)
        elsewhere = next((t for t in tensors if t.device.type != self.device_type), None)
        if reason is None and elsewhere is not None:
            reason = f"a tensor on {elsewhere.device}; {self.launcher} takes {self.device_type.upper()} tensors"
        return reason

    def fallback(self, op: str, reason: str) -> None:
        report_fallback(self.name, op, reason, stacklevel=5)

    def op(self, program: RowProgram) -> RowOp:
        """The differentiable op of `program` on this backend's kernels."""
        if program.hash not in self._ops:
            self._ops[program.hash] = self.op_class(program)
        return self._ops[program.hash]

    def row_program(self, program: RowProgram, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run a forward RowProgram as a generated, differentiable kernel: rows [..., D], vectors [D]."""
        rows = [inputs[n] for n in program.kinds_of("row")]
        reason = self.unsupported(list(inputs.values()), rows[0].shape[-1] if rows else 0)
        if reason is not None:
            self.fallback(program.name, reason)
            return self.reference.row_program(program, inputs)
        if flattens(program, inputs):
            shape = rows[0].shape
            outs = self.op(program)(**{n: t.flatten(-2) for n, t in inputs.items()})
            return {n: t.view(shape) for n, t in outs.items()}
        return self.op(program)(**inputs)

    def rope_qk(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Rotary embedding of q and k (B, S, h, hd) by tables (B, 1, S, hd): the fusion plan's rope
        region, one kernel over rows of half a head (RopeFunction)."""
        reason = self.unsupported([q, k, cos, sin], q.shape[-1] // 2)
        if reason is None and (q.shape != k.shape or q.shape[-1] % 2):
            reason = f"q {tuple(q.shape)} and k {tuple(k.shape)} are not one shape with an even head dim"
        if reason is not None:
            self.fallback("rope", reason)
            return self.reference.rope_qk(q, k, cos, sin)
        return RopeFunction.apply(self.op(ROPE), q, k, cos, sin)


__all__ = ["ROPE", "KernelTable", "flattens"]
