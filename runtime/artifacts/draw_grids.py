"""Look, don't read: the grid a model predicts after each segment of deep supervision, drawn.

`segment_grids(model, batch)` runs `Supervisor.solve` with every segment (`all_segments=True`) and keeps,
per row, one record per segment: its argmax grid, its q_halt logit, sigmoid(q_halt) and whether the
halting head says halt there (q_learning: q_halt > q_continue, bce: q_halt > 0; without a head a row
halts at the last segment). `grid_figure(records, kind, side, ...)` draws one row's records, one panel per
segment after the input puzzle's panel:

    cells      coloured per token: Sudoku givens shaded and digits written; n_queens' queens gold;
               mazes' walls dark, start green, goal red, path blue; ARC in the standard ARC palette
               (0 black, 1 blue, 2 red, 3 green, 4 yellow, 5 grey, 6 magenta, 7 orange, 8 light blue,
               9 maroon), its EOS border light grey, padding white
    changed    the cells that differ from the previous segment, outlined (gid "changed")
    wrong      with the label known, the labelled cells that differ from it, hatched (gid "wrong")
    title      the segment, sigmoid(q_halt) and what the head says (halt / go on)

`kind` is a reasoning-gym grid task (`grids.GRID_TASKS`: mini_sudoku, sudoku, n_queens, maze: tokens
mean the task's `symbols`) or an official dataset's kind (runtime/evaluate/puzzles.py `kind_of`:
sudoku '?.123456789' and maze '?# SGo' share the tokens of the tasks of those names; arc: a square
canvas (30 x 30, 900 tokens, officially), colour c as c + 2, each grid cropped to its corner rectangle,
`arc_grids.crop`); any other kind draws token numbers in a generic palette. An ARC figure shows the
test input as its first panel, beside the attempts; the attempts share one window: the largest of the
label's and the predictions' grids, with room for the EOS border. `save_figure` (plot.py's) writes a figure
(png, svg, pdf, ... by the suffix) atomically.
Matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from hrmspec.errors import HrmspecError
from hrmspec.runtime.artifacts import arc_grids
from hrmspec.runtime.artifacts import checkpoint as ckpt
from hrmspec.runtime.artifacts.grids import GRID_TASKS
from hrmspec.runtime.artifacts.plot import image_format, save_figure
from hrmspec.runtime.execution.losses import IGNORE_INDEX
from hrmspec.runtime.execution.supervision import Supervisor
from hrmspec.spec.load import load_spec

# the standard ARC palette, colours 0-9
ARC_PALETTE = ("#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00", "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF",
               "#870C25")
ARC_BORDER = "#D0D0D0"  # the EOS border of an ARC grid
PAD_COLOUR = "#FFFFFF"
# per kind: token -> (face colour, text colour); the text is the token's symbol
SUDOKU = {0: "#F2F2F2", 1: "#FFFFFF"}  # pad, empty; digits white (givens shaded: GIVEN)
GIVEN = "#E4E4E4"
QUEENS = {0: "#F2F2F2", 1: "#FFFFFF", 2: "#FFDC00"}
MAZE = {0: "#F2F2F2", 1: "#333333", 2: "#FFFFFF", 3: "#2ECC40", 4: "#FF4136", 5: "#7FDBFF"}
GENERIC = ("#FFFFFF", "#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2", "#7F7F7F",
           "#BCBD22", "#17BECF")
CHANGED = "#FF00FF"  # the outline of a cell that changed since the previous segment
WRONG = "#E00000"  # the hatch of a cell that differs from the label
COLUMNS = 6  # panels per row of a figure
PANEL = 2.1  # inches per panel


@torch.no_grad()
def segment_grids(model, batch: dict[str, torch.Tensor]) -> list[list[dict]]:
    """Per row of `batch` (input_ids, puzzle_ids; labels unused), one record per segment, every segment run:
    {"segment", "grid" (the argmax tokens, a list), "q_halt" (the logit, None without a halting head), "q"
    (sigmoid(q_halt), or None), "halts" (whether the head says halt after this segment; without a head: at the
    last segment)}."""
    sup = Supervisor(model)
    B = batch["input_ids"].shape[0]
    rows: list[list[dict]] = [[] for _ in range(B)]
    last = sup.spec.segments
    seen: dict[str, torch.Tensor] = {}
    q_logits = sup.q_logits

    def keep_q_continue(out, steps):  # on_segment sees q_halt only; the halting rule reads q_continue too
        q_halt, q_continue = q_logits(out, steps)
        seen["q_continue"] = q_continue
        return q_halt, q_continue

    sup.q_logits = keep_q_continue

    def on_segment(segment: int, running: torch.Tensor, logits: torch.Tensor, q_halt: torch.Tensor | None) -> None:
        grids = logits.argmax(-1).tolist()
        if q_halt is None:
            qs, halts = [None] * len(grids), [segment == last] * len(grids)
        else:
            qs = q_halt.float().tolist()
            halts = sup.says_halt(q_halt, seen["q_continue"]).tolist()
        for r, grid, q, halt in zip(running.tolist(), grids, qs, halts):
            rows[r].append({"segment": segment, "grid": grid, "q_halt": q,
                            "q": None if q is None else 1.0 / (1.0 + math.exp(-q)), "halts": bool(halt)})

    was_training = model.training
    model.eval()
    try:
        sup.solve(batch, all_segments=True, on_segment=on_segment)
    finally:
        model.train(was_training)
    return rows


# ---------------------------------------------------------------------------------- drawing


def _symbols(kind: str | None) -> str | None:
    """The characters of tokens 0, 1, ... of `kind` ('?' padding), None for ARC or an unknown kind."""
    if kind in GRID_TASKS:
        chars = "?" + GRID_TASKS[kind].symbols
        return chars.replace(".", " ", 1) if kind in ("sudoku", "mini_sudoku") else chars
    return None


def _cell(kind: str | None, token: int, given: bool) -> tuple[str, str]:
    """(face colour, text) of a cell holding `token`."""
    if kind == "arc":
        if arc_grids.COLOUR_OFFSET <= token < arc_grids.VOCAB:
            return ARC_PALETTE[token - arc_grids.COLOUR_OFFSET], ""
        return (ARC_BORDER if token == arc_grids.EOS else PAD_COLOUR), ""
    chars = _symbols(kind)
    if chars is None:
        return GENERIC[token % len(GENERIC)] if token >= 0 else PAD_COLOUR, str(token)
    text = chars[token] if 0 <= token < len(chars) else str(token)
    if kind in ("sudoku", "mini_sudoku"):
        return (GIVEN if given else SUDOKU.get(token, "#FFFFFF")), text.strip("?")
    if kind == "n_queens":
        return QUEENS.get(token, "#FFFFFF"), "Q" if token == 2 else ""
    if kind == "maze":
        return MAZE.get(token, "#FFFFFF"), text if text in "SG" else ""
    return "#FFFFFF", text


def _canvas(tokens) -> np.ndarray:
    """An ARC row (side * side tokens: 900 officially) as its square canvas; a label's IGNORE_INDEX as PAD."""
    flat = np.asarray(tokens, dtype=np.int64).reshape(-1)
    side = math.isqrt(flat.size)
    return np.where(flat < 0, arc_grids.PAD, flat).reshape(side, side)


