"""The puzzle dataset layout of the official HRM and TRM code: what it holds, how it is written, read
and sampled.

A dataset folder DIR holds one folder per split (``train/``, ``test/``) and two files beside them::

    DIR/identifiers.json          identifier id -> name; id 0 is "<blank>" (ARC: one name per variant)
    DIR/test_puzzles.json         ARC only: task name -> the Kaggle task of every test-role task
    DIR/<split>/dataset.json      the split's metadata (PuzzleMetadata)
    DIR/<split>/S__inputs.npy     N x seq_len integer tokens, one row per example, per set S
    DIR/<split>/S__labels.npy     N x seq_len integer tokens (ignore_label_id: no loss)
    DIR/<split>/S__puzzle_identifiers.npy   P int32: the identifier of each puzzle
    DIR/<split>/S__puzzle_indices.npy       P + 1 int32: puzzle p's examples are rows [i[p], i[p+1])
    DIR/<split>/S__group_indices.npy        G + 1 int32: group g's puzzles are [j[g], j[g+1])

An example is one (input, label) pair; a puzzle is a few examples that share an identifier (an ARC task
and one of its augmentations); a group is a puzzle with its augmented copies. Training visits each
group once per epoch, taking one of its puzzles at random and all that puzzle's examples
(`PuzzleSplit.epoch_order`); evaluation visits every example once, in order (`PuzzleSplit.test_order`).

`SplitWriter` writes a split with memory bounded by one group (rows go to a temporary file as they
come); `PuzzleSplit` reads one with the token arrays memory-mapped, every file checked before use.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import stat
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hrmspec.errors import CheckpointError
from hrmspec.runtime.artifacts.data import DataError
from hrmspec.runtime.artifacts.files import (
    LINK_REFUSED,
    OutputError,
    atomic_write,
    fsync_path,
    read_json,
    refuse_link,
    writing,
)

SPLITS = ("train", "test")
FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
TOKEN_FIELDS = ("inputs", "labels")
INDEX_FIELDS = ("puzzle_identifiers", "puzzle_indices", "group_indices")
METADATA_FILE = "dataset.json"
IDENTIFIERS_FILE = "identifiers.json"
TEST_PUZZLES_FILE = "test_puzzles.json"
BLANK_IDENTIFIER = "<blank>"
BUILD_HINT = ("build one with `hrmspec build-data sudoku|maze|arc --source ... --out DIR` "
              "(see docs/puzzles.md)")

MAX_METADATA_BYTES = 1 << 20
MAX_SEQ_LEN = 1 << 24
MAX_VOCAB = 1 << 31
SET_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
INT32_MAX = np.iinfo(np.int32).max
SCAN_ROWS = 1 << 14  # rows per chunk of a token scan
FLUSH_BYTES = 4 << 20  # bytes of rows a writer buffers before writing them out
COPY_BYTES = 16 << 20  # bytes per chunk when a temporary file is copied into its .npy


# ---------------------------------------------------------------------------------------------
# dataset.json


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class PuzzleMetadata:
    """The contents of a split's dataset.json, as the official `PuzzleDatasetMetadata`."""

    pad_id: int
    ignore_label_id: int | None
    blank_identifier_id: int
    vocab_size: int
    seq_len: int
    num_puzzle_identifiers: int
    total_groups: int
    mean_puzzle_examples: float
    total_puzzles: int
    sets: tuple[str, ...]

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> PuzzleMetadata:
        """The metadata of `path`, every field checked: a problem is a DataError naming the file and key."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: missing; {BUILD_HINT}")
        try:
            data = read_json(path, max_bytes=MAX_METADATA_BYTES, max_values=10_000)
        except CheckpointError as e:
            raise DataError(f"{path}: not a readable dataset.json ({e})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = METADATA_FILE) -> PuzzleMetadata:
        """The metadata of a dataset.json object, checked as `from_json` does (`where` names it)."""
        if not isinstance(data, Mapping):
            raise DataError(f"{where}: expected a JSON object, found {type(data).__name__}")
        missing = [f for f in _FIELD_CHECKS if f not in data]
        if missing:
            raise DataError(f"{where}: missing key(s) {', '.join(missing)}")
        for key, check in _FIELD_CHECKS.items():
            problem = check(data[key])
            if problem:
                raise DataError(f"{where}: key {key!r} {problem} (found {_short(data[key])})")
        meta = cls(**{k: data[k] for k in _FIELD_CHECKS if k != "sets"}, sets=tuple(data["sets"]))
        meta._check_ranges(where)
        return meta

    def _check_ranges(self, where: str) -> None:
        """What one field cannot be given the others."""
        if self.pad_id >= self.vocab_size:
            raise DataError(f"{where}: key 'pad_id' is {self.pad_id}, not below vocab_size {self.vocab_size}")
        if self.ignore_label_id is not None and self.ignore_label_id >= self.vocab_size:
            raise DataError(f"{where}: key 'ignore_label_id' is {self.ignore_label_id}, not below vocab_size "
                            f"{self.vocab_size}")
        if self.blank_identifier_id >= self.num_puzzle_identifiers:
            raise DataError(f"{where}: key 'blank_identifier_id' is {self.blank_identifier_id}, not below "
                            f"num_puzzle_identifiers {self.num_puzzle_identifiers}")
        if len(set(self.sets)) != len(self.sets):
            raise DataError(f"{where}: key 'sets' names a set twice: {list(self.sets)}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sets"] = list(self.sets)
        return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _int_in(low: int, high: int) -> Any:
    def check(value: Any) -> str:
        if not _is_int(value):
            return "must be an integer"
        if not low <= value <= high:
            return f"must be between {low} and {high:,}"
        return ""
    return check


def _optional(check: Any) -> Any:
    return lambda value: "" if value is None else check(value)


def _mean(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return "must be a finite number >= 0"
    return ""


def _sets(value: Any) -> str:
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of set names"
    if len(value) > 1024:
        return "lists more than 1024 sets"
    bad = [v for v in value if not isinstance(v, str) or not SET_NAME.match(v)]
    if bad:
        return f"holds {_short(bad[0])}, not a set name (letters, digits, '_' or '-')"
    return ""


_FIELD_CHECKS = {
    "pad_id": _int_in(0, MAX_VOCAB),
    "ignore_label_id": _optional(_int_in(0, MAX_VOCAB)),
    "blank_identifier_id": _int_in(0, INT32_MAX),
    "vocab_size": _int_in(1, MAX_VOCAB),
    "seq_len": _int_in(1, MAX_SEQ_LEN),
    "num_puzzle_identifiers": _int_in(1, INT32_MAX),
    "total_groups": _int_in(0, INT32_MAX),
    "mean_puzzle_examples": _mean,
    "total_puzzles": _int_in(0, INT32_MAX),
    "sets": _sets,
}


# ---------------------------------------------------------------------------------------------
# Writing


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype token arrays are stored in: uint8 when every token fits, else int32."""
    return np.dtype(np.uint8) if vocab_size <= 256 else np.dtype(np.int32)


