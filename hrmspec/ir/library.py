"""Built-in RowPrograms: the norms, residual adds, gates, activations and rotary embedding of a block.

Each is tagged with `RowProgram.known_as` (its function name and static arguments), so a backend
may run a faster form of the same math; `tests/test_reference_rows.py` holds every tagged form
equal to the IR's own evaluation.
"""

from __future__ import annotations

import math

from hrmspec.ir.functions import mean, rsqrt, sigmoid, silu, tanh
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
    prog = b.build()
    return prog if offset else prog.known_as("rms_norm", eps=eps)


def layer_norm(eps: float = 1e-5, affine: bool = True, name: str = "layer_norm") -> RowProgram:
    """y = (x - mean(x)) / sqrt(var(x) + eps) [* w + b], var the biased variance (torch's LayerNorm)."""
    bld = ProgramBuilder(name)
    x = bld.row("x")
    c = x - mean(x)
    y = c * rsqrt(mean(c * c) + eps)
    if affine:
        y = y * bld.vector("w", init="ones") + bld.vector("b", init="zeros")
    bld.output("y", y)
    return bld.build().known_as("layer_norm", eps=eps)


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


def add(arity: int = 2) -> RowProgram:
    """h = x + r (a residual add), or the sum x0 + x1 + ... of `arity` states injected into a module call."""
    b = ProgramBuilder("add" if arity == 2 else f"add{arity}")
    terms = [b.row("x"), b.row("r")] if arity == 2 else [b.row(f"x{i}") for i in range(arity)]
    h = terms[0]
    for t in terms[1:]:
        h = h + t
    b.output("h", h)
    return b.build().known_as("add")


def sigmoid_gate(name: str = "sigmoid_gate") -> RowProgram:
    """y = sigmoid(g) * a (the output gate of gated attention)."""
    b = ProgramBuilder(name)
    g, a = b.row("g"), b.row("a")
    b.output("y", sigmoid(g) * a)
    return b.build().known_as("sigmoid_gate")


def swiglu(name: str = "swiglu") -> RowProgram:
    """y = silu(a) * b (a the gate projection, b the up projection)."""
    bld = ProgramBuilder(name)
    a, b = bld.row("a"), bld.row("b")
    bld.output("y", silu(a) * b)
    return bld.build().known_as("swiglu")


def _gelu(x: Value) -> Value:
    """x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the tanh approximation."""
    return 0.5 * x * (1.0 + tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gelu(name: str = "gelu") -> RowProgram:
    """y = gelu(x), the tanh approximation."""
    b = ProgramBuilder(name)
    b.output("y", _gelu(b.row("x")))
    return b.build().known_as("gelu")


def geglu(name: str = "geglu") -> RowProgram:
    """y = gelu(a) * b (a the gate projection, b the up projection; gelu in its tanh form)."""
    bld = ProgramBuilder(name)
    a, b = bld.row("a"), bld.row("b")
    bld.output("y", _gelu(a) * b)
    return bld.build().known_as("geglu")


def rope(name: str = "rope") -> RowProgram:
    """Rotary embedding of q and k on half rows (one row = one token of one head, width hd/2):
    rope(x) = x cos + rotate_half(x) sin with rotate_half(x) = (-x_hi, x_lo) and both halves of the
    tables equal, so  lo' = lo c - hi s,  hi' = hi c + lo s."""
    b = ProgramBuilder(name)
    c, s = b.row("cos"), b.row("sin")
    for t in ("q", "k"):
        lo, hi = b.row(f"{t}_lo"), b.row(f"{t}_hi")
        b.output(f"{t}r_lo", lo * c - hi * s)
        b.output(f"{t}r_hi", hi * c + lo * s)
    return b.build()


def builtin_programs() -> dict[str, RowProgram]:
    """One instance of every built-in program, by name (what the kernel tests sweep over)."""
    progs = [
        rms_norm(),
        rms_norm(affine=False, name="rms_norm_plain"),
        rms_norm(offset=True, name="rms_norm_offset"),
        layer_norm(),
        layer_norm(affine=False, name="layer_norm_plain"),
        add_rms_norm(),
        sigmoid_gate(),
        swiglu(),
        geglu(),
        gelu(),
    ]
    return {p.name: p for p in progs}
