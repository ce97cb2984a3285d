"""The Kernel IR: RowPrograms (fused elementwise ops and row reductions), their reference
evaluator, autodiff and the expression parser. See docs/kernels.md."""

from hrmspec.ir.autodiff import grad, kept_tensors, save_plan, simplify
from hrmspec.ir.evaluate import evaluate, reduce_vector_grads
from hrmspec.ir.library import add_rms_norm, builtin_programs, gelu, rms_norm, sigmoid_gate, swiglu
from hrmspec.ir.ops import cast, eq, exp, log, mean, relu, rsqrt, sigmoid, silu, sqrt, square, tanh, where
from hrmspec.ir.parse import parse_expr, parse_norm_expr
from hrmspec.ir.program import Input, IRError, Node, Output, ProgramBuilder, RowProgram, Value

__all__ = [
    "IRError", "Input", "Node", "Output", "ProgramBuilder", "RowProgram", "Value",
    "add_rms_norm", "builtin_programs", "cast", "eq", "evaluate", "exp", "gelu", "grad", "kept_tensors", "log",
    "mean", "parse_expr", "parse_norm_expr", "reduce_vector_grads", "relu", "rms_norm", "rsqrt", "save_plan",
    "sigmoid", "sigmoid_gate", "silu", "simplify", "sqrt", "square", "swiglu", "tanh", "where",
]
