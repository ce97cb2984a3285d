"""Built-in RowPrograms: the norms, gates and activations of HRM-Text blocks."""

from __future__ import annotations

import math

from hrmspec.ir.ops import mean, rsqrt, sigmoid, silu, tanh
from hrmspec.ir.program import ProgramBuilder, RowProgram, Value


def _normed(x: Value, eps: float) -> Value:
    return x * rsqrt(mean(x * x) + eps)  # x / sqrt(mean(x^2) + eps)


def rms_norm(eps: float = 1e-6, affine: bool = True, offset: bool = False, name: str = "rms_norm") -> RowProgram:
    """y = x / sqrt(mean(x^2) + eps) [* w]; with offset the weight is (1 + w), initialised at zero."""
    b = ProgramBuilder(name)
    x = b.row("x")
    y = _normed(x, eps)
    if affine:
        w = b.vector("w", init="zeros" if offset else "ones")
        y = y * (1.0 + w if offset else w)
    b.output("y", y)
    return b.build()


def add_rms_norm(eps: float = 1e-6, affine: bool = True, name: str = "add_rms_norm") -> RowProgram:
    """The residual add fused with the norm that follows it: h = x + r, y = rms_norm(h)."""
    b = ProgramBuilder(name)
    x, r = b.row("x"), b.row("r")
    h = x + r
    y = _normed(h, eps)
    if affine:
        y = y * b.vector("w", init="ones")
    b.output("h", h)
    b.output("y", y)
    return b.build()


def sigmoid_gate(name: str = "sigmoid_gate") -> RowProgram:
    """y = sigmoid(g) * a (the output gate of gated attention)."""
    b = ProgramBuilder(name)
    g, a = b.row("g"), b.row("a")
    b.output("y", sigmoid(g) * a)
    return b.build()


def swiglu(name: str = "swiglu") -> RowProgram:
    """y = silu(a) * b (a the gate projection, b the up projection)."""
    bld = ProgramBuilder(name)
    a, b = bld.row("a"), bld.row("b")
    bld.output("y", silu(a) * b)
    return bld.build()


def gelu(name: str = "gelu") -> RowProgram:
    """y = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the tanh approximation."""
    b = ProgramBuilder(name)
    x = b.row("x")
    b.output("y", 0.5 * x * (1.0 + tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))))
    return b.build()


def builtin_programs() -> dict[str, RowProgram]:
    """One instance of every built-in program, by name (what the kernel tests sweep over)."""
    progs = [
        rms_norm(),
        rms_norm(affine=False, name="rms_norm_plain"),
        rms_norm(offset=True, name="rms_norm_offset"),
        add_rms_norm(),
        sigmoid_gate(),
        swiglu(),
        gelu(),
    ]
    return {p.name: p for p in progs}
