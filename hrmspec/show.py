"""`hrmspec show`: the unrolled graph, parameters, FLOPs and memory as tables."""

from __future__ import annotations

import networkx as nx
from rich.console import Console
from rich.table import Table

from hrmspec.cost import RunFlops, seq_len_and_source
from hrmspec.graph.analysis import analyse, human, step_costs
from hrmspec.graph.body import Body
from hrmspec.graph.build import build_graph
from hrmspec.graph.credit_plan import credit_table
from hrmspec.graph.fusion import fuse_model
from hrmspec.graph.layout import loop_layout
from hrmspec.graph.roofline import Roofline
from hrmspec.halting import HALTING, describe_rule
from hrmspec.spec.schedule import sampled_loop


def show(G: nx.DiGraph, seq_len: int | None = None, dtype_bytes: int = 2, console: Console | None = None,
         seq_source: str | None = None) -> None:
    """Print the tables of `G`'s spec. Attention is counted at `seq_len` tokens (`seq_source` says where the
    number comes from); by default at the row length `hrmspec cost` uses (`hrmspec.cost.seq_len_and_source`)."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log or a pipe: whole op and kernel names rather than 80 columns
            console = Console(width=160)
    spec = G.graph["spec"]
    if seq_len is None:
        seq_len, seq_source = seq_len_and_source(spec)
    st = analyse(G, seq_len=seq_len, dtype_bytes=dtype_bytes)
    m = spec.model
    console.print(
        f"[bold]{spec.name}[/bold]  ({spec.source})  d_model {m.d_model}, {m.heads} heads x {m.head_dim}, "
        f"vocab {m.vocab}, head {m.head}, objective {spec.objective.type}"
    )
    console.print(f"attention at {seq_len} tokens: {seq_source or 'given'}", markup=False, highlight=False)

    t = Table(title="Parameters")
    t.add_column("part")
    t.add_column("layers", justify="right")
    t.add_column("parameters", justify="right")
    layers = {f"module {ms.name}": str(ms.layers) for ms in st.modules}
    for part, n in st.params_by_part.items():
        t.add_row(part, layers.get(part, ""), f"{n:,}")
    t.add_row("[bold]total[/bold]", "", f"[bold]{st.params:,}[/bold]")
    if st.buffers:
        t.add_row("(buffers, not trained)", "", f"{st.buffers:,}")
    console.print(t)
    same: dict[tuple, list[str]] = {}  # modules with the same body are shown once
    for mod in spec.model.modules:
        body = G.graph["bodies"][mod.name]
        key = tuple((o.name, o.kind, o.program.hash if o.program else "", tuple(p.shape for p in o.params))
                    for o in body.ops)
        same.setdefault(key, []).append(mod.name)
    for names in same.values():
        layer_table(G.graph["bodies"][names[0]], console, names)

    depth = f", depth {st.credit_depth}" if st.credit_depth is not None else ""
    t = Table(title=f"Unrolled schedule at progress {G.graph['progress']:g} (credit mode {m.credit.mode}{depth})")
    for col in ("step", "cycle", "call", "grad", "GFLOPs/token"):
        t.add_column(col, justify="right" if col in ("step", "GFLOPs/token") else "left")
    per_module = {ms.name: ms.flops_per_token for ms in st.modules}
    for c in st.calls:
        grad = "[green]grad[/green]" if c["grad"] else "[dim]no-grad[/dim]"
        cyc = ".".join(str(i) for i in c["cycle"]) or "-"
        t.add_row(str(c["step"]), cyc, c["text"], grad, f"{per_module[c['module']] / 1e9:.4f}")
    console.print(t)

    if m.halting is not None or spec.objective.steps != "last":
        step_table(G, seq_len, console)

    rows = credit_table(G.graph["calls"], m.credit)
    if rows:
        t = Table(title="Credit ramp: grad calls per module")
        t.add_column("depth", justify="right")
        for name in m.credit.priority:
            t.add_column(name, justify="right")
        for d, per in rows:
            t.add_row(str(d), *(str(per[n]) for n in m.credit.priority))
        console.print(t)

    t = Table(title=f"Cost per token at sequence length {seq_len}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("forward FLOPs", human(st.forward_flops_per_token))
    loop = sampled_loop(m.schedule)
    if loop is not None:  # what `hrmspec cost` prices: the mean over the loop's drawn count
        t.add_row(f"forward FLOPs, mean over the sampled count (shown: {loop_layout(G.graph['calls']).count})",
                  human(RunFlops(spec, seq_len).forward))
    t.add_row("training-step FLOPs (grad calls 3x, no-grad 1x)", human(st.train_flops_per_token))
    t.add_row(f"activation memory ({dtype_bytes} B/elem, grad calls)", human(st.activation_bytes_per_token, "B"))
    t.add_row(f"activation memory for one {seq_len}-token row", human(st.activation_bytes_per_token * seq_len, "B"))
    console.print(t)
    if spec.supervision is not None:
        supervision_table(spec, st.forward_flops_per_token * seq_len, st.train_flops_per_token * seq_len, console)
    if loop is not None:
        recurrence_table(G, seq_len, dtype_bytes, console)
    traffic_table(G, dtype_bytes, console)


def recurrence_table(G: nx.DiGraph, seq_len: int, dtype_bytes: int, console: Console) -> None:
    """A sampled loop: its draw, and the cost per token at the expected count, at evaluation and as shown."""
    spec = G.graph["spec"]
    loop = sampled_loop(spec.model.schedule)
    sample = loop.sample
    shown = loop_layout(G.graph["calls"]).count
    if sample.kind == "lognormal_poisson":
        law, mean = f"Poisson(LogNormal(ln {sample.mean:g} - {sample.sigma:g}^2/2, {sample.sigma:g})) + 1", \
            sample.mean + 1
    else:
        law, mean = f"uniform in [{sample.low}, {sample.high}]", (sample.low + sample.high) / 2
    c = sample.curriculum
    rising = (f"; the {'mean' if sample.kind == 'lognormal_poisson' else 'high end'} rises from 1 ({c.schedule}) over "
              f"the first {c.over:.0%} of training") if c is not None else ""
    t = Table(title=f"Sampled loop: count ~ {law}, at most {sample.max}{rising}; evaluation runs {loop.count}")
    for col in ("count", "forward FLOPs/token", "training FLOPs/token", "activation memory/token"):
        t.add_column(col, justify="right")
    counts = {f"{round(mean)} (expected {mean:g})": round(mean), f"{loop.count} (evaluation)": loop.count,
              f"{shown} (shown above)": shown}
    seen = set()
    for label, n in counts.items():
        if n in seen:
            continue
        seen.add(n)
        st = analyse(build_graph(spec, G.graph["progress"], recurrence=n), seq_len=seq_len, dtype_bytes=dtype_bytes)
        t.add_row(label, human(st.forward_flops_per_token), human(st.train_flops_per_token),
                  human(st.activation_bytes_per_token, "B"))
    console.print(t)


def supervision_table(spec, forward_flops: float, train_flops: float, console: Console) -> None:
    """Deep supervision: segments, the halting head, and what a sample costs per segment and at most."""
    sup, h = spec.supervision, spec.supervision.halting
    t = Table(title=f"Deep supervision: up to {sup.segments} segments per sample, one optimizer step per segment")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    if h is None:
        t.add_row("halting", "none: every sample runs every segment")
    else:
        stops, _ = describe_rule(h.type, {"exploration": h.exploration, "weight": h.weight})
        t.add_row("halting", f"{h.type}: halt when {stops} ({sup.segments})")
        t.add_row("exploration (training)", f"p {h.exploration:g}: a minimum of 2..{sup.segments} segments")
        t.add_row("halting loss weight", f"{h.weight:g}")
    t.add_row("token loss", spec.objective.loss)
    # q_learning's continue target is one more forward of the segment, without gradient
    extra = forward_flops if h is not None and h.type == "q_learning" else 0.0
    t.add_row("forward FLOPs per row and segment", human(forward_flops))
    t.add_row("training FLOPs per row and segment", human(train_flops + extra))
    t.add_row(f"forward FLOPs per row, all {sup.segments} segments", human(forward_flops * sup.segments))
    console.print(t)


def step_table(G: nx.DiGraph, seq_len: int | None = None, console: Console | None = None) -> None:
    """The loop's steps (model.halting, objective.steps): the halting rule and what each step costs (attention
    at `seq_len`, by default the spec's training row length)."""
    console = console or Console()
    spec = G.graph["spec"]
    seq_len = seq_len or seq_len_and_source(spec)[0]
    h, rows = spec.model.halting, step_costs(G, seq_len)
    if h is None:
        console.print(f"Loss over the loop's {len(rows)} steps: {spec.objective.steps}")
    else:
        stops, trains = describe_rule(h.type, dict(h.values) or {"threshold": h.threshold, "weight": h.weight})
        console.print(f"[bold]Halting: {h.type}[/bold] ({HALTING[h.type].reference}), per position, at most "
                      f"{len(rows)} steps: a position stops when {stops}; training: {trains}")
    t = Table(title=f"Cost per step at sequence length {seq_len}")
    for col in ("step", "calls", "FLOPs/token", "FLOPs/token stopping here"):
        t.add_column(col, justify="left" if col == "calls" else "right")
    for r in rows:
        t.add_row(str(r["step"]), "; ".join(r["calls"]), human(r["flops"]), human(r["through"]))
    console.print(t)


