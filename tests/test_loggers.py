"""train.log: metrics go to metrics.jsonl, TensorBoard and W&B (runtime/training/loggers.py); a resumed run
continues the same W&B run; an unknown logger, or one whose package is missing, is refused before the run
folder is made, naming what to install.

W&B runs offline here (WANDB_MODE=offline): its run file, RUN/wandb/offline-run-*/run-<id>.wandb, is read
back record by record (a LevelDB-style log of protobuf records, wandb.proto's `Record`)."""

import json
import os
import struct
import sys
from pathlib import Path

import pytest
from test_train import spec

from hrmspec.cli import main
from hrmspec.runtime.artifacts.config import TrainConfig, TrainError
from hrmspec.runtime.artifacts.files import OutputError
from hrmspec.runtime.training import loggers
from hrmspec.runtime.training.loggers import WANDB_ID, default_loggers, open_loggers
from hrmspec.runtime.training.loop import train

STEPS, STOP = 4, 2
ALL = ["jsonl", "tensorboard", "wandb"]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, quiet, and keeping its settings, cache and service files in the test's folder."""
    home = tmp_path / "wandb-home"
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)


def wandb_records(path: Path):
    """The protobuf records of a .wandb run file: a 7-byte header (":W&B", magic, version), then LevelDB log
    records (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is no W&B run file"
    pos, block, part = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        part += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            yield record
            part = b""


def wandb_history(run_file: Path) -> tuple[dict, dict[str, dict[int, float]]]:
    """(the run record's id, project, name and config; {key: {step: value}} of the logged history)."""
    run, history = {}, {}
    for r in wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = {"id": r.run.run_id, "project": r.run.project, "name": r.run.display_name,
                   "config": {i.key: json.loads(i.value_json) for i in r.run.config.update}}
        elif kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for key, value in items.items():
                if not key.startswith("_"):
                    history.setdefault(key, {})[r.history.step.num] = value
    return run, history


def scalars(board: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(board))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def run_spec(**settings):
    return spec(**{"train.steps": STEPS, "train.save_every": STOP, "train.eval_n": 2, "train.log": ALL, **settings})


def test_a_run_logs_to_jsonl_tensorboard_and_wandb_and_resumes_the_same_wandb_run(tmp_path, offline_wandb,
                                                                                   one_thread):
    run = tmp_path / "my-run"
    train(run_spec(), run, progress_bar=False, stop_after=STOP)
    first_id = (run / WANDB_ID).read_text().strip()
    train(run_spec(), run, resume=True, progress_bar=False)
    assert (run / WANDB_ID).read_text().strip() == first_id  # --resume continues the same W&B run

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    final = [r for r in records if "eval" in r]
    assert len(final) == 1 and final[0]["step"] == STEPS and final[0]["eval"]["n"] == 2
    assert set(records[0]) >= {"step", "loss", "lr", "credit_depth", "tokens_per_s", "grad_norm", "skipped_steps"}

    board = scalars(run / "tensorboard")
    assert sorted(board["train/loss"]) == list(range(1, STEPS + 1))
    assert board["train/loss"][1] == pytest.approx(records[0]["loss"])
    assert {"train/lr", "train/grad_norm", "train/skipped_steps"} <= board.keys()  # every number, not a list
    assert board["eval/accuracy"] == {STEPS: final[0]["eval"]["accuracy"]}
    assert board["eval/loss"][STEPS] == pytest.approx(final[0]["eval"]["loss"])
    assert "train/step" not in board

    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{first_id}.wandb"] * 2  # one offline run file per process, one id
    seen: dict[str, dict[int, float]] = {}
    for f in files:
        meta, history = wandb_history(f)
        assert meta["id"] == first_id and meta["project"] == "hrmspec" and meta["name"] == "my-run"
        assert meta["config"]["train"]["log"] == ALL and meta["config"]["train"]["steps"] == STEPS
        assert meta["config"]["model"]["d_model"] == 32
        for key, points in history.items():
            seen.setdefault(key, {}).update(points)
    assert sorted(seen["train/loss"]) == list(range(1, STEPS + 1))
    assert seen["train/loss"][STEPS] == pytest.approx(records[STEPS - 1]["loss"])
    assert seen["eval/accuracy"] == {STEPS: final[0]["eval"]["accuracy"]}


class FakeRun:
    def __init__(self, calls, **kwargs):
        self.calls = calls
        calls.append(("init", kwargs))

    def log(self, data, step=None):
        self.calls.append(("log", data, step))

    def finish(self, exit_code=None):
        self.calls.append(("finish", exit_code))


@pytest.fixture
def fake_wandb(monkeypatch):
    import wandb

    calls: list = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: FakeRun(calls, **kwargs))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return calls


