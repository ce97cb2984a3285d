"""The official ARC evaluation (runtime/evaluate/arc.py): voting over augmented predictions, pass@K with
fractional credit per task, the Kaggle submission, and combining ranks.

The reference below reads the official evaluators/arc.py's rules straight off: votes per predicted grid
keyed by the grid's cells (not a hash), a candidate ranked above another when it has more votes, or as many
with a higher mean confidence, the first seen winning a complete tie; picked by repeated selection of the
best rather than by a sort."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hrmspec.runtime.artifacts.arc_grids import IDENTITY, Augmentation, place
from hrmspec.runtime.artifacts.data import DataError
from hrmspec.runtime.evaluate.arc import ArcEvaluator

LOGITS = (-1000.0, -2.5, -0.75, 0.0, 0.75, 2.5, 1000.0)  # few values: equal vote counts and equal means happen
KS = (1, 2, 3, 5)


def key(grid) -> tuple:
    return tuple(tuple(int(v) for v in row) for row in np.asarray(grid))


def write_data(folder, tasks: dict[str, list[tuple[np.ndarray, np.ndarray]]], names: list[str]):
    """identifiers.json (blank first) and test_puzzles.json, as the official builder writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "identifiers.json").write_text(json.dumps(["<blank>", *names]))
    puzzles = {t: {"train": [], "test": [{"input": np.asarray(i).tolist(), "output": np.asarray(o).tolist()}
                                         for i, o in pairs]} for t, pairs in tasks.items()}
    (folder / "test_puzzles.json").write_text(json.dumps(puzzles))
    return folder


class Rows:
    """Evaluated rows built as the official pipeline builds them: the test input and the predicted grid
    augmented, placed at the corner of the canvas; the identifier names the augmented copy."""

    def __init__(self):
        self.names: list[str] = []
        self.ids, self.inputs, self.preds, self.logits = [], [], [], []
        self.records = []  # (task, input key, prediction key, logit) per non-blank row, in order

    def ident(self, name: str) -> int:
        if name not in self.names:
            self.names.append(name)
        return self.names.index(name) + 1  # 0 is the blank identifier

    def add(self, task: str, test_input, predicted, logit: float, aug: Augmentation | None = None):
        name = task if aug is None else aug.name(task)
        aug = aug or IDENTITY
        row_in, row_out = place(aug.apply(test_input), aug.apply(predicted))
        self.ids.append(self.ident(name))
        self.inputs.append(row_in)
        self.preds.append(row_out)
        self.logits.append(logit)
        self.records.append((task, key(test_input), key(predicted), len(self.logits) - 1))

    def blank(self, rng: np.random.Generator):
        self.ids.append(0)
        self.inputs.append(rng.integers(0, 12, 900).astype(np.uint8))
        self.preds.append(rng.integers(-5, 40, 900))  # junk: never read
        self.logits.append(float(rng.normal()))

    def batches(self, cuts: list[int], as_torch: bool):
        edges = [0, *sorted(c for c in cuts if 0 < c < len(self.ids)), len(self.ids)]
        for a, b in zip(edges[:-1], edges[1:]):
            if a == b:
                continue
            ids = np.array(self.ids[a:b], dtype=np.int32)
            inputs = np.stack(self.inputs[a:b]).astype(np.int32)
            preds = np.stack([p.astype(np.int64) for p in self.preds[a:b]])
            logits = np.array(self.logits[a:b], dtype=np.float32)
            if as_torch:
                ids, inputs, preds, logits = map(torch.from_numpy, (ids, inputs, preds, logits))
            yield a, {"inputs": inputs, "puzzle_identifiers": ids}, {"preds": preds, "q_halt_logits": logits}


def confidences(batch_q) -> np.ndarray:
    """sigmoid(q) in float64 the official way (torch) for tensors, 1 / (1 + exp(-q)) for arrays."""
    if isinstance(batch_q, torch.Tensor):
        return batch_q.to(torch.float64).sigmoid().numpy()
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(batch_q, dtype=np.float64)))


