"""ARC in a canvas smaller than the official 30 x 30 (`build-data arc --canvas N`): tasks whose grids do not fit
are left out, rows hold N * N tokens, crop reads the side off the row's length, and the official voting and the
evaluation's dataset kind take any square canvas."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from test_build_data import groups_of, kaggle, key

from hrmspec.cli import main
from hrmspec.runtime.artifacts import arc_grids
from hrmspec.runtime.artifacts import puzzle_build as pb
from hrmspec.runtime.artifacts.arc_grids import EOS, PAD, crop, place, random_offset
from hrmspec.runtime.artifacts.data import DataError
from hrmspec.runtime.artifacts.puzzle_data import PuzzleSplit, read_identifiers
from hrmspec.runtime.evaluate.arc import ArcEvaluator
from hrmspec.runtime.evaluate.puzzles import kind_of

SIDE = 10


def with_big_task(challenges, task_id: str, side: int = 12, where: str = "test"):
    """Add to a Kaggle challenges file (and its solutions) a task with one grid of side x side: in its test
    output (where='test') or in a demonstration input (where='train')."""
    data = json.loads(challenges.read_text())
    solutions_path = challenges.with_name(challenges.name.replace("challenges", "solutions"))
    solutions = json.loads(solutions_path.read_text())
    big = [[1] * side for _ in range(side)]
    demo_in = big if where == "train" else [[1, 2]]
    data[task_id] = {"train": [{"input": demo_in, "output": [[3]]}], "test": [{"input": [[4]]}]}
    solutions[task_id] = [big if where == "test" else [[5]]]
    challenges.write_text(json.dumps(data))
    solutions_path.write_text(json.dumps(solutions))


def uncrop(row: np.ndarray, side: int = SIDE) -> np.ndarray:
    """The grid in a row wherever it was placed: the box of its colour tokens."""
    canvas = np.asarray(row).reshape(side, side)
    rows, cols = np.nonzero(canvas >= 2)
    return (canvas[rows.min():rows.max() + 1, cols.min():cols.max() + 1] - 2).astype(np.uint8)


@pytest.fixture
def canvas_dataset(tmp_path, capsys):
    training = kaggle(tmp_path, "training", ["t1", "t2"], seed=1)
    evaluation = kaggle(tmp_path, "evaluation", ["e1", "e2"], seed=2)
    with_big_task(training, "big_train", where="train")
    with_big_task(evaluation, "big_eval", where="test")
    sources = [("training", training, tmp_path / "training_solutions.json", "train"),
               ("evaluation", evaluation, tmp_path / "evaluation_solutions.json", "test")]
    summary = pb.build_arc(sources, tmp_path / "out", num_aug=3, seed=4, canvas=SIDE)
    printed = capsys.readouterr().out
    tasks = {}
    for name, path in (("training", training), ("evaluation", evaluation)):
        subset = pb.load_kaggle_subset(name, path, tmp_path / f"{name}_solutions.json")
        tasks.update({(name, t.id): t for t in subset.tasks})
    return tmp_path / "out", tasks, summary, printed


def test_a_canvas_10_build_leaves_out_big_tasks_and_crops_back_to_the_originals(canvas_dataset):
    out, tasks, summary, printed = canvas_dataset
    assert "training: 1 of 3 task(s) have a grid larger than 10 x 10; left out (2 kept)" in printed
    assert "evaluation: 1 of 3 task(s) have a grid larger than 10 x 10; left out (2 kept)" in printed
    train, test = PuzzleSplit.open(out, "train"), PuzzleSplit.open(out, "test")
    for split in (train, test):
        assert (split.metadata.vocab_size, split.metadata.seq_len) == (12, 100)
    assert summary.splits["train"].seq_len == 100
    names = read_identifiers(out)
    assert {arc_grids.parse_name(n)[0] for n in names[1:]} == {"t1", "t2", "e1", "e2"}  # the big tasks: none
    assert sorted(json.loads((out / "test_puzzles.json").read_text())) == ["e1", "e2"]
    order = [("training", "t1"), ("training", "t2"), ("evaluation", "e1"), ("evaluation", "e2")]
    for (subset, tid), group in zip(order, groups_of(train), strict=True):
        task = tasks[(subset, tid)]
        want = task.train + task.test if subset == "training" else task.train
        assert len(group) == 4  # the task and 3 augmentations
        for ident, inputs, labels in group:
            _, aug = arc_grids.parse_name(names[ident])
            undo = aug.invert if aug else (lambda g: g)
            assert inputs.shape[1] == labels.shape[1] == 100
            placed = [(undo(uncrop(i)), undo(uncrop(o))) for i, o in zip(inputs, labels)]
            assert sorted(key(p) for p in placed) == sorted(key(p) for p in want)
    for tid, group in zip(("e1", "e2"), groups_of(test), strict=True):
        for ident, inputs, labels in group:
            _, aug = arc_grids.parse_name(names[ident])
            undo = aug.invert if aug else (lambda g: g)
            crops = [(undo(crop(i)), undo(crop(o))) for i, o in zip(inputs, labels)]  # at (0, 0)
            assert [key(p) for p in crops] == [key(p) for p in tasks[("evaluation", tid)].test]


def test_the_evaluator_votes_on_canvas_10_rows(canvas_dataset):
    out, tasks, _, _ = canvas_dataset
    test = PuzzleSplit.open(out, "test")
    inputs, labels = test.rows(np.arange(len(test)))
    ids = np.concatenate([np.full(test.puzzle_indices[p + 1] - test.puzzle_indices[p], test.puzzle_identifiers[p])
                          for p in range(test.num_puzzles)])
    batch = {"inputs": inputs, "puzzle_identifiers": ids}
    ev = ArcEvaluator(out, pass_ks=(1, 2))
    ev.update_batch(batch, {"preds": labels, "q_halt_logits": np.zeros(len(ids))})  # every copy right
    assert ev.result() == {"ARC/pass@1": 1.0, "ARC/pass@2": 1.0}
    # wrong on the un-augmented copy of every puzzle, right on the 3 others: the majority still wins
    wrong = labels.copy()
    first = np.isin(ids, [i for i, n in enumerate(read_identifiers(out)) if n in ("e1", "e2")])
    wrong[first] = np.where(wrong[first] >= 2, 2 + (wrong[first] - 1) % 10, wrong[first])  # colours shifted
    ev = ArcEvaluator(out, pass_ks=(1, 2), canvas=SIDE)
    ev.update_batch(batch, {"preds": wrong, "q_halt_logits": np.where(first, 5.0, -5.0)})
    assert ev.result() == {"ARC/pass@1": 1.0, "ARC/pass@2": 1.0}
    ev = ArcEvaluator(out, pass_ks=(1,))
    ev.update_batch({**batch, "puzzle_identifiers": ids[first], "inputs": inputs[first]},
                    {"preds": wrong[first], "q_halt_logits": np.zeros(int(first.sum()))})
    assert ev.result() == {"ARC/pass@1": 0.0}
    with pytest.raises(ValueError, match=r"expected shape \(\d+, 100\)"):  # a canvas fixed: rows of 900 refused
        ArcEvaluator(out, canvas=SIDE).update_batch(
            {"inputs": np.zeros((1, 900), np.int64), "puzzle_identifiers": np.array([1])},
            {"preds": np.zeros((1, 900), np.int64), "q_halt_logits": np.zeros(1)})
    with pytest.raises(ValueError, match="shape"):  # inputs and predictions of different canvases
        ArcEvaluator(out).update_batch({"inputs": inputs[:1], "puzzle_identifiers": ids[:1]},
                                       {"preds": np.zeros((1, 900), np.int64), "q_halt_logits": np.zeros(1)})


def test_the_evaluation_kind_is_arc_for_any_square_canvas():
    def split(vocab, seq):
        return SimpleNamespace(metadata=SimpleNamespace(vocab_size=vocab, seq_len=seq))
    assert [kind_of(split(12, n)) for n in (900, 100, 4, 784)] == ["arc"] * 4
    assert [kind_of(split(12, n)) for n in (899, 101, 1, 961)] == [None] * 4
    assert kind_of(split(11, 81)) == "sudoku"


def test_place_crop_and_offsets_in_a_small_canvas():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 10, (3, 4)).astype(np.uint8)
    b = rng.integers(0, 10, (10, 2)).astype(np.uint8)
    row_a, row_b = place(a, b, canvas=SIDE)
    assert row_a.shape == row_b.shape == (100,) and row_a.dtype == np.uint8
    np.testing.assert_array_equal(crop(row_a), a)
    np.testing.assert_array_equal(crop(row_b.reshape(SIDE, SIDE)), b)
    board = row_a.reshape(SIDE, SIDE)
    assert (board[3, :4] == EOS).all() and (board[:3, 4] == EOS).all() and board[3, 4] == PAD
    assert (row_b.reshape(SIDE, SIDE)[:, 2] == EOS).all()  # no row below a 10-row grid: only the column
    for _ in range(50):
        r, c = random_offset(a, a, rng, canvas=5)
        assert 0 <= r <= 2 and 0 <= c <= 1
        x, _ = place(a, a, (r, c), canvas=5)
        np.testing.assert_array_equal(uncrop(x, 5), a)
    assert random_offset(b, b, rng, canvas=SIDE)[0] == 0
    # the default stays the official 30 x 30
    assert place(a, a)[0].shape == (900,)
    np.testing.assert_array_equal(crop(place(a, b)[1]), b)
    assert crop(np.full(4, 7)).shape == (2, 2)
    with pytest.raises(ValueError, match="larger|1-10|side"):
        place(a, np.zeros((11, 1), np.uint8), canvas=SIDE)
    with pytest.raises(ValueError, match="outside"):
        place(a, a, (8, 0), canvas=SIDE)
    for bad in (1, 31, 0, True, 2.5):
        with pytest.raises(ValueError, match="canvas side"):
            place(a[:1, :1], a[:1, :1], canvas=bad)
    for length in (99, 101, 901, 0):
        with pytest.raises(ValueError, match="perfect square"):
            crop(np.zeros(length, np.int64))


def test_the_command_takes_a_canvas(tmp_path, capsys):
    training = kaggle(tmp_path, "training", ["t1"], seed=1)
    evaluation = kaggle(tmp_path, "evaluation", ["e1"], seed=2)
    with_big_task(evaluation, "big", side=7)
    assert main(["build-data", "arc", "--source", f"training={training}", "--source", str(evaluation),
                 "--out", str(tmp_path / "arc"), "--num-aug", "1", "--canvas", "6"]) == 0
    out = capsys.readouterr().out
    assert "evaluation: 1 of 2 task(s) have a grid larger than 6 x 6; left out (1 kept)" in out
    assert PuzzleSplit.open(tmp_path / "arc", "test").metadata.seq_len == 36
    with pytest.raises(SystemExit):
        main(["build-data", "arc", "--source", str(training), "--out", str(tmp_path / "x"), "--canvas", "31"])
    assert "expected an integer 2-30" in capsys.readouterr().err
    assert main(["build-data", "arc", "--source", str(evaluation), "--out", str(tmp_path / "y"),
                 "--canvas", "2"]) == 2  # no task fits 2 x 2
    assert "use a larger --canvas" in capsys.readouterr().err
    assert main(["build-data", "maze", "--source", str(tmp_path), "--out", str(tmp_path / "z"),
                 "--canvas", "10"]) == 2
    assert "--canvas applies to build-data arc, not maze" in capsys.readouterr().err
    with pytest.raises(DataError, match="canvas side"):
        pb.build_arc([("t", training, None, "train")], tmp_path / "w", num_aug=0, canvas=40)
