"""Spec -> ModelGraph: a networkx DiGraph with the schedule unrolled.

Top-level nodes (one per value-producing op, in execution order):

    x               op=embed        the scaled token embedding (B, S, d)
    init:<state>    op=state_init   a state's initial value (embed | buffer | zeros | learned)
    call:<i>        op=module_call  the i-th module call: module, cycle, target, grad (credit plan)
    head            op=head         logits (B, S, vocab) from the output state
    loss            op=loss         the objective

Edges carry the tensor that flows (`state`, `shape`). A call's inputs are summed (injection by
addition) before the module runs; the edge from the producing node to the call says which state.

Each module's body (its layers' ops: norms, linears, attention, gates, MLP) is a graph of its
own, in `G.graph["bodies"][name]`, shared by every call of that module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import networkx as nx

from hrmspec.graph.credit import Call, credit_depth, grad_flags
from hrmspec.spec.grammar import INPUT
from hrmspec.spec.schema import ModelSpec, ModuleSpec, Repeat, Spec


def unroll(schedule: tuple, _cycle: tuple[int, ...] = ()) -> list[Call]:
    """Flatten nested repeats into the list of module calls, in execution order."""
    out: list[Call] = []

    def rec(items: tuple, cycle: tuple[int, ...]) -> None:
        for item in items:
            if isinstance(item, Repeat):
                for i in range(item.count):
                    rec(item.body, cycle + (i,))
            else:
                out.append(Call(len(out), item.module, item.target, item.inputs, cycle, str(item)))

    rec(schedule, _cycle)
    return out


@dataclass(frozen=True)
class BodyOp:
    """An op of a module body. `params` and `flops` (per token, forward) feed the analysis."""

    name: str
    op: str
    params: int = 0
    flops: int = 0  # matmul FLOPs per token; attention's depend on sequence length (see analysis)
    saved: int = 0  # activation elements kept per token for backward


def body_graph(m: ModuleSpec, model: ModelSpec) -> nx.DiGraph:
    """The ops of one module's layers, chained in order, plus its exit norm."""
    d, h, hd, b = model.d_model, model.heads, model.head_dim, m.block
    inner = h * hd
    bias = int(b.attention.bias)
    # an expression norm has one learnable per-channel vector per declared param
    norm_params = d * len(b.norm.params or {}) if b.norm.type == "expr" else (d if b.norm.affine else 0)
    g = nx.DiGraph(module=m.name, layers=m.layers)
    prev = None

    def add(op: BodyOp) -> None:
        nonlocal prev
        g.add_node(op.name, **op.__dict__)
        if prev is not None:
            g.add_edge(prev, op.name)
        prev = op.name

    def linear(name: str, fan_in: int, fan_out: int, has_bias: int = 0) -> BodyOp:
        return BodyOp(name, "linear", fan_in * fan_out + has_bias * fan_out, 2 * fan_in * fan_out, fan_in)

    for layer in range(m.layers):
        p = f"{layer}."
        place = b.norm.place
        if place in ("pre", "sandwich"):
            add(BodyOp(p + "attn_norm", "rms_norm", norm_params, 0, d))
        for proj in ("q", "k", "v") + (("g",) if b.attention.type == "gated" else ()):
            op = linear(p + f"attn.{proj}", d, inner, bias)
            # one fused matmul (qkvg) keeps its input once
            add(op if proj == "q" else dataclasses.replace(op, saved=0))
        if b.attention.rope_theta is not None:
            add(BodyOp(p + "rope", "rope", 0, 0, 0))
        # saved: q, k, v, the output and the softmax statistics (flash-style)
        add(BodyOp(p + "attention", "attention", 0, 0, 4 * inner + h))
        if b.attention.type == "gated":
            add(BodyOp(p + "attn.gate", "sigmoid_mul", 0, 0, inner))
        o = linear(p + "attn.o", inner, d, bias)
        # without a gate, o reads the attention output, which attention keeps already
        add(o if b.attention.type == "gated" else dataclasses.replace(o, saved=0))
        if place == "sandwich":
            add(BodyOp(p + "attn_out_norm", "rms_norm", norm_params, 0, d))
        add(BodyOp(p + "attn_residual", "add", 0, 0, 0))
        if place == "post":
            add(BodyOp(p + "attn_norm", "rms_norm", norm_params, 0, d))
        if place in ("pre", "sandwich"):
            add(BodyOp(p + "mlp_norm", "rms_norm", norm_params, 0, d))
        if b.mlp == "swiglu":
            add(linear(p + "mlp.gate", d, b.ffn))
            add(dataclasses.replace(linear(p + "mlp.up", d, b.ffn), saved=0))  # gate_up: its input once
            # silu(gate) * up keeps gate and up (one fused projection) and silu(gate)
            add(BodyOp(p + "mlp.act", "silu_mul", 0, 0, 3 * b.ffn))
        else:
            add(linear(p + "mlp.up", d, b.ffn))
            add(BodyOp(p + "mlp.act", "gelu", 0, 0, b.ffn))
        add(linear(p + "mlp.down", b.ffn, d))
        if place == "sandwich":
            add(BodyOp(p + "mlp_out_norm", "rms_norm", norm_params, 0, d))
        add(BodyOp(p + "mlp_residual", "add", 0, 0, 0))
        if place == "post":
            add(BodyOp(p + "mlp_norm", "rms_norm", norm_params, 0, d))
    if m.exit_norm == "rms":
        add(BodyOp("exit_norm", "rms_norm", 0, 0, d))
    return g


def build_graph(spec: Spec, progress: float = 1.0) -> nx.DiGraph:
    """Build the ModelGraph of `spec` with the credit plan evaluated at training `progress`."""
    model = spec.model
    calls = unroll(model.schedule)
    flags = grad_flags(calls, model.credit, progress)
    G = nx.DiGraph(
        name=spec.name,
        spec=spec,
        progress=progress,
        credit_depth=credit_depth(model.credit, progress),
        calls=calls,
        bodies={m.name: body_graph(m, model) for m in model.modules},
    )
    act = ("B", "S", model.d_model)
    G.add_node("x", op="embed", vocab=model.vocab, d=model.d_model, scale=model.embed_scale)
    producer: dict[str, str] = {}
    for s in model.states:
        if s.init == "embed":
            producer[s.name] = "x"
        else:
            G.add_node(f"init:{s.name}", op="state_init", state=s.name, init=s.init)
            producer[s.name] = f"init:{s.name}"
    producer[INPUT] = "x"
    for call, grad in zip(calls, flags):
        node = f"call:{call.index}"
        G.add_node(
            node, op="module_call", module=call.module, step=call.index, cycle=call.cycle,
            target=call.target, inputs=call.inputs, grad=grad, text=call.text,
        )
        for name in call.inputs:
            G.add_edge(producer[name], node, state=name, shape=act)
        producer[call.target] = node
    G.add_node("head", op="head", vocab=model.vocab, tied=model.head == "tied", final_norm=model.final_norm)
    G.add_edge(producer[model.output], "head", state=model.output, shape=act)
    G.add_node("loss", op="loss", objective=spec.objective.type)
    G.add_edge("head", "loss", shape=("B", "S", model.vocab))
    return G


def call_nodes(G: nx.DiGraph) -> list[dict]:
    """The module-call nodes' attributes, in execution order."""
    return [G.nodes[f"call:{c.index}"] for c in G.graph["calls"]]