def _arc_grid(tokens, shape: tuple[int, int] | None = None) -> np.ndarray:
    """An ARC row as its canvas cut to `shape` (default: its cropped grid); a label keeps IGNORE_INDEX."""
    grid = np.asarray(tokens, dtype=np.int64).reshape(_canvas(tokens).shape)
    if shape is None:
        shape = arc_grids.crop(_canvas(tokens)).shape
    return grid[:shape[0], :shape[1]]


def _arc_window(records: list[dict], label) -> tuple[int, int]:
    """The attempts' shared window: the largest grid among the label's and the predictions', with its EOS
    border (within the canvas)."""
    canvases = [_canvas(r["grid"]) for r in records] + ([_canvas(label)] if label is not None else [])
    shapes = [arc_grids.crop(c).shape for c in canvases]
    side = canvases[0].shape[0]
    h, w = max(s[0] for s in shapes), max(s[1] for s in shapes)
    if not h or not w:
        return min(3, side), min(3, side)  # no grid in any of them: the corner, drawn as it is
    return min(h + 1, side), min(w + 1, side)


def _panel(ax, grid: np.ndarray, kind: str | None, puzzle: np.ndarray | None, previous: np.ndarray | None,
           label: np.ndarray | None) -> dict[str, int]:
    """Draw one grid (H, W tokens) on `ax`; (the cells outlined as changed, hatched as wrong)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    h, w = grid.shape
    faces, texts = [], []
    for r in range(h):
        for c in range(w):
            given = puzzle is not None and kind in ("sudoku", "mini_sudoku") and int(puzzle[r, c]) > 1
            face, text = _cell(kind, int(grid[r, c]), given)
            faces.append(face)
            if text and max(h, w) <= 12:
                texts.append((c, r, text))
    cells = PatchCollection([Rectangle((c, r), 1, 1) for r in range(h) for c in range(w)], facecolors=faces,
                            edgecolors="#BBBBBB", linewidths=0.4)
    cells.set_gid("cells")
    ax.add_collection(cells)
    size = max(4.0, 70.0 / max(h, w))
    for c, r, text in texts:
        ax.text(c + 0.5, r + 0.5, text, ha="center", va="center", fontsize=size,
                color="#000000" if kind != "maze" or text not in "SG" else "#FFFFFF")
    if kind in ("sudoku", "mini_sudoku"):  # the boxes
        box = math.isqrt(w)
        for k in range(0, w + 1, box):
            ax.plot([k, k], [0, h], color="#000000", linewidth=1.0)
            ax.plot([0, w], [k, k], color="#000000", linewidth=1.0)
    counts = {"changed": 0, "wrong": 0}
    if previous is not None:
        for r, c in zip(*np.nonzero(previous != grid)):
            ax.add_patch(Rectangle((c + 0.06, r + 0.06), 0.88, 0.88, fill=False, edgecolor=CHANGED,
                                   linewidth=1.6, gid="changed"))
            counts["changed"] += 1
    if label is not None:
        for r, c in zip(*np.nonzero((label != IGNORE_INDEX) & (label != grid))):
            ax.add_patch(Rectangle((c, r), 1, 1, fill=False, hatch="xxx", edgecolor=WRONG, linewidth=0,
                                   gid="wrong"))
            counts["wrong"] += 1
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return counts


def _q_text(rec: dict) -> str:
    say = "halt" if rec["halts"] else "go on"
    if rec.get("q") is None:
        return f"segment {rec['segment']}: {say}"
    return f"segment {rec['segment']}\nq {rec['q']:.3f}: {say}"


def grid_figure(records: list[dict], kind: str | None, side: int, label=None, puzzle=None,
                title: str | None = None):
    """One row's `segment_grids` records drawn: the input `puzzle` (tokens) as the first panel, then one panel
    per segment (see the module docstring); `label` (tokens, IGNORE_INDEX where unlabelled) marks the wrong
    cells. A matplotlib Figure on the Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not records:
        raise ValueError("no segments to draw")
    n = len(records) + 1
    cols = min(n, COLUMNS)
    lines = math.ceil(n / cols)
    fig = Figure(figsize=(PANEL * cols, PANEL * lines + 0.9 + 0.3 * lines))
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(lines, cols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.remove()
    axes = axes[:n]
    if kind == "arc":
        window = _arc_window(records, label)
        shown_puzzle = _arc_grid(puzzle) if puzzle is not None else None
        grids = [_arc_grid(r["grid"], window) for r in records]
        lab = _arc_grid(label, window) if label is not None else None
        template = None
    else:
        def square(tokens):
            return np.asarray(tokens, dtype=np.int64)[: side * side].reshape(side, side)

        shown_puzzle = square(puzzle) if puzzle is not None else None
        grids = [square(r["grid"]) for r in records]
        lab = square(label) if label is not None else None
        template = shown_puzzle
    axes[0].set_title("test input" if kind == "arc" else "input", fontsize=9)
    if shown_puzzle is not None and shown_puzzle.size:
        _panel(axes[0], shown_puzzle, kind, shown_puzzle, None, None)
    else:
        axes[0].set_axis_off()
    wrong = 0
    for i, (ax, rec, grid) in enumerate(zip(axes[1:], records, grids)):
        counts = _panel(ax, grid, kind, template, grids[i - 1] if i else None, lab)
        wrong = counts["wrong"]
        ax.set_title(_q_text(rec), fontsize=9, color="#B00000" if rec["halts"] else "#000000")
    heading = [title] if title else []
    if lab is not None:
        verdict = "every labelled cell right" if not wrong else f"{wrong} cell{'s' * (wrong != 1)} wrong"
        heading.append(f"after segment {records[-1]['segment']}: {verdict}")
    heading.append("outlined: changed since the previous segment" + ("; hatched: wrong" if lab is not None else ""))
    fig.suptitle("\n".join(heading), fontsize=9)
    fig.tight_layout()
    return fig


def check_grid_run(run_dir: str | Path, option: str) -> None:
    """One line (HrmspecError) unless the newest checkpoint of `run_dir` is a grid run's: what `option` needs."""
    spec = ckpt.read_latest(run_dir, lambda last: load_spec(last / "spec.yaml"),
                            missing=f"no checkpoint in {run_dir}/checkpoints: train first")
    if spec.objective.type != "grid":
        raise HrmspecError(f"{option} draws a grid puzzle's segments; {run_dir} trained {spec.objective.type}, "
                           "not a grid run")


__all__ = ["ARC_PALETTE", "check_grid_run", "grid_figure", "image_format", "save_figure", "segment_grids"]