def reference(tasks, votes, pass_ks, submission_k):
    """(metrics, submission) by the official rules; votes: (task, input key, prediction key, confidence)."""
    totals = dict.fromkeys(pass_ks, 0.0)
    submission = {}
    for task, pairs in tasks.items():
        hits = dict.fromkeys(pass_ks, 0)
        submission[task] = []
        for test_input, label in pairs:
            seen: list[tuple] = []  # candidates in order of their first vote
            conf: dict[tuple, list[float]] = {}
            for t, inp, pred, c in votes:
                if t == task and inp == key(test_input):
                    if pred not in conf:
                        seen.append(pred)
                        conf[pred] = []
                    conf[pred].append(c)

            stats = {}
            for p, cs in conf.items():
                total = 0.0
                for c in cs:  # in the order the votes came, as the official code sums them
                    total += c
                stats[p] = (len(cs), total / len(cs))

            def beats(a, b, stats=stats):
                (na, ma), (nb, mb) = stats[a], stats[b]
                return na > nb or (na == nb and ma > mb)

            order, left = [], list(seen)
            while left:
                best = left[0]
                for p in left[1:]:
                    if beats(p, best):
                        best = p
                order.append(best)
                left.remove(best)
            for k in pass_ks:
                hits[k] += key(label) in order[:k]
            attempts = [[list(r) for r in p] for p in order[:submission_k]] or [[[0]]]
            while len(attempts) < submission_k:
                attempts.append(attempts[0])
            submission[task].append({f"attempt_{i + 1}": a for i, a in enumerate(attempts)})
        for k in pass_ks:
            totals[k] += hits[k] / len(pairs)
    return {f"ARC/pass@{k}": totals[k] / len(tasks) for k in pass_ks}, submission


def small_grid(rng: np.random.Generator, side: int = 3) -> np.ndarray:
    return rng.integers(0, 10, tuple(rng.integers(1, side + 1, 2))).astype(np.uint8)


