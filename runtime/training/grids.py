"""Puzzles laid out as fixed grids, for the `grid` objective: every cell is an input token and has a label.

A grid of n x n cells becomes a row of n² tokens, read row by row, in HRM's layout:

    0       padding (never a cell)
    1       an empty cell of the puzzle
    1 + v   a cell holding the value v (1 .. n)

The label of every cell is the solution's token, so a model fills the blanks and copies the
givens; a puzzle counts as solved when every cell is right (exact-grid accuracy).

Puzzles come from reasoning-gym (`mini_sudoku`: 4 x 4, `sudoku`: 9 x 9; each entry's metadata holds
the puzzle and its solution). Training puzzles may be multiplied by HRM's Sudoku augmentations —
a permutation of the values, of the bands and of the rows within each band, of the stacks and of the
columns within each, and a transpose: each maps a valid solution to a valid solution. Held-out
puzzles come from other seeds, and any that also occurs among the training grids (augmented ones
included) is dropped.

    data:
      grids: [mini_sudoku]         # or {mini_sudoku: {config: {...}}}
      size: 2000                   # training puzzles (before augmentation)
      augment: 4                   # augmented copies of each training puzzle (0: none)
      eval_size: 200
      seed: 0
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hrmspec.runtime.training.data import EVAL_SEED_OFFSET, DataError, _close, config_from_dict

PAD, EMPTY = 0, 1
GRID_TASKS = {  # reasoning-gym task -> side of its grid
    "mini_sudoku": 4,
    "sudoku": 9,
}


@dataclass
class GridConfig:
    grids: Any = None  # list of task names, or mapping name -> {config: {...}}
    size: int = 1000
    augment: int = 0
    eval_size: int = 200
    seed: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, where: str = "data") -> GridConfig:
        cfg = config_from_dict(cls, d, where, " for grid data")
        for name, lo in (("size", 1), ("augment", 0), ("eval_size", 0), ("seed", 0)):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise DataError(f"{where}.{name}: expected an integer >= {lo}, got {v!r}")
        cfg.tasks()  # names checked here
        return cfg

    def tasks(self) -> dict[str, dict]:
        """Task name -> reasoning-gym config."""
        raw = self.grids
        if raw is None:
            raise DataError(f"data.grids: the grid objective needs grid tasks, e.g. grids: [mini_sudoku]; "
                            f"known: {', '.join(GRID_TASKS)}")
        items = raw.items() if isinstance(raw, Mapping) else ((name, {}) for name in raw)
        out = {}
        for name, opts in items:
            if name not in GRID_TASKS:
                raise DataError(f"data.grids: unknown grid task {name!r}{_close(str(name), GRID_TASKS)}; "
                                f"known: {', '.join(GRID_TASKS)}")
            opts = dict(opts or {})
            unknown = set(opts) - {"config"}
            if unknown:
                raise DataError(f"data.grids.{name}: unknown key {sorted(unknown)[0]!r}; known: config")
            out[name] = dict(opts.get("config") or {})
        if len({GRID_TASKS[n] for n in out}) > 1:
            raise DataError("data.grids: every grid task of a run must have one size (one row length)")
        return out

    @property
    def side(self) -> int:
        return GRID_TASKS[next(iter(self.tasks()))]


def encode(grid: list[list[int]]) -> list[int]:
    """Cells row by row: 1 for an empty cell (0 in reasoning-gym), 1 + v for a value v."""
    return [EMPTY + v for row in grid for v in row]


def vocab_size(side: int) -> int:
    return EMPTY + side + 1  # padding, empty, the values 1..side


@dataclass
class GridRows:
    """Grids as rows: what `packing.Batches` serves (`len`, `batch(index)`)."""

    inputs: torch.Tensor  # (N, S) long
    labels: torch.Tensor  # (N, S) long
    puzzle_ids: torch.Tensor  # (N,) long
    side: int
    tasks: list[str]

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.inputs[index], "labels": self.labels[index], "puzzle_ids": self.puzzle_ids[index]}

    def pairs(self):
        """(puzzle, solution) token lists."""
        return zip(self.inputs.tolist(), self.labels.tolist())


def _puzzles(name: str, config: dict, size: int, seed: int) -> list[tuple[list[int], list[int]]]:
    import reasoning_gym  # its task registry loads on first use

    try:
        ds = reasoning_gym.create_dataset(name, seed=seed, size=size, **config)
    except (TypeError, ValueError, AssertionError) as e:
        raise DataError(f"data.grids.{name}: reasoning-gym refused the config {config!r}: {e}") from None
    out = []
    for entry in ds:
        meta = entry["metadata"]
        out.append((encode(meta["puzzle"]), encode(meta["solution"])))
    return out


def augmentations(side: int, rng: random.Random):
    """A random symmetry of a side x side sudoku as (cell order, value map): the cell at i of the new
    grid is cell order[i] of the old one, and a value token t becomes value_map[t]."""
    box = math.isqrt(side)
    bands = rng.sample(range(box), box)
    rows = [b * box + r for b in bands for r in rng.sample(range(box), box)]
    stacks = rng.sample(range(box), box)
    cols = [s * box + c for s in stacks for c in rng.sample(range(box), box)]
    transpose = rng.random() < 0.5
    order = []
    for i in range(side):
        for j in range(side):
            r, c = (rows[j], cols[i]) if transpose else (rows[i], cols[j])
            order.append(r * side + c)
    values = rng.sample(range(1, side + 1), side)
    value_map = [PAD, EMPTY] + [EMPTY + v for v in values]
    return order, value_map


def _apply(tokens: list[int], order: list[int], value_map: list[int]) -> list[int]:
    return [value_map[tokens[i]] for i in order]


def load_grids(cfg: GridConfig, split: str = "train") -> GridRows:
    """The training or held-out grids of `cfg` (see the module docstring)."""
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")
    tasks = cfg.tasks()
    side = cfg.side
    pairs: list[tuple[list[int], list[int]]] = []
    names: list[str] = []
    if split == "train":
        rng = random.Random(cfg.seed)
        for name, config in tasks.items():
            found = _puzzles(name, config, cfg.size, cfg.seed)
            for puzzle, solution in found:
                pairs.append((puzzle, solution))
                names.append(name)
                for _ in range(cfg.augment):
                    order, value_map = augmentations(side, rng)
                    pairs.append((_apply(puzzle, order, value_map), _apply(solution, order, value_map)))
                    names.append(name)
    else:
        seen = {tuple(p) for p, _ in load_grids(cfg, "train").pairs()} if cfg.eval_size else set()
        for name, config in tasks.items():
            found = _puzzles(name, config, cfg.eval_size, cfg.seed + EVAL_SEED_OFFSET)
            for puzzle, solution in found:
                if tuple(puzzle) not in seen:
                    pairs.append((puzzle, solution))
                    names.append(name)
    if split == "train" and not pairs:
        raise DataError("data.grids: no training puzzles")
    inputs = torch.tensor([p for p, _ in pairs], dtype=torch.long).view(len(pairs), side * side)
    labels = torch.tensor([s for _, s in pairs], dtype=torch.long).view(len(pairs), side * side)
    return GridRows(inputs, labels, torch.zeros(len(pairs), dtype=torch.long), side, names)


def exact(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: every cell's argmax is its label."""
    return (logits.argmax(-1) == labels).all(-1)


