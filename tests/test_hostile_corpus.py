"""The hostile and careless input corpus: every case through the real command line, in its own process
under a time and an address-space limit, from a working directory of its own.

Each case asserts what a user is promised (README, "Security"): exit 2, the error on one line (a hint line
may follow), no traceback, nothing written outside the case's folder (a planted target file keeps its
bytes), and no marker from code planted on disk. The cases are data (CASES); a case's `setup` builds
what it needs in its folder and returns the command's arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MEMORY_LIMIT = 6 * 2**30  # address space per case: torch maps ~2 GB of it on start; a bomb hits the rest
TIME_LIMIT = 240  # seconds per case: generous for a loaded 2-core machine; a hang fails, never a slow pass

SPEC = """model:
  vocab: 320
  d_model: 32
  heads: 2
  ffn: 64
  max_seq_len: 64
  modules: {L: {layers: 1}}
  states: {z: {init: embed}}
  schedule: ["z = L(z)"]
data: {source: jsonl, path: train.jsonl, eval_path: train.jsonl}
train: {steps: 2, batch_size: 2, seq_len: 64, log_every: 1}
"""


def _samples(n: int = 40) -> str:
    return "".join(json.dumps({"instruction": f"add {i} and {i + 1}", "response": str(2 * i + 1)}) + "\n"
                   for i in range(n))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny trained run (2 steps) that the cases copy; its spec folder holds spec.yaml and train.jsonl."""
    from hrmspec.cli import main

    root = tmp_path_factory.mktemp("trained")
    (root / "spec.yaml").write_text(SPEC)
    (root / "train.jsonl").write_text(_samples())
    assert main(["train", str(root / "spec.yaml"), "--out", str(root / "run"), "--no-progress"]) == 0
    return root


@dataclass
class Case:
    name: str
    setup: Callable[[Path, Path], list[str]]  # (case folder, trained folder) -> the command's arguments
    expect: str  # a fragment of the one-line error
    env: dict[str, str] = field(default_factory=dict)
    argparse: bool = False  # refused by the argument parser (its usage text, then the error line)
    exit: int | None = 2  # None: a command that may succeed; only what it must never do is checked


def _spec(folder: Path, text: str = SPEC) -> str:
    (folder / "train.jsonl").write_text(_samples())
    (folder / "spec.yaml").write_text(text)
    return str(folder / "spec.yaml")


def _train(*sets: str) -> Callable[[Path, Path], list[str]]:
    def setup(folder: Path, trained: Path) -> list[str]:
        args = ["train", _spec(folder), "--out", str(folder / "run"), "--no-progress"]
        for s in sets:
            args += ["--set", s]
        return args
    return setup


def _run_copy(folder: Path, trained: Path) -> Path:
    run = folder / "run"
    shutil.copytree(trained / "run", run)
    return run


def _on_run(*args: str, change: Callable[[Path], None] | None = None) -> Callable[[Path, Path], list[str]]:
    """A command on a copy of the trained run, after `change(checkpoint folder)`."""
    def setup(folder: Path, trained: Path) -> list[str]:
        run = _run_copy(folder, trained)
        if change is not None:
            change(sorted((run / "checkpoints").iterdir())[-1])
        return [a.replace("RUN", str(run)) for a in args]
    return setup


def _tokenizer_garbage(ckpt: Path) -> None:
    (ckpt / "tokenizer.json").write_text('{"version": "1.0", "model": ')


def _tokenizer_missing(ckpt: Path) -> None:
    (ckpt / "tokenizer.json").unlink()


