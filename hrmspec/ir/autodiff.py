"""Reverse-mode autodiff on the Kernel IR.

`grad(program, wrt)` returns a new RowProgram. Its inputs are the forward inputs followed by one
cotangent per forward output (`d_<out>`, of that output's kind); its outputs are `d_<input>` for
each name in `wrt`:

    row input     [R, D]  d_x[r, j] = sum_o  d_o . d o / d x[r, j]
    scalar input  [R]     d_s[r]    = sum_j  (row contributions), a last-dimension reduction
    vector input  [R, D]  the per-row partial  p[r, j]; the gradient is sum_r p[r, j], taken in a
                          second stage (`reduce_vector_grads`) because one program sees one row

The forward is recomputed inside the backward program, from the inputs and from the forward
outputs named in `saved` (those become inputs of the backward program, so the value stored by the
forward is read instead of recomputed); the builder's hash-consing shares every recomputed value,
and its algebraic rules keep the program small. Inputs the backward never reads are dropped from
it. `save_plan` chooses `saved`: for `h = x + r, y = norm(h)` reading the stored h instead of
recomputing it from x and r halves the row tensors a backward needs kept alive.

Broadcasts are undone where a value meets a wider one: a per-row scalar used in a row op receives
the sum over the row of the adjoint of that op. The adjoint of a row value may be held as a
scalar-kind value when it is uniform along the row (the adjoint of sum(x) is g broadcast), so the
sum is taken by the kind of the op, not of the adjoint (it folds to g * D).

Local derivatives (g is the adjoint of the result y):
    mul  (g b, g a)         div   (g / b, -g y / b)      exp  g y        log    g / a
    sqrt g / (2 y)          rsqrt -g y^3 / 2             tanh g (1 - y^2) sigmoid g y (1 - y)
    silu g s (1 + a (1-s))  relu  where(a <= 0, 0, g)     pow  g c a^(c-1) where (., where(c, g, 0), where(c, 0, g))
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
    # torch's rule: 0 where a <= 0, else g, so a NaN input passes g on (and a NaN g) as autograd does
    "relu": lambda b, n, a, y, g: ((a[0] <= 0.0).where(0.0, g),),
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


def grad(program: RowProgram, wrt: Sequence[str] | None = None, name: str | None = None,
         saved: Sequence[str] = ()) -> RowProgram:
    """The backward program of `program` for the inputs `wrt` (all inputs by default). The forward
    outputs named in `saved` are inputs of the backward program (what the forward stored), not
    recomputed; forward inputs the backward does not read are left out of it."""
    wrt = list(program.input_names if wrt is None else wrt)
    for w in wrt:
        program.input(w)  # raises with the list of inputs
    kept = {o.node: o for o in program.outputs if o.name in saved and program.nodes[o.node].kind != "const"}
    unknown = sorted(set(saved) - set(program.output_names))
    if unknown:
        raise IRError(f"{program.name}: cannot save '{unknown[0]}': outputs are {', '.join(program.output_names)}")
    b = ProgramBuilder(name or f"{program.name}_bwd")
    names = set(program.input_names) | set(program.output_names) | {f"d_{o.name}" for o in program.outputs}
    clash = [f"d_{w}" for w in wrt if f"d_{w}" in names]
    if clash:
        raise IRError(f"{program.name}: gradient name {clash[0]} clashes with an input or cotangent name")

    # forward, recomputed: the builder maps each forward node to a value of the backward program
    env = {i.name: b.input(i.name, i.kind, i.init) for i in program.inputs}
    vals: list[Value] = []
    for i, n in enumerate(program.nodes):
        if i in kept:  # read what the forward stored
            o = kept[i]
            vals.append(b.input(o.name, o.kind))
        else:
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
    return prune_inputs(b.build())


def prune_inputs(program: RowProgram) -> RowProgram:
    """The program without the inputs no node reads (one row input stays, to give the rows)."""
    read = {n.arg for n in program.nodes if n.op == "input"}
    keep = [i for i in program.inputs if i.name in read]
    if not any(i.kind == "row" for i in keep):
        first_row = next((i for i in program.inputs if i.kind == "row"), None)
        keep = [i for i in program.inputs if i in keep or i is first_row]
    if len(keep) == len(program.inputs):
        return program
    return RowProgram(program.name, tuple(keep), program.nodes, program.outputs)


def save_plan(program: RowProgram, wrt: Sequence[str] | None = None) -> tuple[str, ...]:
    """The forward outputs a backward should read instead of recomputing them: an output is saved
    when that lowers what the backward needs kept from the forward (row tensors count 1, per-row
    scalars 1/64, weights nothing: they are kept anyway), taking the outputs in order (greedy)."""
    cost_of = {"row": 1.0, "scalar": 1 / 64, "vector": 0.0}
    cotangents = {f"d_{o.name}" for o in program.outputs}

    def cost(saved: tuple[str, ...]) -> float:
        bwd = grad(program, wrt, saved=saved)
        return sum(cost_of[i.kind] for i in bwd.inputs if i.name not in cotangents)

    saved: tuple[str, ...] = ()
    best = cost(saved)
    for o in program.outputs:
        trial = (*saved, o.name)
        c = cost(trial)
        if c < best - 1e-9:
            saved, best = trial, c
    return saved


def kept_tensors(program: RowProgram, saved: Sequence[str], wrt: Sequence[str] | None = None
                 ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(forward inputs, forward outputs) the backward of `program` reads, given `saved`."""
    read = set(grad(program, wrt, saved=saved).input_names)
    return (tuple(n for n in program.input_names if n in read),
            tuple(n for n in program.output_names if n in read and n in saved))


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
