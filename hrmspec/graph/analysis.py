"""Counting on the ModelGraph: parameters, FLOPs per token, activation memory.

FLOPs are "model FLOPs": 2 per multiply-add of every matmul (projections, MLP, head) plus the
two attention matmuls (QK^T and AV: 4 * heads * head_dim FLOPs per attended key). Elementwise
ops are left out, as is customary. A causal or PrefixLM query of a length-S row attends to
(S + 1) / 2 keys on average, a bidirectional one to S.

A training step costs 3x the forward FLOPs (forward, and backward for activations and weights)
for grad-carrying calls and the head, and 1x for no-grad calls, which is why the credit plan
makes deep recurrences affordable. Activation memory counts the elements each grad-carrying
call keeps for backward; no-grad calls keep none. The batch's rotary tables are kept once,
whatever the number of calls; the attention mask is a description, not a tensor, and attention
keeps one log-sum-exp per query and head. The loss keeps the last hidden states and, in training
(the chunked linear + cross-entropy), one log-sum-exp per token; with full logits
(`logits=True`), the (tokens, vocab) logits too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from hrmspec.graph.body import Body
from hrmspec.graph.build import call_nodes
from hrmspec.graph.fusion import final_norm_op
from hrmspec.graph.layout import loop_layout
from hrmspec.halting import HALTING
from hrmspec.spec.schema import ModelSpec


@dataclass
class ModuleStats:
    name: str
    layers: int
    params: int
    calls: int
    grad_calls: int
    flops_per_token: float  # forward, one call, at the analysed sequence length


@dataclass
class GraphStats:
    params: int
    params_by_part: dict[str, int]
    buffers: int
    modules: list[ModuleStats]
    seq_len: int
    forward_flops_per_token: float
    train_flops_per_token: float
    activation_bytes_per_token: float  # grad-carrying calls, at `dtype_bytes`
    dtype_bytes: int
    credit_depth: int | None
    calls: list[dict] = field(default_factory=list)


def attended(mask: str, seq_len: int) -> float:
    """Keys a query attends to on average in a row of `seq_len` tokens."""
    return float(seq_len) if mask == "bidirectional" else (seq_len + 1) / 2


def loop_steps(G: nx.DiGraph) -> tuple[int, int]:
    """(steps of the schedule's outer loop, how many of them the loss scores: every one with a per-step
    objective, else the last)."""
    steps = max(1, loop_layout(G.graph["calls"]).count)
    return steps, steps if G.graph["spec"].objective.steps != "last" else 1


def module_flops(body: Body, model: ModelSpec, seq_len: int) -> float:
    """Forward FLOPs per token of one call of a module."""
    total = 0.0
    for op in body.ops:
        total += op.flops
        if op.kind == "attention":
            total += 4 * op.attrs["heads"] * op.attrs["head_dim"] * attended(op.attrs["mask"], seq_len)
    return total


def analyse(G: nx.DiGraph, seq_len: int = 2048, dtype_bytes: int = 2, logits: bool = False) -> GraphStats:
    spec = G.graph["spec"]
    model: ModelSpec = spec.model
    d, V = model.d_model, model.vocab
    calls = call_nodes(G)
    parts: dict[str, int] = {"embed": V * d}
    buffers = 0
    modules = []
    per_call_flops: dict[str, float] = {}
    saved_per_call: dict[str, int] = {}
    for m in model.modules:
        body: Body = G.graph["bodies"][m.name]
        params = sum(p.size for p in body.params)
        parts[f"module {m.name}"] = params
        flops = module_flops(body, model, seq_len)
        per_call_flops[m.name] = flops
        saved_per_call[m.name] = sum(op.saved for op in body.ops)
        mine = [c for c in calls if c["module"] == m.name]
        modules.append(ModuleStats(m.name, m.layers, params, len(mine), sum(c["grad"] for c in mine), flops))
    for s in model.states:
        if s.init == "learned":
            parts[f"state {s.name}"] = d
        elif s.init in ("buffer", "zeros"):
            buffers += d
    if model.head == "untied":
        parts["head"] = V * d
    final = final_norm_op(model)
    if final is not None and final.params:
        parts["final_norm"] = final.param_count
    P = model.puzzle.positions if model.puzzle is not None else 0
    if model.puzzle is not None:
        parts["puzzle vectors"] = model.puzzle.identifiers * model.puzzle.dim
    if model.positions == "learned":
        parts["positions"] = (model.max_seq_len + P) * d
    sup = spec.supervision
    if sup is not None and sup.halting is not None:
        parts["halting head"] = 2 * d + 2
    head_flops = 2 * d * V
    # per step of the loop: the halting head (model.halting); the LM head when every step is scored
    steps, scored = loop_steps(G)
    step_head = 2 * d * steps if model.halting is not None else 0
    if model.halting is not None:
        parts[HALTING[model.halting.type].head] = d + 1
    fwd = sum(per_call_flops[c["module"]] for c in calls) + head_flops + step_head
    train = sum(per_call_flops[c["module"]] * (3 if c["grad"] else 1) for c in calls) + 3 * (scored * head_flops
                                                                                             + step_head)
    # kept for backward: each grad call's saved activations and its input sum; the loss's input
    # (the last hidden states), and the logits (full) or one log-sum-exp per token (chunked); an
    # exit gate keeps every step's logits
    per_loss = d + (V if logits or spec.objective.steps == "expected" else 1)
    saved = sum(saved_per_call[c["module"]] + d for c in calls if c["grad"]) + scored * per_loss
    if any(c["grad"] for c in calls):  # once per batch, shared by every call: the rotary tables
        rope = any(m.block.attention.rope_theta is not None for m in model.modules)
        saved += 2 * model.head_dim if rope else 0
    return GraphStats(
        params=sum(parts.values()),
        params_by_part=parts,
        buffers=buffers,
        modules=modules,
        seq_len=seq_len,
        forward_flops_per_token=fwd,
        train_flops_per_token=train,
        activation_bytes_per_token=saved * dtype_bytes,
        dtype_bytes=dtype_bytes,
        credit_depth=G.graph["credit_depth"],
        calls=calls,
    )


def step_costs(G: nx.DiGraph, seq_len: int = 2048) -> list[dict]:
    """Per step of the loop (model.halting or a per-step loss): {"step", "calls" (their statements),
    "flops" (forward FLOPs per token of the step's calls and halting head), "through" (of a position
    that stops after this step: the calls before the loop, the steps so far and the LM head once)}."""
    spec = G.graph["spec"]
    model = spec.model
    per_call = {m.name: module_flops(G.graph["bodies"][m.name], model, seq_len) for m in model.modules}
    halting = 2 * model.d_model if model.halting is not None else 0
    layout = loop_layout(G.graph["calls"])
    total = sum(per_call[c.module] for c in layout.before) + 2 * model.d_model * model.vocab
    rows = []
    for t, mine in enumerate(layout.steps):
        flops = sum(per_call[c.module] for c in mine) + halting
        total += flops
        rows.append({"step": t + 1, "calls": [c.text for c in mine], "flops": flops, "through": total})
    return rows


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"
