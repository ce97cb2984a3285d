"""What a CompiledModel runs: the plan `hrmspec.compile` builds once from the ModelGraph.

    calls       the unrolled schedule: module, summed states and target of each call
    layout      where its loop is: the calls before it, of each step, after it (graph/layout.py)
    credit      which calls carry gradient at a training progress (`CreditPlan.flags`)
    bodies      per (module, number of states summed): the `Body` a call runs. On a backend that
                fuses, the fusion pass's body (each region one generated kernel); on the reference
                backend the ops one by one
    params      per module: the parameters its body declares (the same for every arity)
    final_norm  the norm before the head, or None

The runtime reads the plan and imports no compiler pass: it creates the parameters the plan
declares and runs the bodies' ops in order (`hrmspec.runtime.execution`).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from hrmspec.graph.body import Body, Op, Param, module_body
from hrmspec.graph.credit_plan import CreditPlan
from hrmspec.graph.fusion import call_arities, final_norm_op, fuse
from hrmspec.graph.layout import Call, LoopLayout, loop_layout, unroll
from hrmspec.spec.schedule import with_recurrence
from hrmspec.spec.schema import ModelSpec, ModuleSpec, Spec


@dataclass(frozen=True)
class ExecutionPlan:
    spec: Spec
    calls: tuple[Call, ...]
    credit: CreditPlan
    bodies: dict[tuple[str, int], Body]
    params: dict[str, tuple[Param, ...]]
    final_norm: Op | None
    fused: bool
    layout: LoopLayout

    def body(self, call: Call) -> Body:
        return self.bodies[(call.module, len(call.inputs))]

    def layout_at(self, count: int) -> tuple[LoopLayout, CreditPlan]:
        """The layout with the loop (`layout.item`) run `count` times, and its credit plan."""
        schedule = with_recurrence(self.spec.model.schedule, count, self.layout.item)
        layout = loop_layout(unroll(schedule), schedule)
        return layout, CreditPlan(layout.calls, self.spec.model.credit)


def module_plan(m: ModuleSpec, model: ModelSpec, arities: tuple[int, ...] = (1,), fused: bool = False
                ) -> tuple[tuple[Param, ...], dict[int, Body]]:
    """One module's parameters and the body it runs per arity (fused or op by op): what a
    `ModuleStack` is built from. Arity 1 is always there: any module can be called on one tensor."""
    bodies = {}
    for arity in sorted(set(arities) | {1}):
        body = module_body(m, model, arity)
        bodies[arity] = fuse(body) if fused else body
    return module_body(m, model, m.inject_arity or 1).params, bodies  # a cat module's adapter included


def execution_plan(G: nx.DiGraph, fused: bool = False) -> ExecutionPlan:
    """The plan of the ModelGraph `G`; `fused` runs the fusion pass's regions (a kernel backend)."""
    spec: Spec = G.graph["spec"]
    model = spec.model
    calls = tuple(G.graph["calls"])
    bodies, params = {}, {}
    for m in model.modules:
        arities = tuple(k for module, k in call_arities(G) if module == m.name)
        params[m.name], mine = module_plan(m, model, arities, fused)
        bodies.update({(m.name, k): b for k, b in mine.items()})
    return ExecutionPlan(spec, calls, CreditPlan(calls, model.credit), bodies, params, final_norm_op(model), fused,
                         loop_layout(calls, model.schedule))


__all__ = ["ExecutionPlan", "execution_plan", "module_plan"]
