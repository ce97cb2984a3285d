"""A run killed with SIGKILL between two checkpoints, then resumed, ends exactly where an uninterrupted run
with the same seed ends: weights, EMA, every Adam moment and step count, the learning rate, the trainer's
counters, data position, RNG states and a supervised run's carry, bit for bit; and its metrics log holds
every step once. In one process, and under 2-process DDP (torchrun, gloo).

The kill comes from outside, as a crash or an out-of-memory killer would: the test watches the run's
metrics.jsonl and sends SIGKILL once step KILL_AFTER is logged, two steps into an interval of SAVE_EVERY.
The killed run is started through a driver that only sleeps before each step past KILL_AFTER, so the kill
lands before the next checkpoint on a loaded machine too; it changes no number. Every run is a fresh
process with one thread, so the runs compare bit for bit. Checkpoints are read with the project's own
readers (safetensors, `torch.load(weights_only=True)`).
"""

import os
import subprocess
import sys
import time
import types

import pytest
import torch
from test_grids import GRID_SPEC
from test_train import SPEC, free_port, kill_tree, spec

from hrmspec.runtime.artifacts import checkpoint as ckpt
from hrmspec.runtime.artifacts.plot import metric_records
from hrmspec.runtime.training.loop import Trainer, train

SAVE_EVERY, KILL_AFTER, STEPS, EVAL_EVERY = 4, 6, 10, 5  # the held-out evaluation at 5 is logged, then lost
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SETTINGS = {"train.steps": STEPS, "train.save_every": SAVE_EVERY, "train.eval_every": EVAL_EVERY, "train.eval_n": 4,
            "train.keep": 10}
TIMING = ("tokens_per_s",)  # the only logged values that depend on the clock
DRIVER = f"""
import sys, time
from hrmspec.cli import main
from hrmspec.runtime.training.loop import Trainer

step = Trainer.train_step

def slowed(self, batch):
    if self.step >= {KILL_AFTER}:  # a pause before each step past the one the test waits for; no number changes
        time.sleep(1.0)
    return step(self, batch)

Trainer.train_step = slowed
sys.exit(main(sys.argv[1:]))
"""


def command(launcher: list[str], spec_file, out, *extra) -> list[str]:
    sets = [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    return [*launcher, "train", str(spec_file), "--out", str(out), *sets, *extra]


def launcher(processes: int, driver=None) -> list[str]:
    """How a run starts: `python -m hrmspec` (or the driver), under torchrun for more than one process."""
    program = [str(driver)] if driver else ["-m", "hrmspec"]
    if processes == 1:
        return [sys.executable, *program]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            f"--master_port={free_port()}", *program]


def run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, env=ENV, timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def logged_steps(path) -> list[int]:
    return [rec["step"] for rec in metric_records(path) if "loss" in rec] if path.exists() else []


def kill_mid_interval(cmd: list[str], out, log) -> None:
    """Start `cmd`, SIGKILL it (and every process it started) as soon as step KILL_AFTER is logged."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 600
    try:
        while KILL_AFTER not in logged_steps(out / "metrics.jsonl"):
            if proc.poll() is not None:
                pytest.fail(f"the run ended before step {KILL_AFTER}: {log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, f"no step {KILL_AFTER} after 600 s"
            time.sleep(0.01)
    finally:
        kill_tree(proc.pid)  # the run's process, and under torchrun every rank
        proc.wait()


def final_state(out) -> dict:
    """Everything a run's last checkpoint holds that training continues from, read without unpickling."""
    last = ckpt.latest_checkpoint(out)
    assert last is not None and last.name == f"step_{STEPS:08d}", last
    return {"model": ckpt.model_tensors(last), "ema": ckpt.model_tensors(last, "ema"),
            "optimizer": ckpt.read_pt(last / "optimizer.pt"), "trainer": ckpt.read_trainer_state(last)}


