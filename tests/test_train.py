"""Training: exact resume, atomic checkpoints, NaN handling, bad input, 2-process DDP."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from hrmspec.errors import CheckpointError
from hrmspec.runtime.artifacts import checkpoint as ckpt
from hrmspec.runtime.artifacts.files import read_tensors
from hrmspec.runtime.training.loop import TrainConfig, TrainError, train
from hrmspec.spec import load_spec_text

SPEC = """
name: micro
model:
  vocab: 320
  d_model: 32
  heads: 2
  ffn: 64
  max_seq_len: 96
  modules: {L: {layers: 1}, H: {layers: 1}}
  states: {z_H: {init: embed}, z_L: {init: buffer}}
  schedule:
    - repeat: 2
      do: [{repeat: 2, do: ["z_L = L(z_L + z_H)"]}, "z_H = H(z_H + z_L)"]
  output: z_H
  credit: {depth: {from: 2, to: 4, warmup: 0.5}, priority: [H, L]}
data: {source: reasoning_gym, tasks: [basic_arithmetic], size: 120, eval_size: 8}
train: {steps: 6, batch_size: 4, seq_len: 96, log_every: 1, save_every: 3, keep: 5, lr: 3.0e-3, max_new_tokens: 8}
"""


def spec(**overrides):
    return load_spec_text(SPEC, overrides=overrides or None)


def losses(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["credit_depth"], r["grad_norm"]) for r in recs if "loss" in r]


def free_port() -> int:
    """A TCP port nothing listens on now (fixed ports collide when test runs overlap)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL process `pid` and every process under it, wherever each is. Not its process group: torchrun
    starts each rank in a session of its own, so killing torchrun's group would leave the ranks training."""
    import signal
    from pathlib import Path

    def children(of: int) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
            if ppid == of:
                found.append(int(stat.parent.name))
        return found

    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            os.kill(p, signal.SIGSTOP)  # frozen before its children are listed: it starts no more
        except ProcessLookupError:
            continue
        tree.append(p)
        todo += children(p)
    for p in tree:
        os.kill(p, signal.SIGKILL)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(spec(), full, progress_bar=False)
    train(spec(), part, progress_bar=False, stop_after=3)
    assert [s for s, *_ in losses(part)] == [1, 2, 3]
    train(spec(), part, resume=True, progress_bar=False)
    assert losses(part) == losses(full)
    assert [r[2] for r in losses(full)] == [2, 2, 3, 4, 4, 4]  # 2 + floor(min(1, (step/6) / 0.5) * 2)


