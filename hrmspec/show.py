"""`hrmspec show`: the unrolled graph, parameters, FLOPs and memory as tables."""

from __future__ import annotations

import networkx as nx
from rich.console import Console
from rich.table import Table

from hrmspec.graph.analysis import analyse, human
from hrmspec.graph.credit import credit_table


def show(G: nx.DiGraph, seq_len: int = 2048, dtype_bytes: int = 2, console: Console | None = None) -> None:
    console = console or Console()
    spec = G.graph["spec"]
    st = analyse(G, seq_len=seq_len, dtype_bytes=dtype_bytes)
    m = spec.model
    console.print(
        f"[bold]{spec.name}[/bold]  ({spec.source})  d_model {m.d_model}, {m.heads} heads x {m.head_dim}, "
        f"vocab {m.vocab}, head {m.head}, objective {spec.objective.type}"
    )

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
    t.add_row("training-step FLOPs (grad calls 3x, no-grad 1x)", human(st.train_flops_per_token))
    t.add_row(f"activation memory ({dtype_bytes} B/elem, grad calls)", human(st.activation_bytes_per_token, "B"))
    t.add_row(f"activation memory for one {seq_len}-token row", human(st.activation_bytes_per_token * seq_len, "B"))
    console.print(t)
