"""Row expressions from text, over Python's `ast` with a whitelist (never `eval`).

    expr := NUMBER | NAME | expr (+ - * /) expr | expr ** CONST | -expr
          | expr (< > <= >= ==) expr | FUNC(expr, ...)
    FUNC := exp log sqrt rsqrt sigmoid silu tanh relu square sum mean max pow(e, CONST) where(c, a, b)

Names are the declared inputs and named constants. This is how a spec declares a new norm:

    parse_norm_expr("x * rsqrt(mean(x*x) + eps) * (1 + w)", params={"w": "zeros"}, eps=1e-6)

Errors are `SpecError`s naming the column of the offending piece (a file position when the
caller passes the `Location` where the expression text starts).
"""

from __future__ import annotations

import ast
import math

from hrmspec.errors import Location, SpecError, close_match
from hrmspec.ir.functions import FUNCTIONS
from hrmspec.ir.program import IRError, ProgramBuilder, RowProgram, Value

_BINARY = {ast.Add: "__add__", ast.Sub: "__sub__", ast.Mult: "__mul__", ast.Div: "__truediv__"}
_COMPARE = {ast.Lt: "lt", ast.Gt: "gt", ast.LtE: "le", ast.GtE: "ge", ast.Eq: "eq"}
_ARITY = {"pow": 2, "where": 3}  # every other function takes one argument


class _Parser:
    def __init__(self, text: str, b: ProgramBuilder, names: dict[str, Value | float], loc: Location | None, path: str):
        self.source = text.strip()
        self.lead = len(text) - len(text.lstrip())
        self.b, self.names, self.loc, self.path = b, names, loc, path

    def fail(self, message: str, node: ast.AST | None = None, hint: str = "", offset: int | None = None):
        if offset is None:
            offset = 0
            if node is not None and getattr(node, "lineno", 1) == 1:
                offset = len(self.source.encode("utf-8")[: node.col_offset].decode("utf-8", "replace"))
        if self.loc is not None and self.loc.line:
            raise SpecError(message, Location(self.loc.file, self.loc.line, self.loc.col + self.lead + offset),
                            self.path, hint)
        raise SpecError(f"column {self.lead + offset + 1}: {message}", self.loc, self.path, hint)

    def parse(self) -> Value | float:
        try:
            tree = ast.parse(self.source, mode="eval")
        except (RecursionError, MemoryError, ValueError):
            self.fail("the expression is nested too deeply or too long")
        except SyntaxError as e:
            off = max((e.offset or 1) - 1, 0) if (e.lineno or 1) == 1 else 0
            self.fail(f"cannot parse '{self.source}': {e.msg}", offset=off)
        return self.visit(tree.body)

    def constant(self, node: ast.expr) -> float:
        v = self.visit(node)
        if isinstance(v, Value):
            v = v.const_value()
        if v is None:
            self.fail(f"expected a constant here, found '{ast.unparse(node)}'", node,
                      "exponents are numbers, e.g. x ** 2")
        return float(v)

    def visit(self, node: ast.expr) -> Value | float:
        try:
            v = self._visit(node)
        except IRError as e:
            self.fail(str(e).split(": ", 1)[-1], node)
        except (OverflowError, ZeroDivisionError):  # folding constants: 10**10**10, 1/0
            v = None
        c = v.const_value() if isinstance(v, Value) else v
        if v is None or isinstance(c, complex) or (c is not None and not math.isfinite(c)):
            self.fail(f"'{self._text(node)}' is not a finite number", node,
                      "constants here must stay within float range, e.g. 1e-6 or 10**4")
        return v

    def _text(self, node: ast.expr, limit: int = 60) -> str:
        text = ast.unparse(node)
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def _visit(self, node: ast.expr) -> Value | float:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
                return float(node.value)
            self.fail(f"expected a number, found {node.value!r}", node)
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            if node.id in FUNCTIONS:
                self.fail(f"'{node.id}' is a function; call it: {node.id}(...)", node)
            self.fail(f"unknown name '{node.id}'", node,
                      close_match(node.id, self.names) or f"names here: {', '.join(sorted(self.names))}")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self.visit(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                base, c = self.visit(node.left), self.constant(node.right)
                return base**c
            if type(node.op) not in _BINARY:
                self.fail(f"the operator {type(node.op).__name__} is not allowed; use + - * / **", node)
            a, b = self.visit(node.left), self.visit(node.right)
            if not isinstance(a, Value) and not isinstance(b, Value):
                a = self.b.const(a)
            return getattr(self.b.lift(a), _BINARY[type(node.op)])(b)
        if isinstance(node, ast.Compare):
            if len(node.ops) != 1 or type(node.ops[0]) not in _COMPARE:
                self.fail("expected one comparison (< > <= >= ==)", node, "write where(a < b, ...) with one comparison")
            a, b = self.b.lift(self.visit(node.left)), self.visit(node.comparators[0])
            return {"lt": a.__lt__, "gt": a.__gt__, "le": a.__le__, "ge": a.__ge__, "eq": a.eq}[
                _COMPARE[type(node.ops[0])]](b)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.IfExp):
            self.fail("conditional expressions are not allowed", node, "use where(cond, a, b)")
        self.fail(f"'{ast.unparse(node)}' is not allowed in a row expression", node,
                  "use numbers, names, + - * / **, comparisons and " + ", ".join(FUNCTIONS))

    def call(self, node: ast.Call) -> Value:
        if not isinstance(node.func, ast.Name):
            self.fail(f"expected a function name, found '{ast.unparse(node.func)}'", node.func)
        fn = node.func.id
        if fn not in FUNCTIONS:
            self.fail(f"unknown function '{fn}'", node.func,
                      close_match(fn, FUNCTIONS) or f"functions: {', '.join(FUNCTIONS)}")
        if node.keywords:
            self.fail(f"{fn}() takes positional arguments only", node.keywords[0])
        arity = _ARITY.get(fn, 1)
        if len(node.args) != arity:
            self.fail(f"{fn}() takes {arity} argument{'s' if arity > 1 else ''}, found {len(node.args)}", node)
        if fn == "pow":
            return self.b.lift(self.visit(node.args[0])) ** self.constant(node.args[1])
        args = [self.visit(a) for a in node.args]
        args[0] = self.b.lift(args[0])
        return FUNCTIONS[fn](*args)


