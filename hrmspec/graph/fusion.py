"""The fusion pass: each module body cut into maximal RowProgram regions between matmuls and attention.

A module body (`hrmspec.graph.body`) is a sequence of ops; its row ops (norms, residual adds, the
injection sum, the sigmoid gate, the MLP activation, RoPE on half rows) each carry a RowProgram.
Matmuls and attention are barriers. The pass grows regions in execution order:

    an op joins the region of an op whose output it reads (same rows and width) unless that
    would put a barrier on a path from the region back into it (the fused node would wait on itself)

so in a pre-norm layer the residual add and the next norm become one region, `h = x + r,
y = norm(h)`, and the last residual add fuses with the module's exit norm, `y = norm(x + r)`, which
writes only y. The model-level injection (`z_L + z_H` before a call) is the first op of the body of
that call's arity and fuses with the first norm. Each region becomes one row op holding the
composed RowProgram (its backward is `hrmspec.ir.grad` of it) and a deterministic kernel name
`hrm_<region kind>_<fwd|bwd>_<hash8>`; identical regions (every layer's add + norm) share a kernel.
The fused body is again a `Body`, which is what a kernel backend's runtime runs.

Memory traffic per token (forward, activations only: weights are read once per launch, not per
token): an op reads every tensor it consumes and writes every tensor it produces; a fused region
reads its inputs from outside the region once and writes only the tensors used outside it.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx

from hrmspec.graph.body import Body, Op, base, module_body, norm_op
from hrmspec.ir import ProgramBuilder, RowProgram
from hrmspec.ir.autodiff import replay
from hrmspec.ir.kernel import backward_program, kernel_name
from hrmspec.spec.schema import ModelSpec


def dataflow(body: Body) -> nx.DiGraph:
    """The body as the graph the pass works on: `Body.graph()`, each node's `kind` its program's name."""
    g = body.graph()
    for n in g.nodes:
        prog = g.nodes[n]["program"]
        g.nodes[n]["kind"] = prog.name if prog is not None else g.nodes[n]["role"]
    return g


# --------------------------------------------------------------------------- regions


def _acyclic(df: nx.DiGraph, group: dict[str, int], merged: set[int], v: str, into: int) -> bool:
    """Whether contracting every region (with the regions `merged` and op `v` joined into `into`)
    leaves the dataflow a DAG."""
    def label(u: str):
        if u == v:
            return into
        gid = group.get(u)
        return u if gid is None else into if gid in merged else gid

    q = nx.DiGraph()
    q.add_edges_from((label(a), label(c)) for a, c in df.edges if label(a) != label(c))
    return nx.is_directed_acyclic_graph(q)


def regions(df: nx.DiGraph) -> list[list[str]]:
    """Maximal convex groups of row ops with the same domain, each in execution order."""
    pos = {u: i for i, u in enumerate(df.graph["order"])}
    group: dict[str, int] = {}
    fresh = 0
    for v in df.graph["order"]:
        a = df.nodes[v]
        if a["program"] is None:
            continue
        cands = list(dict.fromkeys(group[u] for u in sorted(df.predecessors(v), key=pos.get)
                                   if u in group and df.nodes[u]["domain"] == a["domain"]))
        home = next((c for c in cands if _acyclic(df, group, {c}, v, c)), None)
        if home is None:
            group[v] = fresh = fresh + 1
            continue
        group[v] = home
        for c in cands:  # an op reading two regions may join them, when that stays acyclic
            if c != home and _acyclic(df, group, {c, home}, v, home):
                for u in [u for u, gid in group.items() if gid == c]:
                    group[u] = home
    out: dict[int, list[str]] = defaultdict(list)
    for u in df.graph["order"]:
        if u in group:
            out[group[u]].append(u)
    return sorted(out.values(), key=lambda r: pos[r[0]])


def _compose(body: Body, members: list[str]) -> Op:
    """One region as a row op: its fused program and bindings, inputs x0.. (rows), w0.. (weights),
    outputs y0.. numbered in order of first use, so identical regions give identical programs."""
    inside = set(members)
    used_outside = {body.output}
    for o in body.ops:
        if o.name not in inside:
            used_outside.update(base(r) for r in o.reads)
    ops = [body.op(u) for u in members]
    kind = "_".join(o.program.name for o in ops)
    b = ProgramBuilder(kind)
    val, rows, weights, kinds = {}, {}, {}, {}
    for o in ops:
        env = {}
        for i in o.program.inputs:
            if i.kind == "vector":
                arg = f"w{len(weights)}"
                weights[arg] = o.weights[i.name]
                env[i.name] = b.vector(arg, i.init)
                continue
            ref = o.rows[i.name]
            if ref not in val:
                arg = f"x{len(rows)}"
                rows[arg] = ref
                val[ref] = b.input(arg, i.kind)
            env[i.name] = val[ref]
        vals = []
        for n in o.program.nodes:
            vals.append(replay(b, n, [vals[s] for s in n.srcs], env))
        for out in o.program.outputs:
            ref = o.results[out.name]
            val[ref], kinds[ref] = vals[out.node], out.kind
    results = {}
    for o in ops:
        for ref in o.results.values():
            if base(ref) in used_outside:
                arg = f"y{len(results)}"
                results[arg] = ref
                b.output(arg, val[ref], kind=kinds[ref])
    program = b.build()
    return Op("+".join(members), "row", "region", tuple(dict.fromkeys(base(r) for r in rows.values())),
              tuple(dict.fromkeys(base(r) for r in results.values())), tuple(p for o in ops for p in o.params),
              program, rows, weights, results, ops[0].domain, flops=sum(o.flops for o in ops),
              saved=sum(o.saved for o in ops), members=tuple(members))


def fuse(body: Body) -> Body:
    """The fused body: barriers as they were, each region one row op (`members` lists what it
    computes). A one-op region is its op (the kernel the op-by-op backend runs)."""
    found = {r[0]: r for r in regions(dataflow(body))}
    inside = {u for r in found.values() for u in r}
    ops = []
    for o in body.ops:
        if o.name in found:
            members = found[o.name]
            ops.append(dataclasses.replace(o, members=(o.name,)) if len(members) == 1 else _compose(body, members))
        elif o.name not in inside:
            ops.append(o)
    return dataclasses.replace(body, ops=tuple(ops))


def region_kernel(op: Op) -> str:
    """The forward kernel a row op or region runs."""
    return kernel_name(op.program, "fwd")


def op_bytes(body: Body, op: Op, dtype_bytes: int = 2) -> int:
    """Activation bytes per token `op` reads and writes."""
    return dtype_bytes * sum(body.tensors[t].size for t in dict.fromkeys(op.reads + op.writes))


# --------------------------------------------------------------------------- the model


@dataclass
class KernelInfo:
    """One generated kernel the spec needs."""

    name: str
    direction: str  # fwd | bwd
    program: RowProgram  # what the kernel computes (for bwd: the gradient program)
    forward: RowProgram  # the forward program it belongs to
    width: int  # the row width at this spec's sizes
    regions: list[str] = field(default_factory=list)  # where it runs: "L: 0.attn_residual+0.mlp_norm", ...


@dataclass
class TrafficRow:
    kernel: str  # the forward kernel of the region
    fuses: str  # the ops it fuses, e.g. "attn_residual + mlp_norm; mlp_residual + attn_norm"
    runs: int  # launches per forward pass (over every module call)
    op_bytes: int  # per token, the same ops one kernel each
    fused_bytes: int  # per token, as one region


@dataclass
class FusionPlan:
    dataflow: dict[tuple[str, int], Body]  # (module, injection arity) -> op-by-op body
    bodies: dict[tuple[str, int], Body]  # (module, injection arity) -> fused body
    kernels: list[KernelInfo]
    traffic: list[TrafficRow]
    other_bytes: int  # per token: matmul and attention activations, the same fused or not
    dtype_bytes: int

    @property
    def op_bytes(self) -> int:
        return sum(r.op_bytes for r in self.traffic)

    @property
    def fused_bytes(self) -> int:
        return sum(r.fused_bytes for r in self.traffic)


def call_arities(G: nx.DiGraph) -> dict[tuple[str, int], int]:
    """(module, number of states summed into the call) -> calls per forward pass."""
    runs: dict[tuple[str, int], int] = defaultdict(int)
    for c in G.graph["calls"]:
        runs[(c.module, len(c.inputs))] += 1
    return dict(sorted(runs.items()))


def final_norm_op(model: ModelSpec) -> Op | None:
    """The norm before the head (`model.final_norm`), as a row op with its parameters at the top level."""
    n = model.final_norm
    return None if n is None else norm_op("final_norm", "h", n, model.d_model, "final_norm:y")


def fuse_model(G: nx.DiGraph, dtype_bytes: int = 2) -> FusionPlan:
    """Fuse every module body (once per injection arity it is called with) and count the traffic of
    one forward pass over the unrolled schedule."""
    model: ModelSpec = G.graph["spec"].model
    runs = call_arities(G)
    dataflow_, bodies = {}, {}
    for key in runs:
        dataflow_[key] = module_body(model.module(key[0]), model, key[1])
        bodies[key] = fuse(dataflow_[key])

    kernels: dict[str, KernelInfo] = {}
    backward: dict[str, RowProgram] = {}  # by forward hash: the same region recurs in every layer

    def need(program: RowProgram, width: int, where: str) -> None:
        for direction in ("fwd", "bwd"):
            if direction == "bwd" and program.hash not in backward:
                backward[program.hash] = backward_program(program)
            prog = program if direction == "fwd" else backward[program.hash]
            name = kernel_name(prog, direction, program.name)
            info = kernels.setdefault(name, KernelInfo(name, direction, prog, program, width))
            if where not in info.regions:
                info.regions.append(where)

    traffic: dict[str, TrafficRow] = {}
    other = 0
    arities = defaultdict(set)
    for mod, k in bodies:
        arities[mod].add(k)
    for key, fused in bodies.items():
        df = dataflow_[key]
        tag = key[0] if len(arities[key[0]]) == 1 else f"{key[0]} (called on a sum of {key[1]})"
        for o in fused.ops:
            if o.program is None:
                other += runs[key] * op_bytes(fused, o, dtype_bytes)
                continue
            need(o.program, o.domain[1], f"{tag}: {o.name}")
            kernel = region_kernel(o)
            row = traffic.setdefault(kernel, TrafficRow(kernel, "", 0, 0, 0))
            what = " + ".join(re.sub(r"^\d+\.", "", x) for x in o.members)  # the same in every layer
            if what not in row.fuses.split("; "):
                row.fuses = f"{row.fuses}; {what}" if row.fuses else what
            row.runs += runs[key]
            row.op_bytes += runs[key] * sum(op_bytes(df, df.op(x), dtype_bytes) for x in o.members)
            row.fused_bytes += runs[key] * op_bytes(fused, o, dtype_bytes)
    final = final_norm_op(model)
    if final is not None:
        need(final.program, model.d_model, "final_norm")
        kernel = region_kernel(final)
        row = traffic.setdefault(kernel, TrafficRow(kernel, final.program.name, 0, 0, 0))
        row.runs += 1
        row.op_bytes += 2 * model.d_model * dtype_bytes
        row.fused_bytes += 2 * model.d_model * dtype_bytes
    return FusionPlan(dataflow_, bodies, list(kernels.values()), list(traffic.values()), other, dtype_bytes)


def saving(plan: FusionPlan) -> float:
    """The fraction of row-op traffic fusion removes."""
    return 1.0 - plan.fused_bytes / plan.op_bytes if plan.op_bytes else 0.0


__all__ = [
    "FusionPlan", "KernelInfo", "TrafficRow", "call_arities", "dataflow", "final_norm_op", "fuse", "fuse_model",
    "op_bytes", "region_kernel", "regions", "saving",
]
