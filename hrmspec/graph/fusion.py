"""The fusion pass: each module body cut into maximal RowProgram regions between matmuls and attention.

A module body (`build.body_graph`) is a chain of ops. Here it is first read as *dataflow*: every op
with the tensors it reads and writes, and for each elementwise or row-reduction op its RowProgram
(norms, residual adds, the injection sum, the sigmoid gate, SwiGLU / GELU, RoPE on half rows).
Matmuls and attention are barriers. The pass then grows regions in execution order:

    an op joins the region of an op whose output it reads (same rows and width) unless that
    would put a barrier on a path from the region back into it (the fused node would wait on itself)

so in a pre-norm layer the residual add and the next norm become one region, `h = x + r,
y = norm(h)`, and the last residual add fuses with the module's exit norm, `y = rms(x + r)`, which
writes only y. The model-level injection (`z_L + z_H` before a call) is the first op of the body of
that call's arity and fuses with the first norm. Each region becomes one `fused` node holding the
composed RowProgram (its backward is `hrmspec.ir.grad` of it) and a deterministic kernel name
`hrm_<region kind>_<fwd|bwd>_<hash8>`; identical regions (every layer's add + norm) share a kernel.

Memory traffic per token (forward, activations only: weights are read once per launch, not per
token): an op reads every tensor it consumes and writes every tensor it produces; a fused region
reads its inputs from outside the region once and writes only the tensors used outside it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx

from hrmspec.graph.build import BodyOp
from hrmspec.ir import ProgramBuilder, RowProgram, library, parse_norm_expr
from hrmspec.ir.autodiff import replay
from hrmspec.ir.kernel import backward_program, kernel_name
from hrmspec.spec.schema import ModelSpec, ModuleSpec, NormSpec

# --------------------------------------------------------------------------- op programs


def norm_program(n: NormSpec) -> RowProgram:
    """The RowProgram of a norm: RMSNorm (input x, weight w when affine) or the spec's expression."""
    if n.type == "expr":
        return parse_norm_expr(n.expr, dict(n.params or ()), n.eps, name="expr_norm")
    return library.rms_norm(n.eps, affine=n.affine, name="rms_norm")


# --------------------------------------------------------------------------- dataflow


@dataclass(frozen=True)
class Tensor:
    name: str
    size: int  # elements per token


def base(ref: str) -> str:
    """The tensor a binding refers to: 'q[lo]' (the first half of each head of q) -> 'q'."""
    return ref.split("[", 1)[0]


