"""Spec -> ModelGraph: a networkx DiGraph with the schedule unrolled.

Top-level nodes (one per value-producing op, in execution order):

    x               op=embed        the scaled token embedding (B, S, d)
    init:<state>    op=state_init   a state's initial value (embed | buffer | zeros | learned)
    call:<i>        op=module_call  the i-th module call: module, cycle, target, grad (credit plan)
    head            op=head         logits (B, S, vocab) from the output state
    loss            op=loss         the objective

Edges carry the tensor that flows (`state`, `shape`). A call's inputs are summed (injection by
addition) before the module runs; the edge from the producing node to the call says which state.

Each module's body (its layers' ops: norms, linears, attention, gates, MLP, with their parameters)
is `G.graph["bodies"][name]`, a `hrmspec.graph.body.Body` shared by every call of that module.
"""

from __future__ import annotations

import networkx as nx

from hrmspec.graph.body import module_body
from hrmspec.graph.credit_plan import credit_depth, grad_flags
from hrmspec.graph.layout import unroll
from hrmspec.spec.grammar import INPUT
from hrmspec.spec.schedule import with_recurrence
from hrmspec.spec.schema import Spec


def build_graph(spec: Spec, progress: float = 1.0, recurrence: int | None = None) -> nx.DiGraph:
    """Build the ModelGraph of `spec` with the credit plan evaluated at training `progress`; a sampled
    loop runs `recurrence` times (default: its evaluation count)."""
    model = spec.model
    schedule = model.schedule if recurrence is None else with_recurrence(model.schedule, recurrence)
    calls = unroll(schedule)
    flags = grad_flags(calls, model.credit, progress)
    G = nx.DiGraph(
        name=spec.name,
        spec=spec,
        progress=progress,
        credit_depth=credit_depth(model.credit, progress),
        calls=calls,
        bodies={m.name: module_body(m, model, m.inject_arity or 1) for m in model.modules},  # all its parameters
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
