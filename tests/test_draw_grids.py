"""Drawing a grid run's solution after each segment (runtime/artifacts/draw_grids.py), `generate --png` and
`eval --show`."""

from __future__ import annotations

import math

import pytest
import torch

from hrmspec.runtime.artifacts import arc_grids
from hrmspec.runtime.artifacts.draw_grids import ARC_PALETTE, grid_figure, save_figure, segment_grids
from hrmspec.runtime.artifacts.grids import GridConfig
from hrmspec.runtime.evaluate.heldout import held_out_set, load_run
from hrmspec.runtime.execution.supervision import Supervisor
from hrmspec.runtime.training.loop import train
from hrmspec.spec import load_spec_text
from tests.test_grids import GRID_SPEC

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("draw") / "run"
    spec = load_spec_text(GRID_SPEC, overrides={"train.steps": 2, "train.save_every": 2})
    train(spec, out, progress_bar=False)
    return out


@pytest.fixture(scope="module")
def solved(run):
    model, _, spec, _ = load_run(run)
    rows = held_out_set(GridConfig.from_dict(dict(spec.data)))
    batch = rows.batch(torch.arange(3))
    return model, spec, batch, segment_grids(model, batch)


def _cells(ax):
    return next(c for c in ax.collections if c.get_gid() == "cells")


def test_one_record_per_segment_and_row_matching_solve(solved):
    model, spec, batch, records = solved
    segments = spec.supervision.segments
    assert len(records) == 3 and all([r["segment"] for r in row] == list(range(1, segments + 1)) for row in records)
    # independently: solve with every segment run, its final logits and q_halt
    sup = Supervisor(model)
    q = torch.zeros(3)
    logits, steps = sup.solve(batch, all_segments=True, q_halt=q)
    assert steps.tolist() == [segments] * 3
    for i, row in enumerate(records):
        assert row[-1]["grid"] == logits[i].argmax(-1).tolist()
        assert row[-1]["q_halt"] == pytest.approx(float(q[i]), abs=1e-6)
        assert row[-1]["q"] == pytest.approx(float(torch.sigmoid(q[i])), abs=1e-6)
        assert 0.0 < row[-1]["q"] < 1.0 and all(isinstance(r["halts"], bool) for r in row)
    # halting as solve does it: a row stops at the first segment its head says halt
    _, stopped = sup.solve(batch, all_segments=False)
    for i, row in enumerate(records):
        first = next((r["segment"] for r in row if r["halts"]), segments)
        assert int(stopped[i]) == first


def test_the_figure_has_the_input_and_a_panel_per_segment(solved, tmp_path):
    _, spec, batch, records = solved
    row, label, puzzle = records[0], batch["labels"][0].tolist(), batch["input_ids"][0].tolist()
    fig = grid_figure(row, "mini_sudoku", 4, label=label, puzzle=puzzle, title="a puzzle")
    axes = fig.axes
    assert len(axes) == spec.supervision.segments + 1
    assert axes[0].get_title() == "input"
    for ax, rec in zip(axes[1:], row):
        assert f"segment {rec['segment']}" in ax.get_title() and f"q {rec['q']:.3f}" in ax.get_title()
        assert ("halt" if rec["halts"] else "go on") in ax.get_title()
        assert len(_cells(ax).get_facecolors()) == 16
    wrong = [p for p in axes[-1].patches if p.get_gid() == "wrong"]
    assert len(wrong) == sum(a != b for a, b in zip(row[-1]["grid"], label))
    for k in (1, 2):  # the cells changed since the previous segment are outlined
        changed = [p for p in axes[k + 1].patches if p.get_gid() == "changed"]
        assert len(changed) == sum(a != b for a, b in zip(row[k]["grid"], row[k - 1]["grid"]))
    assert not [p for p in axes[1].patches if p.get_gid() == "changed"]
    path = save_figure(fig, tmp_path / "one.png")
    assert path.read_bytes().startswith(PNG)