def test_wandb_gets_prefixed_numbers_a_stable_id_and_the_project(tmp_path, fake_wandb, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    logs = open_loggers(["wandb"], run, 0, {"train": {"lr": 1e-3}}, project="mine")
    logs.log({"step": 3, "loss": 1.5, "lr": 1e-3, "halted": True, "name": "x", "bad": float("nan")}, 3, "train")
    logs.log({"accuracy": 0.5, "tasks": {"sum": {"accuracy": 1.0}}, "samples": [{"got": "1"}]}, 3, "eval")
    logs.close()
    init = fake_wandb[0][1]
    assert init["project"] == "mine" and init["name"] == "run" and init["dir"] == str(run)
    assert init["resume"] == "allow" and init["config"] == {"train": {"lr": 1e-3}}
    assert init["id"] == (run / WANDB_ID).read_text().strip()
    assert fake_wandb[1:] == [("log", {"train/loss": 1.5, "train/lr": 1e-3}, 3),
                              ("log", {"eval/accuracy": 0.5, "eval/tasks/sum/accuracy": 1.0}, 3), ("finish", 0)]

    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    open_loggers(["wandb"], run, 3, {}).close()  # resumed at step 3: the same id
    assert fake_wandb[-2][1]["id"] == init["id"] and fake_wandb[-2][1]["project"] == "from-env"
    open_loggers(["wandb"], run, 0, {}).close()  # a new run in the folder (--overwrite): a new W&B run
    assert fake_wandb[-2][1]["id"] != init["id"] == fake_wandb[-4][1]["id"]
    assert fake_wandb[-2][1]["id"] == (run / WANDB_ID).read_text().strip()


def test_a_run_that_fails_finishes_its_wandb_run_as_failed(tmp_path, fake_wandb):
    logs = open_loggers(["wandb"], tmp_path, 0, {})
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("died")
        finally:
            logs.close()
    assert fake_wandb[-1] == ("finish", 1)


@pytest.mark.parametrize("planted, message", [("text", "does not hold a W&B run id; delete it"),
                                               ("fifo", "is not a regular file; delete it")])
def test_a_damaged_wandb_id_is_refused_on_resume(tmp_path, fake_wandb, planted, message):
    if planted == "fifo":  # never read: it would block
        os.mkfifo(tmp_path / WANDB_ID)
    else:
        (tmp_path / WANDB_ID).write_text("not an id!\n")
    with pytest.raises(TrainError, match=message):
        open_loggers(["wandb"], tmp_path, 5, {})


@pytest.mark.parametrize("name", ["tensorboard", "wandb", WANDB_ID])
def test_links_in_place_of_the_loggers_files_are_refused(tmp_path, fake_wandb, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(outside)
    logger = "wandb" if name != "tensorboard" else "tensorboard"
    with pytest.raises(OutputError, match=f"{name} is a symbolic link"):
        open_loggers([logger], run, 0, {})
    assert list(outside.iterdir()) == []


def test_only_the_named_loggers_write(tmp_path):
    logs = open_loggers(["jsonl"], tmp_path, 0, {})
    logs.log({"step": 1, "loss": 2.0}, 1, "train")
    logs.log({"accuracy": 1.0}, 1, "eval")
    logs.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ('{"step": 1, "loss": 2.0}\n'
                                                        '{"step": 1, "eval": {"accuracy": 1.0}}\n')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    open_loggers([], tmp_path, 0, {}).close()  # none at all: nothing is written


def test_the_default_is_jsonl_and_tensorboard_when_it_imports(monkeypatch):
    assert default_loggers() == ["jsonl", "tensorboard"]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # tensorboard not installed
    assert default_loggers() == ["jsonl"]
    assert TrainConfig.from_dict({}).log is None


@pytest.mark.parametrize("value, message", [
    ("tensorbord", "train.log: unknown logger 'tensorbord' (did you mean 'tensorboard'?); known: jsonl | "
                   "tensorboard | wandb"),
    (["jsonl", "jsonl"], "train.log: jsonl is named twice"),
    ({"jsonl": 1}, "train.log: expected a list of loggers"),
    ([3], "train.log: unknown logger 3"),
])
def test_a_bad_log_is_refused(value, message):
    with pytest.raises(TrainError) as e:
        TrainConfig.from_dict({"log": value})
    assert str(e.value).startswith(message)


def test_log_takes_a_name_or_a_list():
    assert TrainConfig.from_dict({"log": "wandb"}).log == ["wandb"]
    assert TrainConfig.from_dict({"log": ["wandb", "jsonl"], "wandb_project": "p-1"}).log == ["wandb", "jsonl"]
    with pytest.raises(TrainError, match="train.wandb_project: expected a W&B project name"):
        TrainConfig.from_dict({"wandb_project": "a/b"})


def test_an_unknown_logger_is_refused_when_opened(tmp_path):
    with pytest.raises(TrainError, match="train.log: unknown logger 'mlflow'"):
        open_loggers(["jsonl", "mlflow"], tmp_path, 0, {})


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_package_names_its_extra(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` fails, as when it is not installed
    with pytest.raises(TrainError, match=rf"train.log: {name} is not installed: pip install 'hrmspec\[{name}\]'"):
        TrainConfig.from_dict({"log": ["jsonl", name]}).check_loggers()
    with pytest.raises(TrainError, match=rf"pip install 'hrmspec\[{name}\]'"):
        open_loggers(["jsonl", name], tmp_path, 0, {})
    assert loggers.missing_logger("jsonl") is None


BAD_LOG = """extends: hrm-text-tiny
train:
  steps: 2
  log: [jsonl, tensorbord]
"""


def test_validate_locates_a_bad_log(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_LOG)
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}:4:3: train.log: unknown logger 'tensorbord' (did you mean 'tensorboard'?)" in err
    code = main(["validate", str(path), "--set", "train.log=[jsonl, jsonl]"])
    err = capsys.readouterr().err
    assert code == 2 and "--set train.log: train.log: jsonl is named twice" in err, err


def test_train_refuses_a_missing_logger_package_before_making_the_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    path = tmp_path / "spec.yaml"
    path.write_text(BAD_LOG.replace("tensorbord", "wandb"))
    out = tmp_path / "run"
    code = main(["train", str(path), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}:4:3: train.log: wandb is not installed: pip install 'hrmspec[wandb]'" in err, err
    assert not out.exists()