def body_dataflow(m: ModuleSpec, model: ModelSpec, arity: int = 1, body: nx.DiGraph | None = None) -> nx.DiGraph:
    """The ops of one module call as dataflow, op by op. Node attributes: those of the BodyOp, plus
    `reads`/`writes` (tensor names), and for row ops `program`, `kind`, `domain` (rows per token,
    width) and the bindings `rows` (program input -> tensor ref), `weights` (program input -> weight
    name), `results` (program output -> tensor ref). `arity` > 1 prepends the injection sum."""
    d, h, hd, b = model.d_model, model.heads, model.head_dim, m.block
    inner = h * hd
    g = nx.DiGraph(module=m.name, arity=arity, heads=h, head_dim=hd, tensors={}, order=[])
    producer: dict[str, str] = {}
    body_ops = dict(body.nodes(data=True)) if body is not None else {}

    def tensor(name: str, size: int) -> str:
        g.graph["tensors"][name] = Tensor(name, size)
        return name

    def node(name: str, op: str, reads: tuple[str, ...], writes: tuple[str, ...], program: RowProgram | None = None,
             domain: tuple[int, int] | None = None, **bind) -> None:
        attrs = dict(body_ops.get(name) or BodyOp(name, op).__dict__)
        reads = tuple(dict.fromkeys(base(r) for r in reads))
        attrs.update(reads=reads, writes=writes, program=program, domain=domain,
                     kind=program.name if program is not None else attrs["op"],
                     rows=bind.get("rows", {}), weights=bind.get("weights", {}), results=bind.get("results", {}))
        g.add_node(name, **attrs)
        g.graph["order"].append(name)
        for t in reads:
            if t in producer:
                g.add_edge(producer[t], name)
        for t in writes:
            producer[t] = name

    def row_op(name: str, op: str, program: RowProgram, rows: dict[str, str], width: int, weights=None) -> str:
        out = tensor(f"{name}:{program.outputs[0].name}", width)
        node(name, op, tuple(rows.values()), (out,), program, (1, width), rows=rows, weights=weights or {},
             results={program.outputs[0].name: out})
        return out

    def norm(name: str, x: str, n: NormSpec) -> str:
        prog = norm_program(n)
        weights = {i.name: f"{name}.{i.name}" for i in prog.inputs if i.kind == "vector"}
        return row_op(name, "rms_norm", prog, {"x": x}, d, weights)

    def linear(name: str, x: str, size: int) -> str:
        out = tensor(f"{name}:y", size)
        node(name, "linear", (x,), (out,))
        return out

    if arity > 1:  # the states summed into the call: in0 + in1 + ...
        g.graph["inputs"] = tuple(tensor(f"in{i}", d) for i in range(arity))
        prog = library.add(arity)
        x = row_op("inject", "add", prog, dict(zip(prog.input_names, g.graph["inputs"])), d)
    else:
        x = tensor("input", d)
        g.graph["inputs"] = (x,)
    tables = (tensor("rope.cos", hd), tensor("rope.sin", hd))
    for layer in range(m.layers):
        p, place = f"{layer}.", b.norm.place
        a_in = norm(p + "attn_norm", x, b.norm) if place in ("pre", "sandwich") else x
        projs = ("q", "k", "v") + (("g",) if b.attention.type == "gated" else ())
        proj = {t: linear(p + f"attn.{t}", a_in, inner) for t in projs}
        q, k = proj["q"], proj["k"]
        if b.attention.rope_theta is not None:
            prog = library.rope()
            rows = {"cos": tables[0] + "[lo]", "sin": tables[1] + "[lo]"}
            for t, ref in (("q", q), ("k", k)):
                rows.update({f"{t}_lo": ref + "[lo]", f"{t}_hi": ref + "[hi]"})
            q, k = tensor(p + "rope:q", inner), tensor(p + "rope:k", inner)
            results = {"qr_lo": q + "[lo]", "qr_hi": q + "[hi]", "kr_lo": k + "[lo]", "kr_hi": k + "[hi]"}
            node(p + "rope", "rope", tuple(rows.values()), (q, k), prog, (h, hd // 2), rows=rows, results=results)
        att = tensor(p + "attention:y", inner)
        node(p + "attention", "attention", (q, k, proj["v"]), (att,))
        if b.attention.type == "gated":
            att = row_op(p + "attn.gate", "sigmoid_mul", library.sigmoid_gate(), {"g": proj["g"], "a": att}, inner)
        o = linear(p + "attn.o", att, d)
        if place == "sandwich":
            o = norm(p + "attn_out_norm", o, b.norm)
        x = row_op(p + "attn_residual", "add", library.add(), {"x": x, "r": o}, d)
        if place == "post":
            x = norm(p + "attn_norm", x, b.norm)
        m_in = norm(p + "mlp_norm", x, b.norm) if place in ("pre", "sandwich") else x
        if b.mlp == "swiglu":
            gate, up = linear(p + "mlp.gate", m_in, b.ffn), linear(p + "mlp.up", m_in, b.ffn)
            act = row_op(p + "mlp.act", "silu_mul", library.swiglu(), {"a": gate, "b": up}, b.ffn)
        else:
            act = row_op(p + "mlp.act", "gelu", library.gelu(), {"x": linear(p + "mlp.up", m_in, b.ffn)}, b.ffn)
        down = linear(p + "mlp.down", act, d)
        if place == "sandwich":
            down = norm(p + "mlp_out_norm", down, b.norm)
        x = row_op(p + "mlp_residual", "add", library.add(), {"x": x, "r": down}, d)
        if place == "post":
            x = norm(p + "mlp_norm", x, b.norm)
    if m.exit_norm == "rms":
        x = norm("exit_norm", x, NormSpec(eps=b.norm.eps))
    g.graph["output"] = x
    if body is not None and set(g.nodes) - {"inject"} != set(body.nodes):
        extra = sorted((set(g.nodes) ^ set(body.nodes)) - {"inject"})
        raise RuntimeError(f"module {m.name}: the fusion pass and the graph builder disagree on ops {extra[:5]}")
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


def _compose(df: nx.DiGraph, members: list[str]) -> dict:
    """One region's fused program and its bindings: inputs x0.. (rows), w0.. (weights), outputs y0..
    numbered in order of first use, so identical regions give identical programs."""
    inside = set(members)
    used_outside = {df.graph["output"]}
    for u in df.nodes:
        if u not in inside:
            used_outside.update(base(r) for r in df.nodes[u]["reads"])
    kind = "_".join(df.nodes[u]["kind"] for u in members)
    b = ProgramBuilder(kind)
    val, rows, weights, kinds = {}, {}, {}, {}
    for u in members:
        a = df.nodes[u]
        env = {}
        for i in a["program"].inputs:
            if i.kind == "vector":
                arg = f"w{len(weights)}"
                weights[arg] = a["weights"][i.name]
                env[i.name] = b.vector(arg, i.init)
                continue
            ref = a["rows"][i.name]
            if ref not in val:
                arg = f"x{len(rows)}"
                rows[arg] = ref
                val[ref] = b.input(arg, i.kind)
            env[i.name] = val[ref]
        vals = []
        for n in a["program"].nodes:
            vals.append(replay(b, n, [vals[s] for s in n.srcs], env))
        for o in a["program"].outputs:
            ref = a["results"][o.name]
            val[ref], kinds[ref] = vals[o.node], o.kind
    results = {}
    for u in members:
        for ref in df.nodes[u]["results"].values():
            if base(ref) in used_outside:
                arg = f"y{len(results)}"
                results[arg] = ref
                b.output(arg, val[ref], kind=kinds[ref])
    return dict(program=b.build(), rows=rows, weights=weights, results=results, kind=kind)


def fuse_body(df: nx.DiGraph) -> nx.DiGraph:
    """The fused body: barriers as they were, each region one node with op `fused`. A one-op region
    keeps its op's own program (the kernel the op-by-op backend runs)."""
    fused = nx.DiGraph(**{k: v for k, v in df.graph.items() if k != "order"}, order=[])
    owner: dict[str, str] = {}
    found = {r[0]: r for r in regions(df)}
    for u in df.graph["order"]:
        a = df.nodes[u]
        if a["program"] is None:
            fused.add_node(u, **a)
        elif u in found:
            members = found[u]
            if len(members) == 1:
                parts = {k: a[k] for k in ("program", "rows", "weights", "results", "kind")}
            else:
                parts = _compose(df, members)
            name = "+".join(members)
            ops = [df.nodes[x] for x in members]
            reads = tuple(dict.fromkeys(base(r) for r in parts["rows"].values()))
            writes = tuple(dict.fromkeys(base(r) for r in parts["results"].values()))
            fused.add_node(name, name=name, op="fused", members=tuple(members), reads=reads, writes=writes,
                           domain=a["domain"], kernel=kernel_name(parts["program"], "fwd"),
                           params=sum(o["params"] for o in ops), flops=sum(o["flops"] for o in ops),
                           saved=sum(o["saved"] for o in ops), **parts)
            for x in members:
                owner[x] = name
        else:
            continue
        fused.graph["order"].append(owner.get(u, u))
    producer = {t: n for n in fused.graph["order"] for t in fused.nodes[n]["writes"]}
    for n in fused.graph["order"]:
        for t in fused.nodes[n]["reads"]:
            if t in producer and producer[t] != n:
                fused.add_edge(producer[t], n)
    return fused


def node_bytes(g: nx.DiGraph, n: str, dtype_bytes: int = 2) -> int:
    """Activation bytes per token node `n` reads and writes."""
    a, sizes = g.nodes[n], g.graph["tensors"]
    return dtype_bytes * sum(sizes[t].size for t in dict.fromkeys(a["reads"] + a["writes"]))


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
    dataflow: dict[tuple[str, int], nx.DiGraph]  # (module, injection arity) -> op-by-op body
    bodies: dict[tuple[str, int], nx.DiGraph]  # (module, injection arity) -> fused body
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


def fuse_model(G: nx.DiGraph, dtype_bytes: int = 2) -> FusionPlan:
    """Fuse every module body (once per injection arity it is called with) and count the traffic of
    one forward pass over the unrolled schedule."""
    model: ModelSpec = G.graph["spec"].model
    calls = G.graph["calls"]
    runs = defaultdict(int)
    for c in calls:
        runs[(c.module, len(c.inputs))] += 1
    dataflow, bodies = {}, {}
    for key in sorted(runs):
        dataflow[key] = body_dataflow(model.module(key[0]), model, key[1], G.graph["bodies"][key[0]])
        bodies[key] = fuse_body(dataflow[key])

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
        df = dataflow[key]
        tag = key[0] if len(arities[key[0]]) == 1 else f"{key[0]} (called on a sum of {key[1]})"
        for n in fused.graph["order"]:
            a = fused.nodes[n]
            if a["op"] != "fused":
                other += runs[key] * node_bytes(fused, n, dtype_bytes)
                continue
            width = a["domain"][1]
            need(a["program"], width, f"{tag}: {n}")
            row = traffic.setdefault(a["kernel"], TrafficRow(a["kernel"], "", 0, 0, 0))
            what = " + ".join(re.sub(r"^\d+\.", "", x) for x in a["members"])  # the same in every layer
            if what not in row.fuses.split("; "):
                row.fuses = f"{row.fuses}; {what}" if row.fuses else what
            row.runs += runs[key]
            row.op_bytes += runs[key] * sum(node_bytes(df, x, dtype_bytes) for x in a["members"])
            row.fused_bytes += runs[key] * node_bytes(fused, n, dtype_bytes)
    if model.final_norm:
        prog = norm_program(NormSpec(eps=model.block.norm.eps, affine=model.block.norm.affine))
        need(prog, model.d_model, "final_norm")
        row = traffic.setdefault(kernel_name(prog, "fwd"), TrafficRow(kernel_name(prog, "fwd"), prog.name, 0, 0, 0))
        row.runs += 1
        row.op_bytes += 2 * model.d_model * dtype_bytes
        row.fused_bytes += 2 * model.d_model * dtype_bytes
    return FusionPlan(dataflow, bodies, list(kernels.values()), list(traffic.values()), other, dtype_bytes)


def saving(plan: FusionPlan) -> float:
    """The fraction of row-op traffic fusion removes."""
    return 1.0 - plan.fused_bytes / plan.op_bytes if plan.op_bytes else 0.0


__all__ = [
    "FusionPlan", "KernelInfo", "Tensor", "TrafficRow", "body_dataflow", "fuse_body", "fuse_model", "node_bytes",
    "norm_program", "regions", "saving",
]