def layer_table(body: Body, console: Console | None = None, modules: list[str] | None = None) -> None:
    """The ops of one call of a module as its body describes them: the first layer (the others repeat it)
    and the ops outside the layers, with what each reads and writes, its parameters and FLOPs."""
    console = console or Console()
    layers = 1 + max((int(o.name.split(".")[0]) for o in body.ops if o.name[0].isdigit()), default=-1)
    more = {0: "", 1: "", 2: "; layer 1 repeats layer 0"}.get(layers, f"; layers 1-{layers - 1} repeat layer 0")
    names = modules or [body.module]
    t = Table(title=f"{'Modules' if len(names) > 1 else 'Module'} {', '.join(names)}: the ops of a call{more}")
    for col in ("op", "kind", "reads", "writes", "parameters", "MFLOPs/token"):
        t.add_column(col, justify="right" if col in ("parameters", "MFLOPs/token") else "left")
    for o in body.ops:
        if o.name[0].isdigit() and not o.name.startswith("0."):
            continue
        what = o.program.name if o.kind == "row" else o.kind
        params = ", ".join(f"{p.path.rsplit('.', 1)[-1]} {'x'.join(map(str, p.shape))}" for p in o.params) or "-"
        t.add_row(o.name, what, ", ".join(o.reads), ", ".join(o.writes), params,
                  f"{o.flops / 1e6:.3f}" if o.flops else "-")
    console.print(t)