@st.composite
def scenarios(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_tasks = draw(st.integers(1, 3))
    tasks, pools = {}, {}
    for t in range(n_tasks):
        name = f"task{t}"
        pool = [small_grid(rng) for _ in range(draw(st.integers(1, 4)))]
        pairs = []
        for _ in range(draw(st.integers(1, 3))):
            label = pool[draw(st.integers(0, len(pool) - 1))] if draw(st.booleans()) else small_grid(rng)
            pairs.append((small_grid(rng, 4), label))
        tasks[name], pools[name] = pairs, pool
    rows = []  # (task, pair, candidate, logit, augmentation or None) or None for a blank row
    for _ in range(draw(st.integers(0, 30))):
        if draw(st.integers(0, 9)) == 0:
            rows.append(None)
            continue
        task = draw(st.sampled_from(sorted(tasks)))
        aug = None if draw(st.integers(0, 3)) == 0 else Augmentation(
            draw(st.integers(0, 7)), (0, *draw(st.permutations(list(range(1, 10))))))
        rows.append((task, draw(st.integers(0, len(tasks[task]) - 1)), draw(st.integers(0, len(pools[task]) - 1)),
                     draw(st.sampled_from(LOGITS)), aug))
    cuts = draw(st.lists(st.integers(0, 30), max_size=3))
    return tasks, pools, rows, cuts, draw(st.booleans()), draw(st.integers(1, 3)), draw(st.integers(1, 3)), rng


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_the_vote_matches_the_official_rules(tmp_path_factory, scenario):
    tasks, pools, plan, cuts, as_torch, submission_k, n_ranks, rng = scenario
    rows = Rows()
    for step in plan:
        if step is None:
            rows.blank(rng)
        else:
            task, pair, cand, logit, aug = step
            rows.add(task, tasks[task][pair][0], pools[task][cand], logit, aug)
    folder = write_data(tmp_path_factory.mktemp("arc"), tasks, rows.names)

    whole = ArcEvaluator(folder, pass_ks=KS, submission_k=submission_k)
    ranks = [ArcEvaluator(folder, pass_ks=KS, submission_k=submission_k) for _ in range(n_ranks)]
    conf = np.zeros(len(rows.ids))
    for n, (start, batch, preds) in enumerate(rows.batches(cuts, as_torch)):
        whole.update_batch(batch, preds)
        ranks[n % n_ranks].update_batch(batch, preds)
        conf[start:start + len(preds["q_halt_logits"])] = confidences(preds["q_halt_logits"])

    # the votes in the order rank 0's batches, rank 1's, ... reach the gather
    batches = list(rows.batches(cuts, as_torch))
    order = [i for r in range(n_ranks) for n, (start, _, p) in enumerate(batches) if n % n_ranks == r
             for i in range(start, start + len(p["q_halt_logits"]))]
    by_row = {i: r for r, (_, _, _, i) in enumerate(rows.records)}

    def votes(row_order):
        return [(t, inp, pred, float(conf[i])) for i in row_order if i in by_row
                for (t, inp, pred, _) in [rows.records[by_row[i]]]]

    out = tmp_path_factory.mktemp("out")
    want, want_sub = reference(tasks, votes(range(len(rows.ids))), KS, submission_k)
    assert whole.result(save_path=out) == want
    assert json.loads((out / "submission.json").read_text()) == want_sub

    gathered = ArcEvaluator(folder, pass_ks=KS, submission_k=submission_k)
    gathered.gather([json.loads(json.dumps(r.state_dict())) for r in ranks])  # plain data survives JSON
    want_ranks, _ = reference(tasks, votes(order), KS, submission_k)
    assert gathered.result() == want_ranks


# --- examples ---------------------------------------------------------------------------------------------

A = np.array([[1, 2], [3, 4]], dtype=np.uint8)
B = np.array([[5]], dtype=np.uint8)
C = np.array([[6, 6, 6]], dtype=np.uint8)
D = np.array([[7], [8]], dtype=np.uint8)
X = np.array([[0, 1, 2]], dtype=np.uint8)  # test inputs
Y = np.array([[3], [4]], dtype=np.uint8)


def evaluator(tmp_path, tasks, rows: Rows, **kw) -> ArcEvaluator:
    ev = ArcEvaluator(write_data(tmp_path / "data", tasks, rows.names), **kw)
    for _, batch, preds in rows.batches([], as_torch=True):
        ev.update_batch(batch, preds)
    return ev


def test_attempts_are_ranked_by_votes_then_mean_confidence(tmp_path):
    rows = Rows()
    aug = Augmentation(5, (0, 9, 8, 7, 6, 5, 4, 3, 2, 1))
    for logit in (-3.0, -3.0):  # C: two votes, low confidence, seen first
        rows.add("t", X, C, logit)
    for logit in (4.0, 0.0):    # D: two votes, higher mean
        rows.add("t", X, D, logit, aug)
    for logit in (-9.0, -9.0, -9.0):  # A: three votes win whatever their confidence
        rows.add("t", X, A, logit, Augmentation(1, (0, 2, 1, 3, 4, 5, 6, 7, 8, 9)))
    rows.add("t", X, B, 9.0)    # B: one vote
    ev = evaluator(tmp_path, {"t": [(X, D)]}, rows, pass_ks=(1, 2, 3, 4), submission_k=3)
    assert ev.result(save_path=tmp_path / "out") == {"ARC/pass@1": 0.0, "ARC/pass@2": 1.0, "ARC/pass@3": 1.0,
                                                     "ARC/pass@4": 1.0}
    sub = json.loads((tmp_path / "out" / "submission.json").read_text())
    assert sub == {"t": [{"attempt_1": A.tolist(), "attempt_2": D.tolist(), "attempt_3": C.tolist()}]}


def test_a_complete_tie_goes_to_the_grid_seen_first(tmp_path):
    rows = Rows()
    rows.add("t", X, C, 1.0)
    rows.add("t", X, D, 1.0)
    ev = evaluator(tmp_path, {"t": [(X, D)]}, rows, pass_ks=(1, 2))
    assert ev.result() == {"ARC/pass@1": 0.0, "ARC/pass@2": 1.0}


def test_too_few_candidates_repeat_the_first_attempt(tmp_path):
    rows = Rows()
    rows.add("t", X, A, 0.0)
    rows.add("t", X, A, 1.0, Augmentation(6, (0, 1, 2, 3, 4, 5, 6, 7, 9, 8)))
    ev = evaluator(tmp_path, {"t": [(X, A)]}, rows, submission_k=2)
    ev.result(save_path=tmp_path)
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert sub == {"t": [{"attempt_1": A.tolist(), "attempt_2": A.tolist()}]}
    assert ev.result()["ARC/pass@1"] == 1.0


def test_a_task_with_two_test_inputs_and_one_right_scores_half(tmp_path):
    rows = Rows()
    rows.add("t", X, A, 0.0)          # right
    rows.add("t", Y, C, 0.0)          # wrong: the label is D
    rows.add("u", X, B, 0.0, Augmentation(3, (0, 3, 1, 2, 4, 5, 6, 7, 8, 9)))  # right
    ev = evaluator(tmp_path, {"t": [(X, A), (Y, D)], "u": [(X, B)]}, rows, pass_ks=(1,))
    assert ev.result() == {"ARC/pass@1": (0.5 + 1.0) / 2}


def test_a_test_input_without_predictions_scores_zero_and_keeps_its_place_in_the_submission(tmp_path):
    rows = Rows()
    rows.add("t", Y, D, 0.0)  # only the second test input of t; no rows at all for task u
    ev = evaluator(tmp_path, {"t": [(X, A), (Y, D)], "u": [(X, B)]}, rows, pass_ks=(1, 1000))
    assert ev.result(save_path=tmp_path / "o") == {"ARC/pass@1": 0.25, "ARC/pass@1000": 0.25}
    sub = json.loads((tmp_path / "o" / "submission.json").read_text())
    assert sub == {"t": [{"attempt_1": [[0]], "attempt_2": [[0]]}, {"attempt_1": D.tolist(), "attempt_2": D.tolist()}],
                   "u": [{"attempt_1": [[0]], "attempt_2": [[0]]}]}


def test_the_prediction_is_read_in_the_frame_of_the_original_task(tmp_path):
    """A row of an augmented copy predicts the augmented label: right only once the augmentation is undone."""
    aug = Augmentation(7, (0, 4, 5, 6, 1, 2, 3, 9, 8, 7))
    rows = Rows()
    rows.add("t", X, A, 0.0, aug)        # the model predicted aug(A): A in the task's own frame
    rows.add("u", X, aug.apply(A), 0.0)  # an unaugmented row predicting aug(A): not A
    ev = evaluator(tmp_path, {"t": [(X, A)], "u": [(X, A)]}, rows, pass_ks=(1,))
    assert ev.result() == {"ARC/pass@1": 0.5}


def test_blank_rows_are_skipped_whatever_they_hold(tmp_path):
    rows = Rows()
    rng = np.random.default_rng(0)
    rows.blank(rng)
    rows.add("t", X, A, 0.0)
    rows.blank(rng)
    ev = evaluator(tmp_path, {"t": [(X, A)]}, rows, pass_ks=(1,))
    assert ev.result() == {"ARC/pass@1": 1.0}
    assert sum(len(v) for inputs in ev.state_dict()["votes"].values() for p in inputs.values() for v in p.values()) == 1


def test_an_identifier_out_of_range_is_a_data_error_and_files_nothing(tmp_path):
    rows = Rows()
    rows.add("t", X, A, 0.0)
    ev = ArcEvaluator(write_data(tmp_path, {"t": [(X, A)]}, rows.names))
    _, batch, preds = next(rows.batches([], as_torch=False))
    bad = {"inputs": np.concatenate([batch["inputs"]] * 2),
           "puzzle_identifiers": np.array([1, 2], dtype=np.int32)}  # the file names 0 and 1
    two = {"preds": np.concatenate([preds["preds"]] * 2), "q_halt_logits": np.zeros(2)}
    with pytest.raises(DataError, match="identifiers.json.*identifier 2 is out of range"):
        ev.update_batch(bad, two)
    bad["puzzle_identifiers"] = np.array([1, -1], dtype=np.int32)
    with pytest.raises(DataError, match="out of range"):
        ev.update_batch(bad, two)
    assert ev.state_dict()["votes"] == {}


def test_a_malformed_name_in_identifiers_is_a_data_error(tmp_path):
    folder = write_data(tmp_path, {"t": [(X, A)]}, ["t|||t9|||0123456789"])
    ev = ArcEvaluator(folder)
    row_in, row_out = place(X, A)
    with pytest.raises(DataError, match="identifiers.json: identifier 1"):
        ev.update_batch({"inputs": row_in[None], "puzzle_identifiers": np.array([1])},
                        {"preds": row_out[None], "q_halt_logits": np.zeros(1)})


def test_numpy_rows_and_bfloat16_confidences_are_accepted(tmp_path):
    rows = Rows()
    rows.add("t", X, A, 3.0)
    rows.add("t", X, B, 3.0)
    rows.add("t", X, B, -3.0)
    rows.add("t", X, C, 0.5)
    rows.add("t", X, C, 0.5)
    folder = write_data(tmp_path, {"t": [(X, C)]}, rows.names)
    for as_torch in (False, True):
        ev = ArcEvaluator(folder, pass_ks=(1,))
        for _, batch, preds in rows.batches([], as_torch):
            if as_torch:
                preds = {**preds, "q_halt_logits": preds["q_halt_logits"].to(torch.bfloat16)}
            ev.update_batch(batch, preds)
        assert ev.result() == {"ARC/pass@1": 1.0}  # C: two votes, mean 0.62 over B's 0.5


def test_missing_outputs_and_wrong_shapes_are_refused(tmp_path):
    ev = ArcEvaluator(write_data(tmp_path, {"t": [(X, A)]}, ["t"]))
    row = np.zeros((1, 900), dtype=np.int64)
    with pytest.raises(ValueError, match="q_halt_logits"):
        ev.update_batch({"inputs": row, "puzzle_identifiers": np.array([1])}, {"preds": row})
    with pytest.raises(ValueError, match="shape"):
        ev.update_batch({"inputs": row[:, :899], "puzzle_identifiers": np.array([1])},
                        {"preds": row, "q_halt_logits": np.zeros(1)})


@pytest.mark.parametrize("files, match", [
    ({"identifiers.json": None}, "identifiers.json: not found"),
    ({"identifiers.json": "{}"}, "identifiers.json: expected a list, found an object"),
    ({"identifiers.json": "[0, 1]"}, "identifiers.json: identifier 0"),
    ({"identifiers.json": "[\"<blank>\""}, "identifiers.json"),
    ({"test_puzzles.json": "{}"}, "test_puzzles.json: no tasks"),
    ({"test_puzzles.json": "[]"}, "test_puzzles.json: expected an object, found a list"),
    ({"test_puzzles.json": '{"t": {"test": []}}'}, "test_puzzles.json: task 't'"),
    ({"test_puzzles.json": '{"t": {"test": [{"input": [[1]]}]}}'}, "test_puzzles.json: task 't'.*output"),
    ({"test_puzzles.json": '{"t": {"test": [{"input": [[1]], "output": [[10]]}]}}'},
     "test_puzzles.json: task 't', test 0 output"),
])
def test_a_damaged_dataset_folder_is_a_data_error_naming_the_file(tmp_path, files, match):
    write_data(tmp_path, {"t": [(X, A)]}, ["t"])
    for name, text in files.items():
        if text is None:
            (tmp_path / name).unlink()
        else:
            (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=match):
        ArcEvaluator(tmp_path)


def test_a_malformed_state_is_refused_before_any_merge(tmp_path):
    rows = Rows()
    rows.add("t", X, A, 0.0)
    ev = evaluator(tmp_path, {"t": [(X, A)]}, rows)
    state = ev.state_dict()
    other = ArcEvaluator(tmp_path / "data")
    for broken in ({**state, "version": 0}, {**state, "grids": {}},
                   {**state, "grids": {h: [[1]] for h in state["grids"]}}, "state"):
        with pytest.raises(DataError):
            other.merge(broken)
    assert other.state_dict()["votes"] == {}
    other.merge(ev)
    other.merge(state)
    assert other.result()["ARC/pass@1"] == 1.0
    assert sum(len(v) for p in other.state_dict()["votes"]["t"].values() for v in p.values()) == 2


def test_the_public_module():
    import hrmspec.arc as arc

    assert arc.ArcEvaluator is ArcEvaluator
    assert {"crop", "grid_hash", "Augmentation", "parse_name"} <= set(arc.__all__)
