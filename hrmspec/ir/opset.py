"""The op set of the Kernel IR: names, kinds, and host-side constant folding."""

from __future__ import annotations

import math
import struct

from hrmspec.errors import HrmspecError

KINDS = ("const", "scalar", "vector", "row")
INPUT_KINDS = ("row", "vector", "scalar")
OUTPUT_KINDS = ("row", "scalar")
CAST_TYPES = ("f32", "bool", "f16", "bf16")  # f16/bf16: round to that precision, keep computing in fp32

UNARY = ("neg", "exp", "log", "sqrt", "rsqrt", "sigmoid", "silu", "tanh", "relu", "square")
BINARY = ("add", "sub", "mul", "div")
COMPARE = ("lt", "gt", "le", "ge", "eq")
REDUCE = ("sum", "mean", "max")
LEAF = ("input", "const", "width")
OTHER = ("pow", "where", "cast")
OPS = LEAF + UNARY + BINARY + COMPARE + REDUCE + OTHER
COMMUTATIVE = ("add", "mul", "eq")


class IRError(HrmspecError):
    """A program that is not well formed: wrong kinds or dtypes, unknown names, bad outputs."""


def join(a: str, b: str) -> str:
    """The kind of a broadcast between values of kinds a and b."""
    if a == b or b == "const":
        return a
    if a == "const":
        return b
    return "row"  # scalar with vector, or anything with row


# -- constant folding (float64, on the host) ------------------------------------------------------
def _sigmoid(a: float) -> float:
    return 1.0 / (1.0 + math.exp(-a)) if a >= 0 else math.exp(a) / (1.0 + math.exp(a))


def _safe(fn):
    def wrapped(*a):
        try:
            return float(fn(*a))
        except (ValueError, ZeroDivisionError, OverflowError):
            return math.nan
    return wrapped


FOLD = {
    "neg": lambda a: -a, "exp": _safe(math.exp), "log": _safe(math.log), "sqrt": _safe(math.sqrt),
    "rsqrt": _safe(lambda a: 1.0 / math.sqrt(a)), "sigmoid": _sigmoid, "silu": lambda a: a * _sigmoid(a),
    "tanh": math.tanh, "relu": lambda a: max(a, 0.0), "square": lambda a: a * a,
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b, "div": _safe(lambda a, b: a / b),
    "lt": lambda a, b: a < b, "gt": lambda a, b: a > b, "le": lambda a, b: a <= b, "ge": lambda a, b: a >= b,
    "eq": lambda a, b: a == b, "where": lambda c, a, b: a if c else b, "pow": _safe(lambda a, c: a**c),
}


def round_to(v: float, dtype: str) -> float:
    """v rounded (to nearest even) to half or bfloat16 precision, as the cast op does."""
    if not math.isfinite(v):
        return v
    if dtype == "f16":
        try:
            return struct.unpack("<e", struct.pack("<e", v))[0]
        except OverflowError:
            return math.copysign(math.inf, v)
    try:
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # bfloat16 keeps the top 16 bits of an fp32
    return struct.unpack("<f", struct.pack("<I", bits))[0]
