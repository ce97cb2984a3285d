"""The official ARC evaluation of HRM / TRM (evaluators/arc.py): votes over augmented copies, pass@K,
and a Kaggle submission.

A dataset built as the official one (see hrmspec.runtime.artifacts.arc_grids) holds, next to its
splits, two files this evaluator reads:

    identifiers.json    a list: puzzle identifier -> name, `base` or `base|||t<tid>|||<colours>` for an
                        augmented copy; entry 0 is the blank identifier ("<blank>") of padding rows
    test_puzzles.json   {task: {"test": [{"input": grid, "output": grid}, ...], ...}} in Kaggle's format;
                        the test outputs are the labels (a set without solutions carries a dummy [[0]])

Every evaluated row is one test input of one augmented copy of a task, placed at the corner of the
30 x 30 canvas (900 tokens), or of a smaller square canvas (`build-data arc --canvas N`: N * N tokens; the
side is read off the rows, or fixed with `canvas=N`). `update_batch` reads the row's name from its
identifier, crops the input and the prediction, and undoes the augmentation on both, so that each
prediction is a grid of the original task, filed under the original test input (found by its hash).
Each prediction is one vote, carrying the model's confidence sigmoid(q_halt_logit) (computed in float64).

`result` counts the votes for every test input of every task in test_puzzles.json: the candidate
grids are ranked by (number of votes, mean confidence), both descending, a complete tie keeping the
grid seen first. pass@K holds for a test input when its label is among the top K candidates. A task
scores the fraction of its test inputs that pass. The metric `ARC/pass@K` is the mean score over
tasks. A task the model never predicted for (its rows missing from the evaluated split) scores 0.

Divergences from the official code, none of which changes a score:

* A test input with no prediction scores 0, as in the official code. The official code then skips
  it in the submission too, which shifts the attempts of any later test input of the task onto the
  wrong index. Here it gets attempts of `[[0]]`, so the file stays aligned and valid for Kaggle.
* An empty prediction (a crop of zero cells) is written to the submission as `[[0]]` for the same
  reason; it can never match a label.
* A NaN confidence ranks below every number among grids with the same vote count (the official
  sort leaves the order undefined).
* Distributed runs: the official `result` calls torch.distributed.gather_object itself. Here that is
  the caller's business. Every rank sends `state_dict()` (plain lists, dicts, strings and floats,
  no pickled objects of ours); rank 0 passes the list of all ranks' states, in rank order, to
  `gather` and calls `result`. Votes are kept per grid in arrival order, so the confidences are summed
  in the same order as the official code and ties fall the same way.

    evaluator = ArcEvaluator("data/arc-aug-1000")
    for batch in loader:                                   # inputs (B, 900), puzzle_identifiers (B,)
        evaluator.update_batch(batch, {"preds": preds, "q_halt_logits": q})
    metrics = evaluator.result(save_path="out/")           # {"ARC/pass@1": ..., ...}, out/submission.json
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hrmspec.errors import SpecError
from hrmspec.runtime.artifacts.arc_grids import (
    IDENTITY,
    SEQ_LEN,
    Augmentation,
    canvas_side,
    check_grid,
    crop,
    grid_hash,
    parse_name,
    side_of,
)
from hrmspec.runtime.artifacts.data import DataError
from hrmspec.runtime.artifacts.files import atomic_write, writing
from hrmspec.spec.source import quoted
from hrmspec.spec.source import read_json as read_bounded

IDENTIFIERS = "identifiers.json"
TEST_PUZZLES = "test_puzzles.json"
SUBMISSION = "submission.json"
# an ARC-AGI set with 1000 augmentations per task names about a million copies (tens of MB)
MAX_BYTES = 512 << 20
MAX_VALUES = 50_000_000
EMPTY_ATTEMPT = [[0]]  # what Kaggle gets where there is no grid to submit
STATE_VERSION = 1


def _read(path: Path, kind: type) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: not found; an ARC dataset folder holds {IDENTIFIERS} and {TEST_PUZZLES}")
    try:
        data = read_bounded(path, max_bytes=MAX_BYTES, max_values=MAX_VALUES)
    except SpecError as e:
        raise DataError(str(e).splitlines()[0]) from None
    if not isinstance(data, kind):
        names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
                 float: "a number", type(None): "null"}
        raise DataError(f"{path}: expected {names[kind]}, found {names.get(type(data), 'another value')}")
    return data


def read_identifiers(path: Path) -> list[str]:
    names = _read(path, list)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise DataError(f"{path}: identifier {i} names a puzzle with text, not {quoted(name)}")
    return names


def read_test_puzzles(path: Path) -> dict[str, list[tuple[str, str]]]:
    """task -> [(input hash, label hash)] per test input, in the file's order."""
    tasks = _read(path, dict)
    if not tasks:
        raise DataError(f"{path}: no tasks")
    out: dict[str, list[tuple[str, str]]] = {}
    for name, task in tasks.items():
        where = f"{path}: task {quoted(name)}"
        test = task.get("test") if isinstance(task, dict) else None
        if not isinstance(test, list) or not test:
            raise DataError(f"{where}: expected an object with a non-empty list \"test\"")
        pairs = []
        for i, pair in enumerate(test):
            if not isinstance(pair, dict) or "input" not in pair or "output" not in pair:
                raise DataError(f"{where}: test {i} is an object with \"input\" and \"output\" grids "
                                "(a set without solutions gives the output [[0]])")
            pairs.append((grid_hash(check_grid(pair["input"], f"{where}, test {i} input")),
                          grid_hash(check_grid(pair["output"], f"{where}, test {i} output"))))
        out[name] = pairs
    return out