def parse_grid(text: str, max_cells: int) -> list[int]:
    """Tokens of a puzzle written row by row ('.' or 0 for an empty cell, digits 1-9 for values,
    spaces, commas, '|' and newlines ignored), checked to be a square grid that fits the model."""
    cells = []
    for i, ch in enumerate(text):
        if ch in " \t\n,|-+":
            continue
        if ch in ".0":
            cells.append(EMPTY)
        elif ch.isdigit():
            cells.append(EMPTY + int(ch))
        else:
            raise DataError(f"puzzle: character {i + 1} is {ch!r}; write cells as digits 1-9 and '.' or 0 for empty")
    side = math.isqrt(len(cells))
    if not cells or side * side != len(cells) or len(cells) > max_cells:
        raise DataError(f"puzzle: {len(cells)} cells is not a square grid of at most {max_cells} cells")
    if max(cells) > EMPTY + side:
        raise DataError(f"puzzle: a value above {side} in a {side} x {side} grid")
    return cells


def render(tokens: list[int], side: int) -> str:
    """A grid as text, '.' for an empty cell (for logs and `hrmspec generate`)."""
    chars = ["?" if t == PAD else "." if t == EMPTY else str(t - EMPTY) for t in tokens]
    return "\n".join(" ".join(chars[r * side:(r + 1) * side]) for r in range(side))


__all__ = ["EMPTY", "GRID_TASKS", "PAD", "GridConfig", "GridRows", "augmentations", "encode", "exact",
           "load_grids", "render", "vocab_size"]
