"""Training and evaluating on dataset folders in the official HRM / TRM layout (`data: {source: hrm_dataset}`):
the official sampling feeds training, evaluation reports the official ACTLossHead metrics (checked against a
computation of them from the model's own predictions) and, for ARC, the official voting and submission."""

import json

import numpy as np
import pytest
import torch
from test_build_data import kaggle, sudoku_rows, write_csv

import hrmspec.runtime.artifacts.puzzle_build as pb
from hrmspec.cli import main
from hrmspec.runtime.artifacts.packing import Batches
from hrmspec.runtime.artifacts.puzzle_data import PuzzleSource, PuzzleSplit
from hrmspec.runtime.evaluate.heldout import load_run
from hrmspec.runtime.execution.supervision import Supervisor
from hrmspec.runtime.training.loop import train
from hrmspec.spec import load_spec_text

SPEC = """
name: trm-micro
model:
  vocab: {vocab}
  d_model: 16
  heads: 2
  expansion: 2
  max_seq_len: {seq}
  block:
    norm: {{type: rms, place: post}}
    attention: {{type: plain, mask: bidirectional}}
  modules: {{net: {{layers: 1, exit_norm: none}}}}
  states: {{z: {{init: buffer}}, y: {{init: buffer}}}}
  schedule:
    - repeat: 2
      do: [{{repeat: 2, do: ["z = net(z + y + x)"]}}, "y = net(y + z)"]
  output: y
  credit: {{last: 3}}
  puzzle: {{identifiers: {ids}, positions: 1}}
objective: {{type: grid, loss: stablemax}}
supervision: {{segments: 2, halting: {{type: q_learning, exploration: 0.3}}}}
data: {{source: hrm_dataset, path: {path}}}
train: {{steps: 2, batch_size: 4, log_every: 1, save_every: 2, lr: 3.0e-3, eval_n: 4, threads: 1}}
"""


@pytest.fixture(scope="module")
def sudoku(tmp_path_factory):
    root = tmp_path_factory.mktemp("sudoku")
    write_csv(root / "src" / "train.csv", sudoku_rows(10))
    write_csv(root / "src" / "test.csv", sudoku_rows(5, seed=1))
    pb.build_sudoku(root / "src", root / "data", num_aug=2, seed=0)
    return root


def test_batches_follow_the_official_sampler_one_puzzle_of_each_group_per_epoch(sudoku):
    split = PuzzleSplit.open(sudoku / "data", "train")
    assert split.num_groups == 10 and len(split) == 30  # each puzzle and its 2 augmentations: one group
    batches = Batches(split, batch_size=5, seed=3)
    seen = [int(p) for b in (next(batches), next(batches)) for p in split.puzzle_of(_rows(split, b))]
    groups = split.group_of_puzzle(np.array(seen))
    assert sorted(groups.tolist()) == list(range(10))  # an epoch: every group once
    assert batches.epoch == 0 and len(batches) == 2


def _rows(split, batch):
    """The example index of each row of a batch, found by its tokens (rows are distinct here)."""
    inputs, labels = split.rows(np.arange(len(split)))
    out = []
    for row in batch["input_ids"].numpy():
        (hit,) = np.nonzero((inputs == row).all(1))
        out.append(int(hit[0]))
    return np.array(out)


def test_a_sudoku_run_trains_and_reports_the_official_metrics(sudoku, capsys):
    spec = load_spec_text(SPEC.format(vocab=11, seq=81, ids=1, path=sudoku / "data"), str(sudoku / "s.yaml"))
    run = sudoku / "run"
    train(spec, run, progress_bar=False)
    final = json.loads((run / "eval.json").read_text())
    assert final["n"] == 4 and final["kind"] == "sudoku" and final["max_segments"] == 2
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    res = json.loads((run / "eval-dataset.json").read_text())
    assert res["n"] == 5 and "exact accuracy" in out and "every segment run" in out
    assert main(["generate", str(run), "1" * 81]) == 2  # a dataset's puzzles are drawn with eval --show
    assert "eval" in capsys.readouterr().err
    # the official ACTLossHead metrics, computed here from the model's predictions at its last segment
    model, _, _, _ = load_run(run)
    data = PuzzleSplit.open(sudoku / "data", "test")
    batch = data.batch(np.arange(5))
    q = torch.zeros(5)
    logits, steps = Supervisor(model).solve(batch, all_segments=True, q_halt=q)
    labels = batch["labels"]
    valid = labels != -100
    right = (logits.argmax(-1) == labels) & valid
    exact = (right.sum(-1) == valid.sum(-1)).float()
    assert res["exact_accuracy"] == pytest.approx(float(exact.mean()))
    assert res["token_accuracy"] == pytest.approx(float((right.sum(-1) / valid.sum(-1)).mean()))
    assert res["q_halt_accuracy"] == pytest.approx(float(((q >= 0).float() == exact).float().mean()))
    assert res["segments"] == 2 and (steps == 2).all()


