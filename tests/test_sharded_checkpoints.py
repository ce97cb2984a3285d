"""Sharded (DCP) checkpoints of FSDP runs: each rank writes its own shards, a run killed with SIGKILL
resumes to the same losses, any number of processes reads them, and they convert to one file."""

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from test_train import SPEC, free_port, kill_tree, losses, spec

from hrmspec.errors import CheckpointError
from hrmspec.runtime.artifacts import checkpoint as ckpt
from hrmspec.runtime.artifacts.files import read_tensors
from hrmspec.runtime.artifacts.sharded import load_sharded, read_sharded, save_sharded
from hrmspec.runtime.training.loop import Trainer

STEPS, EVERY = 12, 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(spec_file, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "-m", "hrmspec", "train", str(spec_file), "--no-progress", "--fsdp", "--out", str(out),
            "--set", f"train.steps={STEPS}", "--set", f"train.save_every={EVERY}", "--set", "train.keep=10", *extra]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """An uninterrupted 2-process FSDP run, and its spec file."""
    root = tmp_path_factory.mktemp("fsdp")
    spec_file = root / "micro.yaml"
    spec_file.write_text(SPEC)
    r = subprocess.run(torchrun(spec_file, root / "full"), env=ENV, timeout=600, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return spec_file, root / "full"


def test_each_rank_writes_only_its_shards(fsdp_run):
    _, run = fsdp_run
    last = ckpt.latest_checkpoint(run)
    files = sorted((last / "shards").glob("*.safetensors"))
    assert len(files) == 2 and not (last / "model.safetensors").exists() and not (last / "optimizer.pt").exists()
    full = read_sharded(last, "model")
    held = [0, 0]
    for i, path in enumerate(files):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                if key.startswith("model."):
                    shape, whole = f.get_slice(key).get_shape(), full[key[len("model."):]].shape
                    if len(whole) == 2:  # a weight: its rows are split (buffers are replicated, written once)
                        assert shape[0] < whole[0], key
                    held[i] += torch.Size(shape).numel()
    total = sum(t.numel() for t in full.values())
    assert held[0] + held[1] == total and min(held) > total // 4  # split between the ranks, nothing twice


def test_kill_9_then_resume_gives_the_uninterrupted_losses(fsdp_run, tmp_path):
    spec_file, full = fsdp_run
    part = tmp_path / "part"
    proc = subprocess.Popen(torchrun(spec_file, part), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while not (part / "checkpoints" / "step_00000004" / "trainer.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its 2nd checkpoint"
            time.sleep(0.02)
    finally:
        kill_tree(proc.pid)  # torchrun and both ranks, wherever they are (a save included)
        proc.wait()
    killed_at = int(ckpt.latest_checkpoint(part).name.split("_")[1])
    assert 4 <= killed_at < STEPS
    r = subprocess.run(torchrun(spec_file, part, "--resume"), env=ENV, timeout=600, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [s for s, *_ in losses(part)] == list(range(1, STEPS + 1))
    assert losses(part) == losses(full)  # every step: loss, credit depth and grad norm, as rounded in the log
    assert not list((part / "checkpoints").glob(".tmp-*"))  # a save cut short is cleaned by the next one


def test_one_process_reads_two_ranks_shards_exactly(fsdp_run, tmp_path):
    _, run = fsdp_run
    last = ckpt.latest_checkpoint(run)
    model, ema, optim = (read_sharded(last, part) for part in ("model", "ema", "optim"))
    trainer = Trainer(spec(**{"train.steps": STEPS + 2}), run, resume=True)  # one process, no FSDP
    try:
        for name, value in trainer.model.state_dict().items():
            assert torch.equal(value, model[name]), name
        for name, shadow in trainer.ema.shadow.items():
            assert torch.equal(shadow, ema[name]), name
        params = dict(trainer.model.named_parameters())
        for name, p in params.items():
            state = trainer.optimizer.state[p]
            assert torch.equal(state["exp_avg"], optim[f"{name}.exp_avg"]), name
            assert float(state["step"]) == float(optim[f"{name}.step"]) > 0  # steps with gradient for it
        assert trainer.step == STEPS
    finally:
        trainer.release()


def test_consolidate_writes_the_single_file_layout_that_eval_reads(fsdp_run, tmp_path):
    from hrmspec.cli import main
    from hrmspec.runtime.evaluate.heldout import load_run

    _, run = fsdp_run
    last = ckpt.latest_checkpoint(run)
    copy = tmp_path / "run"
    (copy / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(last), str(copy / "checkpoints")], check=True)
    direct, *_ = load_run(copy)  # from the shards
    assert main(["consolidate", str(copy)]) == 0
    copied = copy / "checkpoints" / last.name
    assert read_tensors(copied / "model.safetensors").keys() == direct.state_dict().keys()
    shutil.rmtree(copied / "shards")  # now only the single files remain
    again, *_ = load_run(copy)
    for (name, a), b in zip(direct.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert main(["consolidate", str(copy)]) == 2  # no shards left: one line, not a traceback


def test_sharded_round_trip_in_one_process_and_damage_is_one_error(tmp_path):
    """save_sharded / load_sharded without a process group: weights, EMA, moments and groups come back."""
    src, dst = Trainer(spec(**{"train.steps": 2}), tmp_path / "a"), Trainer(spec(), tmp_path / "b")
    try:
        src.fit(progress_bar=False)
        folder = tmp_path / "ckpt"
        folder.mkdir()
        save_sharded(folder, src.model, src.optimizer, src.ema)
        load_sharded(folder, dst.model, dst.optimizer, dst.ema)
        for (n, a), b in zip(src.model.state_dict().items(), dst.model.state_dict().values()):
            assert torch.equal(a, b), n
        for n in src.ema.shadow:
            assert torch.equal(src.ema.shadow[n], dst.ema.shadow[n]), n
        assert src.optimizer.param_groups[0]["lr"] != src.cfg.lr  # moved by the schedule: loading must restore it
        def hyper(group):
            return {k: v for k, v in group.items() if k != "params"}

        assert [hyper(g) for g in src.optimizer.param_groups] == [hyper(g) for g in dst.optimizer.param_groups]
        for p_src, p_dst in zip(src.model.parameters(), dst.model.parameters()):
            assert torch.equal(src.optimizer.state[p_src]["exp_avg_sq"], dst.optimizer.state[p_dst]["exp_avg_sq"])

        (folder / "optimizer.json").write_bytes(b"\x80\x04K\x01.")  # a pickle where JSON belongs: not run
        with pytest.raises(CheckpointError, match="optimizer.json cannot be read"):
            load_sharded(folder, dst.model, dst.optimizer, dst.ema)
        shard = next((folder / "shards").glob("*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:100])
        with pytest.raises(CheckpointError, match="shards cannot be read"):
            read_sharded(folder, "model")
    finally:
        src.release()
        dst.release()
