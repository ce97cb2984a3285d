"""The statement grammar of schedules, over Python's `ast` with a whitelist (never `eval`).

    statement := STATE '=' MODULE '(' expr ')' | STATE '=' MODULE '(' 'cat' '(' NAME (',' NAME)+ ')' ')'
    expr      := term ('+' term)*
    term      := NAME | '(' expr ')'      # a state, or x (the scaled input embedding)

A statement such as ``z_L = L(z_L + z_H)`` says: call module L on the sum of the states z_L and
z_H, and store the result in z_L. ``s = R(cat(s, e))`` injects by concatenation instead (Huginn's
adapter): the module maps [s; e] (2d) back to d with a learned linear map before its layers.
Anything outside the grammar is rejected with the column of the offending piece.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from hrmspec.errors import Location, SpecError

INPUT = "x"  # the name of the scaled input embedding inside statements

_EXAMPLE = '"z_L = L(z_L + z_H)"'
_OPERATORS = {
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.MatMult: "@",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
}


@dataclass(frozen=True)
class Statement:
    """`target = module(inputs[0] + inputs[1] + ...)` with the position it was written at."""

    target: str
    module: str
    inputs: tuple[str, ...]
    # equality is by meaning: the same call written with other spacing, or elsewhere, is equal
    text: str = field(compare=False)
    loc: Location = field(compare=False)
    path: str = field(default="", compare=False)  # the field path, e.g. model.schedule[0].do[1]
    # where the target, the module and each input are written (same order as target, module, *inputs)
    name_locs: tuple[Location, ...] = field(default=(), compare=False, repr=False)
    combine: str = "add"  # add: the inputs are summed; cat: concatenated, then the module's adapter

    def __str__(self) -> str:
        if self.combine == "cat":
            return f"{self.target} = {self.module}(cat({', '.join(self.inputs)}))"
        return f"{self.target} = {self.module}({' + '.join(self.inputs)})"


class _Text:
    """Maps `ast` positions (UTF-8 byte offsets into the stripped text) to file locations."""

    def __init__(self, text: str, loc: Location):
        self.source = text.strip()
        self.lead = len(text) - len(text.lstrip())
        self.loc = loc

    def at(self, node: ast.AST | None = None, offset: int | None = None) -> Location:
        """The location of a node (or of a 0-based character offset into the stripped text)."""
        if not self.loc.line:
            return self.loc
        if offset is None:
            if node is None or getattr(node, "lineno", 1) != 1:
                return self.loc
            offset = len(self.source.encode("utf-8")[: node.col_offset].decode("utf-8", "replace"))
        return Location(self.loc.file, self.loc.line, self.loc.col + self.lead + offset)

    def operator_at(self, node: ast.BinOp) -> Location:
        """The column of a binary operator: the first non-space, non-')' after the left operand."""
        line = self.source.splitlines()[0] if self.source else ""
        end = getattr(node.left, "end_col_offset", None)
        if end is None or getattr(node.left, "end_lineno", 1) != 1:
            return self.at(node)
        i = len(line.encode("utf-8")[:end].decode("utf-8", "replace"))
        while i < len(line) and line[i] in " )":
            i += 1
        return self.at(offset=i)


def _terms(node: ast.expr, src: _Text, path: str) -> list[ast.Name]:
    """The names of a sum, left to right (a + b + c parses as (a + b) + c: walk the left spine)."""
    rights: list[ast.expr] = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        rights.append(node.right)
        node = node.left
    if rights:
        out = _terms(node, src, path)
        for right in reversed(rights):
            out += _terms(right, src, path)
        return out
    if isinstance(node, ast.Name):
        return [node]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "cat":
        raise SpecError(
            "expected cat(...) as the whole input of a call, found it inside a sum",
            src.at(node),
            path,
            "write L(cat(z_L, z_H, x)), or sum: L(z_L + z_H + x)",
        )
    if isinstance(node, ast.BinOp):
        op = _OPERATORS.get(type(node.op), type(node.op).__name__)
        raise SpecError(
            f"expected '+' between states, found '{op}'",
            src.operator_at(node),
            path,
            "states are combined by addition only: H(z_H + z_L)",
        )
    raise SpecError(
        f"expected a state name or a sum of states, found '{ast.unparse(node)}'",
        src.at(node),
        path,
        "write e.g. L(z_L + z_H + x)",
    )


def parse_statement(text: str, loc: Location, path: str = "") -> Statement:
    """Parse one schedule statement; errors carry the file position of the offending column."""
    if not isinstance(text, str):
        shown = "a mapping" if isinstance(text, dict) else "a list" if isinstance(text, list) else repr(text)
        raise SpecError(f"expected a statement string like {_EXAMPLE}, found {shown}", loc, path)
    src = _Text(text, loc)
    try:
        tree = ast.parse(src.source, mode="exec")
    except (RecursionError, MemoryError, ValueError):
        raise SpecError(
            "cannot parse the statement: it is nested too deeply or too long", loc, path
        ) from None
    except SyntaxError as e:
        where = src.at(offset=max((e.offset or 1) - 1, 0)) if (e.lineno or 1) == 1 else loc
        raise SpecError(
            f"cannot parse the statement '{text.strip()}': {e.msg}", where, path, f"expected e.g. {_EXAMPLE}"
        ) from None
    if not tree.body:
        raise SpecError(f"expected a statement like {_EXAMPLE}, found an empty string", loc, path)
    if len(tree.body) > 1:
        raise SpecError(
            f"expected one statement, found {len(tree.body)}",
            src.at(tree.body[1]),
            path,
            "write one statement per list item",
        )
    stmt = tree.body[0]
    if not isinstance(stmt, ast.Assign):
        found = ast.unparse(stmt)
        raise SpecError(
            f"expected an assignment 'state = Module(inputs)', found '{found}'",
            src.at(stmt),
            path,
            'e.g. "z_H = H(z_H + z_L)"',
        )
    if len(stmt.targets) != 1 or not isinstance(stmt.targets[0], ast.Name):
        where = stmt.targets[1] if len(stmt.targets) > 1 else stmt.targets[0]
        raise SpecError(
            f"expected one state name on the left of '=', found '{ast.unparse(where)}'",
            src.at(where),
            path,
            'e.g. "z_H = H(z_H + z_L)"',
        )
    target = stmt.targets[0]
    if target.id == INPUT:
        raise SpecError(
            f"cannot assign to '{INPUT}': it is the input embedding, not a state",
            src.at(target),
            path,
            "assign to a state declared under model.states",
        )
    call = stmt.value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
        raise SpecError(
            f"expected a module call on the right of '=', found '{ast.unparse(call)}'",
            src.at(call),
            path,
            'e.g. "z_L = L(z_L + z_H)"',
        )
    if call.keywords:
        kw = call.keywords[0]
        shown = f"{kw.arg}=" if kw.arg else "**"
        raise SpecError(
            f"expected one input expression, found the keyword argument '{shown}'",
            src.at(kw),
            path,
            "sum the inputs: L(z_L + z_H)",
        )
    if len(call.args) != 1:
        where = call.args[1] if len(call.args) > 1 else call
        raise SpecError(
            f"expected one input expression in {call.func.id}(...), found {len(call.args)} arguments",
            src.at(where),
            path,
            "sum the inputs: L(z_L + z_H)",
        )
    arg, combine = call.args[0], "add"
    if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and arg.func.id == "cat":
        names, combine = _cat_names(arg, src, path), "cat"
    else:
        names = _terms(arg, src, path)
    seen: set[str] = set()
    for n in names:
        if n.id in seen:
            raise SpecError(
                f"expected each name once in a sum, found '{n.id}' twice",
                src.at(n),
                path,
                "remove the repeat",
            )
        seen.add(n.id)
    return Statement(
        target=target.id,
        module=call.func.id,
        inputs=tuple(n.id for n in names),
        text=text,
        loc=loc,
        path=path,
        name_locs=tuple(src.at(n) for n in [target, call.func, *names]),
        combine=combine,
    )


def _cat_names(node: ast.Call, src: _Text, path: str) -> list[ast.Name]:
    """The states of `cat(a, b, ...)`: names only, at least two."""
    if node.keywords:
        raise SpecError("expected state names in cat(...), found a keyword argument", src.at(node.keywords[0]), path,
                        "e.g. cat(s, e)")
    for a in node.args:
        if not isinstance(a, ast.Name):
            raise SpecError(f"expected a state name in cat(...), found '{ast.unparse(a)}'", src.at(a), path,
                            "concatenate states, e.g. R(cat(s, e))")
    if len(node.args) < 2:
        raise SpecError(f"expected at least two states in cat(...), found {len(node.args)}", src.at(node), path,
                        "e.g. R(cat(s, e)); a single input needs no injection: R(s)")
    return list(node.args)


def name_columns(stmt: Statement) -> dict[str, Location]:
    """Location of each name in a statement (the first place it is written)."""
    names = (stmt.target, stmt.module, *stmt.inputs)
    locs = stmt.name_locs or (stmt.loc,) * len(names)
    out: dict[str, Location] = {}
    for name, loc in zip(names, locs):
        out.setdefault(name, loc)
    return out