def test_validate_and_train_refuse_a_dataset_the_model_cannot_read(sudoku, capsys):
    path = sudoku / "small.yaml"
    path.write_text(SPEC.format(vocab=6, seq=81, ids=1, path=sudoku / "data"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "small.yaml:" in err and "vocab_size 11 but model.vocab is 6" in err
    assert main(["train", str(path), "--out", str(sudoku / "refused")]) == 2
    assert not (sudoku / "refused").exists()
    path.write_text(SPEC.format(vocab=11, seq=81, ids=1, path=sudoku / "missing"))
    assert main(["validate", str(path)]) == 2
    assert "build-data" in capsys.readouterr().err


def arc_run(tmp_path, train_tasks: list[str], eval_tasks: list[str], num_aug: int):
    """A tiny ARC dataset in tmp_path/arc built from random Kaggle tasks, and a micro TRM trained 2 steps on it
    in tmp_path/run."""
    training = kaggle(tmp_path, "training", train_tasks, seed=1)
    evaluation = kaggle(tmp_path, "evaluation", eval_tasks, seed=2)
    pb.build_arc([("training", training, tmp_path / "training_solutions.json", "train"),
                  ("evaluation", evaluation, tmp_path / "evaluation_solutions.json", "test")],
                 tmp_path / "arc", num_aug=num_aug, seed=0)
    ids = len(json.loads((tmp_path / "arc" / "identifiers.json").read_text()))
    spec = load_spec_text(SPEC.format(vocab=12, seq=900, ids=ids, path=tmp_path / "arc").replace(
        "d_model: 16", "d_model: 8"), str(tmp_path / "arc.yaml"))
    train(spec, tmp_path / "run", progress_bar=False)


def test_an_arc_run_votes_over_augmentations_and_writes_a_submission(tmp_path, capsys):
    arc_run(tmp_path, ["t1", "t2"], ["e1", "e2"], num_aug=2)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "arc")]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "run" / "eval-data-arc.json").read_text())
    assert res["kind"] == "arc" and {"ARC/pass@1", "ARC/pass@2", "ARC/pass@1000"} <= res.keys()
    assert 0.0 <= res["ARC/pass@1"] <= res["ARC/pass@2"] <= res["ARC/pass@1000"] <= 1.0
    submission = json.loads((tmp_path / "run" / "submission.json").read_text())
    tests = json.loads((tmp_path / "arc" / "test_puzzles.json").read_text())
    assert set(submission) == set(tests) == {"e1", "e2"}
    for task, attempts in submission.items():
        assert len(attempts) == len(tests[task]["test"]) and all(set(a) == {"attempt_1", "attempt_2"}
                                                                  for a in attempts)
    assert "ARC (voted over augmentations): pass@1" in out and "submission.json" in out


def test_eval_data_is_for_grid_runs(tmp_path, capsys):
    from test_eval_reports import SPEC as TEXT
    from test_readout import _text_folder

    _text_folder(tmp_path)
    train(load_spec_text(TEXT, str(tmp_path / "m.yaml")), tmp_path / "run", progress_bar=False)
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path)]) == 2
    assert "grid runs" in capsys.readouterr().err


def test_a_puzzle_source_names_its_keys():
    with pytest.raises(Exception, match="unknown key"):
        PuzzleSource.from_dict({"source": "hrm_dataset", "path": "x", "grids": ["sudoku"]})
    with pytest.raises(Exception, match="data.path"):
        PuzzleSource.from_dict({"source": "hrm_dataset"})


def test_import_hrm_carries_the_official_training_config(sudoku, tmp_path, capsys):
    """all_config.yaml's run settings become the spec's train: and data: (steps as pretrain.py counts them from
    the dataset), so `hrmspec train` repeats the official run; export writes them back."""
    import yaml
    from test_hrm_checkpoint import archs_example, official_tensors, resolved, write_official

    from hrmspec.runtime.interop.convert import load_checkpoint

    a = archs_example(trm=True)
    path = write_official(tmp_path / "run", a, official_tensors(resolved(a), 11, 1, 81, seed=0))
    config = {"arch": a, "data_paths": [str(sudoku / "data")], "global_batch_size": 4, "epochs": 6, "lr": 7e-4,
              "lr_min_ratio": 1.0, "lr_warmup_steps": 3, "beta1": 0.9, "beta2": 0.95, "weight_decay": 1.0,
              "puzzle_emb_lr": 1e-2, "puzzle_emb_weight_decay": 0.1, "ema": True, "ema_rate": 0.999, "seed": 3}
    (tmp_path / "run" / "all_config.yaml").write_text(yaml.dump(config))
    assert main(["import-hrm", str(path), "--out", str(tmp_path / "ours")]) == 0
    spec = load_checkpoint(tmp_path / "ours").spec
    meta = json.loads((sudoku / "data" / "train" / "dataset.json").read_text())
    steps = int(6 * meta["total_groups"] * meta["mean_puzzle_examples"] / 4)  # pretrain.py's total_steps
    assert spec.train == {"optimizer": "adam_atan2", "lr": 7e-4, "weight_decay": 1.0, "min_lr_ratio": 1.0,
                          "betas": [0.9, 0.95], "batch_size": 4, "schedule": "constant", "seed": 3, "ema": 0.999,
                          "puzzle_optimizer": {"type": "sign_sgd", "lr": 1e-2, "weight_decay": 0.1},
                          "steps": steps, "warmup": 3 / steps}
    assert spec.data == {"source": "hrm_dataset", "path": str(sudoku / "data")}
    from hrmspec.runtime.artifacts.preflight import check

    check(spec, run=True)  # the imported spec trains as it is
    assert main(["export-hrm", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    back = yaml.safe_load((tmp_path / "back" / "all_config.yaml").read_text())
    assert {k: back[k] for k in ("lr", "global_batch_size", "lr_warmup_steps", "puzzle_emb_lr", "ema_rate", "seed")} \
        == {"lr": 7e-4, "global_batch_size": 4, "lr_warmup_steps": 3, "puzzle_emb_lr": 1e-2, "ema_rate": 0.999,
            "seed": 3}
    assert back["data_path"] == str(sudoku / "data") and back["ema"] is True
    capsys.readouterr()
