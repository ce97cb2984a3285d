"""The reference backend's op table: the torch definitions of backends/reference/naive.py.

Row programs run through the IR's evaluator (`hrmspec.ir.evaluate`), the definition of every
RowProgram, except a built-in one (`RowProgram.builtin`, set by `hrmspec.ir.library`) with a
faster torch form of the same math:

    rms_norm      F.rms_norm, in fp32 for half types          inputs x [, w]; eps
    layer_norm    F.layer_norm, in fp32 for half types        inputs x [, w, b]; eps
    add           x + r, or x0 + x1 + ...                      a residual add, an injection
    sigmoid_gate  sigmoid(g) * a
    swiglu        silu(a) * b
    geglu         gelu(a) * b, tanh form
    gelu          F.gelu, tanh form

tests/test_reference_rows.py holds each fast form equal to the evaluator, values and gradients.
The reference runs a module call op by op (`fuses = False`); a kernel backend falls back to this
table for what its kernels cannot take (backends/common/kernel_table.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from hrmspec.backends.common.contract import IGNORE_INDEX, TableBase
from hrmspec.backends.reference import naive
from hrmspec.ir import RowProgram, evaluate
from hrmspec.mask import Mask

# a built-in function's name -> its torch form: (inputs in program order, static args) -> the output
FAST_FORMS: dict[str, Callable[..., Tensor]] = {
    "rms_norm": lambda x, w=None, *, eps: naive.rms_norm(x, eps, w),
    "layer_norm": lambda x, w=None, b=None, *, eps: torch.nn.functional.layer_norm(
        naive.upcast(x), (x.shape[-1],), w if w is None else naive.upcast(w), b if b is None else naive.upcast(b),
        eps).to(x.dtype),
    "add": naive.add,
    "sigmoid_gate": naive.sigmoid_gate,
    "swiglu": naive.swiglu,
    "geglu": lambda a, b: naive.gelu(a) * b,
    "gelu": naive.gelu,
}


class ReferenceTable(TableBase):
    """Torch ops, the definition of every op (see the module docstring)."""

    name = "reference"
    fuses = False

    def row_program(self, program: RowProgram, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        fast = FAST_FORMS.get(program.builtin[0]) if program.builtin else None
        if fast is None:
            return evaluate(program, dict(inputs))
        (output,) = program.output_names  # every built-in with a fast form has one output
        return {output: fast(*(inputs[n] for n in program.input_names), **dict(program.builtin[1]))}

    def rope_tables(self, position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype
                    ) -> tuple[Tensor, Tensor]:
        return naive.rope_tables(position_ids, head_dim, theta, dtype)

    def rope_qk(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        return naive.rope_qk(q, k, cos, sin)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Tensor:
        return naive.attention(q, k, v, mask)

    def linear_cross_entropy(self, h: Tensor, W: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
                             ) -> tuple[Tensor, Tensor]:
        return naive.linear_cross_entropy(h, W, labels, ignore_index)

    def cross_entropy(self, logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
                      ) -> tuple[Tensor, Tensor]:
        return naive.cross_entropy(logits, labels, ignore_index)


__all__ = ["FAST_FORMS", "ReferenceTable"]