def assert_identical(a, b, where: str = "") -> None:
    """`a` and `b` hold the same keys, the same numbers and bit-identical tensors (dtype and shape too)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs by up to {(a.double() - b.double()).abs().max():g}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def records(out) -> list[dict]:
    return [{k: v for k, v in rec.items() if k not in TIMING} for rec in metric_records(out / "metrics.jsonl")]


def check_resume_after_kill(spec_text: str, tmp_path, processes: int) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    driver, spec_file = tmp_path / "driver.py", tmp_path / "spec.yaml"
    driver.write_text(DRIVER)
    spec_file.write_text(spec_text)
    with open(tmp_path / "full.log", "wb") as log:  # the uninterrupted run, beside the others (one thread each)
        reference = subprocess.Popen(command(launcher(processes), spec_file, full, "--no-progress"), env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=log)
    try:
        kill_mid_interval(command(launcher(processes, driver), spec_file, part, "--no-progress"), part,
                          tmp_path / "killed.log")
    finally:
        if reference.wait(timeout=600):
            pytest.fail(f"the uninterrupted run failed: {(tmp_path / 'full.log').read_text()[-3000:]}")
    assert [p.name for p in ckpt.list_checkpoints(part)] == [f"step_{SAVE_EVERY:08d}"]  # killed mid-interval
    before = logged_steps(part / "metrics.jsonl")
    assert before[:KILL_AFTER] == list(range(1, KILL_AFTER + 1)) and before[-1] < 2 * SAVE_EVERY, before

    # without --no-progress, off a terminal, the resumed run prints a line per step it runs
    printed = run(command(launcher(processes), spec_file, part, "--resume"))
    ran = [int(line.split()[1].split("/")[0]) for line in printed.splitlines() if line.startswith("step ")
           and "/" in line.split()[1]]
    assert ran == list(range(SAVE_EVERY + 1, STEPS + 1)), printed  # the steps after the checkpoint, done again

    got, want = records(part), records(full)
    assert [r["step"] for r in got if "loss" in r] == list(range(1, STEPS + 1))  # each step exactly once
    assert [r["step"] for r in got if "eval" in r] == [EVAL_EVERY, STEPS]  # periodic, and at the end
    assert got == want  # loss, lr, credit depth, grad norm, held-out accuracy: every logged value

    a, b = final_state(part), final_state(full)
    assert_identical(a, b, "checkpoint")
    moments = a["optimizer"]["state"]
    assert len(moments) == len(a["ema"]) > 0  # every parameter (the EMA has one entry each) has its Adam state
    assert all({"exp_avg", "exp_avg_sq", "step"} <= set(m) for m in moments.values())
    assert {float(m["step"]) for m in moments.values()} <= set(range(1, STEPS + 1))
    assert a["trainer"]["step"] == STEPS and a["trainer"]["ema_steps"] == STEPS
    lrs = [g["lr"] for g in a["optimizer"]["param_groups"]]
    assert lrs == [next(r["lr"] for r in want if r.get("step") == STEPS)] * len(lrs)


# z_L drawn afresh at every forward from torch's global generator: a resume that did not restore the RNG
# states would draw other initial states, and every loss after it would differ
RANDOM_STATE_SPEC = SPEC.replace("z_L: {init: buffer}", "z_L: {init: random, std: 1.0}")


def test_sigkill_mid_interval_then_resume_is_the_uninterrupted_run_bit_for_bit(tmp_path):
    assert RANDOM_STATE_SPEC != SPEC
    check_resume_after_kill(RANDOM_STATE_SPEC, tmp_path, processes=1)


# about 35 s each on 2 cores (three torchrun launches): in CI's budget, and the only check of a DDP resume
@pytest.mark.parametrize("spec_text", [SPEC, GRID_SPEC], ids=["hrm-text", "grid-carry"])
def test_sigkill_mid_interval_under_ddp_then_resume_is_the_uninterrupted_run_bit_for_bit(tmp_path, spec_text):
    """Two processes: the gradients and the loss are all-reduced sums of two ranks' terms, a + b, exact in either
    order, so the runs agree bit for bit. Under deep supervision each rank's rows carry their states and
    segment counts across steps: the checkpoint holds every rank's carry."""
    check_resume_after_kill(spec_text, tmp_path, processes=2)


def test_steps_done_again_are_shown_once_in_metrics_and_tensorboard(tmp_path, monkeypatch, one_thread):
    """In one process: a run that dies past its last checkpoint logged steps that the resumed run logs again;
    metrics.jsonl drops the old lines and TensorBoard's writer is told to purge the old events (tensorboard
    need not be installed: a stand-in writer keeps what TensorBoard shows, honouring purge_step as its reader
    does). A new run with --overwrite starts without the old event files."""
    shown: dict[str, list[int]] = {}

    class Board:
        def __init__(self, log_dir, purge_step=None):
            if purge_step is not None:  # TensorBoard hides the events at purge_step and after
                for tag in shown:
                    shown[tag] = [s for s in shown[tag] if s < purge_step]

        def add_scalar(self, tag, value, step):
            shown.setdefault(tag, []).append(step)

        def close(self):
            pass

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = Board
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    run_spec = spec(**{"train.steps": STEPS, "train.save_every": SAVE_EVERY})
    step = Trainer.train_step

    def dies(self, batch):
        if self.step == KILL_AFTER:
            raise RuntimeError("died")
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", dies)
    with pytest.raises(RuntimeError, match="died"):
        train(run_spec, tmp_path, progress_bar=False)
    assert logged_steps(tmp_path / "metrics.jsonl") == shown["train/loss"] == list(range(1, KILL_AFTER + 1))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [f"step_{SAVE_EVERY:08d}"]
    monkeypatch.setattr(Trainer, "train_step", step)
    train(run_spec, tmp_path, resume=True, progress_bar=False)
    assert logged_steps(tmp_path / "metrics.jsonl") == shown["train/loss"] == list(range(1, STEPS + 1))
    # every number of a record (loggers.py): the step's values and the final evaluation's
    assert {"train/loss", "train/lr", "train/credit_depth", "train/tokens_per_s", "train/grad_norm",
            "train/skipped_steps", "eval/accuracy", "eval/loss"} <= shown.keys()

    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_bytes(b"")
    train(spec(**{"train.steps": 1}), tmp_path, progress_bar=False, overwrite=True)
    assert not (tmp_path / "tensorboard").exists()  # a real writer would have made it anew, with step 1 only
