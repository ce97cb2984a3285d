"""The official puzzle dataset layout: SplitWriter -> PuzzleSplit round trips, the official sampling
(epoch_order, test_order), and refusals of damaged or hostile files (runtime/artifacts/puzzle_data.py)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hrmspec.runtime.artifacts.data import DataError
from hrmspec.runtime.artifacts.puzzle_data import (
    PuzzleMetadata,
    PuzzleSplit,
    SplitWriter,
    clear_dataset_folder,
    is_dataset_folder,
    read_identifiers,
    write_identifiers,
)
from hrmspec.runtime.execution.losses import IGNORE_INDEX

# a dataset: groups of puzzles of examples, each example an (input, label) pair of seq_len tokens


@st.composite
def datasets(draw, max_groups: int = 6):
    seq_len = draw(st.integers(1, 6))
    vocab = draw(st.integers(2, 300))  # over 256: stored as int32
    tokens = st.lists(st.integers(0, vocab - 1), min_size=seq_len, max_size=seq_len)
    example = st.tuples(tokens, tokens)
    puzzle = st.tuples(st.integers(0, 9), st.lists(example, min_size=1, max_size=4))
    groups = draw(st.lists(st.lists(puzzle, min_size=1, max_size=3), min_size=0, max_size=max_groups))
    return seq_len, vocab, groups


def write(folder: Path, seq_len: int, vocab: int, groups, split: str = "train", set_name: str = "all",
          ignore: int | None = 0) -> PuzzleMetadata:
    with SplitWriter(folder, split, seq_len, set_name) as w:
        for group in groups:
            w.add_group(group)
        return w.close(vocab_size=vocab, num_puzzle_identifiers=10, ignore_label_id=ignore)


def flat(groups):
    """(inputs, labels, identifier, puzzle number, group number) per example, in writing order."""
    rows, p = [], 0
    for g, group in enumerate(groups):
        for ident, examples in group:
            rows += [(inp, lab, ident, p, g) for inp, lab in examples]
            p += 1
    return rows


@given(datasets())
def test_a_written_split_reads_back_exactly(data):
    seq_len, vocab, groups = data
    with tempfile.TemporaryDirectory() as tmp:
        meta = write(Path(tmp), seq_len, vocab, groups)
        split = PuzzleSplit.open(tmp, "train")
        rows = flat(groups)
        assert len(split) == len(rows)
        assert split.num_groups == len(groups) == meta.total_groups
        assert split.num_puzzles == sum(len(g) for g in groups) == meta.total_puzzles
        assert split.sets[0].inputs.dtype == (np.uint8 if vocab <= 256 else np.int32)
        assert not any(p.name.endswith(".rows") for p in (Path(tmp) / "train").iterdir())  # temp files gone
        if not rows:
            return
        order = split.test_order()
        assert order.tolist() == list(range(len(rows)))  # every example once, in order
        batch = split.batch(order)
        assert batch["input_ids"].tolist() == [r[0] for r in rows]
        assert batch["puzzle_ids"].tolist() == [r[2] for r in rows]
        want = [[IGNORE_INDEX if t == 0 else t for t in r[1]] for r in rows]
        assert batch["labels"].tolist() == want
        assert str(batch["input_ids"].dtype) == "torch.int64"


@given(datasets(), st.integers(0, 2**32), st.integers(0, 50))
def test_an_epoch_visits_each_group_once_with_one_whole_puzzle(data, seed, epoch):
    seq_len, vocab, groups = data
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp), seq_len, vocab, groups)
        split = PuzzleSplit.open(tmp, "train")
        order = split.epoch_order(seed, epoch)
        assert np.array_equal(order, split.epoch_order(seed, epoch))  # from (seed, epoch) alone
        puzzles = split.puzzle_of(order)
        group_of = split.group_of_puzzle(puzzles)
        # one puzzle per group, every group once, that puzzle's examples each once and together
        assert sorted(set(group_of.tolist())) == list(range(len(groups)))
        runs = [g for i, g in enumerate(group_of.tolist()) if i == 0 or g != group_of[i - 1]]
        assert len(runs) == len(groups)
        for g in range(len(groups)):
            chosen = set(puzzles[group_of == g].tolist())
            assert len(chosen) == 1
            p = chosen.pop()
            got = sorted(order[puzzles == p].tolist())
            assert got == list(range(split.puzzle_indices[p], split.puzzle_indices[p + 1]))


def test_epochs_shuffle_groups_and_draw_every_puzzle(tmp_path):
    groups = [[(1, [([g, p], [g, p])]) for p in range(3)] for g in range(20)]
    write(tmp_path, 2, 30, groups)
    split = PuzzleSplit.open(tmp_path, "train")
    orders = [split.epoch_order(7, e) for e in range(30)]
    assert any(not np.array_equal(orders[0], o) for o in orders[1:])
    drawn = {int(p) for o in orders for p in split.puzzle_of(o)}
    assert drawn == set(range(60))  # 30 epochs: every puzzle of every group drawn at some point
    with pytest.raises(ValueError):
        split.epoch_order(-1, 0)


def test_several_sets_read_as_one_view(tmp_path):
    a = [[(1, [([1, 1], [1, 1]), ([2, 2], [2, 2])])], [(2, [([3, 3], [3, 3])])]]
    b = [[(3, [([4, 4], [4, 4])]), (4, [([5, 5], [5, 5])])]]
    write(tmp_path, 2, 8, a, set_name="all")
    meta = write(tmp_path, 2, 8, b, set_name="extra")
    assert meta.sets == ("all", "extra") and meta.total_puzzles == 4 and meta.total_groups == 3
    split = PuzzleSplit.open(tmp_path, "train")
    assert len(split) == 5 and split.num_groups == 3 and split.num_puzzles == 4
    batch = split.batch([4, 0, 3])
    assert batch["input_ids"][:, 0].tolist() == [5, 1, 4]
    assert batch["puzzle_ids"].tolist() == [4, 1, 3]
    assert sorted(split.epoch_order(0, 0).tolist()) != []


@pytest.mark.parametrize("vocab, top, dtype", [(10, 9, np.uint8), (300, 200, np.int32), (300, 299, np.int32)])
def test_tokens_are_stored_in_the_smallest_dtype(tmp_path, vocab, top, dtype):
    """uint8 up to 256 tokens, int32 beyond: rows first stored as uint8 are widened when a value needs it
    (after 2 groups here) or converted when the file is written."""
    groups = [[(0, [([1, 2], [3, 4])])], [(0, [([5, 6], [7, 8])])], [(0, [([top, 0], [0, top])])]]
    write(tmp_path, 2, vocab, groups)
    split = PuzzleSplit.open(tmp_path, "train")
    assert split.sets[0].inputs.dtype == dtype and split.sets[0].labels.dtype == dtype
    assert split.rows([0, 1, 2])[0].tolist() == [[1, 2], [5, 6], [top, 0]]
    assert split.rows([2])[1].tolist() == [[0, top]]


def test_a_null_ignore_label_keeps_every_label(tmp_path):
    write(tmp_path, 2, 4, [[(0, [([0, 1], [0, 1])])]], ignore=None)
    assert PuzzleSplit.open(tmp_path, "train").batch([0])["labels"].tolist() == [[0, 1]]


def test_identifiers_round_trip(tmp_path):
    assert write_identifiers(tmp_path, iter(["<blank>", "a|||t1|||0123456789", "é"])) == 3
    assert read_identifiers(tmp_path) == ["<blank>", "a|||t1|||0123456789", "é"]


def test_the_writer_refuses_bad_rows(tmp_path):
    with SplitWriter(tmp_path, "train", 3) as w:
        with pytest.raises(DataError, match="seq_len 3"):
            w.add_group([(0, [([1, 2], [1, 2])])])
        with pytest.raises(DataError, match="no examples"):
            w.add_group([(0, [])])
        with pytest.raises(DataError, match="outside"):
            w.add_group([(0, [([1, -2, 3], [1, 2, 3])])])
        w.add_group([(5, [([1, 2, 9], [1, 2, 3])])])
        with pytest.raises(DataError, match="vocab_size 4"):
            w.close(vocab_size=4, num_puzzle_identifiers=10)
    assert not (tmp_path / "train" / "dataset.json").exists()
    assert list((tmp_path / "train").iterdir()) == []  # nothing left behind


# -- damaged and hostile files


@pytest.fixture
def good(tmp_path) -> Path:
    write(tmp_path, 3, 10, [[(1, [([1, 2, 3], [1, 2, 3]), ([4, 5, 6], [4, 5, 6])])], [(2, [([7, 8, 9], [0, 0, 0])])]])
    write(tmp_path, 3, 10, [[(1, [([1, 2, 3], [1, 2, 3])])]], split="test")
    return tmp_path


def test_a_pickled_object_array_is_refused_not_loaded(good):
    target = good / "train" / "all__puzzle_indices.npy"
    np.save(target, np.array([0, {"evil": 1}, 3], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="all__puzzle_indices.npy.*object"):
        PuzzleSplit.open(good, "train")
    np.save(good / "train" / "all__inputs.npy", np.array([[1, 2, 3]], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="all__inputs.npy"):
        PuzzleSplit.open(good, "train")


@pytest.mark.parametrize("field, value, message", [
    ("puzzle_indices", np.array([0, 2], np.int32), "2 offsets for 2 puzzles|offsets end at 2"),
    ("puzzle_indices", np.array([1, 2, 3], np.int32), "start at 1"),
    ("puzzle_indices", np.array([0, 3, 2, 3], np.int32), "decrease|offsets for"),
    ("puzzle_indices", np.array([0, 2, 4], np.int32), "end at 4, but there are 3 examples"),
    ("group_indices", np.array([0, 1, 3], np.int32), "end at 3, but there are 2 puzzles"),
    ("puzzle_identifiers", np.array([1, 10], np.int32), "identifier 10 outside"),
    ("puzzle_identifiers", np.array([[1, 2]], np.int32), "1-D"),
    ("labels", np.zeros((2, 3), np.uint8), "2 rows, but all__inputs.npy has 3"),
    ("inputs", np.zeros((3, 4), np.uint8), r"shape \(3, 4\), expected \(examples, seq_len 3\)"),
    ("inputs", np.zeros((3, 3), np.float32), "float32"),
])
def test_mismatched_arrays_are_refused(good, field, value, message):
    np.save(good / "train" / f"all__{field}.npy", value)
    with pytest.raises(DataError, match=message):
        PuzzleSplit.open(good, "train")


def test_truncated_and_missing_files_are_refused(good):
    path = good / "train" / "all__inputs.npy"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(DataError, match="all__inputs.npy"):
        PuzzleSplit.open(good, "train")
    path.write_bytes(b"not a numpy file at all")
    with pytest.raises(DataError, match="all__inputs.npy: not a readable .npy"):
        PuzzleSplit.open(good, "train")
    path.unlink()
    with pytest.raises(DataError, match="missing all__inputs.npy.*hrmspec build-data"):
        PuzzleSplit.open(good, "train")
    with pytest.raises(DataError, match="has no validation split.*hrmspec build-data"):
        PuzzleSplit.open(good, "validation")


def test_tokens_over_the_vocabulary_are_refused_when_read(good):
    np.save(good / "test" / "all__inputs.npy", np.array([[1, 2, 11]], np.uint8))
    split = PuzzleSplit.open(good, "test")  # opening maps the tokens, reading checks them
    with pytest.raises(DataError, match="all__inputs.npy: row 0 holds token 11"):
        split.batch([0])
    with pytest.raises(DataError, match="token 11"):
        split.scan(chunk_rows=1)


@pytest.mark.parametrize("edit, message", [
    ({"vocab_size": "10"}, "'vocab_size' must be an integer"),
    ({"vocab_size": True}, "'vocab_size' must be an integer"),
    ({"seq_len": 0}, "'seq_len' must be between"),
    ({"pad_id": 10}, "'pad_id' is 10, not below vocab_size 10"),
    ({"ignore_label_id": 12}, "'ignore_label_id' is 12"),
    ({"ignore_label_id": 1.5}, "'ignore_label_id' must be an integer"),
    ({"blank_identifier_id": 10}, "'blank_identifier_id' is 10"),
    ({"sets": []}, "'sets' must be a non-empty list"),
    ({"sets": ["../x"]}, "not a set name"),
    ({"sets": ["all", "all"]}, "names a set twice"),
    ({"mean_puzzle_examples": float("nan")}, "finite number"),
    ({"total_groups": -1}, "'total_groups' must be between"),
])
def test_a_bad_dataset_json_is_refused_naming_the_key(good, edit, message):
    path = good / "train" / "dataset.json"
    data = json.loads(path.read_text())
    data.update(edit)
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=message) as e:
        PuzzleSplit.open(good, "train")
    assert str(path) in str(e.value)


def test_a_dataset_json_that_is_not_metadata_is_refused(good):
    path = good / "train" / "dataset.json"
    for text, message in (("[1, 2]", "expected a JSON object"), ("{", "not a readable"), ("{}", "missing key")):
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            PuzzleSplit.open(good, "train")


def test_clearing_a_dataset_folder_removes_only_dataset_files(good):
    write_identifiers(good, ["<blank>"])
    (good / "notes.txt").write_text("mine")
    (good / "train" / "mine.npy").write_bytes(b"")
    assert is_dataset_folder(good)
    clear_dataset_folder(good)
    assert not is_dataset_folder(good)
    assert sorted(p.name for p in good.rglob("*")) == ["mine.npy", "notes.txt", "train"]
