"""Puzzles laid out as fixed grids, for the `grid` objective: every cell is an input token and has a label.

A grid of n x n cells becomes a row of n² tokens, read row by row. Token 0 is padding (a cell
beyond a smaller puzzle); a task's cell symbols follow from 1:

    task         side                 symbols (tokens 1, 2, ...)         solved when
    mini_sudoku  4                    empty, the digits 1-4              rows, columns, boxes full; givens kept
    sudoku       9                    empty, the digits 1-9              the same
    n_queens     config n (8)         empty, queen                       n queens, none attacked; givens kept
    maze         max_grid_size (10)   wall, passage, start, goal, path   the path cells: a shortest path

The label of every cell is the solution's token, so a model fills the blanks and copies the
givens (sudoku and n_queens: HRM's layout, `1 + v` for a digit v), or marks the cells of the
shortest path from start to goal on the maze (HRM's maze task; the path is found by breadth-first
search, neighbours in the order up, down, left, right). Training counts a grid right when every
cell matches its label; held-out evaluation counts a puzzle solved when the predicted grid is *a*
solution (`GridTask.solved`: another valid sudoku completion, queen placement or shortest path counts).

Puzzles come from reasoning-gym. Training puzzles may be multiplied by augmentations that map a
solution to a solution: HRM's Sudoku ones — a permutation of the digits, of the bands and of the
rows within each band, of the stacks and of the columns within each, and a transpose — and the
eight symmetries of the square for n_queens and maze. Held-out puzzles come from other seeds, and
any that also occurs among the training grids (augmented ones included) is dropped.

    data:
      grids: [mini_sudoku]         # or [{maze: {config: {max_grid_size: 8}}}], or {maze: {config: {...}}}
      size: 2000                   # training puzzles (before augmentation)
      augment: 4                   # augmented copies of each training puzzle (0: none)
      eval_size: 200
      seed: 0
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hrmspec.runtime.artifacts.data import EVAL_SEED_OFFSET, DataError, _close, config_from_dict

PAD, EMPTY = 0, 1  # EMPTY: an empty cell of sudoku and n_queens


def _sudoku_cells(meta: dict, side: int) -> tuple[list[int], list[int]]:
    return encode(meta["puzzle"]), encode(meta["solution"])


def _queens_cells(meta: dict, side: int) -> tuple[list[int], list[int]]:
    def cells(grid) -> list[int]:
        return [EMPTY + (c == "Q") for row in grid for c in row]

    answer = [row.split() for row in meta["valid_answers"][0].splitlines()]
    return cells(meta["puzzle"]), cells(answer)


WALL, PASSAGE, START, GOAL, PATH = 1, 2, 3, 4, 5


def _maze_cells(meta: dict, side: int) -> tuple[list[int], list[int]]:
    """The maze padded to side x side, and the same with a shortest path's cells marked PATH."""
    code = {meta["wall"]: WALL, meta["path"]: PASSAGE, meta["start"]: START, meta["goal"]: GOAL}
    rows = meta["grid"]
    grid = [[code[c] for c in row] + [PAD] * (side - len(row)) for row in rows]
    grid += [[PAD] * side for _ in range(side - len(rows))]
    puzzle = [t for row in grid for t in row]
    solution = list(puzzle)
    for i in shortest_path(puzzle, side)[1:-1]:
        solution[i] = PATH
    return puzzle, solution


def shortest_path(cells: list[int], side: int) -> list[int]:
    """Cell indices of a shortest start -> goal path through passages (breadth-first: up, down,
    left, right), start and goal included; [] when the goal cannot be reached."""
    start, goal = cells.index(START), cells.index(GOAL)
    came = {start: start}
    queue = deque([start])
    while queue:
        i = queue.popleft()
        if i == goal:
            path = [i]
            while path[-1] != start:
                path.append(came[path[-1]])
            return path[::-1]
        r, c = divmod(i, side)
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            j = nr * side + nc
            if 0 <= nr < side and 0 <= nc < side and j not in came and cells[j] in (PASSAGE, GOAL):
                came[j] = i
                queue.append(j)
    return []


def _sudoku_solved(puzzle: list[int], answer: list[int], side: int) -> bool:
    box = math.isqrt(side)
    grid = [answer[r * side:(r + 1) * side] for r in range(side)]
    want = set(range(EMPTY + 1, EMPTY + side + 1))
    units = [set(row) for row in grid] + [{grid[r][c] for r in range(side)} for c in range(side)]
    units += [{grid[br + r][bc + c] for r in range(box) for c in range(box)}
              for br in range(0, side, box) for bc in range(0, side, box)]
    return all(u == want for u in units) and all(p in (EMPTY, a) for p, a in zip(puzzle, answer))


