"""The inductor backend: the reference ops, with every run of ops between two attention ops compiled
by torch.compile (TorchInductor: C++/OpenMP on a CPU, Triton on a GPU).

A module call is cut at its attention ops (`hrmspec.runtime.execution.stack.segments`); each
piece - norms, projections, rotary embedding, residual adds, the MLP - is a function of explicit
tensors (its inputs, its weights, the rotary tables), which Inductor compiles once per shape,
dtype and grad mode, and which every call of the module then reuses: HRM-Text's 8 calls per
forward run 2 compiled programs per segment (with and without gradient). Attention stays the
reference's flash-style kernel (backends/reference/attention.py), as do the loss and the head.

What Inductor gains on a CPU is fusion: a norm, a gate or a residual add becomes one loop over
the row instead of one pass per torch op, and backward is generated beside it. It computes the
same math in a different order, so its results equal the reference's to float rounding, not bit
for bit (tests/test_inductor_backend.py). docs/kernels.md measures it.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from hrmspec.backends.common.contract import OnReference, OpTable
from hrmspec.caches import private_inductor_cache

# Each segment gets its own code object, so its compiled variants (shapes, dtypes, grad modes)
# live in their own cache; this many per segment before it is run uncompiled (with a warning).
VARIANTS_PER_SEGMENT = 16


class InductorTable(OnReference):
    """The reference's ops (given at construction: a backend imports no other backend), and
    `compile_segment`, which compiles the runs of ops between attention ops."""

    name = "inductor"
    fuses = False  # a module call runs op by op; Inductor does the fusing

    def __init__(self, reference: OpTable):
        super().__init__(reference)
        private_inductor_cache()  # generated code kept under the user's home, not in /tmp
        if torch._dynamo.config.recompile_limit < VARIANTS_PER_SEGMENT:
            torch._dynamo.config.recompile_limit = VARIANTS_PER_SEGMENT

    def compile_segment(self, run: Callable, label: str) -> Callable:
        """`run` (a bound `Segment.run`) compiled, with a code object of its own: torch.compile keeps
        its compiled variants per code object, and a segment's should not crowd out another's."""
        fn = run.__func__
        own = types.FunctionType(fn.__code__.replace(co_name=f"segment {label}"), fn.__globals__, fn.__name__,
                                 fn.__defaults__, fn.__closure__)
        return torch.compile(types.MethodType(own, run.__self__), fullgraph=True, dynamic=None)


__all__ = ["InductorTable"]
