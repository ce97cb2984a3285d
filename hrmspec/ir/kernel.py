"""What a generated kernel of a RowProgram is, whatever the backend that prints it.

    name       hrm_<program name>_<fwd|bwd>_<hash8>; a backward kernel is named after its forward
               program, so the same program always yields the same file names
    wrt        the inputs a backward kernel differentiates: every input but the rotary tables
    backward   grad(program, wrt, saved=save_plan(program, wrt)): the gradient program, reading the
               forward outputs the save plan keeps (for h = x + r, y = norm(h): h and w, not x and r)

The fusion plan (which kernels a spec needs), `hrmspec check`, `--emit`, the golden snapshots and
every backend's launcher name and derive kernels through these three functions only.
"""

from __future__ import annotations

import re

from hrmspec.ir.autodiff import grad, save_plan
from hrmspec.ir.program import RowProgram

ROPE_TABLES = ("cos", "sin")  # rope inputs that are tables, not activations: no gradient


def kernel_name(program: RowProgram, direction: str, base: str | None = None) -> str:
    """hrm_<name>_<fwd|bwd>_<hash8>; `base` names a backward kernel after its forward program."""
    kind = re.sub(r"\W", "_", base or program.name)
    return f"hrm_{kind}_{direction}_{program.hash[:8]}"


def trainable(program: RowProgram) -> tuple[str, ...]:
    """The inputs a backward kernel differentiates: all but the rotary tables."""
    return tuple(n for n in program.input_names if n not in ROPE_TABLES)


def backward_program(program: RowProgram) -> RowProgram:
    """The backward kernel's program: every trainable input, reading the forward outputs `save_plan` picks."""
    wrt = list(trainable(program))
    return grad(program, wrt, saved=save_plan(program, wrt))


__all__ = ["ROPE_TABLES", "backward_program", "kernel_name", "trainable"]