def _new_file(path: Path) -> Any:
    """A new binary file at `path`, made by this call (O_EXCL, never through a link)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    return os.fdopen(os.open(path, flags, 0o644), "wb")


def _npy_header_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The .npy header (format 1.0) of a C-ordered array of `dtype` and `shape`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return buf.getvalue()


class _RowFile:
    """Rows of one token array, appended to a temporary file that starts with room for its .npy header:
    stored as uint8 until a value needs more, then as int32 (the file so far rewritten once). When the
    rows are finished the header is written into that room and the file renamed to its .npy name, so a
    dataset of many gigabytes is never copied (numpy pads a header so its length does not depend on
    the number of rows; when it would, the rows are copied into a new file instead)."""

    def __init__(self, path: Path, seq_len: int):
        self.path, self.seq_len = path, seq_len
        self.dtype = np.dtype(np.uint8)
        self.rows = 0
        self.max_value = -1
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._file = _new_file(path)
        self._room = self._reserve(self._file, self.dtype)

    def _reserve(self, f: Any, dtype: np.dtype) -> int:
        room = len(_npy_header_bytes(dtype, (0, self.seq_len)))
        f.write(b"\0" * room)
        return room

    def append(self, rows: np.ndarray) -> None:
        if rows.size:
            self.max_value = max(self.max_value, int(rows.max()))
            if self.max_value > 255 and self.dtype == np.uint8:
                self._widen()
        self._buffer.append(rows.astype(self.dtype, copy=False))
        self._buffered += rows.nbytes
        self.rows += len(rows)
        if self._buffered >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        for rows in self._buffer:
            self._file.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self._buffer, self._buffered = [], 0

    def _widen(self) -> None:
        """From uint8 to int32: the rows written so far rewritten chunk by chunk."""
        self.flush()
        self._file.close()
        wide = self.path.with_name(self.path.name + ".wide")
        wide_dtype = np.dtype(np.int32)
        with open(self.path, "rb") as src, _new_file(wide) as dst:
            src.seek(self._room)
            room = self._reserve(dst, wide_dtype)
            while chunk := src.read(COPY_BYTES):
                dst.write(np.frombuffer(chunk, np.uint8).astype(wide_dtype).tobytes())
        os.replace(wide, self.path)
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed by write_npy() or discard()
        self.dtype, self._room = wide_dtype, room

    def write_npy(self, target: Path, dtype: np.dtype) -> None:
        """The rows as the .npy file `target` (atomically: renamed over it when complete), stored as `dtype`."""
        self.flush()
        self._file.close()
        header = _npy_header_bytes(dtype, (self.rows, self.seq_len))
        with writing(target):
            if dtype == self.dtype and len(header) == self._room:
                self._finish_in_place(target, header)
            else:
                atomic_write(target, lambda tmp: self._copy_into(tmp, header, dtype))

    def _finish_in_place(self, target: Path, header: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutputError(f"{self.path} {LINK_REFUSED}")
            os.pwrite(fd, header, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        refuse_link(self.path)
        os.replace(self.path, target)  # a link at `target` is replaced, never followed
        fsync_path(target.parent)

    def _copy_into(self, tmp: Path, header: bytes, dtype: np.dtype) -> None:
        rows_per_chunk = max(1, COPY_BYTES // max(1, self.seq_len * self.dtype.itemsize))
        with open(tmp, "wb") as out, open(self.path, "rb") as src:
            out.write(header)
            src.seek(self._room)
            while chunk := src.read(rows_per_chunk * self.seq_len * self.dtype.itemsize):
                out.write(np.frombuffer(chunk, self.dtype).astype(dtype, copy=False).tobytes())

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)
        self.path.with_name(self.path.name + ".wide").unlink(missing_ok=True)


def set_files(folder: Path, set_name: str) -> dict[str, Path]:
    return {f: folder / f"{set_name}__{f}.npy" for f in FIELDS}


class SplitWriter:
    """Writes one set of one split, a group at a time, with memory bounded by a group: rows go to
    temporary files beside the outputs, the index arrays are kept as compact arrays (4 or 8 bytes an
    entry). `close` writes the .npy files and dataset.json, each atomically; `abort` (or leaving a
    `with` block on an error) removes what was written so far.

        with SplitWriter(out, "train", seq_len=81) as w:
            w.add_group([(0, [(input_row, label_row)])])
            meta = w.close(vocab_size=11, num_puzzle_identifiers=1)
    """

    def __init__(self, folder: str | os.PathLike, split: str, seq_len: int, set_name: str = "all"):
        if not SET_NAME.match(set_name):
            raise DataError(f"set name {set_name!r}: letters, digits, '_' or '-' only")
        if not _is_int(seq_len) or not 1 <= seq_len <= MAX_SEQ_LEN:
            raise DataError(f"seq_len {seq_len!r}: must be an integer between 1 and {MAX_SEQ_LEN:,}")
        self.folder = Path(folder) / split
        refuse_link(self.folder)
        with writing(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
        self.split, self.seq_len, self.set_name = split, seq_len, set_name
        tag = f"{os.getpid()}.{id(self):x}"
        self._rows = {f: _RowFile(self.folder / f".{set_name}__{f}.{tag}.rows", seq_len) for f in TOKEN_FIELDS}
        self.puzzle_identifiers = array("q")
        self.puzzle_indices = array("q", [0])
        self.group_indices = array("q", [0])
        self.closed = False

    # -- adding

    @property
    def num_examples(self) -> int:
        return self.puzzle_indices[-1]

    @property
    def num_puzzles(self) -> int:
        return len(self.puzzle_identifiers)

    @property
    def num_groups(self) -> int:
        return len(self.group_indices) - 1

    def add_group(self, puzzles: Sequence[tuple[int, Sequence[tuple[Any, Any]]]]) -> None:
        """One group: a list of puzzles, each `(identifier, [(input_row, label_row), ...])` with rows of
        seq_len non-negative integers."""
        if self.closed:
            raise DataError(f"{self.folder}: the writer is closed")
        if not puzzles:
            raise DataError(f"{self.folder}: group {self.num_groups} has no puzzles")
        for identifier, examples in puzzles:
            self._add_puzzle(identifier, examples)
        self.group_indices.append(self.num_puzzles)

    def _add_puzzle(self, identifier: int, examples: Sequence[tuple[Any, Any]]) -> None:
        if not (_is_int(identifier) or isinstance(identifier, np.integer)) or identifier < 0:
            raise DataError(f"{self.folder}: puzzle {self.num_puzzles}: identifier {identifier!r} "
                            "is not an integer >= 0")
        if not examples:
            raise DataError(f"{self.folder}: puzzle {self.num_puzzles} has no examples")
        inputs = self._rows_of([inp for inp, _ in examples], "input")
        labels = self._rows_of([lab for _, lab in examples], "label")
        self._rows["inputs"].append(inputs)
        self._rows["labels"].append(labels)
        self.puzzle_identifiers.append(int(identifier))
        self.puzzle_indices.append(self.num_examples + len(examples))

    def _rows_of(self, rows: list[Any], what: str) -> np.ndarray:
        arr = np.asarray(rows)
        if arr.ndim != 2 or arr.shape[1] != self.seq_len:
            raise DataError(f"{self.folder}: puzzle {self.num_puzzles}: {what} rows of shape "
                            f"{tuple(arr.shape[1:]) or '()'} where each must hold seq_len {self.seq_len} tokens")
        if arr.dtype.kind not in "iu":
            raise DataError(f"{self.folder}: puzzle {self.num_puzzles}: {what} rows of {arr.dtype}, not integers")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > INT32_MAX):
            raise DataError(f"{self.folder}: puzzle {self.num_puzzles}: {what} tokens outside 0..{INT32_MAX}")
        return arr

    # -- finishing

    def close(self, vocab_size: int, num_puzzle_identifiers: int, pad_id: int = 0, ignore_label_id: int | None = 0,
              blank_identifier_id: int = 0) -> PuzzleMetadata:
        """Write the set's arrays and the split's dataset.json (listing the sets already written into
        this split with the same settings, then this one) and return the metadata."""
        if self.closed:
            raise DataError(f"{self.folder}: the writer is closed")
        try:
            meta = self._metadata(vocab_size, num_puzzle_identifiers, pad_id, ignore_label_id, blank_identifier_id)
            self._check_values(meta)
            files = set_files(self.folder, self.set_name)
            dtype = token_dtype(vocab_size)
            for f in TOKEN_FIELDS:
                self._rows[f].write_npy(files[f], dtype)
            for f in INDEX_FIELDS:
                _save_index(files[f], np.frombuffer(getattr(self, f), np.int64).astype(np.int32))
            with writing(self.folder / METADATA_FILE):
                atomic_write(self.folder / METADATA_FILE,
                             lambda p: p.write_text(json.dumps(meta.to_dict()), encoding="utf-8"))
        finally:
            self.abort()
        return meta

    def _metadata(self, vocab_size: int, num_ids: int, pad_id: int, ignore_label_id: int | None,
                  blank_id: int) -> PuzzleMetadata:
        examples, puzzles, groups = self.num_examples, self.num_puzzles, self.num_groups
        if max(examples, puzzles, groups) > INT32_MAX:
            raise DataError(f"{self.folder}: {examples:,} examples do not fit the layout's int32 indices")
        sets = [self.set_name]
        path = self.folder / METADATA_FILE
        if path.is_file():  # another set of this split, written before: listed too, totals added
            old = PuzzleMetadata.from_json(path)
            same = (old.vocab_size, old.seq_len, old.pad_id, old.ignore_label_id, old.blank_identifier_id,
                    old.num_puzzle_identifiers) == (vocab_size, self.seq_len, pad_id, ignore_label_id, blank_id,
                                                    num_ids)
            if same and self.set_name not in old.sets:
                old_examples = old.mean_puzzle_examples * old.total_puzzles
                sets = [*old.sets, self.set_name]
                examples, puzzles, groups = (examples + round(old_examples), puzzles + old.total_puzzles,
                                             groups + old.total_groups)
        data = dict(pad_id=pad_id, ignore_label_id=ignore_label_id, blank_identifier_id=blank_id,
                    vocab_size=vocab_size, seq_len=self.seq_len, num_puzzle_identifiers=num_ids,
                    total_groups=groups, mean_puzzle_examples=examples / puzzles if puzzles else 0.0,
                    total_puzzles=puzzles, sets=sets)
        return PuzzleMetadata.from_dict(data, f"{path} (being written)")

    def _check_values(self, meta: PuzzleMetadata) -> None:
        for f in TOKEN_FIELDS:
            if self._rows[f].max_value >= meta.vocab_size:
                raise DataError(f"{self.folder}: a token of {f} is {self._rows[f].max_value}, not below "
                                f"vocab_size {meta.vocab_size}")
        ids = self.puzzle_identifiers
        if len(ids) and max(ids) >= meta.num_puzzle_identifiers:
            raise DataError(f"{self.folder}: puzzle identifier {max(ids)} is not below num_puzzle_identifiers "
                            f"{meta.num_puzzle_identifiers}")

    def abort(self) -> None:
        """Remove the temporary files; the writer takes no more groups."""
        self.closed = True
        for rows in self._rows.values():
            rows.discard()

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.closed:
            self.abort()


def _save_index(path: Path, values: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, values, allow_pickle=False)

    with writing(path):
        atomic_write(path, write)


def write_identifiers(folder: str | os.PathLike, names: Iterable[str]) -> int:
    """DIR/identifiers.json: the JSON list of identifier names, written as they come (id 0 is
    "<blank>"); returns how many."""
    path = Path(folder) / IDENTIFIERS_FILE
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("[")
            for i, name in enumerate(names):
                f.write((", " if i else "") + json.dumps(str(name)))
                count = i + 1
            f.write("]")

    with writing(path):
        atomic_write(path, write)
    return count


def write_test_puzzles(folder: str | os.PathLike, mapping: Mapping[str, Any]) -> None:
    """DIR/test_puzzles.json: task name -> the Kaggle task (train and test pairs, solutions filled in)."""
    path = Path(folder) / TEST_PUZZLES_FILE
    with writing(path):
        atomic_write(path, lambda p: p.write_text(json.dumps(mapping), encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Reading


def _npy_header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a .npy file, read without loading it; a file that is not one (or
    whose dtype holds Python objects) is a DataError naming it."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise DataError(f"{path}: not a readable .npy file ({str(e).splitlines()[0] if str(e) else e!r})") from None
    shape, fortran, dtype = header
    if dtype.hasobject or dtype.kind not in "iu" or dtype.fields is not None:
        raise DataError(f"{path}: holds {dtype} values; a puzzle array must hold integers "
                        "(a file of Python objects is never loaded)")
    return shape, fortran, dtype


def _load(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing; {BUILD_HINT}")
    shape, _, _ = _npy_header(path)
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: damaged .npy file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        ) from None
    if tuple(arr.shape) != tuple(shape):
        raise DataError(f"{path}: damaged .npy file (shape {arr.shape}, header says {shape})")
    return arr


def _check_offsets(arr: np.ndarray, path: Path, end: int, what: str) -> np.ndarray:
    """An offsets array: 1-D, starting at 0, non-decreasing, ending at `end` (the count of `what`)."""
    if arr.ndim != 1 or arr.size < 1:
        raise DataError(f"{path}: expected a 1-D array of offsets, found shape {arr.shape}")
    if int(arr[0]) != 0:
        raise DataError(f"{path}: offsets start at {int(arr[0])}, not 0")
    if arr.size > 1 and bool(np.any(np.diff(arr.astype(np.int64)) < 0)):
        bad = int(np.argmax(np.diff(arr.astype(np.int64)) < 0))
        raise DataError(f"{path}: offsets decrease at entry {bad + 1} ({int(arr[bad])} then {int(arr[bad + 1])})")
    if int(arr[-1]) != end:
        raise DataError(f"{path}: offsets end at {int(arr[-1])}, but there are {end} {what}")
    return arr.astype(np.int64)


@dataclass
class _Set:
    """One set of a split: its memory-mapped token arrays and checked indices."""

    name: str
    inputs: np.ndarray
    labels: np.ndarray
    puzzle_identifiers: np.ndarray
    puzzle_indices: np.ndarray
    group_indices: np.ndarray
    files: dict[str, Path]


def _open_set(folder: Path, name: str, meta: PuzzleMetadata) -> _Set:
    files = set_files(folder, name)
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)} of set {name!r}; {BUILD_HINT}")
    inputs, labels = (_load(files[f], mmap=True) for f in TOKEN_FIELDS)
    for f, arr in (("inputs", inputs), ("labels", labels)):
        if arr.ndim != 2 or arr.shape[1] != meta.seq_len:
            raise DataError(f"{files[f]}: shape {arr.shape}, expected (examples, seq_len {meta.seq_len})")
    if inputs.shape[0] != labels.shape[0]:
        raise DataError(f"{files['labels']}: {labels.shape[0]} rows, but {files['inputs'].name} has "
                        f"{inputs.shape[0]}")
    ids = _load(files["puzzle_identifiers"], mmap=False)
    if ids.ndim != 1:
        raise DataError(f"{files['puzzle_identifiers']}: expected a 1-D array, found shape {ids.shape}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= meta.num_puzzle_identifiers):
        bad = int(ids.max()) if int(ids.max()) >= meta.num_puzzle_identifiers else int(ids.min())
        raise DataError(f"{files['puzzle_identifiers']}: identifier {bad} outside 0..{meta.num_puzzle_identifiers - 1} "
                        "(num_puzzle_identifiers in dataset.json)")
    puzzles = _check_offsets(_load(files["puzzle_indices"], mmap=False), files["puzzle_indices"],
                             inputs.shape[0], "examples")
    if puzzles.size != ids.size + 1:
        raise DataError(f"{files['puzzle_indices']}: {puzzles.size} offsets for {ids.size} puzzles "
                        f"({files['puzzle_identifiers'].name}); expected {ids.size + 1}")
    groups = _check_offsets(_load(files["group_indices"], mmap=False), files["group_indices"], ids.size, "puzzles")
    return _Set(name, inputs, labels, ids.astype(np.int64), puzzles, groups, files)


class PuzzleSplit:
    """One split of a puzzle dataset, read: its sets concatenated into one view of examples, puzzles
    and groups (example, puzzle and group numbers run on from one set to the next).

    Token arrays are memory-mapped and checked against vocab_size lazily, batch by batch (or all at once
    by `scan`); every index array is checked when the split is opened."""

    def __init__(self, folder: Path, metadata: PuzzleMetadata, sets: list[_Set]):
        self.folder, self.metadata, self.sets = folder, metadata, sets
        rows = [s.inputs.shape[0] for s in sets]
        self.set_offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        puzzle_base = np.concatenate([[0], np.cumsum([s.puzzle_identifiers.size for s in sets])]).astype(np.int64)
        self.puzzle_identifiers = np.concatenate([s.puzzle_identifiers for s in sets]).astype(np.int64)
        self.puzzle_indices = np.concatenate(
            [[0]] + [s.puzzle_indices[1:] + self.set_offsets[i] for i, s in enumerate(sets)]).astype(np.int64)
        self.group_indices = np.concatenate(
            [[0]] + [s.group_indices[1:] + puzzle_base[i] for i, s in enumerate(sets)]).astype(np.int64)
        self._checked = np.zeros(len(sets), dtype=bool)  # sets scanned whole already

    @classmethod
    def open(cls, root: str | os.PathLike, split: str) -> PuzzleSplit:
        """The split `split` ('train' or 'test') of the dataset folder `root`."""
        folder = Path(root) / split
        if not (folder / METADATA_FILE).is_file():
            what = "is not a folder" if Path(root).exists() and not Path(root).is_dir() else \
                f"has no {split} split (missing {folder / METADATA_FILE})"
            raise DataError(f"puzzle dataset {root} {what}; {BUILD_HINT}")
        meta = PuzzleMetadata.from_json(folder / METADATA_FILE)
        return cls(folder, meta, [_open_set(folder, name, meta) for name in meta.sets])

    # -- sizes

    def __len__(self) -> int:
        return int(self.set_offsets[-1])

    @property
    def num_puzzles(self) -> int:
        return int(self.puzzle_identifiers.size)

    @property
    def num_groups(self) -> int:
        return int(self.group_indices.size - 1)

    @property
    def seq_len(self) -> int:
        return self.metadata.seq_len

    # -- orders

    def test_order(self) -> np.ndarray:
        """Every example once, in order (evaluation)."""
        return np.arange(len(self), dtype=np.int64)

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The examples of one training epoch, as the official sampler draws them: the groups in a random
        order, one random puzzle of each, that puzzle's examples in a random order. Random from
        (seed, epoch) alone."""
        if not _is_int(seed) or not _is_int(epoch) or seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be integers >= 0, got {seed!r} and {epoch!r}")
        rng = np.random.default_rng([seed, epoch])
        groups = rng.permutation(self.num_groups)
        first, sizes = self.group_indices[groups], np.diff(self.group_indices)[groups]
        groups_kept = sizes > 0
        first, sizes = first[groups_kept], sizes[groups_kept]
        puzzles = first + np.minimum((rng.random(first.size) * sizes).astype(np.int64), sizes - 1)
        starts, counts = self.puzzle_indices[puzzles], np.diff(self.puzzle_indices)[puzzles]
        segment = np.repeat(np.arange(puzzles.size), counts)
        within = np.arange(segment.size) - np.repeat(np.cumsum(counts) - counts, counts)
        shuffled = np.lexsort((rng.random(segment.size), segment))  # a random order inside each puzzle
        return (np.repeat(starts, counts) + within)[shuffled]

    def puzzle_of(self, index: Any) -> np.ndarray:
        """The puzzle number of each example index."""
        index = np.asarray(index, dtype=np.int64)
        return np.searchsorted(self.puzzle_indices, index, side="right") - 1

    def group_of_puzzle(self, puzzle: Any) -> np.ndarray:
        return np.searchsorted(self.group_indices, np.asarray(puzzle, dtype=np.int64), side="right") - 1

    # -- rows

    def rows(self, index: Any) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) of the example indices `index` as int64 arrays (B, seq_len), each checked
        against vocab_size."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        n = len(self)
        if index.size and (int(index.min()) < 0 or int(index.max()) >= n):
            raise IndexError(f"example index outside 0..{n - 1}")
        inputs = np.empty((index.size, self.seq_len), dtype=np.int64)
        labels = np.empty((index.size, self.seq_len), dtype=np.int64)
        which = np.searchsorted(self.set_offsets, index, side="right") - 1
        for k in np.unique(which):
            pick = which == k
            local = index[pick] - self.set_offsets[k]
            order = np.argsort(local, kind="stable")  # a memory map reads sorted rows faster
            s = self.sets[k]
            for f, out in (("inputs", inputs), ("labels", labels)):
                got = np.empty((local.size, self.seq_len), dtype=np.int64)
                got[order] = getattr(s, f)[local[order]]
                self._check_tokens(got, s.files[f], local)
                out[pick] = got
        return inputs, labels

    def _check_tokens(self, rows: np.ndarray, path: Path, local: np.ndarray) -> None:
        if not rows.size:
            return
        bad = (rows < 0) | (rows >= self.metadata.vocab_size)
        if bool(bad.any()):
            r = int(np.argmax(bad.any(axis=1)))
            value = int(rows[r][bad[r]][0])
            raise DataError(f"{path}: row {int(local[r])} holds token {value}, outside "
                            f"0..{self.metadata.vocab_size - 1} (vocab_size in {self.folder / METADATA_FILE})")

    def scan(self, chunk_rows: int = SCAN_ROWS) -> None:
        """Check every token of every set against vocab_size, `chunk_rows` rows at a time."""
        for k, s in enumerate(self.sets):
            if self._checked[k]:
                continue
            for f in TOKEN_FIELDS:
                arr = getattr(s, f)
                for start in range(0, arr.shape[0], chunk_rows):
                    chunk = np.asarray(arr[start:start + chunk_rows])
                    if chunk.size and (int(chunk.min()) < 0 or int(chunk.max()) >= self.metadata.vocab_size):
                        rows = chunk.astype(np.int64)
                        self._check_tokens(rows, s.files[f], np.arange(start, start + len(chunk)))
            self._checked[k] = True

    def batch(self, index: Any) -> dict[str, Any]:
        """The examples `index` as torch long tensors: input_ids and labels (B, seq_len), labels equal to
        ignore_label_id replaced by the runtime's ignore index, and puzzle_ids (B,), the identifier of
        each example's puzzle."""
        import torch

        from hrmspec.runtime.execution.losses import IGNORE_INDEX

        index = np.asarray(index, dtype=np.int64).reshape(-1)
        inputs, labels = self.rows(index)
        if self.metadata.ignore_label_id is not None:
            labels[labels == self.metadata.ignore_label_id] = IGNORE_INDEX
        puzzle_ids = self.puzzle_identifiers[self.puzzle_of(index)]
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                "puzzle_ids": torch.from_numpy(puzzle_ids)}