def parse_expr(text: str, inputs: dict[str, str], consts: dict[str, float] | None = None, name: str = "expr",
               output: str = "y", inits: dict[str, str] | None = None, loc: Location | None = None,
               path: str = "") -> RowProgram:
    """A one-output RowProgram from an expression over `inputs` (name -> row | vector | scalar)."""
    if not isinstance(text, str):
        raise SpecError(f"expected an expression string, found {type(text).__name__}", loc, path)
    b = ProgramBuilder(name)
    names: dict[str, Value | float] = {}
    for n, kind in inputs.items():
        names[n] = b.input(n, kind, (inits or {}).get(n))
    for n, v in (consts or {}).items():
        names[n] = float(v)
    p = _Parser(text, b, names, loc, path)
    v = p.parse()
    if not isinstance(v, Value) or v.kind == "const":
        p.fail(f"'{text.strip()}' does not depend on any input", hint=f"use {', '.join(inputs)}")
    if v.node.dtype == "bool":
        p.fail(f"'{text.strip()}' is a comparison; a row expression must give numbers",
               hint="wrap it: where(cond, a, b)")
    b.output(output, v)
    return b.build()


def parse_norm_expr(text: str, params: dict[str, str] | None = None, eps: float = 1e-6, name: str = "norm",
                    loc: Location | None = None, path: str = "") -> RowProgram:
    """A norm written as an expression of the row `x`, weights `params` (name -> init, e.g. 'ones'
    or 'zeros') and the constant `eps`; the output is `y`."""
    params = params or {}
    inputs = {"x": "row", **{p: "vector" for p in params}}
    return parse_expr(text, inputs, {"eps": eps}, name=name, inits=params, loc=loc, path=path)
