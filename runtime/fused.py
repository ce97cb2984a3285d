"""A module call run as the fusion pass cut it: each row region between sublayers is one kernel.

On a kernel backend (triton, opencl, cuda: an op table with `fuses` set) a Stack does not run
its layers op by op. It runs the fused body of `hrmspec.graph.fusion` for the call's injection
arity, so the kernels that run are exactly the ones `hrmspec check` and the golden snapshots
cover. In a pre-norm stack of two layers called on z_L + z_H:

    step   what                                   reads              writes
    rows   inject + 0.attn_norm                   in0, in1           inject:h, 0.attn_norm:y
    attn   layer 0: qkvg, rope, attention, gate, o 0.attn_norm:y      0.attn.o:y
    rows   0.attn_residual + 0.mlp_norm           inject:h, 0.attn.o:y   0.attn_residual:h, 0.mlp_norm:y
    mlp    layer 0: gate_up, activation, down     0.mlp_norm:y       0.mlp.down:y
    rows   0.mlp_residual + 1.attn_norm           ...
    ...
    rows   1.mlp_residual + exit_norm             ...                exit_norm:y   (the call's output)

A `rows` step is `ops.row_program(region program, tensors and norm weights)`; its backward is the
region's derived backward kernel, which reads the stored sum h rather than the two terms. The
sublayers are the barriers between regions and run as the layer's own modules (their single-op
regions, the gate and the activation, are the same kernels either way). A tensor is dropped once
no later step reads it, so a call holds no more activations than the op-by-op path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import networkx as nx

from hrmspec.graph.fusion import body_dataflow, fuse_body
from hrmspec.ir import RowProgram
from hrmspec.spec.schema import ModelSpec, ModuleSpec

# dataflow op names inside a sublayer: "3.attn.q", "3.rope", "3.attention", "3.mlp.down", ...
_SUBLAYER = re.compile(r"(\d+)\.(?:(attn)\.|(rope|attention)$|(mlp)\.)")


@dataclass(frozen=True)
class Step:
    kind: str  # rows | attn | mlp
    layer: int | None  # the layer of a sublayer step
    program: RowProgram | None  # a rows step's region
    reads: tuple[tuple[str, str], ...]  # (program input, tensor); a sublayer: (("x", tensor),)
    weights: tuple[tuple[str, str], ...]  # (program input, "<layer>.<norm>.<param>" or "<norm>.<param>")
    writes: tuple[tuple[str, str], ...]  # (program output, tensor); a sublayer: (("y", tensor),)
    drop: tuple[str, ...] = ()  # tensors no later step reads


@dataclass(frozen=True)
class CallPlan:
    inputs: tuple[str, ...]  # the tensors the call is given: ("input",) or ("in0", "in1", ...)
    steps: tuple[Step, ...]
    output: str


def sublayer_of(name: str) -> tuple[int, str] | None:
    """(layer, "attn" | "mlp") of a dataflow op inside a sublayer, None for a norm or residual."""
    m = _SUBLAYER.match(name)
    if m is None:
        return None
    return int(m.group(1)), "mlp" if m.group(4) else "attn"


def plan_call(m: ModuleSpec, model: ModelSpec, arity: int) -> CallPlan:
    """The steps of one call of module `m` on the sum of `arity` states (1: a single input)."""
    fused: nx.DiGraph = fuse_body(body_dataflow(m, model, arity))
    steps: list[Step] = []
    done: set[tuple[int, str]] = set()
    for n in fused.graph["order"]:
        a = fused.nodes[n]
        members = a.get("members") or (n,)
        where = {sublayer_of(x) for x in members}
        if len(where) > 1:
            raise RuntimeError(f"module {m.name}: region {n} spans a sublayer boundary; it cannot run as one kernel")
        sub = where.pop()
        if sub is None:
            if a["op"] != "fused":
                raise RuntimeError(f"module {m.name}: op {n} ({a['op']}) is outside every sublayer")
            steps.append(Step("rows", None, a["program"], tuple(a["rows"].items()), tuple(a["weights"].items()),
                              tuple(a["results"].items())))
        elif sub not in done:
            done.add(sub)
            layer, kind = sub
            first, last = (f"{layer}.attn.q", f"{layer}.attn.o") if kind == "attn" else \
                (f"{layer}.mlp.up", f"{layer}.mlp.down")
            steps.append(Step(kind, layer, None, (("x", fused.nodes[first]["reads"][0]),), (),
                              (("y", fused.nodes[last]["writes"][0]),)))
    output = fused.graph["output"]
    return CallPlan(tuple(fused.graph["inputs"]), tuple(_with_drops(steps, output)), output)


def _with_drops(steps: list[Step], output: str) -> list[Step]:
    """Each step with the tensors read for the last time by it (the call's output is kept)."""
    last: dict[str, int] = {}
    for i, s in enumerate(steps):
        for _, t in s.reads:
            last[t] = i
    out = []
    for i, s in enumerate(steps):
        gone = tuple(dict.fromkeys(t for _, t in s.reads if last[t] == i and t != output))
        out.append(Step(s.kind, s.layer, s.program, s.reads, s.weights, s.writes, gone))
    return out


__all__ = ["CallPlan", "Step", "plan_call", "sublayer_of"]