def test_checkpoints_are_complete_and_pruned(tmp_path):
    train(spec(**{"train.keep": 1}), tmp_path, progress_bar=False)
    found = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step_00000006"]
    names = {p.name for p in found[0].iterdir()}
    expected = {"model.safetensors", "ema.safetensors", "optimizer.pt", "trainer.pt", "spec.yaml", "tokenizer.json"}
    assert expected <= names
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real = ckpt.save_file
    calls = {"n": 0}

    def failing(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint writes model + ema; the second fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", failing)
    with pytest.raises(CheckpointError, match="No space left on device.*step_00000003 is intact"):
        train(spec(), tmp_path, progress_bar=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    read_tensors(ckpt.latest_checkpoint(tmp_path) / "model.safetensors")  # still loads


def test_nan_losses_are_skipped_then_stop(tmp_path, monkeypatch):
    from hrmspec.runtime.execution import compiled as model_mod

    real = model_mod.CompiledModel.forward

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(model_mod.CompiledModel, "forward", poisoned)
    with pytest.raises(TrainError, match="not finite for 2 steps"):
        train(spec(**{"train.max_nan_steps": 2}), tmp_path, progress_bar=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    from hrmspec.runtime.evaluate.heldout import load_run

    train(spec(**{"train.steps": 3}), tmp_path, progress_bar=False)
    last = ckpt.latest_checkpoint(tmp_path)
    (last / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt checkpoint file"):
        load_run(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    from hrmspec.runtime.evaluate.heldout import load_run

    train(spec(**{"train.steps": 3}), tmp_path, progress_bar=False)
    last = ckpt.latest_checkpoint(tmp_path)
    text = (last / "spec.yaml").read_text().replace("ffn: 64", "ffn: 96")
    (last / "spec.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=r"tensor 'stacks\.\w\.layers\.0\.mlp\.\w+\.weight' has shape"):
        load_run(tmp_path)


def test_bad_train_config_and_small_vocab(tmp_path):
    with pytest.raises(TrainError, match="unknown key.*did you mean 'steps'"):
        train(spec(**{"train.stepz": 3}), tmp_path, progress_bar=False)
    with pytest.raises(TrainError, match="train.lr: expected a finite number > 0, found 'fast'"):
        train(spec(**{"train.lr": "fast"}), tmp_path, progress_bar=False)
    assert TrainConfig.from_dict({"lr": "3e-3"}).lr == 3e-3  # YAML 1.1 reads 3e-3 as a string
    with pytest.raises(TrainError, match="vocab_size 100 is too small"):
        train(spec(**{"model.vocab": 100}), tmp_path, progress_bar=False)


def test_eval_scores_with_task_checker(tmp_path, monkeypatch, one_thread):
    from dataclasses import replace

    from hrmspec.runtime.artifacts.data import DataConfig, format_sample
    from hrmspec.runtime.artifacts.tokenizer import Tokenizer
    from hrmspec.runtime.evaluate.heldout import evaluate_run, held_out_set
    from hrmspec.runtime.execution.compiled import CompiledModel

    run_spec = spec(**{"train.max_new_tokens": 40})
    train(run_spec, tmp_path, progress_bar=False)
    tok = Tokenizer.load(ckpt.latest_checkpoint(tmp_path))
    samples = held_out_set(DataConfig.from_dict(run_spec.data)).samples[:8]
    # a model forced to answer: samples 0, 2, 3 and 6 with their gold response, the others with it and a digit
    # more; each answer ends with eos (its response text does), and what follows the eos must be ignored
    right = {0, 2, 3, 6}
    answers = {tuple(tok.encode(format_sample(x)[0])): tok.encode(format_sample(
        x if i in right else replace(x, response=x.response + "7"))[1]) for i, x in enumerate(samples)}
    assert len(answers) == 8 and all(a[-1] == tok.eos_id for a in answers.values())

    def forced(self, ids, max_new_tokens, eos_id=None, attention_mask=None, **_):
        assert eos_id == tok.eos_id
        real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        rows = [(answers[tuple(row[keep].tolist())] + tok.encode("9" * max_new_tokens))[:max_new_tokens]
                for row, keep in zip(ids, real)]  # prompts of different lengths come left-padded
        return torch.cat([ids, torch.tensor(rows)], dim=1)

    monkeypatch.setattr(CompiledModel, "generate", forced)
    res = evaluate_run(tmp_path, n=8)
    assert res["accuracy"] == 0.5 and res["n"] == 8
    assert res["tasks"] == {"basic_arithmetic": {"accuracy": 0.5, "n": 8}}
    assert json.loads((tmp_path / "eval.json").read_text())["tasks"] == res["tasks"]


# A gloo process that exits with its process group alive can abort (SIGABRT) in the group's worker threads:
# the trainer destroys the group it made, once those threads are idle (runtime/training/loop.py:_leave_group).
DDP_DRIVER = """
import sys
import torch.distributed as dist
from hrmspec.cli import main
code = main(sys.argv[1:])
if dist.is_initialized():
    sys.exit("the process group outlived the run")
sys.exit(code)
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_single_process(tmp_path, mode):
    spec_file = tmp_path / "micro.yaml"
    spec_file.write_text(SPEC)
    single, double = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "hrmspec", "train", str(spec_file), "--no-progress", "--set", "train.steps=4"]
    subprocess.run(base + ["--out", str(single)], check=True, env=env, timeout=600, capture_output=True)
    driver = tmp_path / "driver.py"  # the CLI, then a check that the run let go of its process group
    driver.write_text(DDP_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(driver), "train", str(spec_file), "--no-progress", "--set", "train.steps=4", "--out", str(double)]
    cmd += ["--fsdp"] if mode == "fsdp" else []
    r = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(single), losses(double)
    assert [x[0] for x in a] == [x[0] for x in b] == [1, 2, 3, 4]
    for (_, la, _, ga), (_, lb, _, gb) in zip(a, b):
        assert abs(la - lb) < 1e-4 and abs(ga - gb) < 1e-3
    assert torch.equal(torch.tensor([x[2] for x in a]), torch.tensor([x[2] for x in b]))


def test_export_trained_run_to_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from hrmspec.cli import main
    from hrmspec.runtime.evaluate.heldout import load_run

    run = tmp_path / "run"
    train(spec(**{"train.steps": 3}), run, progress_bar=False)
    assert main(["export-hf", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, *_ = load_run(run)  # EMA weights, as exported
    ids = torch.randint(0, 300, (2, 10))
    prefix = torch.zeros(2, 10, dtype=torch.bool)
    prefix[:, :4] = True
    with torch.no_grad():
        a = ours(ids, prefix_mask=prefix).logits
        b = hf(input_ids=ids, token_type_ids=prefix.long()).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def greedy_answer(run, prompt: str, new: int) -> str:
    """The answer of the run's newest checkpoint (EMA weights) to `prompt` by the greedy loop: the full forward
    re-run on the growing sequence, cut at the first eos."""
    from greedy_oracle import greedy_loop

    from hrmspec.runtime.artifacts.data import Sample, format_sample
    from hrmspec.runtime.evaluate.heldout import load_run

    model, tok, *_ = load_run(run)
    ids = torch.tensor([tok.encode(format_sample(Sample(instruction=prompt, response=""))[0])])
    stream, gap = greedy_loop(model, ids, new)
    assert gap > 1e-4  # no near tie: generate's argmax is the loop's
    tokens = stream[0, ids.shape[1]:].tolist()
    return tok.decode(tokens[:tokens.index(tok.eos_id)] if tok.eos_id in tokens else tokens, skip_special=True)


def test_cli_train_eval_generate_plot(tmp_path, capsys, one_thread):
    from hrmspec.cli import main

    spec_file, run = tmp_path / "micro.yaml", tmp_path / "run"
    spec_file.write_text(SPEC)
    assert main(["train", str(spec_file), "--out", str(run), "--set", "train.steps=3"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    # off a terminal: one plain line per logged step, not a progress bar
    assert [x.split()[1] for x in lines[:3]] == ["1/3", "2/3", "3/3"] and all("eta" in x for x in lines[:3])
    assert main(["eval", str(run), "--n", "4"]) == 0
    assert "basic_arithmetic" in capsys.readouterr().out
    assert main(["generate", str(run), "Calculate 12 + 30.", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == greedy_answer(run, "Calculate 12 + 30.", 4) + "\n"
    assert main(["generate", str(run), "Calculate 12 + 30.", "--max-new-tokens", "90"]) == 2
    assert "more than model.max_seq_len 96" in capsys.readouterr().err
    assert main(["generate", str(run), "9" * 100_000]) == 2
    assert "the prompt is 100,000 characters" in capsys.readouterr().err
    assert main(["plot", str(run)]) == 0
    png = (run / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_cli_bad_data_is_one_line_exit_2(tmp_path, capsys):
    from hrmspec.cli import main

    spec_file = tmp_path / "micro.yaml"
    spec_file.write_text(SPEC)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a"\n')
    base = ["train", str(spec_file), "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(base + ["--set", "data={source: jsonl, path: missing.jsonl}"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(base + ["--set", f"data={{source: jsonl, path: {bad}}}"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"instruction": "a", "response": ""}\n')
    assert main(base + ["--set", f"data={{source: jsonl, path: {empty}}}"]) == 2
    assert "training set is empty" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


class _Payload:
    """Unpickling this would run code: it records that it did."""

    ran: list = []

    def __reduce__(self):
        return (_Payload.ran.append, ("unpickled",))


@pytest.mark.parametrize("name", ["trainer.pt", "optimizer.pt"])
def test_resume_never_unpickles_objects_from_a_checkpoint(tmp_path, name):
    train(spec(**{"train.steps": 3}), tmp_path, progress_bar=False)
    last = ckpt.latest_checkpoint(tmp_path)
    state = torch.load(last / name, weights_only=True)  # what resuming reads: plain tensors and numbers
    torch.save({**state, "payload": _Payload()}, last / name)
    _Payload.ran.clear()
    with pytest.raises(CheckpointError, match=f"unsafe checkpoint file .*{name}"):
        train(spec(**{"train.steps": 5}), tmp_path, resume=True, progress_bar=False)
    assert _Payload.ran == []  # refused, not run


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    import signal

    from hrmspec.runtime.artifacts.runfolder import TrainInterrupted
    from hrmspec.runtime.training.loop import Trainer

    full, part = tmp_path / "full", tmp_path / "part"
    train(spec(**{"train.save_every": 100}), full, progress_bar=False)
    real = Trainer.train_step

    def step_then_signal(self, batch):
        out = real(self, batch)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, in the middle of the run
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    with pytest.raises(TrainInterrupted, match="stopped by SIGTERM after step 2") as info:
        train(spec(**{"train.save_every": 100}), part, progress_bar=False)
    assert info.value.exit_code == 143
    assert [p.name for p in ckpt.list_checkpoints(part)] == ["step_00000002"]
    monkeypatch.setattr(Trainer, "train_step", real)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's only while it runs
    train(spec(**{"train.save_every": 100}), part, resume=True, progress_bar=False)
    assert losses(part) == losses(full)


def test_a_run_folder_is_one_runs(tmp_path, capsys):
    from hrmspec.cli import main
    from hrmspec.runtime.artifacts.runfolder import RunLock

    train(spec(**{"train.steps": 2}), tmp_path, progress_bar=False)
    with pytest.raises(TrainError, match="already holds a run .checkpoints up to step_00000002.: continue it with "
                                         "--resume, or start afresh with --overwrite"):
        train(spec(**{"train.steps": 2}), tmp_path, progress_bar=False)
    (tmp_path / "notes.txt").write_text("mine")
    train(spec(**{"train.steps": 1}), tmp_path, progress_bar=False, overwrite=True)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001"]
    assert [r[0] for r in losses(tmp_path)] == [1] and (tmp_path / "notes.txt").read_text() == "mine"
    held = RunLock(tmp_path)  # another trainer is running there
    try:
        spec_file = tmp_path / "micro.yaml"
        spec_file.write_text(SPEC)
        code = main(["train", str(spec_file), "--out", str(tmp_path), "--resume", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and f"is in use by a trainer (pid {os.getpid()})" in err and "Traceback" not in err
    finally:
        held.release()
    (tmp_path / "file").write_text("")
    with pytest.raises(TrainError, match="is a file, not a folder"):
        train(spec(), tmp_path / "file", progress_bar=False)


def test_resume_under_a_changed_model_is_refused_with_what_changed(tmp_path):
    train(spec(**{"train.steps": 2}), tmp_path, progress_bar=False)
    changed = spec(**{"train.steps": 4, "model.d_model": 64, "model.credit": "none"})
    want = r'--resume: the spec changes what step_00000002 was trained as \(model.d_model: 32 -> 64; model.credit: '
    with pytest.raises(TrainError, match=want + r'\{"depth": .*\.\.\. -> "none"\)'):
        train(changed, tmp_path, resume=True, progress_bar=False)
    train(spec(**{"train.steps": 3}), tmp_path, resume=True, progress_bar=False)  # train: may change
    assert [r[0] for r in losses(tmp_path)] == [1, 2, 3]