def test_arc_records_draw_in_the_arc_palette():
    def canvas(grid):
        tokens = torch.zeros(30, 30, dtype=torch.long)
        h, w = len(grid), len(grid[0])
        tokens[:h, :w] = torch.tensor(grid) + arc_grids.COLOUR_OFFSET
        tokens[h, :w] = arc_grids.EOS
        tokens[:h, w] = arc_grids.EOS
        return tokens.view(-1).tolist()

    test_input = canvas([[1, 2, 3], [4, 5, 6]])
    label = canvas([[1, 2], [3, 0]])
    label = [t if t else -100 for t in label]  # padding unlabelled, as a dataset's batch holds it
    attempt = canvas([[1, 2], [9, 0]])
    records = [{"segment": 1, "grid": canvas([[7, 7], [7, 7]]), "q_halt": -1.0, "q": 1 / (1 + math.e), "halts": False},
               {"segment": 2, "grid": attempt, "q_halt": 2.0, "q": 1 / (1 + math.exp(-2)), "halts": True}]
    fig = grid_figure(records, "arc", 30, label=label, puzzle=test_input)
    from matplotlib.colors import to_rgba

    assert len(fig.axes) == 3 and fig.axes[0].get_title() == "test input"
    inp = _cells(fig.axes[0]).get_facecolors()
    assert len(inp) == 6 and tuple(inp[5]) == to_rgba(ARC_PALETTE[6])  # cropped to the 2 x 3 input
    faces = _cells(fig.axes[2]).get_facecolors()
    assert len(faces) == 9  # the 2 x 2 window and its EOS border
    assert tuple(faces[0]) == to_rgba(ARC_PALETTE[1]) and tuple(faces[1]) == to_rgba(ARC_PALETTE[2])
    assert tuple(faces[3]) == to_rgba(ARC_PALETTE[9]) and tuple(faces[4]) == to_rgba(ARC_PALETTE[0])
    assert len([p for p in fig.axes[2].patches if p.get_gid() == "wrong"]) == 1  # 9 where the label has 3
    assert len([p for p in fig.axes[2].patches if p.get_gid() == "changed"]) == 4
    assert "q 0.881: halt" in fig.axes[2].get_title()


def test_cli_generate_png_and_eval_show(run, tmp_path, capsys):
    from hrmspec.cli import main

    out = tmp_path / "solution.png"
    assert main(["generate", str(run), "1.3. .4.. ..1. 3...", "--png", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[4].startswith("segments: ") and lines[5] == f"wrote {out}"
    assert out.read_bytes().startswith(PNG)
    assert main(["eval", str(run), "--show", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"wrote {run / 'show-0.png'}", f"wrote {run / 'show-1.png'}"]
    for i in range(2):
        assert (run / f"show-{i}.png").read_bytes().startswith(PNG)
    # one line each, exit 2
    for argv, words in ((["eval", str(run), "--show", "0"], "--show 0"),
                        (["generate", str(run), "1.3. .4.. ..1. 3...", "--png", str(tmp_path / "no" / "a.png")],
                         "does not exist"),
                        (["generate", str(run), "1.3. .4.. ..1. 3...", "--png", str(tmp_path / "a.txt")],
                         "not an image file name")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1


def test_eval_show_draws_an_official_arc_dataset(tmp_path, capsys):
    from hrmspec.cli import main
    from tests.test_official_datasets import arc_run

    arc_run(tmp_path, ["t1"], ["e1"], num_aug=1)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--show", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / 'run' / 'show-0.png'}"]
    assert (tmp_path / "run" / "show-0.png").read_bytes().startswith(PNG)


def test_show_and_png_are_for_grid_runs(tmp_path, capsys):
    from hrmspec.cli import main
    from tests.test_eval_reports import SPEC as TEXT
    from tests.test_readout import _text_folder

    _text_folder(tmp_path)
    train(load_spec_text(TEXT, str(tmp_path / "m.yaml")), tmp_path / "run", progress_bar=False)
    capsys.readouterr()
    for argv in (["eval", str(tmp_path / "run"), "--show", "1"],
                 ["generate", str(tmp_path / "run"), "hello", "--png", str(tmp_path / "a.png")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "not a grid run" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a.png").exists()
