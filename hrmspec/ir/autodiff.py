"""Reverse-mode autodiff on the Kernel IR.

`grad(program, wrt)` returns a new RowProgram. Its inputs are the forward inputs followed by one
cotangent per forward output (`d_<out>`, of that output's kind); its outputs are `d_<input>` for
each name in `wrt`:

    row input     [R, D]  d_x[r, j] = sum_o  d_o . d o / d x[r, j]
    scalar input  [R]     d_s[r]    = sum_j  (row contributions), a last-dimension reduction
    vector input  [R, D]  the per-row partial  p[r, j]; the gradient is sum_r p[r, j], taken in a
                          second stage (`reduce_vector_grads`) because one program sees one row

The forward is recomputed inside the backward program from the inputs (nothing but the inputs is
saved); the builder's hash-consing shares every recomputed value, and its algebraic rules keep
the program small. Broadcasts are undone where a value meets a wider one: a per-row scalar used
in a row op receives the sum over the row of the adjoint of that op. The adjoint of a row value
may be held as a scalar-kind value when it is uniform along the row (the adjoint of sum(x) is
g broadcast), so the sum is taken by the kind of the op, not of the adjoint (it folds to g * D).

Local derivatives (g is the adjoint of the result y):
    mul  (g b, g a)         div   (g / b, -g y / b)      exp  g y        log    g / a
    sqrt g / (2 y)          rsqrt -g y^3 / 2             tanh g (1 - y^2) sigmoid g y (1 - y)
    silu g s (1 + a (1-s))  relu  where(a > 0, g, 0)     pow  g c a^(c-1) where (., where(c, g, 0), where(c, 0, g))
    sum  g                  mean  g / D                  max  g m / sum(m), m = [a == y] (ties share, as amax)
Comparisons and casts to bool have no gradient; rounding casts (f16, bf16) pass it straight through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hrmspec.ir.opset import COMPARE, IRError
from hrmspec.ir.program import Node, ProgramBuilder, RowProgram, Value


def _zero_as_none(v: Value | None) -> Value | None:
    return None if v is None or v.const_value() == 0.0 else v


# op -> (builder, node, operands, result, adjoint) -> adjoint contribution per operand
VJP: dict[str, Callable[[ProgramBuilder, Node, list[Value], Value, Value], tuple[Value | None, ...]]] = {
    "add": lambda b, n, a, y, g: (g, g),
    "sub": lambda b, n, a, y, g: (g, -g),
    "mul": lambda b, n, a, y, g: (2.0 * (g * a[0]), None) if n.srcs[0] == n.srcs[1] else (g * a[1], g * a[0]),
    "div": lambda b, n, a, y, g: (g / a[1], -(g * y) / a[1]),
    "neg": lambda b, n, a, y, g: (-g,),
    "exp": lambda b, n, a, y, g: (g * y,),
    "log": lambda b, n, a, y, g: (g / a[0],),
    "sqrt": lambda b, n, a, y, g: (g / (2.0 * y),),
    "rsqrt": lambda b, n, a, y, g: (-0.5 * (g * (y * y * y)),),
    "sigmoid": lambda b, n, a, y, g: (g * (y * (1.0 - y)),),
    "silu": lambda b, n, a, y, g: (g * _dsilu(a[0]),),
    "tanh": lambda b, n, a, y, g: (g * (1.0 - y * y),),
    "relu": lambda b, n, a, y, g: ((a[0] > 0.0).where(g, 0.0),),
    "square": lambda b, n, a, y, g: (2.0 * (g * a[0]),),
    "pow": lambda b, n, a, y, g: (n.arg * (g * a[0] ** (n.arg - 1.0)),),
    "where": lambda b, n, a, y, g: (None, a[0].where(g, 0.0), a[0].where(0.0, g)),
    "cast": lambda b, n, a, y, g: (g if n.arg in ("f32", "f16", "bf16") and a[0].node.dtype == "f32" else None,),
    "sum": lambda b, n, a, y, g: (g,),
    "mean": lambda b, n, a, y, g: (g / b.width(),),
    "max": lambda b, n, a, y, g: (_dmax(b, a[0], y, g),),
}
for _op in COMPARE:
    VJP[_op] = lambda b, n, a, y, g: (None, None)


def _dsilu(a: Value) -> Value:
    s = a.sigmoid()
    return s * (1.0 + a * (1.0 - s))


def _dmax(b: ProgramBuilder, a: Value, y: Value, g: Value) -> Value:
    m = a.eq(y).cast("f32")
    return g * m / b.reduce("sum", m)


def grad(program: RowProgram, wrt: Sequence[str] | None = None, name: str | None = None) -> RowProgram:
    """The backward program of `program` for the inputs `wrt` (all inputs by default)."""
    wrt = list(program.input_names if wrt is None else wrt)
    for w in wrt:
        program.input(w)  # raises with the list of inputs
    b = ProgramBuilder(name or f"{program.name}_bwd")
    names = set(program.input_names) | {f"d_{o.name}" for o in program.outputs}
    clash = [f"d_{w}" for w in wrt if f"d_{w}" in names]
    if clash:
        raise IRError(f"{program.name}: gradient name {clash[0]} clashes with an input or cotangent name")

    # forward, recomputed: the builder maps each forward node to a value of the backward program
    env = {i.name: b.input(i.name, i.kind, i.init) for i in program.inputs}
    vals: list[Value] = []
    for n in program.nodes:
        vals.append(replay(b, n, [vals[s] for s in n.srcs], env))

    adj: dict[int, Value] = {}
    for o in program.outputs:
        d = b.row(f"d_{o.name}") if o.kind == "row" else b.scalar(f"d_{o.name}")
        adj[o.node] = adj[o.node] + d if o.node in adj else d

    for i in reversed(range(len(program.nodes))):
        n, g = program.nodes[i], adj.get(i)
        if g is None or n.op in ("input", "const", "width"):
            continue
        contribs = VJP[n.op](b, n, [vals[s] for s in n.srcs], vals[i], g)
        for s, c in zip(n.srcs, contribs):
            c = _zero_as_none(c)
            src = program.nodes[s]
            if c is None or src.kind == "const":
                continue
            if src.kind == "scalar" and n.kind != "scalar":
                # a per-row scalar broadcast over the row gets the row sum of the adjoint; an adjoint
                # that is itself uniform along the row (scalar kind) folds to c * D
                c = b.reduce("sum", c)
            adj[s] = adj[s] + c if s in adj else c

    inputs = {n.arg: i for i, n in enumerate(program.nodes) if n.op == "input"}
    for w in wrt:
        kind = program.input(w).kind
        g = adj.get(inputs[w]) if w in inputs else None
        g = b.const(0.0) if g is None else g
        b.output(f"d_{w}", g, kind="scalar" if kind == "scalar" else "row", row_partial=kind == "vector")
    return b.build()


def replay(b: ProgramBuilder, n: Node, srcs: list[Value], env: dict[str, Value]) -> Value:
    """Re-emit node `n` of another program into builder `b` (operands already re-emitted)."""
    if n.op == "input":
        return env[n.arg]
    if n.op == "const":
        return b.const(n.arg)
    if n.op == "width":
        return b.width()
    if n.op in ("sum", "mean", "max"):
        return b.reduce(n.op, srcs[0])
    return b.emit(n.op, *srcs, arg=n.arg)


def simplify(program: RowProgram) -> RowProgram:
    """Rebuild a program through the builder: constants folded, identities applied, common
    subexpressions shared, dead nodes dropped."""
    b = ProgramBuilder(program.name)
    env = {i.name: b.input(i.name, i.kind, i.init) for i in program.inputs}
    vals: list[Value] = []
    for n in program.nodes:
        vals.append(replay(b, n, [vals[s] for s in n.srcs], env))
    for o in program.outputs:
        b.output(o.name, vals[o.node], kind=o.kind, row_partial=o.row_partial)
    return b.build()