def _queens_solved(puzzle: list[int], answer: list[int], side: int) -> bool:
    queens = [divmod(i, side) for i, t in enumerate(answer) if t == EMPTY + 1]
    if len(queens) != side or any(t not in (EMPTY, EMPTY + 1) for t in answer):
        return False
    attack = any(r1 == r2 or c1 == c2 or abs(r1 - r2) == abs(c1 - c2)
                 for k, (r1, c1) in enumerate(queens) for r2, c2 in queens[k + 1:])
    kept = all(a == EMPTY + 1 for p, a in zip(puzzle, answer) if p == EMPTY + 1)
    return not attack and kept


def _maze_solved(puzzle: list[int], answer: list[int], side: int) -> bool:
    """Every cell as in the maze but for PATH marks on passages, which form a shortest path."""
    if any(a != p and not (p == PASSAGE and a == PATH) for p, a in zip(puzzle, answer)):
        return False
    best = shortest_path(puzzle, side)
    marked = [PASSAGE if t == PATH else t for t in answer]  # walk only the marked cells
    walk = [t if t != PASSAGE or answer[i] == PATH else WALL for i, t in enumerate(marked)]
    path = shortest_path(walk, side)
    return bool(best) and len(path) == len(best) and answer.count(PATH) == len(best) - 2


@dataclass(frozen=True)
class GridTask:
    """One reasoning-gym task as grids (see the module docstring's table)."""

    symbols: str  # the characters of tokens 1, 2, ... (render and parse); '?' is padding
    side: Callable[[dict], int]  # the grid side under a task config
    cells: Callable[[dict, int], tuple[list[int], list[int]]]  # metadata, side -> (puzzle, solution) tokens
    solved: Callable[[list[int], list[int], int], bool]  # puzzle, answer, side -> is the answer a solution
    symmetry: str  # sudoku | square: which augmentations keep solutions solutions

    @property
    def vocab(self) -> int:
        return 1 + len(self.symbols)


GRID_TASKS: dict[str, GridTask] = {
    "mini_sudoku": GridTask(".1234", lambda c: 4, _sudoku_cells, _sudoku_solved, "sudoku"),
    "sudoku": GridTask(".123456789", lambda c: 9, _sudoku_cells, _sudoku_solved, "sudoku"),
    "n_queens": GridTask(".Q", lambda c: c.get("n", 8), _queens_cells, _queens_solved, "square"),
    "maze": GridTask("#.SGo", lambda c: c.get("max_grid_size", 10), _maze_cells, _maze_solved, "square"),
}


@dataclass
class GridConfig:
    grids: Any = None  # list of task names (or one-key mappings name -> {config}), or mapping name -> {config: {...}}
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
        out = {}
        for name, opts in _grid_items(raw):
            if name in out:
                raise DataError(f"data.grids: grid task {name!r} is listed twice")
            if name not in GRID_TASKS:
                raise DataError(f"data.grids: unknown grid task {name!r}{_close(str(name), GRID_TASKS)}; "
                                f"known: {', '.join(GRID_TASKS)}")
            if opts is not None and not isinstance(opts, Mapping):
                raise DataError(f"data.grids.{name}: expected a mapping {{config: {{...}}}}, found {_short(opts)}")
            opts = dict(opts or {})
            if not isinstance(opts.get("config") or {}, Mapping):
                raise DataError(f"data.grids.{name}.config: expected a mapping of the task's options, found "
                                f"{_short(opts['config'])}")
            unknown = set(opts) - {"config"}
            if unknown:
                raise DataError(f"data.grids.{name}: unknown key {sorted(unknown)[0]!r}; known: config")
            out[name] = dict(opts.get("config") or {})
        sides = {n: GRID_TASKS[n].side(c) for n, c in out.items()}
        if len(set(sides.values())) > 1:
            raise DataError(f"data.grids: every grid task of a run must have one side (one row length), "
                            f"found {', '.join(f'{n} {v}' for n, v in sides.items())}")
        return out

    @property
    def side(self) -> int:
        name, config = next(iter(self.tasks().items()))
        return GRID_TASKS[name].side(config)

    @property
    def vocab(self) -> int:
        """Tokens the run's grids use: padding and every task's symbols."""
        return max(GRID_TASKS[n].vocab for n in self.tasks())


