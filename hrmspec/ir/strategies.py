"""Hypothesis strategies: random RowPrograms and inputs for property tests (needs `hypothesis`).

A random program is a DAG grown from 1-3 inputs (the first a row, the others rows, vectors or
per-row scalars): each step applies a random op to values already built. Ops whose domain is
not the whole line are applied on safe arguments, so any input values are valid:

    log, sqrt, rsqrt, fractional pow  of  a*a + 1        (>= 1)
    a / b                             as  a / (1 + sigmoid(b))   (denominator in (1, 2))
    exp                               of  tanh(a)         (bounded)

Reductions take a row or vector operand (a scalar is first broadcast against the row input).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from hrmspec.ir.opset import INPUT_KINDS
from hrmspec.ir.program import ProgramBuilder, RowProgram, Value

COMPARISONS = ("lt", "gt", "le", "ge")


def _cmp(op: str, a: Value, c: Value) -> Value:
    return {"lt": a.__lt__, "gt": a.__gt__, "le": a.__le__, "ge": a.__ge__}[op](c)


def _pos(a: Value) -> Value:
    return a * a + 1.0


def _rowish(a: Value, x: Value) -> Value:
    return a if a.kind in ("row", "vector") else a * x


# op -> (draw, a, c, d, x) -> value; x is the first (row) input
_BUILD = {
    "add": lambda draw, a, c, d, x: a + c,
    "sub": lambda draw, a, c, d, x: a - c,
    "mul": lambda draw, a, c, d, x: a * c,
    "div": lambda draw, a, c, d, x: a / (1.0 + c.sigmoid()),
    "neg": lambda draw, a, c, d, x: -a,
    "exp": lambda draw, a, c, d, x: a.tanh().exp(),
    "log": lambda draw, a, c, d, x: _pos(a).log(),
    "sqrt": lambda draw, a, c, d, x: _pos(a).sqrt(),
    "rsqrt": lambda draw, a, c, d, x: _pos(a).rsqrt(),
    "sigmoid": lambda draw, a, c, d, x: a.sigmoid(),
    "silu": lambda draw, a, c, d, x: a.silu(),
    "tanh": lambda draw, a, c, d, x: a.tanh(),
    "relu": lambda draw, a, c, d, x: a.relu(),
    "square": lambda draw, a, c, d, x: a.square(),
    "pow_int": lambda draw, a, c, d, x: a ** draw(st.sampled_from((2, 3))),
    "pow_frac": lambda draw, a, c, d, x: _pos(a) ** draw(st.sampled_from((0.5, -0.5, -1.5, 1.3))),
    "scale": lambda draw, a, c, d, x: a * draw(st.sampled_from((-2.0, 0.5, 3.0))) + draw(st.sampled_from((0.0, 1.0))),
    "where": lambda draw, a, c, d, x: _cmp(draw(st.sampled_from(COMPARISONS)), a, c).where(a, d),
    "step": lambda draw, a, c, d, x: _cmp(draw(st.sampled_from(COMPARISONS)), a, c).cast("f32") * d,
    "sum": lambda draw, a, c, d, x: _rowish(a, x).sum(),
    "mean": lambda draw, a, c, d, x: _rowish(a, x).mean(),
    "max": lambda draw, a, c, d, x: _rowish(a, x).max(),
    "round_bf16": lambda draw, a, c, d, x: a.cast("bf16"),
    "round_f16": lambda draw, a, c, d, x: a.cast("f16"),
}
SMOOTH_OPS = tuple(k for k in _BUILD if k not in ("round_bf16", "round_f16"))


@st.composite
def row_programs(draw, max_inputs: int = 3, max_ops: int = 6, ops: tuple[str, ...] = tuple(_BUILD)) -> RowProgram:
    """A random RowProgram with 1-2 outputs (`ops` restricts the ops drawn, e.g. to SMOOTH_OPS
    where a comparison against a fp64 reference would be upset by rounding)."""
    b = ProgramBuilder("rand")
    kinds = ["row"] + draw(st.lists(st.sampled_from(INPUT_KINDS), max_size=max_inputs - 1))
    pool = [b.input(f"i{k}", kind) for k, kind in enumerate(kinds)]
    x = pool[0]
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(ops))
        a, c, d = (draw(st.sampled_from(pool)) for _ in range(3))
        v = _BUILD[op](draw, a, c, d, x)
        if v.kind != "const" and v.node.dtype == "f32":
            pool.append(v)
    made = pool[len(kinds):] or pool[:1]
    b.output("y", made[-1])
    if len(made) > 1 and draw(st.booleans()):
        b.output("z", draw(st.sampled_from(made[:-1])))
    return b.build()


def random_inputs(program: RowProgram, rows: int, width: int, scale: float, seed: int,
                  dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Normal inputs of the program's kinds, times `scale`, from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in program.inputs:
        shape = {"row": (rows, width), "vector": (width,), "scalar": (rows,)}[i.kind]
        out[i.name] = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return out


def random_cotangents(program: RowProgram, rows: int, width: int, seed: int,
                      dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    return {f"d_{o.name}": torch.randn((rows, width) if o.kind == "row" else (rows,), generator=gen,
                                       dtype=torch.float64).to(dtype) for o in program.outputs}
