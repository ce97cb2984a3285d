"""The reference evaluator: a RowProgram computed with torch ops, the ground truth for every backend.

Values live in broadcastable shapes: rows [R, D], vectors [1, D], per-row scalars [R, 1] and
constants []. Half types are upcast to fp32 on entry; fp64 inputs are computed in fp64 (that is
what the gradient tests use). Outputs are cast back to the storage dtype, the dtype of the first
row input, except row partials of vector gradients, which stay in the compute dtype until they
are summed over rows (`reduce_vector_grads`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hrmspec.ir.program import IRError, RowProgram

_CAST = {"f16": torch.float16, "bf16": torch.bfloat16}


class _Round(torch.autograd.Function):
    """A rounding cast: torch's rounding to the half type as the value, the gradient straight through.
    (a + (round(a) - a).detach() would make +-inf NaN, inf - inf, and a negative result -0 into +0.)"""

    @staticmethod
    def forward(ctx, a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return a.to(dtype).to(a.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


# op -> torch; the evaluator is this table and a loop
TORCH_OPS = {
    "neg": torch.neg, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "sigmoid": torch.sigmoid, "silu": F.silu, "tanh": torch.tanh, "relu": torch.relu, "square": torch.square,
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "lt": torch.lt, "gt": torch.gt, "le": torch.le, "ge": torch.ge, "eq": torch.eq,
    "where": torch.where,
    "sum": lambda a: a.sum(-1, keepdim=True),
    "mean": lambda a: a.mean(-1, keepdim=True),
    "max": lambda a: a.amax(-1, keepdim=True),  # amax spreads the gradient evenly over ties, as autodiff does
}


def compute_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def row_shapes(program: RowProgram, inputs: dict[str, torch.Tensor]) -> tuple[tuple[int, ...], int]:
    """The leading (row) shape and the width D, checked across all inputs."""
    missing = [n for n in program.input_names if n not in inputs]
    if missing:
        raise IRError(f"{program.name}: missing input(s) {', '.join(missing)}; "
                      f"expected {', '.join(program.input_names)}")
    lead = width = None
    for i in program.inputs:
        t = inputs[i.name]
        if i.kind == "row":
            if t.dim() < 1:
                raise IRError(f"{program.name}: row input '{i.name}' must have a last dimension, "
                              f"got shape {tuple(t.shape)}")
            shape, d = tuple(t.shape[:-1]), t.shape[-1]
        elif i.kind == "vector":
            if t.dim() != 1:
                raise IRError(f"{program.name}: vector input '{i.name}' must be 1-d [D], got shape {tuple(t.shape)}")
            shape, d = None, t.shape[0]
        else:
            shape, d = tuple(t.shape), None
        if shape is not None:
            if lead is not None and shape != lead:
                raise IRError(f"{program.name}: input '{i.name}' has rows {shape}, others have {lead}")
            lead = shape
        if d is not None:
            if width is not None and d != width:
                raise IRError(f"{program.name}: input '{i.name}' has width {d}, others have {width}")
            width = d
    if lead is None or width is None:
        raise IRError(f"{program.name}: cannot tell the number of rows and the width from the inputs")
    return lead, width


def evaluate(program: RowProgram, inputs: dict[str, torch.Tensor], out_dtype: torch.dtype | None = None
             ) -> dict[str, torch.Tensor]:
    """Run `program` on named tensors: rows [..., D], vectors [D], per-row scalars [...]."""
    lead, width = row_shapes(program, inputs)
    ct = compute_dtype(inputs.values())
    rows = [program.input(n) for n in program.kinds_of("row")]
    store = out_dtype or (inputs[rows[0].name].dtype if rows else inputs[program.inputs[0].name].dtype)
    n_rows = 1
    for s in lead:
        n_rows *= s
    env: dict[str, torch.Tensor] = {}
    for i in program.inputs:
        t = inputs[i.name].to(ct)
        env[i.name] = t.reshape(n_rows, width) if i.kind == "row" else t.reshape(1, width) if i.kind == "vector" \
            else t.reshape(n_rows, 1)
    vals: list[torch.Tensor] = []
    for n in program.nodes:
        if n.op == "input":
            v = env[n.arg]
        elif n.op == "const":
            v = torch.tensor(n.arg, dtype=ct)
        elif n.op == "width":
            v = torch.tensor(float(width), dtype=ct)
        elif n.op == "pow":
            v = torch.pow(vals[n.srcs[0]], n.arg)
        elif n.op == "cast":
            a = vals[n.srcs[0]]
            if n.arg == "bool":
                v = a != 0
            elif n.arg in _CAST:  # rounding: the value of a half type, the gradient straight through
                v = _Round.apply(a, _CAST[n.arg])
            else:
                v = a.to(ct)
        else:
            v = TORCH_OPS[n.op](*(vals[s] for s in n.srcs))
        vals.append(v)
    out: dict[str, torch.Tensor] = {}
    for o in program.outputs:
        v = vals[o.node]
        if o.kind == "row":
            v = v.expand(n_rows, width).reshape(*lead, width)
        else:
            v = v.expand(n_rows, 1).reshape(lead)
        out[o.name] = v if o.row_partial else v.to(store)
    return out


def reduce_vector_grads(program: RowProgram, grads: dict[str, torch.Tensor],
                        dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """Second stage of a backward program: sum the per-row partials of vector gradients over rows.

    `program` is the backward program (its row-partial outputs are the ones summed); `dtypes`
    optionally maps output names to the dtype of the result (the weight's dtype)."""
    out = dict(grads)
    for o in program.outputs:
        if o.row_partial and o.name in out:
            g = out[o.name]
            s = g.reshape(-1, g.shape[-1]).sum(0, dtype=torch.float64 if g.dtype == torch.float64 else torch.float32)
            out[o.name] = s.to((dtypes or {}).get(o.name, s.dtype))
    return out
