"""The Kernel IR: RowPrograms (fused elementwise ops and row reductions), their reference
evaluator, autodiff, the expression parser and what a generated kernel of a program is. See
docs/kernels.md.

Building, differentiating and naming programs needs no torch; the evaluator (`evaluate`,
`reduce_vector_grads`) runs them with torch and is imported on first use.
"""

from hrmspec.ir.autodiff import grad, kept_tensors, save_plan, simplify
from hrmspec.ir.functions import cast, eq, exp, log, mean, relu, rsqrt, sigmoid, silu, sqrt, square, tanh, where
from hrmspec.ir.kernel import ROPE_TABLES, backward_program, kernel_name, trainable
from hrmspec.ir.library import add_rms_norm, builtin_programs, gelu, rms_norm, sigmoid_gate, swiglu
from hrmspec.ir.parse import parse_expr, parse_norm_expr
from hrmspec.ir.program import Input, IRError, Node, Output, ProgramBuilder, RowProgram, Value

_TORCH = ("evaluate", "reduce_vector_grads")


def __getattr__(name: str):
    if name in _TORCH:  # the torch evaluator: torch is imported only by those who run programs
        from hrmspec.ir import interpret as module

        return getattr(module, name)
    raise AttributeError(f"module 'hrmspec.ir' has no attribute '{name}'")


__all__ = [
    "IRError", "Input", "Node", "Output", "ProgramBuilder", "ROPE_TABLES", "RowProgram", "Value",
    "add_rms_norm", "backward_program", "builtin_programs", "cast", "eq", "evaluate", "exp", "gelu", "grad",
    "kept_tensors", "kernel_name", "log", "mean", "parse_expr", "parse_norm_expr", "reduce_vector_grads", "relu",
    "rms_norm", "rsqrt", "save_plan", "sigmoid", "sigmoid_gate", "silu", "simplify", "sqrt", "square", "swiglu",
    "tanh", "trainable", "where",
]
