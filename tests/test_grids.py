"""Grid puzzles (runtime/artifacts/grids.py) and training them with deep supervision: the layout, the
Sudoku symmetries, held-out puzzles unseen in training, exact resume with the carry, and the CLI."""

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hrmspec.runtime.artifacts.data import DataError
from hrmspec.runtime.artifacts.grids import (
    EMPTY,
    GRID_TASKS,
    PATH,
    GridConfig,
    _apply,
    _puzzles,
    augmentations,
    encode,
    load_grids,
    parse_grid,
    render,
    shortest_path,
    square_symmetry,
)
from hrmspec.runtime.training.loop import train
from hrmspec.spec import load_spec_text


def _solution(side: int, seed: int) -> list[list[int]]:
    """A valid side x side sudoku solution from the pattern (r * box + r // box + c) % side + 1."""
    box = int(side ** 0.5)
    rng = random.Random(seed)
    values = rng.sample(range(1, side + 1), side)
    return [[values[(box * (r % box) + r // box + c) % side] for c in range(side)] for r in range(side)]


def _valid(tokens: list[int], side: int) -> bool:
    box = int(side ** 0.5)
    grid = [[tokens[r * side + c] - EMPTY for c in range(side)] for r in range(side)]
    want = set(range(1, side + 1))
    rows = all(set(row) == want for row in grid)
    cols = all({grid[r][c] for r in range(side)} == want for c in range(side))
    boxes = all({grid[br + r][bc + c] for r in range(box) for c in range(box)} == want
                for br in range(0, side, box) for bc in range(0, side, box))
    return rows and cols and boxes


@settings(max_examples=40, deadline=None)
@given(side=st.sampled_from([4, 9]), seed=st.integers(0, 10**6))
def test_every_augmentation_maps_a_solution_to_a_solution_and_keeps_puzzle_and_answer_aligned(side, seed):
    solution = encode(_solution(side, seed))
    assert _valid(solution, side)
    rng = random.Random(seed)
    puzzle = [t if rng.random() < 0.5 else EMPTY for t in solution]
    order, value_map = augmentations(side, rng)
    assert sorted(order) == list(range(side * side))
    new_solution, new_puzzle = _apply(solution, order, value_map), _apply(puzzle, order, value_map)
    assert _valid(new_solution, side)
    # every given stays a given of the same cell of the new solution; blanks stay blank
    assert all(p in (EMPTY, s) for p, s in zip(new_puzzle, new_solution))
    assert new_puzzle.count(EMPTY) == puzzle.count(EMPTY)


def test_grids_layout_and_held_out_puzzles_never_occur_in_training():
    cfg = GridConfig.from_dict({"grids": ["mini_sudoku"], "size": 60, "augment": 2, "eval_size": 40, "seed": 3})
    train_rows, eval_rows = load_grids(cfg, "train"), load_grids(cfg, "eval")
    assert train_rows.inputs.shape == (180, 16) and train_rows.labels.shape == (180, 16)
    assert int(train_rows.labels.min()) >= EMPTY + 1 and int(train_rows.labels.max()) <= EMPTY + 4
    assert all(_valid(s, 4) for _, s in train_rows.pairs())
    # givens are copied to the labels
    given_cells = train_rows.inputs != EMPTY
    assert torch.equal(train_rows.inputs[given_cells], train_rows.labels[given_cells])
    seen = {tuple(p) for p, _ in train_rows.pairs()}
    assert len(eval_rows) > 0 and not any(tuple(p) in seen for p, _ in eval_rows.pairs())


def test_bad_grid_configs_and_puzzles_are_one_line_errors():
    with pytest.raises(DataError, match="unknown key 'sise'.*did you mean 'size'"):
        GridConfig.from_dict({"grids": ["mini_sudoku"], "sise": 3})
    with pytest.raises(DataError, match="unknown grid task 'mini_sudoko'.*mini_sudoku"):
        GridConfig.from_dict({"grids": ["mini_sudoko"]})
    with pytest.raises(DataError, match="5 cells is not a square grid"):
        parse_grid("12.34", "mini_sudoku", 16)
    with pytest.raises(DataError, match="character 2 is 'x'"):
        parse_grid("1x3.", "mini_sudoku", 16)
    cells = parse_grid("1.3. | .4.. \n ..1. 3...", "mini_sudoku", 16)
    assert render(cells, 4, "mini_sudoku").splitlines()[0] == "1 . 3 ."
    assert parse_grid("10 3.", "mini_sudoku", 16) == parse_grid("1. 3.", "mini_sudoku", 16)


@pytest.mark.parametrize("task, config", [("n_queens", {}), ("maze", {"max_grid_size": 8}), ("mini_sudoku", {})])
def test_every_task_s_solutions_are_solved_its_symmetries_keep_them_and_a_wrong_cell_is_not(task, config):
    t = GRID_TASKS[task]
    side = t.side(config)
    rng = random.Random(0)
    for puzzle, solution in _puzzles(task, config, 12, 5, side):
        assert len(puzzle) == len(solution) == side * side
        assert t.solved(puzzle, solution, side)
        order, value_map = (augmentations(side, rng) if t.symmetry == "sudoku"
                            else square_symmetry(side, rng, t.vocab))
        assert t.solved(_apply(puzzle, order, value_map), _apply(solution, order, value_map), side)
        wrong = list(solution)
        i = next(i for i, (p, s) in enumerate(zip(puzzle, solution)) if p != s)  # a cell the model must fill
        wrong[i] = puzzle[i]  # left as it was in the puzzle
        assert not t.solved(puzzle, wrong, side)


def test_maze_labels_mark_a_shortest_path_of_reasoning_gym_s_length():
    import reasoning_gym

    side = 8
    for entry in reasoning_gym.create_dataset("maze", seed=3, size=10, max_grid_size=side):
        puzzle, solution = GRID_TASKS["maze"].cells(entry["metadata"], side)
        assert len(shortest_path(puzzle, side)) - 1 == entry["metadata"]["shortest_path_length"]
        assert solution.count(PATH) == entry["metadata"]["shortest_path_length"] - 1


def test_a_square_symmetry_is_one_of_the_eight():
    side, rng = 3, random.Random(1)
    grid = list(range(9))
    rot = [6, 3, 0, 7, 4, 1, 8, 5, 2]  # a quarter turn
    seen = {tuple(_apply(grid, *square_symmetry(side, rng, 9))) for _ in range(200)}
    assert len(seen) == 8 and tuple(_apply(grid, rot, list(range(9)))) in seen and tuple(grid) in seen


GRID_SPEC = """
name: grid-micro
model:
  vocab: 6
  d_model: 16
  heads: 2
  expansion: 2
  max_seq_len: 16
  block:
    norm: {type: rms, place: post}
    attention: {type: plain, mask: bidirectional}
  modules: {net: {layers: 1, exit_norm: none}}
  states: {z: {init: buffer}, y: {init: buffer}}
  schedule:
    - repeat: 2
      do: [{repeat: 2, do: ["z = net(z + y + x)"]}, "y = net(y + z)"]
  output: y
  credit: {last: 3}
  puzzle: {identifiers: 1, positions: 2}
objective: {type: grid, loss: stablemax}
supervision: {segments: 3, halting: {type: q_learning, exploration: 0.3}}
data: {grids: [mini_sudoku], size: 40, eval_size: 8}
train: {steps: 6, batch_size: 8, log_every: 1, save_every: 3, keep: 5, lr: 3.0e-3, eval_every: 0}
"""


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_grid_training_resumes_exactly_with_its_carry(tmp_path):
    spec = load_spec_text(GRID_SPEC)
    full, part = tmp_path / "full", tmp_path / "part"
    train(spec, full, progress_bar=False)
    train(spec, part, progress_bar=False, stop_after=3)
    train(spec, part, resume=True, progress_bar=False)
    got = [(r["step"], r["loss"]) for r in _records(part) if "loss" in r]
    want = [(r["step"], r["loss"]) for r in _records(full) if "loss" in r]
    assert got == want and len(want) == 6
    assert all(r["loss"] == r["loss"] for r in _records(full) if "loss" in r)  # finite, not NaN


def test_cli_grid_train_eval_generate(tmp_path, capsys):
    from hrmspec.cli import main

    spec_file, run = tmp_path / "grid.yaml", tmp_path / "run"
    spec_file.write_text(GRID_SPEC)
    assert main(["train", str(spec_file), "--out", str(run), "--set", "train.steps=3", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--n", "8", "--all-segments"]) == 0
    out = capsys.readouterr().out
    assert "mini_sudoku" in out and "segments per puzzle: 3.00 of 3" in out
    res = json.loads((run / "eval.json").read_text())
    assert res["n"] == 8 and res["saved"] == 0.0
    assert main(["generate", str(run), "1.3. .4.. ..1. 3..."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[-1].startswith("segments: ")
    assert main(["generate", str(run), "1.3"]) == 2
    assert "not a square grid" in capsys.readouterr().err
    assert main(["eval", str(run), "--n", "8", "--compile"]) == 2  # nothing to decode: refused in one line
    err = capsys.readouterr().err
    assert err.startswith("hrmspec: error: --compile: grid-micro: it runs whole puzzles in segments") and \
        err.count("\n") == 1
