"""Free-function spelling of the IR ops, for programs that read like the math:

    from hrmspec.ir.functions import mean, rsqrt
    y = x * rsqrt(mean(x * x) + eps) * w

The names are those of the expression language (`parse_expr`), so `sum` and `max` here are the
row reductions, not Python's builtins. Numbers mixed with values become constants.
"""

from __future__ import annotations

from hrmspec.ir.program import IRError, Value


def _value(v, *others) -> Value:
    for x in (v, *others):
        if isinstance(x, Value):
            return x
    raise IRError("an op needs at least one program value among its operands (constants alone are folded)")


def exp(v: Value) -> Value: return v.exp()
def log(v: Value) -> Value: return v.log()
def sqrt(v: Value) -> Value: return v.sqrt()
def rsqrt(v: Value) -> Value: return v.rsqrt()
def sigmoid(v: Value) -> Value: return v.sigmoid()
def silu(v: Value) -> Value: return v.silu()
def tanh(v: Value) -> Value: return v.tanh()
def relu(v: Value) -> Value: return v.relu()
def square(v: Value) -> Value: return v.square()
def neg(v: Value) -> Value: return -v
def sum(v: Value) -> Value: return v.sum()  # noqa: A001 - the row reduction of the expression language
def mean(v: Value) -> Value: return v.mean()
def max(v: Value) -> Value: return v.max()  # noqa: A001
def cast(v: Value, dtype: str) -> Value: return v.cast(dtype)


def pow(v: Value, c: float) -> Value:  # noqa: A001
    """v ** c for a constant c."""
    return v**c


def where(cond: Value, a, b) -> Value:
    """a where cond is true, else b (cond is a comparison)."""
    return _value(cond).where(a, b)


def eq(a, b) -> Value:
    v = _value(a, b)
    return v.b.lift(a).eq(b)


def lt(a, b) -> Value: return _value(a, b).b.lift(a) < b
def gt(a, b) -> Value: return _value(a, b).b.lift(a) > b
def le(a, b) -> Value: return _value(a, b).b.lift(a) <= b
def ge(a, b) -> Value: return _value(a, b).b.lift(a) >= b


FUNCTIONS = {
    "exp": exp, "log": log, "sqrt": sqrt, "rsqrt": rsqrt, "sigmoid": sigmoid, "silu": silu, "tanh": tanh,
    "relu": relu, "square": square, "sum": sum, "mean": mean, "max": max, "pow": pow, "where": where,
}
