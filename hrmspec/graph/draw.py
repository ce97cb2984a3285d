"""Draw a ModelGraph's unrolled schedule as a PNG.

One box per module call, left to right in execution order, one row per module (the module with
the fewest calls, the slow one, on top). The embedding `x` and the state inits sit on the left,
the head on the right; arrows are the state edges, coloured by state. Grad-carrying calls (the
credit plan at the graph's progress) are filled in one colour, no-grad calls in another.

    from hrmspec.graph import build_graph
    from hrmspec.graph.draw import draw_schedule
    draw_schedule(build_graph(spec, progress=0.0), "schedule.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

GRAD_COLOR = "#e6550d"  # grad-carrying module call
NO_GRAD_COLOR = "#c6dbef"  # module call run under no-grad
IO_COLOR = "#f0f0f0"  # x, state inits, head
EDGE_COLORS = ("#08519c", "#238b45", "#6a51a3", "#b15928", "#525252", "#ce1256")

_BOX_W, _BOX_H = 0.72, 0.62  # in column / row units
_ROW_GAP = 1.7  # vertical distance between module rows


@dataclass(frozen=True)
class _Box:
    node: str
    x: float
    y: float
    label: str
    sub: str
    color: str


def node_colors(G: nx.DiGraph) -> dict[str, str]:
    """Fill colour of every module-call node: GRAD_COLOR or NO_GRAD_COLOR."""
    return {
        n: GRAD_COLOR if a["grad"] else NO_GRAD_COLOR for n, a in G.nodes(data=True) if a.get("op") == "module_call"
    }


def credit_label(G: nx.DiGraph) -> str:
    """The credit plan in a few words, e.g. 'credit depth 2 (2/8 calls carry gradient)'."""
    credit = G.graph["spec"].model.credit
    calls = [a for _, a in G.nodes(data=True) if a.get("op") == "module_call"]
    n_grad = sum(bool(a["grad"]) for a in calls)
    share = f"{n_grad}/{len(calls)} calls carry gradient"
    if credit.mode == "depth":
        return f"credit depth {G.graph['credit_depth']} ({share})"
    if credit.mode == "last":
        return f"credit: last {credit.last} ({share})"
    if credit.mode == "last_cycle":
        return f"credit: the last outer cycle ({share})"
    if credit.mode == "per_cycle":
        table = ", ".join(f"{m}={list(counts)}" for m, counts in credit.per_cycle)
        return f"credit per cycle {table} ({share})"
    return f"no credit plan: full backprop ({share})"


def _row_order(G: nx.DiGraph, calls: Sequence[str]) -> list[str]:
    """Modules top to bottom: fewest calls first (the slow module above the fast one)."""
    counts: dict[str, int] = {}
    for n in calls:
        counts[G.nodes[n]["module"]] = counts.get(G.nodes[n]["module"], 0) + 1
    first = {m: i for i, m in enumerate(counts)}
    return sorted(counts, key=lambda m: (counts[m], -first[m]))


def _layout(G: nx.DiGraph) -> tuple[list[_Box], dict[str, float], int]:
    calls = sorted((n for n, a in G.nodes(data=True) if a.get("op") == "module_call"), key=lambda n: G.nodes[n]["step"])
    rows = _row_order(G, calls)
    row_y = {m: -_ROW_GAP * i for i, m in enumerate(rows)}
    # a state lives in the row of the module that writes it
    owner = {G.nodes[n]["target"]: G.nodes[n]["module"] for n in calls}
    mid = sum(row_y.values()) / max(1, len(row_y))
    colors = node_colors(G)
    boxes = []
    for col, n in enumerate(calls, start=1):
        a = G.nodes[n]
        cycle = ",".join(str(c) for c in a["cycle"])  # iteration of each enclosing repeat
        sub = f"#{a['step']}  c{cycle}" if cycle else f"#{a['step']}"
        boxes.append(_Box(n, col, row_y[a["module"]], a["module"], sub, colors[n]))

    sources = []
    for n, a in G.nodes(data=True):
        if a.get("op") == "embed":
            embedded = [s.name for s in G.graph["spec"].model.states if s.init == "embed"]
            y = row_y[owner[embedded[0]]] if embedded and embedded[0] in owner else mid
            sources.append((y, n, "x", "embed"))
        elif a.get("op") == "state_init":
            y = row_y.get(owner.get(a["state"], ""), mid)
            sources.append((y, n, a["state"], a["init"]))
    sources.sort(key=lambda s: -s[0])
    used: list[float] = []
    for y, n, label, sub in sources:
        while any(abs(y - u) < _BOX_H * 1.2 for u in used):
            y -= _BOX_H * 1.3  # two sources for one row: stack them
        used.append(y)
        boxes.append(_Box(n, 0, y, label, sub, IO_COLOR))

    if "head" in G:
        out = G.graph["spec"].model.output
        boxes.append(_Box("head", len(calls) + 1, row_y.get(owner.get(out, ""), mid), "head", "→ loss", IO_COLOR))
    return boxes, row_y, len(calls)


def _edge_style(src: _Box, dst: _Box, row_boxes: dict[float, list[float]]) -> str:
    """Straight when nothing is in the way, else an arc over (top row) or under the boxes between."""
    if src.y != dst.y or dst.x - src.x <= 1:
        return "arc3,rad=0"
    between = [x for x in row_boxes.get(src.y, []) if src.x < x < dst.x]
    if not between:
        return "arc3,rad=0"
    rad = min(0.45, 1.1 / (dst.x - src.x))
    top = src.y == max(row_boxes)
    return f"arc3,rad={-rad if top else rad}"


def _draw_cycle_bands(ax, G: nx.DiGraph, boxes: list[_Box], top: float) -> None:
    """Shade the iterations of the outermost repeat."""
    cycles: dict[int, list[float]] = {}
    for b in boxes:
        a = G.nodes[b.node]
        if a.get("op") == "module_call" and a["cycle"]:
            cycles.setdefault(a["cycle"][0], []).append(b.x)
    if len(cycles) < 2:
        return
    for i, xs in sorted(cycles.items()):
        lo, hi = min(xs) - 0.45, max(xs) + 0.45
        ax.axvspan(lo, hi, color="#fafafa" if i % 2 else "#eeeeee", zorder=0, lw=0)
        ax.text((lo + hi) / 2, top, f"cycle {i}", ha="center", va="center", fontsize=8, color="#636363")


def _draw_boxes(ax, boxes: list[_Box], small: bool) -> dict[str, FancyBboxPatch]:
    patches = {}
    style = {"ha": "center", "va": "center", "zorder": 4}
    for b in boxes:
        corner = (b.x - _BOX_W / 2, b.y - _BOX_H / 2)
        patches[b.node] = p = FancyBboxPatch(
            corner, _BOX_W, _BOX_H, boxstyle="round,pad=0.02,rounding_size=0.08", fc=b.color, ec="#252525", zorder=3
        )
        ax.add_patch(p)
        ax.text(b.x, b.y + 0.09, b.label, fontsize=9 if small else 11, weight="bold", **style)
        ax.text(b.x, b.y - 0.17, b.sub, fontsize=6 if small else 7.5, **style)
    return patches


def _draw_edges(ax, G: nx.DiGraph, boxes: list[_Box], patches: dict[str, FancyBboxPatch]) -> dict[str, str]:
    """One arrow per state edge, coloured by state; returns state -> colour."""
    by_node = {b.node: b for b in boxes}
    row_boxes: dict[float, list[float]] = {}
    for b in boxes:
        row_boxes.setdefault(b.y, []).append(b.x)
    states = sorted({a["state"] for _, _, a in G.edges(data=True) if "state" in a})
    state_color = {s: EDGE_COLORS[i % len(EDGE_COLORS)] for i, s in enumerate(states)}
    for u, v, a in G.edges(data=True):
        if "state" not in a or u not in by_node or v not in by_node:
            continue
        src, dst = by_node[u], by_node[v]
        arrow = FancyArrowPatch(
            posA=(src.x, src.y),
            posB=(dst.x, dst.y),
            patchA=patches[u],
            patchB=patches[v],
            connectionstyle=_edge_style(src, dst, row_boxes),
            arrowstyle="-|>",
            mutation_scale=9,
            color=state_color[a["state"]],
            lw=0.9,
            alpha=0.85,
            shrinkA=1,
            shrinkB=1,
            zorder=2,
        )
        ax.add_patch(arrow)
    return state_color


def draw_schedule(G: nx.DiGraph, path: str | Path, dpi: int = 110) -> Path:
    """Write the unrolled schedule of `G` (a ModelGraph) as a PNG to `path`; returns the path."""
    boxes, row_y, n_calls = _layout(G)
    cols = n_calls + 2  # the sources, the calls, the head
    col_in = 1.05 if n_calls <= 12 else 0.78  # inches per column
    ys = [b.y for b in boxes]
    height_units = max(ys) - min(ys) + 2.6
    # the Agg canvas directly, not pyplot: no global backend state, no windows
    fig = Figure(figsize=(max(7.5, cols * col_in + 0.6), 1.2 + height_units * 0.95), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.01, 0.02, 0.98, 0.80))
    ax.set_xlim(-0.62, cols - 0.4)
    ax.set_ylim(min(ys) - 1.0, max(ys) + 1.15)
    ax.axis("off")

    _draw_cycle_bands(ax, G, boxes, top=max(ys) + 0.85)
    patches = _draw_boxes(ax, boxes, small=n_calls > 16)
    state_color = _draw_edges(ax, G, boxes, patches)
    for m, y in row_y.items():
        ax.text(-0.5, y, f"module {m}", fontsize=8, color="#525252", ha="center", va="center", rotation=90)

    name = G.graph["spec"].name
    fig.suptitle(f"{name}: unrolled schedule, {n_calls} module calls", fontsize=12, y=0.985)
    subtitle = f"progress {G.graph['progress']:.2f}  ·  {credit_label(G)}"
    fig.text(0.5, 0.895, subtitle, ha="center", fontsize=10)
    handles = [
        Patch(fc=GRAD_COLOR, ec="#252525", label="grad-carrying call"),
        Patch(fc=NO_GRAD_COLOR, ec="#252525", label="no-grad call"),
    ] + [Line2D([], [], color=c, lw=1.5, label=f"state {s}") for s, c in state_color.items()]
    fig.legend(
        handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.80)
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out