def _short(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _grid_items(raw: Any) -> list[tuple[Any, Any]]:
    """(name, options) of each grid task in `data.grids`, written as a mapping {name: {config}}, as a list of
    names and one-key mappings ([mini_sudoku, {maze: {config: {...}}}]), or as one name."""
    if isinstance(raw, str):
        return [(raw, None)]
    if isinstance(raw, Mapping):
        return list(raw.items())
    if not isinstance(raw, list):
        raise DataError(f"data.grids: expected a list of grid tasks or a mapping name -> {{config}}, "
                        f"found {_short(raw)}")
    items = []
    for i, item in enumerate(raw):
        if isinstance(item, Mapping) and len(item) == 1:
            items.extend(item.items())
        elif isinstance(item, str):
            items.append((item, None))
        else:
            raise DataError(f"data.grids[{i}]: expected a task name or a one-key mapping {{name: {{config: ...}}}}, "
                            f"found {_short(item)}")
    return items


def encode(grid: list[list[int]]) -> list[int]:
    """Sudoku cells row by row: 1 for an empty cell (0 in reasoning-gym), 1 + v for a value v."""
    return [EMPTY + v for row in grid for v in row]


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


def _puzzles(name: str, config: dict, size: int, seed: int, side: int) -> list[tuple[list[int], list[int]]]:
    import reasoning_gym  # its task registry loads on first use

    try:
        ds = reasoning_gym.create_dataset(name, seed=seed, size=size, **config)
    except (TypeError, ValueError, AssertionError) as e:
        raise DataError(f"data.grids.{name}: reasoning-gym refused the config {config!r}: {e}") from None
    cells = GRID_TASKS[name].cells
    return [cells(entry["metadata"], side) for entry in ds]


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


def square_symmetry(side: int, rng: random.Random, vocab: int):
    """One of the 8 symmetries of the square (a rotation by 0-3 quarter turns, then maybe a transpose)
    as (cell order, the identity value map)."""
    turns, transpose = rng.randrange(4), rng.random() < 0.5
    order = []
    for i in range(side):
        for j in range(side):
            r, c = (j, i) if transpose else (i, j)
            for _ in range(turns):  # the cell a quarter turn brings here
                r, c = side - 1 - c, r
            order.append(r * side + c)
    return order, list(range(vocab))


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
            task = GRID_TASKS[name]
            for puzzle, solution in _puzzles(name, config, cfg.size, cfg.seed, side):
                pairs.append((puzzle, solution))
                names.append(name)
                for _ in range(cfg.augment):
                    if task.symmetry == "sudoku":
                        order, value_map = augmentations(side, rng)
                    else:
                        order, value_map = square_symmetry(side, rng, task.vocab)
                    pairs.append((_apply(puzzle, order, value_map), _apply(solution, order, value_map)))
                    names.append(name)
    else:
        seen = {tuple(p) for p, _ in load_grids(cfg, "train").pairs()} if cfg.eval_size else set()
        for name, config in tasks.items():
            for puzzle, solution in _puzzles(name, config, cfg.eval_size, cfg.seed + EVAL_SEED_OFFSET, side):
                if tuple(puzzle) not in seen:
                    pairs.append((puzzle, solution))
                    names.append(name)
    if split == "train" and not pairs:
        raise DataError("data.grids: no training puzzles")
    inputs = torch.tensor([p for p, _ in pairs], dtype=torch.long).view(len(pairs), side * side)
    labels = torch.tensor([s for _, s in pairs], dtype=torch.long).view(len(pairs), side * side)
    return GridRows(inputs, labels, torch.zeros(len(pairs), dtype=torch.long), side, names)


def solved(tasks: list[str], puzzles: torch.Tensor, logits: torch.Tensor, side: int) -> list[bool]:
    """Whether each predicted grid (the argmax of `logits`) is a solution of its puzzle (of task `tasks[i]`)."""
    answers = logits.argmax(-1).tolist()
    return [GRID_TASKS[t].solved(p, a, side) for t, p, a in zip(tasks, puzzles.tolist(), answers)]


def parse_grid(text: str, task: str, max_cells: int) -> list[int]:
    """Tokens of a `task` puzzle written row by row in its symbols (sudoku: digits and '.' or 0 for
    an empty cell; n_queens: '.' and 'Q'; maze: '#', '.', 'S', 'G'); spaces, commas, '|' and
    newlines are ignored. Checked to be a square grid that fits the model."""
    symbols = GRID_TASKS[task].symbols
    cells = []
    for i, ch in enumerate(text):
        if ch in " \t\n,|":
            continue
        token = symbols.find("." if ch == "0" else ch)  # 0: an empty cell, as reasoning-gym writes it
        if token < 0:
            raise DataError(f"puzzle: character {i + 1} is {ch!r}; a {task} cell is one of {' '.join(symbols)}")
        cells.append(token + 1)
    side = math.isqrt(len(cells))
    if not cells or side * side != len(cells) or len(cells) > max_cells:
        raise DataError(f"puzzle: {len(cells)} cells is not a square grid of at most {max_cells} cells")
    return cells


def render(tokens: list[int], side: int, task: str = "sudoku") -> str:
    """A grid as text in the task's symbols ('?' for padding), for logs and `hrmspec generate`."""
    chars = "?" + GRID_TASKS[task].symbols
    return "\n".join(" ".join(chars[t] if 0 <= t < len(chars) else "?" for t in tokens[r * side:(r + 1) * side])
                     for r in range(side))