def traffic_table(G: nx.DiGraph, dtype_bytes: int = 2, console: Console | None = None) -> None:
    """Activation bytes per token of one forward pass, op by op vs the fusion pass's regions."""
    console = console or Console()
    plan = fuse_model(G, dtype_bytes)
    t = Table(title=f"Memory traffic per token, one forward pass ({dtype_bytes} B/elem; op by op vs fused regions)")
    t.add_column("kernel", no_wrap=True)
    t.add_column("fuses")
    t.add_column("runs", justify="right")
    t.add_column("op by op", justify="right")
    t.add_column("fused", justify="right")
    t.add_column("saved", justify="right")

    def pct(a: int, b: int) -> str:
        return f"{1 - b / a:.0%}" if a else "-"

    for r in plan.traffic:
        t.add_row(r.kernel, r.fuses, str(r.runs), human(r.op_bytes, "B"), human(r.fused_bytes, "B"),
                  pct(r.op_bytes, r.fused_bytes))
    op, fused, other = plan.op_bytes, plan.fused_bytes, plan.other_bytes
    t.add_row("[bold]row ops[/bold]", "", "", human(op, "B"), human(fused, "B"), pct(op, fused))
    t.add_row("matmuls + attention (activations, not fused)", "", "", human(other, "B"), human(other, "B"), "")
    t.add_row("[bold]total[/bold]", "", "", human(op + other, "B"), human(fused + other, "B"),
              pct(op + other, fused + other))
    console.print(t)


def duration(seconds: float) -> str:
    """0.000123 -> '123.0 us'."""
    for factor, unit in ((1.0, "s"), (1e-3, "ms")):
        if seconds >= factor:
            return f"{seconds / factor:.2f} {unit}"
    return f"{seconds / 1e-6:.1f} us"


def roofline_table(r: Roofline, console: Console | None = None) -> None:
    """Per kernel of a training step: FLOPs, bytes, intensity, bound and time on the roofline's GPU; the totals."""
    console = console or Console()
    g = r.gpu
    ridge = g.peak_flops(True, r.dtype_bytes) / g.bandwidth
    t = Table(title=f"Roofline on {g.name} ({g.bf16_tflops:g} TFLOP/s bf16 dense, {g.fp32_tflops:g} fp32, "
              f"{g.hbm_tbps:g} TB/s; ridge {ridge:.0f} FLOP/B): {r.batch} x {r.seq_len} tokens per step, "
              f"{r.dtype_bytes} B/elem")
    for col in ("kernel", "dir", "launches", "FLOPs", "bytes", "FLOP/B", "bound", "per launch", "per step", "share"):
        t.add_column(col, justify="left" if col in ("kernel", "dir", "bound") else "right",
                     no_wrap=col == "kernel")
    step = r.step_time
    for k in r.kernels:
        c = k.cost
        bound = "[red]memory[/red]" if k.bound == "memory" else "compute"
        t.add_row(c.name, c.direction, str(c.launches), human(c.flops), human(c.bytes, "B"),
                  f"{c.intensity:.1f}" if c.flops else "-", bound, duration(k.time), duration(k.step_time),
                  f"{k.step_time / step:.1%}")
    console.print(t)
    t = Table(title=f"Predicted step on {g.name} (peaks: a lower bound on time; source {g.source})")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("forward (every call)", duration(r.time("fwd")))
    t.add_row("backward (grad calls and the loss)", duration(r.time("bwd")))
    t.add_row("optimizer, gradient clip, EMA", duration(r.time("update")))
    t.add_row("[bold]training step[/bold]", f"[bold]{duration(step)}[/bold]")
    t.add_row("kernel launches (each costs a few us more, not counted)", f"{sum(k.cost.launches for k in r.kernels):,}")
    t.add_row("tokens per second", f"{r.tokens / step:,.0f}")
    t.add_row("model FLOPs per step (matmuls and attention)", human(r.model_flops))
    t.add_row("model FLOPs utilisation at this time", f"{r.mfu:.1%}")
    console.print(t)