def _tensors(ckpt: Path, name: str, change: Callable) -> None:
    """Rewrite one safetensors file of a checkpoint with `change(tensors)` applied."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ckpt / name))
    change(tensors)
    save_file(tensors, str(ckpt / name))


def _nan_weight(ckpt: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        _tensors(ckpt, name, lambda t: next(v for v in t.values() if v.is_floating_point()).fill_(float("nan")))


def _int_weights(ckpt: Path) -> None:
    def cast(t):
        for k in t:
            t[k] = t[k].round().to(__import__("torch").int64)
    _tensors(ckpt, "model.safetensors", cast)


def _ema_shape(ckpt: Path) -> None:
    def reshape(t):
        k = next(iter(t))
        t[k] = t[k].flatten()[:3].clone()
    _tensors(ckpt, "ema.safetensors", reshape)


def _big_tokenizer(ckpt: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(2000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(ckpt / "tokenizer.json"))


def _trainer_state(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        import torch

        state = torch.load(ckpt / "trainer.pt", weights_only=True)
        change(state)
        torch.save(state, ckpt / "trainer.pt")
    return edit


def _empty_file(name: str) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / name).write_bytes(b"")


def _resume(*sets: str, change: Callable[[Path], None] | None = None) -> Callable[[Path, Path], list[str]]:
    """`train --resume` of a copy of the trained run (its spec beside it), after `change(checkpoint)`."""
    def setup(folder: Path, trained: Path) -> list[str]:
        run = _run_copy(folder, trained)
        if change is not None:
            change(sorted((run / "checkpoints").iterdir())[-1])
        args = ["train", _spec(folder), "--out", str(run), "--resume", "--no-progress"]
        for s in sets:
            args += ["--set", s]
        return args
    return setup


def _sparse(name: str, size: int, head: bytes = b"") -> Callable[[Path], Path]:
    """A file of `size` bytes that takes no disk: `head`, then zero bytes and no line end."""
    def make(folder: Path) -> Path:
        path = folder / name
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(size)
        return path
    return make


def _huge_line(folder: Path, trained: Path) -> list[str]:
    text = SPEC.replace("path: train.jsonl, eval_path: train.jsonl", "path: huge.jsonl, eval_path: huge.jsonl")
    spec = _spec(folder, text)
    _sparse("huge.jsonl", 3 * 2**30, b'{"instruction": "')(folder)
    return ["train", spec, "--out", str(folder / "run"), "--no-progress"]


def _surrogate_line(folder: Path, trained: Path) -> list[str]:
    (folder / "train.jsonl").write_text(_samples(3) + '{"instruction": "\\ud800", "response": "x"}\n')
    (folder / "spec.yaml").write_text(SPEC)
    return ["train", str(folder / "spec.yaml"), "--out", str(folder / "run"), "--no-progress"]


def _huge_metrics(folder: Path, trained: Path) -> list[str]:
    """A metrics.jsonl whose first line is 2 GB (no disk: zero bytes), then a good record."""
    run = _run_copy(folder, trained)
    (run / "metrics.jsonl").unlink()
    _sparse("metrics.jsonl", 2 * 2**30, b'{"step": 1, "loss": "')(run)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'\n{"step": 2, "loss": 1.0}\n')
    return ["plot", str(run)]


def _spec_text(text: str, *rest: str) -> Callable[[Path, Path], list[str]]:
    def setup(folder: Path, trained: Path) -> list[str]:
        (folder / "spec.yaml").write_text(text)
        return [a.replace("SPEC", str(folder / "spec.yaml")) for a in rest]
    return setup


def _hf_dir(config: str) -> Callable[[Path, Path], list[str]]:
    def setup(folder: Path, trained: Path) -> list[str]:
        (folder / "hf").mkdir()
        (folder / "hf" / "config.json").write_text(config)
        (folder / "hf" / "model.safetensors").write_bytes(b"")
        return ["import-hf", str(folder / "hf"), "--out", str(folder / "out")]
    return setup


def _all_config(text: str) -> Callable[[Path, Path], list[str]]:
    def setup(folder: Path, trained: Path) -> list[str]:
        (folder / "ckpt").mkdir()
        (folder / "ckpt" / "step_10").write_bytes(b"")
        (folder / "ckpt" / "all_config.yaml").write_text(text)
        return ["import-hrm", str(folder / "ckpt" / "step_10"), "--seq-len", "81", "--out", str(folder / "out")]
    return setup


def _onto_checkpoint(command: str) -> Callable[[Path, Path], list[str]]:
    def setup(folder: Path, trained: Path) -> list[str]:
        run = _run_copy(folder, trained)
        ckpt = sorted((run / "checkpoints").iterdir())[-1]
        if command == "export-hf":
            return ["export-hf", str(ckpt), "--out", str(ckpt)]
        _hf_dir('{"model_type": "hrm_text"}')(folder, trained)  # the output is refused before the input is read
        return ["import-hf", str(folder / "hf"), "--out", str(ckpt)]
    return setup


def _linked_lock(folder: Path, trained: Path) -> list[str]:
    run = _run_copy(folder, trained)
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(folder.parent / "outside" / "precious.txt")
    return ["train", _spec(folder), "--out", str(run), "--resume", "--no-progress", "--set", "train.steps=3"]


def _planted_json(folder: Path, trained: Path) -> list[str]:
    marker = folder.parent / "outside" / "marker"
    (folder / "json.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return ["check", "trm-tiny", "--draws", "1", "--arch", "80"]


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefg", "bcdefgh"))


CASES = [
    # train: values of the train: section that used to fail after training started, or pass wrongly
    Case("log_every-0", _train("train.log_every=0"), "train.log_every: expected an integer of at least 1"),
    Case("save_every-0", _train("train.save_every=0"), "train.save_every: expected an integer of at least 1"),
    Case("threads-negative", _train("train.threads=-3"), "train.threads: expected an integer of at least 0"),
    Case("seed-text", _train("train.seed=abc"), "train.seed: expected an integer"),
    Case("seed-huge", _train("train.seed=1e23"), "train.seed: expected an integer"),
    Case("betas-out-of-range", _train("train.betas=[2, 3]"), "train.betas: expected two numbers in [0, 1)"),
    Case("keep-text", _train("train.keep=abc"), "train.keep: expected an integer"),
    Case("tokenizer-not-one", _train("train.tokenizer=/etc/passwd"),
         "/etc/passwd: not a tokenizer.json the tokenizers library can use"),
    # the environment torchrun would set, set by hand
    Case("world-size-without-torchrun", _train(), "WORLD_SIZE=2 is set but MASTER_ADDR",
         env={"WORLD_SIZE": "2"}),
    Case("local-rank-text", _train(), "LOCAL_RANK='abc' is not an integer",
         env={"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555", "RANK": "0",
              "LOCAL_RANK": "abc"}),
    # eval / generate arguments
    Case("eval-n-negative", _on_run("eval", "RUN", "--n", "-5"), "argument --n: expected a positive integer",
         argparse=True),
    Case("generate-not-utf8", _on_run("generate", "RUN", "abc\udcff"), "the prompt is not UTF-8 text (byte 0xff"),
    Case("exit-argmax-huge", _on_run("generate", "RUN", "add 1 and 2", "--exit", "argmax:1e20"),
         "argmax takes a number of steps from 1 to"),
    # what a run folder holds, damaged
    Case("tokenizer-malformed", _on_run("eval", "RUN", "--n", "2", change=_tokenizer_garbage),
         "tokenizer.json: not a tokenizer.json the tokenizers library can use"),
    Case("tokenizer-missing", _on_run("eval", "RUN", "--n", "2", change=_tokenizer_missing), "no tokenizer.json there"),
    Case("tokenizer-too-big", _on_run("generate", "RUN", "hi", change=_big_tokenizer),
         "tokens but the model's vocabulary is 320"),
    Case("nan-weights", _on_run("eval", "RUN", "--n", "2", change=_nan_weight), "NaN or infinite value"),
    Case("int-weights", _on_run("eval", "RUN", "--n", "2", change=_int_weights), "holds torch.int64"),
    Case("ema-shape", _on_run("eval", "RUN", "--n", "2", change=_ema_shape), "(EMA): tensor"),
    # resuming what cannot be resumed
    Case("resume-batch-size", _resume("train.batch_size=4", "train.steps=4"),
         "drawn with batch_size 2, this run has 4"),
    Case("resume-optimizer", _resume("train.optimizer=adamw", "train.steps=4"),
         "was trained with train.optimizer adam_atan2, this run asks for adamw"),
    Case("resume-past-steps", _resume("train.steps=1"), "is at step 2, past train.steps 1"),
    Case("resume-trainer-without-data", _resume("train.steps=4", change=_trainer_state(lambda s: s.pop("data"))),
         "trainer.pt"),
    Case("resume-empty-optimizer", _resume("train.steps=4", change=_empty_file("optimizer.pt")), "optimizer.pt"),
    Case("resume-linked-lock", _linked_lock, "is a symbolic link"),
    Case("consolidate-empty-shards", _on_run("consolidate", "RUN", change=lambda c: (c / "shards").mkdir()),
         "holds no model shards"),
    # inputs that are small on disk and huge in memory
    Case("set-alias-bomb", _spec_text(SPEC, "validate", "SPEC", "--set", "model.vocab=" + BOMB.replace("\n", "\n")),
         "--set"),
    Case("set-self-alias", _spec_text(SPEC, "validate", "SPEC", "--set", "train.lr=&a [*a]"), "--set"),
    Case("jsonl-3gb-line", _huge_line, "huge.jsonl:1"),
    Case("jsonl-lone-surrogate", _surrogate_line, "train.jsonl:4"),
    Case("metrics-2gb-line", _huge_metrics, "metrics.jsonl:1: a line of more than"),
    Case("all-config-bomb", _all_config(BOMB), "all_config.yaml"),
    Case("config-json-deep", _hf_dir("[" * 200_000 + "]" * 200_000), "config.json"),
    Case("config-json-huge-value", _hf_dir(json.dumps({"model_type": "x" * 5_000_000})), "config.json"),
    Case("compare-budget-steps", lambda f, t: ["compare", "hrm-text-tiny", "--budget", "steps=1e20",
                                               "--out", str(f / "cmp")], "steps"),
    Case("compare-budget-flops", lambda f, t: ["compare", "hrm-text-tiny", "--budget", "flops=1e30",
                                               "--out", str(f / "cmp")], "optimizer steps"),
    Case("cost-mfu-tiny", lambda f, t: ["cost", "hrm-text-tiny", "--tokens", "1B", "--mfu", "1e-320", "--json"],
         "--mfu"),
    Case("show-progress-nan", lambda f, t: ["show", "hrm-text-tiny", "--progress", "nan"], "--progress"),
    Case("expression-overflow", _spec_text("extends: hrm-text-tiny\nmodel:\n  block:\n    norm: {type: expr, "
                                           "expr: \"x * 10**10**10\", place: pre}\n", "validate", "SPEC"),
         "is not a finite number"),
    Case("extends-not-a-spec", _spec_text("extends: /etc/passwd\n", "validate", "SPEC"), "/etc/passwd"),
    Case("credit-warmup-out-of-range", _spec_text("extends: hrm-text-tiny\nmodel:\n  credit:\n    depth: {from: 2, "
                                                  "to: 4, warmup: 7.5}\n", "validate", "SPEC"),
         "warmup: expected a number in [0, 1]"),
    # outputs that would destroy data or leave the folder
    Case("out-root", lambda f, t: ["train", _spec(f), "--out", "/", "--no-progress"], "--out /"),
    Case("export-onto-its-checkpoint", _onto_checkpoint("export-hf"), "--out"),
    Case("import-onto-a-checkpoint", _onto_checkpoint("import-hf"), "--out"),
    Case("plot-out-not-an-image", _on_run("plot", "RUN", "--out", "RUN/metrics.jsonl"), "--out"),
    Case("emit-onto-a-file", lambda f, t: ["compile", "trm-tiny", "--emit", str(_spec(f))], "is a file"),
    # code planted on disk, and caches in odd places
    Case("check-json-py-in-cwd", _planted_json, "", exit=None),
    Case("cache-under-a-file", _on_run("eval", "RUN", "--n", "1", "--backend", "triton", "--device", "cpu"),
         "HRMSPEC_CACHE", env={"HRMSPEC_CACHE": "/etc/passwd/kernels"}),
    Case("check-draws-negative", lambda f, t: ["check", "trm-tiny", "--draws", "-5"], "--draws", argparse=True),
]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_one_line_and_exit_2(case: Case, trained: Path, tmp_path: Path):
    folder, outside = tmp_path / "case", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (outside / "precious.txt").write_text("the user's own file\n")
    before = _digest(outside)
    args = case.setup(folder, trained)
    env = {**{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
           "HRMSPEC_MARKER_DIR": str(outside), **case.env}
    # as the `hrmspec` script runs: -P keeps the working directory off sys.path (`python -m` puts it first)
    python = [sys.executable, "-P"] if sys.version_info >= (3, 11) else [sys.executable, "-I"]
    r = subprocess.run([*python, "-m", "hrmspec", *args], cwd=folder, env=env, capture_output=True,
                       timeout=TIME_LIMIT, preexec_fn=_limits, errors="replace", text=True)
    err = r.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert _digest(outside) == before, "a file outside the case's folder changed (or planted code ran)"
    if case.exit is None:
        return
    assert r.returncode == case.exit, f"exit {r.returncode}\n{err[-3000:]}"
    assert case.expect in err, err[-2000:]
    if case.argparse:  # argparse's usage text, then its one error line, last
        assert lines[0].startswith("usage:") and ": error: " in lines[-1] and case.expect in lines[-1], err
    else:  # the message and at most a hint line
        assert 1 <= len(lines) <= 2 and lines[0].startswith("hrmspec: error: "), err[-2000:]