def _array(v: Any, name: str) -> np.ndarray:
    """Integer tokens from a torch tensor (any device) or an array-like, as a numpy array."""
    if hasattr(v, "detach"):  # torch, without importing it
        v = v.detach().cpu().numpy()
    arr = np.asarray(v)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integer tokens, found {arr.dtype}")
    return arr


def _confidence(v: Any) -> np.ndarray:
    """sigmoid(q) in float64: torch's own for a tensor (the official computation), else 1 / (1 + exp(-q))."""
    if hasattr(v, "detach"):  # torch, without importing it; bfloat16 has no numpy dtype
        return v.detach().double().sigmoid().cpu().numpy()
    x = np.asarray(v, dtype=np.float64)
    with np.errstate(over="ignore"):  # exp(-q) overflows to inf for q below about -709: sigmoid 0
        return 1.0 / (1.0 + np.exp(-x))


def _rank_key(stats: tuple[int, float]) -> tuple[int, float]:
    count, mean = stats
    return count, (-math.inf if math.isnan(mean) else mean)


class ArcEvaluator:
    """The official ARC evaluator's interface: `update_batch` per batch, then `result`."""

    required_outputs = frozenset({"inputs", "puzzle_identifiers", "q_halt_logits", "preds"})

    def __init__(self, data_dir: str | os.PathLike, pass_ks: Sequence[int] = (1, 2, 5, 10, 100, 1000),
                 submission_k: int = 2, blank_identifier_id: int = 0, canvas: int | None = None):
        """`canvas`: the side of the square canvas the rows use (2-30; their length is its square); None
        accepts any square canvas, read off the rows' length (900 tokens: the official 30 x 30)."""
        ks = tuple(pass_ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"pass_ks are positive integers, not {quoted(pass_ks)}")
        if isinstance(submission_k, bool) or not isinstance(submission_k, int) or submission_k < 1:
            raise ValueError(f"submission_k is a positive integer, not {quoted(submission_k)}")
        self.data_dir = Path(data_dir)
        self.pass_ks = ks
        self.submission_k = submission_k
        self.canvas = None if canvas is None else canvas_side(canvas)
        self.blank_identifier_id = int(blank_identifier_id)
        self._identifiers_path = self.data_dir / IDENTIFIERS
        self.identifiers = read_identifiers(self._identifiers_path)
        self.test_puzzles = read_test_puzzles(self.data_dir / TEST_PUZZLES)
        self._parsed: dict[int, tuple[str, Augmentation]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget every prediction. Call it between evaluations of different checkpoints: the official
        evaluator's default (aggregated_voting) never clears, so its votes pile up across evaluations."""
        self._grids: dict[str, np.ndarray] = {}  # prediction hash -> grid (one per hash)
        # task -> test input hash -> prediction hash -> confidences, in arrival order
        self._votes: dict[str, dict[str, dict[str, list[float]]]] = {}

    def _name(self, identifier: int) -> tuple[str, Augmentation]:
        got = self._parsed.get(identifier)
        if got is None:
            if not 0 <= identifier < len(self.identifiers):
                raise DataError(f"{self._identifiers_path}: puzzle identifier {identifier} is out of range: "
                                f"the file names {len(self.identifiers)} (0-{len(self.identifiers) - 1}); "
                                "the data and this dataset folder disagree")
            try:
                base, aug = parse_name(self.identifiers[identifier])
            except DataError as e:
                raise DataError(f"{self._identifiers_path}: identifier {identifier}: {e}") from None
            got = self._parsed[identifier] = (base, aug or IDENTITY)
        return got

    def update_batch(self, batch: Mapping[str, Any], preds: Mapping[str, Any]) -> None:
        """File every non-blank row's prediction under its task and test input. `batch` and `preds`
        together hold inputs (B, L), puzzle_identifiers (B,), preds (B, L) and q_halt_logits (B,), as torch
        tensors or numpy arrays; L is the canvas's side squared (900 for the official 30 x 30)."""
        found = {k: v for coll in (batch, preds) for k, v in coll.items() if k in self.required_outputs}
        missing = sorted(self.required_outputs - found.keys())
        if missing:
            raise ValueError(f"update_batch needs {', '.join(missing)} in the batch or the predictions")
        ids = _array(found["puzzle_identifiers"], "puzzle_identifiers").reshape(-1)
        inputs = _array(found["inputs"], "inputs")
        outputs = _array(found["preds"], "preds")
        q = _confidence(found["q_halt_logits"]).reshape(-1)
        b = ids.shape[0]
        if self.canvas is not None:
            length = self.canvas * self.canvas
        else:  # the canvas the rows come in: any square up to 30 x 30
            length = inputs.shape[-1] if inputs.ndim == 2 else SEQ_LEN
            if side_of(length) is None:
                length = SEQ_LEN
        for name, arr in (("inputs", inputs), ("preds", outputs)):
            if arr.shape != (b, length):
                raise ValueError(f"{name}: expected shape ({b}, {length}) (rows of a square canvas, 900 tokens for "
                                 f"30 x 30), found {arr.shape}")
        if q.shape != (b,):
            raise ValueError(f"q_halt_logits: expected {b} values, found shape {q.shape}")
        rows = np.flatnonzero(ids != self.blank_identifier_id)
        names = [self._name(int(ids[i])) for i in rows]  # every identifier checked before any vote is filed
        for i, (base, aug) in zip(rows, names):
            input_hash = grid_hash(aug.invert(crop(inputs[i])))
            grid = aug.invert(crop(outputs[i]))
            pred_hash = grid_hash(grid)
            self._grids.setdefault(pred_hash, grid)
            (self._votes.setdefault(base, {}).setdefault(input_hash, {})
             .setdefault(pred_hash, []).append(float(q[i])))

    # --- distributed ranks ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This evaluator's predictions as plain data (JSON-compatible), for another rank's `merge` / `gather`."""
        return {
            "version": STATE_VERSION,
            "grids": {h: g.tolist() for h, g in self._grids.items()},
            "votes": {task: {ih: {ph: list(qs) for ph, qs in preds.items()} for ih, preds in inputs.items()}
                      for task, inputs in self._votes.items()},
        }

    def merge(self, other: ArcEvaluator | Mapping[str, Any]) -> None:
        """Add another evaluator's predictions (or its `state_dict()`) after this one's."""
        state = other.state_dict() if isinstance(other, ArcEvaluator) else other
        grids, votes = _checked_state(state)
        for h, g in grids.items():
            self._grids.setdefault(h, g)
        for task, inputs in votes.items():
            mine = self._votes.setdefault(task, {})
            for ih, preds in inputs.items():
                slot = mine.setdefault(ih, {})
                for ph, qs in preds.items():
                    slot.setdefault(ph, []).extend(qs)

    def gather(self, states: Iterable[ArcEvaluator | Mapping[str, Any]]) -> None:
        """Replace this evaluator's predictions by those of every rank, `states` in rank order (this
        rank's own among them), as the official result() votes after torch.distributed.gather_object."""
        states = list(states)
        self.reset()
        for state in states:
            self.merge(state)

    # --- voting -----------------------------------------------------------------------------------------

    def _ranked(self, task: str, input_hash: str) -> list[tuple[str, tuple[int, float]]]:
        preds = self._votes.get(task, {}).get(input_hash, {})
        stats = []
        for h, qs in preds.items():
            total = 0.0
            for v in qs:  # summed in arrival order, as the official code does
                total += v
            stats.append((h, (len(qs), total / len(qs))))
        return sorted(stats, key=lambda kv: _rank_key(kv[1]), reverse=True)  # stable: first seen wins a tie

    def result(self, save_path: str | os.PathLike | None = None) -> dict[str, float]:
        """{"ARC/pass@K": mean over tasks of the fraction of test inputs whose label is among the top K
        candidates}; with `save_path` (a folder), also its submission.json."""
        correct = [0.0] * len(self.pass_ks)
        submission: dict[str, list[dict[str, Any]]] = {}
        for task, pairs in self.test_puzzles.items():
            passed = [0] * len(self.pass_ks)
            attempts = []
            for input_hash, label_hash in pairs:
                ranked = self._ranked(task, input_hash)
                hashes = [h for h, _ in ranked]
                for i, k in enumerate(self.pass_ks):
                    passed[i] += label_hash in hashes[:k]
                grids = [self._attempt(h) for h in hashes[:self.submission_k]] or [EMPTY_ATTEMPT]
                grids += [grids[0]] * (self.submission_k - len(grids))
                attempts.append({f"attempt_{i + 1}": g for i, g in enumerate(grids)})
            submission[task] = attempts
            for i in range(len(self.pass_ks)):
                correct[i] += passed[i] / len(pairs)
        if save_path is not None:
            folder = Path(save_path)
            path = folder / SUBMISSION
            with writing(path):
                folder.mkdir(parents=True, exist_ok=True)
                text = json.dumps(submission, separators=(",", ":"))
                atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
        return {f"ARC/pass@{k}": correct[i] / len(self.test_puzzles) for i, k in enumerate(self.pass_ks)}

    def _attempt(self, h: str) -> list[list[int]]:
        g = self._grids[h]
        return g.tolist() if g.size else EMPTY_ATTEMPT


def _checked_state(state: Any) -> tuple[dict[str, np.ndarray], dict[str, dict[str, dict[str, list[float]]]]]:
    """The grids and votes of a state_dict(), checked: a malformed one is a DataError, never half-merged."""
    where = "an ARC evaluator state"
    if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
        raise DataError(f"{where}: expected a dict from ArcEvaluator.state_dict() (version {STATE_VERSION})")
    raw_grids, raw_votes = state.get("grids"), state.get("votes")
    if not isinstance(raw_grids, Mapping) or not isinstance(raw_votes, Mapping):
        raise DataError(f"{where}: expected \"grids\" and \"votes\" mappings")
    grids = {}
    for h, g in raw_grids.items():
        empty = isinstance(g, list) and not g  # a crop of zero cells
        arr = np.zeros((0, 0), dtype=np.uint8) if empty else check_grid(g, f"{where}, grid {quoted(h)}")
        if not isinstance(h, str) or grid_hash(arr) != h:
            raise DataError(f"{where}: grid {quoted(h)} does not match its hash")
        grids[h] = arr
    votes: dict[str, dict[str, dict[str, list[float]]]] = {}
    for task, inputs in raw_votes.items():
        if not isinstance(task, str) or not isinstance(inputs, Mapping):
            raise DataError(f"{where}: votes of {quoted(task)} are not a mapping")
        for ih, preds in inputs.items():
            if not isinstance(ih, str) or not isinstance(preds, Mapping):
                raise DataError(f"{where}: votes of {quoted(task)} for input {quoted(ih)} are not a mapping")
            for ph, qs in preds.items():
                if (not isinstance(ph, str) or not isinstance(qs, list) or not qs
                        or any(isinstance(q, bool) or not isinstance(q, (int, float)) for q in qs)):
                    raise DataError(f"{where}: the votes of {quoted(task)} for grid {quoted(ph)} are not a "
                                    "non-empty list of numbers")
                if ph not in grids:
                    raise DataError(f"{where}: votes for grid {quoted(ph)} without the grid")
                votes.setdefault(task, {}).setdefault(ih, {})[ph] = [float(q) for q in qs]
    return grids, votes


__all__ = ["ArcEvaluator", "read_identifiers", "read_test_puzzles"]