def read_identifiers(root: str | os.PathLike, max_bytes: int = 1 << 30) -> list[str]:
    """DIR/identifiers.json: identifier id -> name."""
    path = Path(root) / IDENTIFIERS_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing; {BUILD_HINT}")
    try:
        data = read_json_list(path, max_bytes)
    except CheckpointError as e:
        raise DataError(f"{path}: {e}") from None
    if not all(isinstance(n, str) for n in data):
        raise DataError(f"{path}: expected a JSON list of names")
    return data


def read_json_list(path: Path, max_bytes: int) -> list:
    """A JSON list file of at most `max_bytes` (identifiers.json may hold a million names)."""
    if os.stat(path).st_size > max_bytes:
        raise DataError(f"{path}: over the limit of {max_bytes:,} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list, found {type(data).__name__}")
    return data


def is_dataset_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a puzzle dataset (identifiers.json or a split's dataset.json)."""
    folder = Path(folder)
    return (folder / IDENTIFIERS_FILE).is_file() or any((folder / s / METADATA_FILE).is_file() for s in SPLITS)


def clear_dataset_folder(folder: str | os.PathLike) -> None:
    """Remove the files of a puzzle dataset from `folder` (before it is rebuilt): its splits' arrays and
    dataset.json, identifiers.json and test_puzzles.json; nothing else, and never through a link."""
    folder = Path(folder)
    for name in (IDENTIFIERS_FILE, TEST_PUZZLES_FILE):
        (folder / name).unlink(missing_ok=True)
    for split in SPLITS:
        sub = folder / split
        if sub.is_symlink() or not sub.is_dir():
            continue
        for path in sub.iterdir():
            if path.name == METADATA_FILE or (path.name.endswith(".npy") and "__" in path.name):
                if stat.S_ISREG(os.lstat(path).st_mode) or path.is_symlink():
                    path.unlink()
        if not any(sub.iterdir()):
            shutil.rmtree(sub, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the data: section that names such a folder


SOURCE = "hrm_dataset"


@dataclass
class PuzzleSource:
    """`data: {source: hrm_dataset, path: DIR}`: a grid run on a dataset folder in the official layout
    (relative paths are the spec folder's, recorded absolute in the run). Training samples `train/` as the
    official loader does (`PuzzleSplit.epoch_order`); evaluation reads `test/`, every example once."""

    source: str = SOURCE
    path: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, where: str = "data") -> PuzzleSource:
        d = dict(d or {})
        known = ("source", "path")
        for key in d:
            if key not in known:
                raise DataError(f"{where}.{key}: unknown key for a puzzle dataset; known: source, path "
                                "(the grid tasks of reasoning-gym take grids:, size:, ...: source is for a folder)")
        cfg = cls(**d)
        if cfg.source != SOURCE:
            raise DataError(f"{where}.source: expected {SOURCE}, found {_short(cfg.source)}")
        if not isinstance(cfg.path, str) or not cfg.path:
            raise DataError(f"{where}.path: the dataset folder, e.g. path: data/sudoku-extreme-1k-aug-1000; "
                            f"{BUILD_HINT}")
        return cfg

    def split(self, name: str) -> PuzzleSplit:
        return PuzzleSplit.open(self.path, name)

    def training_split(self, model, batch_size: int, seed: int = 0) -> PuzzleSplit:
        """The train split, checked against a spec's `model` (`ModelSpec`: vocab, max_seq_len, puzzle) and
        the batch an epoch must fill; the test split is opened too (a run evaluates on it at the end)."""
        rows = self.split("train")
        self.split("test")
        meta, where = rows.metadata, f"{self.path}/train/dataset.json"
        if meta.vocab_size > model.vocab:
            raise DataError(f"{where}: vocab_size {meta.vocab_size} but model.vocab is {model.vocab}: set --set "
                            f"model.vocab={meta.vocab_size}")
        if meta.seq_len > model.max_seq_len:
            raise DataError(f"{where}: seq_len {meta.seq_len} but model.max_seq_len is {model.max_seq_len}: set "
                            f"--set model.max_seq_len={meta.seq_len}")
        if model.puzzle is not None and meta.num_puzzle_identifiers > model.puzzle.identifiers:
            raise DataError(f"{where}: num_puzzle_identifiers {meta.num_puzzle_identifiers} but model.puzzle."
                            f"identifiers is {model.puzzle.identifiers}: set --set model.puzzle.identifiers="
                            f"{meta.num_puzzle_identifiers}")
        epoch = len(rows.epoch_order(seed, 0))
        if epoch < batch_size:
            raise DataError(f"{where}: an epoch (one puzzle of each of {rows.num_groups:,} groups) holds {epoch:,} "
                            f"examples, fewer than train.batch_size {batch_size}: use a smaller batch")
        return rows

    @property
    def arc(self) -> bool:
        """An ARC dataset: its test_puzzles.json is there, for the official voting."""
        return (Path(self.path) / TEST_PUZZLES_FILE).is_file()


def is_puzzle_source(data: Mapping[str, Any] | None) -> bool:
    return isinstance(data, Mapping) and data.get("source") == SOURCE


__all__ = ["BLANK_IDENTIFIER", "FIELDS", "SOURCE", "SPLITS", "PuzzleMetadata", "PuzzleSource", "PuzzleSplit",
           "SplitWriter", "is_puzzle_source",
           "clear_dataset_folder", "is_dataset_folder", "read_identifiers", "token_dtype", "write_identifiers",
           "write_test_puzzles"]
