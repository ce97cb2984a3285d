"""ARC grids laid out as the official HRM / TRM datasets store them (dataset/build_arc_dataset.py).

An ARC grid is a rectangle of at most 30 x 30 cells, each one of ten colours 0-9. A dataset row is
one such grid placed in a fixed 30 x 30 canvas, read row by row into 900 tokens:

    token   0        PAD: a cell outside the grid and its border
            1        EOS: the border that marks where the grid ends
            2..11    colour c is stored as c + 2
    VOCAB = 12

A smaller square canvas (side 2-30, `seq_len` side * side) holds only the grids that fit it: `place` and
`random_offset` take the side (`canvas`, default 30), `crop` reads it off the row's length (a perfect
square), so every function below works on any square canvas; the official datasets use 30.

`place` puts an example's input and output grids into two such canvases at the same offset
(row, column), one shared top-left corner. Each grid gets an EOS border: the row just below it (over the
grid's columns) and the column just right of it (over the grid's rows), each only when it falls
inside the canvas; the corner cell diagonally below-right stays PAD. Training rows may use a random
offset (`random_offset`, the official translational augmentation); evaluation rows sit at (0, 0).

`crop` is the official evaluator's inverse: the largest rectangle anchored at the top-left corner
whose cells are all colours. It recovers a grid placed at (0, 0) exactly; a grid placed at any
other offset has PAD in its first row or column, so it crops to an empty 0 x 0 grid. That is why
the official pipeline never translates the rows it evaluates.

Augmentations. A puzzle is multiplied by one of the eight symmetries of the square (`dihedral`,
with the official ids below) combined with a permutation of the colours 1-9 (0, the background,
stays fixed). The colours are mapped first and the symmetry applied second. An augmented copy
of a puzzle is named `base|||t<tid>|||<ten digits>`, where the digits are the colour map (digit i is
the colour that i becomes). The evaluator reads this name back with `parse_name` and undoes the
augmentation on the model's prediction with `Augmentation.invert`:

    tid  0 identity   1 rot90 (np.rot90, k=1)   2 rot180   3 rot270
         4 fliplr     5 flipud                   6 transpose
         7 fliplr(rot90(k=1)): the reflection in the anti-diagonal

Rotations 1 and 3 are each other's inverse. Every other transform undoes itself.

`grid_hash` identifies a grid the way the official code does: the sha256 of one byte per dimension
of its shape, followed by its cells as uint8. Grids with the same cells but different shapes
hash differently.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from hrmspec.runtime.artifacts.data import DataError
from hrmspec.spec.source import quoted

MAX_SIDE = 30
PAD = 0
EOS = 1
COLOUR_OFFSET = 2  # colour c is the token c + 2
NUM_COLOURS = 10
VOCAB = NUM_COLOURS + COLOUR_OFFSET  # 12
SEQ_LEN = MAX_SIDE * MAX_SIDE  # 900
MIN_CANVAS = 2  # the smallest canvas side: a 1 x 1 grid and its EOS border
SEPARATOR = "|||"  # between a puzzle's name and its augmentation

# DIHEDRAL_INVERSE[t] undoes transform t: only the two quarter turns swap, the rest are involutions
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)

_SUFFIX = re.compile(r"t([0-7])")
_DIGITS = re.compile(r"[0-9]{10}")


def dihedral(grid: np.ndarray, tid: int) -> np.ndarray:
    """`grid` under the symmetry of the square with the official id `tid` (0-7, see the module docstring)."""
    grid = np.asarray(grid)
    if tid == 0:
        out = grid
    elif tid == 1:
        out = np.rot90(grid, k=1)
    elif tid == 2:
        out = np.rot90(grid, k=2)
    elif tid == 3:
        out = np.rot90(grid, k=3)
    elif tid == 4:
        out = np.fliplr(grid)
    elif tid == 5:
        out = np.flipud(grid)
    elif tid == 6:
        out = grid.T
    elif tid == 7:
        out = np.fliplr(np.rot90(grid, k=1))
    else:
        raise ValueError(f"a dihedral transform id is 0-7, not {quoted(tid)}")
    return np.ascontiguousarray(out)


def inverse_dihedral(grid: np.ndarray, tid: int) -> np.ndarray:
    """The transform that undoes `dihedral(., tid)`."""
    if not isinstance(tid, (int, np.integer)) or isinstance(tid, bool) or not 0 <= tid < 8:
        raise ValueError(f"a dihedral transform id is 0-7, not {quoted(tid)}")
    return dihedral(grid, DIHEDRAL_INVERSE[tid])


@dataclass(frozen=True)
class Augmentation:
    """One official ARC augmentation: map every colour c to `colours[c]`, then apply `dihedral(., tid)`.

    `colours` is a permutation of 0-9 that fixes 0 (the background)."""

    tid: int
    colours: tuple[int, ...]

    IDENTITY: ClassVar[Augmentation]

    def __post_init__(self) -> None:
        tid = self.tid
        if isinstance(tid, bool) or not isinstance(tid, (int, np.integer)) or not 0 <= tid < 8:
            raise DataError(f"an augmentation's transform id is 0-7, not {quoted(tid)}")
        try:
            colours = tuple(self.colours)
        except TypeError:
            raise DataError(f"an augmentation's colours are a sequence of 10, not {quoted(self.colours)}") from None
        if (len(colours) != NUM_COLOURS
                or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in colours)
                or sorted(int(c) for c in colours) != list(range(NUM_COLOURS))):
            raise DataError(f"an augmentation's colours must be a permutation of 0-9, not {quoted(colours)}")
        if colours[0] != 0:
            raise DataError(f"an augmentation keeps colour 0 (the background) fixed; got {quoted(colours)}")
        object.__setattr__(self, "tid", int(tid))
        object.__setattr__(self, "colours", tuple(int(c) for c in colours))

    @property
    def _forward(self) -> np.ndarray:
        return np.asarray(self.colours, dtype=np.uint8)

    @property
    def _backward(self) -> np.ndarray:
        return np.argsort(self._forward).astype(np.uint8)

    def apply(self, grid: np.ndarray) -> np.ndarray:
        """The augmented grid (uint8): colours mapped, then transformed."""
        return dihedral(self._forward[_colours(grid)], self.tid)

    def invert(self, grid: np.ndarray) -> np.ndarray:
        """The grid that `apply` maps to `grid` (uint8)."""
        return self._backward[inverse_dihedral(_colours(grid), self.tid)]

    def name(self, base: str) -> str:
        """The official name of puzzle `base` under this augmentation: `base|||t<tid>|||<digits>`."""
        return f"{base}{SEPARATOR}t{self.tid}{SEPARATOR}{''.join(str(c) for c in self.colours)}"

    @classmethod
    def random(cls, rng: np.random.Generator) -> Augmentation:
        """A uniformly random transform and permutation of the colours 1-9."""
        tid = int(rng.integers(0, 8))
        return cls(tid, (0, *(int(c) for c in rng.permutation(np.arange(1, NUM_COLOURS)))))


IDENTITY = Augmentation(0, tuple(range(NUM_COLOURS)))
Augmentation.IDENTITY = IDENTITY


def _colours(grid: Any) -> np.ndarray:
    """`grid` as a 2-D integer array of colours 0-9 (ValueError otherwise), for indexing a colour map."""
    arr = np.asarray(grid)
    if arr.ndim != 2:
        raise ValueError(f"an ARC grid is 2-D, not of shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"an ARC grid holds integer colours, not {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= NUM_COLOURS):
        raise ValueError("an ARC grid's colours are 0-9")
    return arr.astype(np.intp, copy=False) if arr.size else arr.astype(np.intp)


def parse_name(name: str) -> tuple[str, Augmentation | None]:
    """(base name, augmentation) of an official puzzle name; None when the name carries no augmentation.
    A name with `|||` that is not `base|||t<0-7>|||<a permutation of 0-9 fixing 0>` is a DataError."""
    if not isinstance(name, str):
        raise DataError(f"a puzzle name is text, not {quoted(name)}")
    if SEPARATOR not in name:
        return name, None
    parts = name.split(SEPARATOR)
    if len(parts) != 3:
        raise DataError(f"puzzle name {quoted(name)}: expected base{SEPARATOR}t<id>{SEPARATOR}<10 digits>")
    base, t, digits = parts
    m, d = _SUFFIX.fullmatch(t), _DIGITS.fullmatch(digits)
    if not base or m is None or d is None:
        raise DataError(f"puzzle name {quoted(name)}: expected base{SEPARATOR}t<0-7>{SEPARATOR}<10 digits>")
    try:
        aug = Augmentation(int(m.group(1)), tuple(int(c) for c in digits))
    except DataError as e:
        raise DataError(f"puzzle name {quoted(name)}: {e}") from None
    return base, aug


def grid_hash(grid: np.ndarray) -> str:
    """The official identity of a grid: sha256 over one byte per dimension of its shape, then its uint8 cells."""
    if not isinstance(grid, np.ndarray) or grid.ndim != 2 or grid.dtype != np.uint8:
        what = f"{grid.ndim}-D {grid.dtype} array" if isinstance(grid, np.ndarray) else type(grid).__name__
        raise ValueError(f"grid_hash takes a 2-D uint8 array, not a {what}")
    if max(grid.shape) > 255:
        raise ValueError(f"grid_hash stores each side in one byte; shape {grid.shape} does not fit")
    return hashlib.sha256(bytes(grid.shape) + grid.tobytes()).hexdigest()


def canvas_side(canvas: Any) -> int:
    """`canvas` checked as the side of a square canvas: an integer 2-30 (ValueError otherwise)."""
    if isinstance(canvas, bool) or not isinstance(canvas, (int, np.integer)) or not MIN_CANVAS <= canvas <= MAX_SIDE:
        raise ValueError(f"an ARC canvas side is an integer {MIN_CANVAS}-{MAX_SIDE}, not {quoted(canvas)}")
    return int(canvas)


def side_of(length: Any) -> int | None:
    """The side of the square canvas whose rows hold `length` tokens (a perfect square, at most 900); None
    for any other length."""
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 1 <= length <= SEQ_LEN:
        return None
    side = math.isqrt(int(length))
    return side if side * side == length else None


def fits(grid: np.ndarray, canvas: int) -> bool:
    """Whether `grid` (2-D) fits a `canvas` x `canvas` canvas."""
    return grid.shape[0] <= canvas and grid.shape[1] <= canvas


def _check_offset(grids: tuple[np.ndarray, ...], offset: tuple[int, int], side: int) -> tuple[int, int]:
    try:
        r, c = (int(x) for x in offset)
    except (TypeError, ValueError):
        raise ValueError(f"an offset is (row, column), not {quoted(offset)}") from None
    rows = max(g.shape[0] for g in grids)
    cols = max(g.shape[1] for g in grids)
    if not (0 <= r <= side - rows and 0 <= c <= side - cols):
        raise ValueError(f"offset {(r, c)} puts a {rows} x {cols} grid outside the {side} x {side} canvas")
    return r, c


def _checked_side(grid: Any, side: int = MAX_SIDE) -> np.ndarray:
    arr = _colours(grid)
    if not (1 <= arr.shape[0] <= side and 1 <= arr.shape[1] <= side):
        raise ValueError(f"an ARC grid in a {side} x {side} canvas is 1-{side} cells on each side, not {arr.shape}")
    return arr


def place(input: np.ndarray, output: np.ndarray, offset: tuple[int, int] = (0, 0),
          canvas: int = MAX_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """(input row, output row): each grid in its own `canvas` x `canvas` canvas (default 30) at `offset`,
    colours as tokens c + 2, an EOS border below and right of it, PAD elsewhere; flattened to canvas ** 2
    (900) uint8 tokens."""
    side = canvas_side(canvas)
    grids = (_checked_side(input, side), _checked_side(output, side))
    r0, c0 = _check_offset(grids, offset, side)
    rows = []
    for grid in grids:
        n, m = grid.shape
        board = np.full((side, side), PAD, dtype=np.uint8)
        board[r0:r0 + n, c0:c0 + m] = grid + COLOUR_OFFSET
        end_r, end_c = r0 + n, c0 + m
        if end_r < side:
            board[end_r, c0:end_c] = EOS
        if end_c < side:
            board[r0:end_r, end_c] = EOS
        rows.append(board.reshape(-1))
    return rows[0], rows[1]


def random_offset(input: np.ndarray, output: np.ndarray, rng: np.random.Generator,
                  canvas: int = MAX_SIDE) -> tuple[int, int]:
    """A uniformly random offset at which both grids (and so both canvases of `place`) fit a `canvas` x
    `canvas` canvas (default 30)."""
    side = canvas_side(canvas)
    grids = (_checked_side(input, side), _checked_side(output, side))
    rows = max(g.shape[0] for g in grids)
    cols = max(g.shape[1] for g in grids)
    return int(rng.integers(0, side - rows + 1)), int(rng.integers(0, side - cols + 1))


def crop(row: np.ndarray) -> np.ndarray:
    """The grid (colours 0-9, uint8) in a row of a square canvas, as the official evaluator reads it: the
    largest rectangle anchored at the top-left corner holding only colour tokens (2-11). Rows are
    scanned top-down; the column count shrinks to just before the first non-colour token of each
    row, and the largest area seen wins (the first on a tie). A row with no colour in its corner
    crops to an empty 0 x 0 grid. Accepts any integer dtype, flat (900, or side * side for a smaller
    canvas: the side is read off the length) or square (30 x 30, side x side)."""
    arr = np.asarray(row)
    side = side_of(arr.size)
    if side is None:
        raise ValueError(f"an ARC row has side * side tokens, a perfect square up to {SEQ_LEN} (900: the 30 x 30 "
                         f"canvas), not {arr.size}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(f"an ARC row holds integer tokens, not {arr.dtype}")
    grid = arr.reshape(side, side).astype(np.int64)
    colour = (grid >= COLOUR_OFFSET) & (grid < VOCAB)
    # the official scan, vectorised: after row r the width is the first non-colour column of any row so far
    first_bad = np.where(colour.all(axis=1), side, np.argmin(colour, axis=1))
    widths = np.minimum.accumulate(first_bad)
    areas = np.arange(1, side + 1) * widths
    r = int(np.argmax(areas))  # the first largest, as the official strict ">" keeps
    best = (r + 1, int(widths[r])) if areas[r] > 0 else (0, 0)
    return (grid[:best[0], :best[1]] - COLOUR_OFFSET).astype(np.uint8)


def check_grid(obj: Any, where: str) -> np.ndarray:
    """A Kaggle JSON grid (a non-empty list of equal-length, non-empty lists of integers 0-9, at most
    30 x 30) as a uint8 array; anything else is a DataError naming `where`."""
    if not isinstance(obj, list) or not obj:
        raise DataError(f"{where}: an ARC grid is a non-empty list of rows, not {quoted(obj)}")
    if len(obj) > MAX_SIDE:
        raise DataError(f"{where}: an ARC grid has at most {MAX_SIDE} rows, not {len(obj)}")
    width = None
    for i, line in enumerate(obj):
        if not isinstance(line, list) or not line:
            raise DataError(f"{where}: row {i} of an ARC grid is a non-empty list, not {quoted(line)}")
        if len(line) > MAX_SIDE:
            raise DataError(f"{where}: row {i} of an ARC grid has {len(line)} cells, over {MAX_SIDE}")
        if width is None:
            width = len(line)
        elif len(line) != width:
            raise DataError(f"{where}: row {i} of an ARC grid has {len(line)} cells, row 0 has {width}")
        for j, v in enumerate(line):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < NUM_COLOURS:
                raise DataError(f"{where}: cell ({i}, {j}) of an ARC grid is a colour 0-9, not {quoted(v)}")
    return np.array(obj, dtype=np.uint8)


__all__ = ["COLOUR_OFFSET", "DIHEDRAL_INVERSE", "EOS", "IDENTITY", "MAX_SIDE", "MIN_CANVAS", "NUM_COLOURS", "PAD",
           "SEPARATOR", "SEQ_LEN", "VOCAB", "Augmentation", "canvas_side", "check_grid", "crop", "dihedral", "fits",
           "grid_hash", "inverse_dihedral", "parse_name", "place", "random_offset", "side_of"]
