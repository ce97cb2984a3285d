"""The printer base: a RowProgram's expressions printed from a table, whatever the target language.

Every kernel printer (backends/triton/printer.py, backends/cstyle/printer.py) prints one statement
per node; what a node's expression looks like is a matter of tables, not of code:

    code_for_op   op -> a format of its operands {0} {1} {2} (and math names such as {exp})
    cast          target type -> a format of the operand
    reciprocal    1 / {0}, for negative integer powers
    power         {0} ** {1} for a constant that is neither a small integer nor +-1/2
    rounding      a constant as the kernel holds it (C: the nearest fp32, which may overflow)
    literal       a finite constant as the language reads it; nan, inf and -inf are names
    reserved      the words an input's name must not take: the language's keywords and builtins,
                  and the kernel's own names (its parameters, temporaries, helpers)

The kernel structure stays with each printer: Triton vectorises a row in one block, C loops over
columns and reduces in trees. `ExprPrinter(table, names)` prints with `names` for the math
functions and special values (a C dialect's `expf` or `exp`, `INFINITY`, ...).

A printer also tells `hrmspec compile --emit` what it writes (`KernelSource`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from hrmspec.ir.program import Node, RowProgram


@dataclass(frozen=True)
class ExprTable:
    """How a language spells the IR's expressions (see the module docstring)."""

    code_for_op: Mapping[str, str]
    cast: Mapping[str, str]
    reciprocal: str
    power: str
    rounding: Callable[[float], float]
    literal: Callable[[float], str]  # a finite value, rounded
    reserved: frozenset[str]
    own_names: str  # a regex of names the kernel makes itself: temporaries, parameters, helpers


# the operators Python and C spell alike (each node is its own statement, so no parentheses are needed)
INFIX = {
    "neg": "-{0}",
    "square": "{0} * {0}",
    "add": "{0} + {1}",
    "sub": "{0} - {1}",
    "mul": "{0} * {1}",
    "div": "{0} / {1}",
    "lt": "{0} < {1}",
    "gt": "{0} > {1}",
    "le": "{0} <= {1}",
    "ge": "{0} >= {1}",
    "eq": "{0} == {1}",
}


def _product(a: str, n: int) -> str:
    """a**n for a positive integer n by repeated squaring."""
    if n == 1:
        return a
    half = _product(a, n // 2)
    sq = f"({half} * {half})"
    return f"({sq} * {a})" if n % 2 else sq


class ExprPrinter:
    """Expressions of one target: `table` spells them, `names` fills the math names and the special
    values `nan`, `inf` and `-inf`."""

    def __init__(self, table: ExprTable, names: Mapping[str, str]):
        self.table, self.names = table, names

    def literal(self, v: float) -> str:
        v = self.table.rounding(v)
        if math.isnan(v):
            return self.names["nan"]
        if math.isinf(v):
            return self.names["inf" if v > 0 else "-inf"]
        return self.table.literal(v)

    def identifier(self, name: str) -> str:
        """A name for an input's value that clashes with no word of the language or of the kernel."""
        if name in self.table.reserved or re.fullmatch(self.table.own_names, name):
            return f"{name}_v"
        return name

    def op(self, op: str, *operands: str) -> str:
        return self.table.code_for_op[op].format(*operands, **self.names)

    def pow(self, a: str, c: float) -> str:
        """a ** c for a constant c: exact products for small integers, square roots for +-1/2."""
        if c == 0.5:
            return self.op("sqrt", a)
        if c == -0.5:
            return self.op("rsqrt", a)
        if c == int(c) and 0 < abs(c) <= 8:
            p = _product(a, int(abs(c)))
            return p if c > 0 else self.table.reciprocal.format(p)
        return self.table.power.format(a, self.literal(c), **self.names)

    def expression(self, node: Node, operands: list[str]) -> str:
        """The expression of an elementwise node (not a reduction, input or literal)."""
        if node.op == "pow":
            return self.pow(operands[0], node.arg)
        if node.op == "cast":
            return self.table.cast[node.arg].format(*operands)
        return self.op(node.op, *operands)


class KernelSource(Protocol):
    """What `hrmspec compile --emit` writes for a backend (hrmspec/emit.py)."""

    def source(self, program: RowProgram, name: str, width: int) -> str:
        """The source of kernel `name` computing `program` on rows of `width`."""

    def specialisation(self, width: int) -> dict[str, str | int]:
        """What the source depends on besides the program and the target (manifest fields): {} when
        nothing, {"storage": ..., "block": threads per row} for a C source."""


__all__ = ["INFIX", "ExprPrinter", "ExprTable", "KernelSource"]
