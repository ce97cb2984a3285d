"""Draw a ModelGraph's unrolled schedule as a PNG.

One box per module call, left to right in execution order, one row per module (the module with
the fewest calls, the slow one, on top). The state inits sit on the left of their module's row, the
input `x` in a row of its own at the bottom, the head on the right; arrows are the state edges,
coloured by state. Grad-carrying calls (the credit plan at the graph's progress) are filled in one
colour, no-grad calls in another. A spec that halts has a row of halting heads: a step rule's
(ACT, exit gate, ponder) after each step of the loop, reading the output state there; a segment
rule's (q_learning, bce) after the segment. `schedule_layout` is what is drawn, as data.

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

from hrmspec.graph.layout import loop_layout
from hrmspec.halting import HALTING
from hrmspec.spec.grammar import INPUT

GRAD_COLOR = "#e6550d"  # grad-carrying module call
NO_GRAD_COLOR = "#c6dbef"  # module call run under no-grad
IO_COLOR = "#f0f0f0"  # state inits, head
INPUT_COLOR = "#fff7bc"  # the input x
HALTING_COLOR = "#d9f0a3"  # a halting head (exit gate, ACT, ponder, Q head)
EDGE_COLORS = ("#08519c", "#238b45", "#6a51a3", "#b15928", "#525252", "#ce1256")

_BOX_W, _BOX_H = 0.72, 0.62  # in column / row units
_ROW_GAP = 1.7  # vertical distance between module rows


@dataclass(frozen=True)
class Box:
    node: str  # the graph's node, or "halt:<i>" for a halting head (no node of its own)
    x: float
    y: float
    label: str
    sub: str
    color: str
    kind: str = "call"  # call | input | init | head | halting


@dataclass(frozen=True)
class Arrow:
    src: str
    dst: str
    state: str  # the tensor that flows, for its colour


@dataclass(frozen=True)
class ScheduleLayout:
    """What `draw_schedule` draws, before any drawing: boxes at (column, row y), the arrows between them,
    and the label of each row (module rows, then the halting heads' and the inputs' rows)."""

    boxes: tuple[Box, ...]
    arrows: tuple[Arrow, ...]
    rows: dict[str, float]  # row label -> y
    calls: int
    halting: str | None = None  # the halting rule whose heads are drawn (hrmspec/halting.py)

    def kind(self, kind: str) -> list[Box]:
        return [b for b in self.boxes if b.kind == kind]


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


def schedule_layout(G: nx.DiGraph) -> ScheduleLayout:
    """Lay out the unrolled schedule of `G`: a row per module (the slow one on top), a row for the halting
    heads when the spec halts (a step rule's head after every step of the loop, where it reads the output
    state; a segment rule's beside the LM head), and a row for the input x, drawn as an input."""
    spec = G.graph["spec"]
    model = spec.model
    calls = sorted((n for n, a in G.nodes(data=True) if a.get("op") == "module_call"), key=lambda n: G.nodes[n]["step"])
    modules = _row_order(G, calls)
    row_y = {f"module {m}": -_ROW_GAP * i for i, m in enumerate(modules)}
    bottom = -_ROW_GAP * len(modules)
    halting = model.halting.type if model.halting is not None else \
        spec.supervision.halting.type if spec.supervision is not None and spec.supervision.halting is not None else None
    if halting is not None:
        row_y["halting"], bottom = bottom, bottom - _ROW_GAP
    row_y["input"] = bottom
    # a state lives in the row of the module that writes it
    owner = {G.nodes[n]["target"]: G.nodes[n]["module"] for n in calls}
    colors = node_colors(G)
    boxes, column = [], {}
    for col, n in enumerate(calls, start=1):
        a = G.nodes[n]
        cycle = ",".join(str(c) for c in a["cycle"])  # iteration of each enclosing repeat
        sub = f"#{a['step']}  c{cycle}" if cycle else f"#{a['step']}"
        boxes.append(Box(n, col, row_y[f"module {a['module']}"], a["module"], sub, colors[n]))
        column[a["step"]] = col

    mid = sum(row_y[f"module {m}"] for m in modules) / max(1, len(modules))
    sources = []
    for n, a in G.nodes(data=True):
        if a.get("op") == "state_init":
            sources.append((row_y.get(f"module {owner.get(a['state'], '')}", mid), n, a["state"], a["init"]))
    sources.sort(key=lambda s: -s[0])
    used: list[float] = [row_y["input"]] if "x" in G else []  # the input's place, below
    for y, n, label, sub in sources:
        while any(abs(y - u) < _BOX_H * 1.2 for u in used):
            y -= _BOX_H * 1.3  # two sources for one row: stack them
        used.append(y)
        boxes.append(Box(n, 0, y, label, sub, IO_COLOR, "init"))
    if "x" in G:
        embedded = [s.name for s in model.states if s.init == "embed"]
        sub = "input" + (f", inits {', '.join(embedded)}" if embedded else "")
        boxes.append(Box("x", 0, row_y["input"], "x", sub, INPUT_COLOR, "input"))
    # an edge from x carries the input, though x also starts the states initialised from the embedding
    arrows = [Arrow(u, v, INPUT if u == "x" and INPUT in G.nodes[v].get("inputs", ()) else a["state"])
              for u, v, a in G.edges(data=True) if "state" in a]

    if "head" in G:
        y = row_y.get(f"module {owner.get(model.output, '')}", mid)
        boxes.append(Box("head", len(calls) + 1, y, "head", "→ loss", IO_COLOR, "head"))
    if halting is not None:
        heads = _halting_heads(G, halting, column, row_y["halting"], len(calls))
        boxes += heads
        arrows += [Arrow(_reader(G, b.x), b.node, model.output) for b in heads]
    return ScheduleLayout(tuple(boxes), tuple(arrows), row_y, len(calls), halting)


def _halting_heads(G: nx.DiGraph, rule: str, column: dict[int, int], y: float, n_calls: int) -> list[Box]:
    """A step rule's head after each step of the loop, under the step's last call; a segment rule's after the
    segment, beside the LM head."""
    kind = HALTING[rule]
    if kind.scope == "segment":
        return [Box("halt:segment", n_calls + 1, y, kind.head, f"{rule} · segment", HALTING_COLOR, "halting")]
    steps = loop_layout(G.graph["calls"]).steps
    return [Box(f"halt:{t}", column[step[-1].index], y, kind.head, f"{rule} · step {t + 1}", HALTING_COLOR,
                "halting") for t, step in enumerate(steps)]


def _reader(G: nx.DiGraph, column: float) -> str:
    """The node whose output state a halting head in `column` reads: the output's last write up to the call of
    that column (call i is in column i + 1; a segment's head, past every call, reads the final one)."""
    model = G.graph["spec"].model
    embedded = any(s.name == model.output and s.init == "embed" for s in model.states)
    source = "x" if embedded else f"init:{model.output}"
    for call in G.graph["calls"]:
        if call.index + 1 <= column and call.target == model.output:
            source = f"call:{call.index}"
    return source


def _edge_style(src: Box, dst: Box, row_boxes: dict[float, list[float]]) -> str:
    """Straight when nothing is in the way, else an arc over (top row) or under the boxes between."""
    if src.y != dst.y or dst.x - src.x <= 1:
        return "arc3,rad=0"
    between = [x for x in row_boxes.get(src.y, []) if src.x < x < dst.x]
    if not between:
        return "arc3,rad=0"
    rad = min(0.45, 1.1 / (dst.x - src.x))
    top = src.y == max(row_boxes)
    return f"arc3,rad={-rad if top else rad}"


def _draw_cycle_bands(ax, G: nx.DiGraph, boxes: list[Box], top: float) -> None:
    """Shade the iterations of the outermost repeat."""
    cycles: dict[int, list[float]] = {}
    for b in boxes:
        a = G.nodes[b.node] if b.kind == "call" else {}
        if a.get("op") == "module_call" and a["cycle"]:
            cycles.setdefault(a["cycle"][0], []).append(b.x)
    if len(cycles) < 2:
        return
    for i, xs in sorted(cycles.items()):
        lo, hi = min(xs) - 0.45, max(xs) + 0.45
        ax.axvspan(lo, hi, color="#fafafa" if i % 2 else "#eeeeee", zorder=0, lw=0)
        ax.text((lo + hi) / 2, top, f"cycle {i}", ha="center", va="center", fontsize=8, color="#636363")


def _draw_boxes(ax, boxes: tuple[Box, ...], small: bool) -> dict[str, FancyBboxPatch]:
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


def _draw_edges(ax, layout: ScheduleLayout, patches: dict[str, FancyBboxPatch]) -> dict[str, str]:
    """One arrow per state edge, coloured by state; returns state -> colour."""
    by_node = {b.node: b for b in layout.boxes}
    row_boxes: dict[float, list[float]] = {}
    for b in layout.boxes:
        row_boxes.setdefault(b.y, []).append(b.x)
    states = sorted({a.state for a in layout.arrows})
    state_color = {s: EDGE_COLORS[i % len(EDGE_COLORS)] for i, s in enumerate(states)}
    for a in layout.arrows:
        if a.src not in by_node or a.dst not in by_node:
            continue
        src, dst = by_node[a.src], by_node[a.dst]
        arrow = FancyArrowPatch(
            posA=(src.x, src.y),
            posB=(dst.x, dst.y),
            patchA=patches[a.src],
            patchB=patches[a.dst],
            connectionstyle=_edge_style(src, dst, row_boxes),
            arrowstyle="-|>",
            mutation_scale=9,
            color=state_color[a.state],
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
    layout = schedule_layout(G)
    boxes, n_calls = layout.boxes, layout.calls
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
    state_color = _draw_edges(ax, layout, patches)
    for label, y in layout.rows.items():
        ax.text(-0.5, y, label, fontsize=8, color="#525252", ha="center", va="center", rotation=90)

    name = G.graph["spec"].name
    fig.suptitle(f"{name}: unrolled schedule, {n_calls} module calls", fontsize=12, y=0.985)
    subtitle = f"progress {G.graph['progress']:.2f}  ·  {credit_label(G)}"
    fig.text(0.5, 0.895, subtitle, ha="center", fontsize=10)
    handles = [
        Patch(fc=GRAD_COLOR, ec="#252525", label="grad-carrying call"),
        Patch(fc=NO_GRAD_COLOR, ec="#252525", label="no-grad call"),
        Patch(fc=INPUT_COLOR, ec="#252525", label="input"),
    ]
    if layout.halting is not None:
        handles.append(Patch(fc=HALTING_COLOR, ec="#252525", label=f"halting head ({layout.halting})"))
    handles += [Line2D([], [], color=c, lw=1.5, label=f"input {s}" if s == INPUT else f"state {s}")
                for s, c in state_color.items()]
    fig.legend(
        handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.80)
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out
