"""Evaluation: greedy decoding of held-out samples, scored by each task's own answer checker.

For reasoning-gym tasks the score is the dataset's `score_answer(answer, entry)`; for JSONL data it
is an exact match of the response. A sample counts as correct when its score is 1.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

import hrmspec
from hrmspec.errors import CheckpointError, HrmspecError
from hrmspec.runtime.artifacts import checkpoint as ckpt
from hrmspec.runtime.artifacts.config import TrainConfig
from hrmspec.runtime.artifacts.data import DataConfig, DataError, format_sample, load_split
from hrmspec.runtime.artifacts.files import write_text_atomic, writing
from hrmspec.runtime.artifacts.grids import GridConfig, load_grids
from hrmspec.runtime.artifacts.grids import solved as grid_solved
from hrmspec.runtime.artifacts.placement import resolve, to_device
from hrmspec.runtime.artifacts.tokenizer import Tokenizer
from hrmspec.runtime.evaluate.adaptive_eval import checked, compare_depths
from hrmspec.runtime.execution.adaptive import parse_exit
from hrmspec.runtime.execution.depth import DecodeStats, DepthPolicy
from hrmspec.runtime.execution.generate import compile_refusal
from hrmspec.runtime.execution.supervision import Supervisor
from hrmspec.spec.load import load_spec

_SPLITS: dict = {}


def held_out_set(data_cfg, root=None):
    """The held-out set of a data config (text samples, or grids for a GridConfig), built once and kept
    for every later evaluation; the trainer builds it before the first step, so a config that
    allows too few distinct questions fails then, not after the run."""
    if isinstance(data_cfg, GridConfig):
        key = repr(data_cfg)
        if key not in _GRIDS:
            _GRIDS[key] = load_grids(data_cfg, "eval")
        return _GRIDS[key]
    return _eval_split(data_cfg, root)


def _eval_split(dcfg, root=None):

    key = repr(dcfg)
    if key not in _SPLITS:
        _SPLITS[key] = load_split(dcfg, "eval", root=root)
    return _SPLITS[key]


@contextmanager
def ema_weights(model: torch.nn.Module, ema):
    """Temporarily evaluate with the EMA weights."""
    if ema is None:
        yield model
        return
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.copy_to(model)
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])


# An exit criterion that reads logits (kl, entropy, argmax) makes the logits of every position of the rows
# still running at each step of a prompt's loop, and kl keeps the previous step's log-probabilities: about
# PEEK_COPIES fp32 tensors of rows x width x vocab. A batch holds at most PEEK_BYTES of them.
PEEK_BYTES = 1 << 30
PEEK_COPIES = 4


@torch.no_grad()
def decode_responses(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
                     batch_size: int = 64, depth: DepthPolicy | None = None,
                     stats: DecodeStats | None = None) -> list[list[int]]:
    """Greedy response tokens (up to eos, not included) to token-id prompts, decoded in batches of prompts of
    neighbouring lengths, left-padded to one length (generate's attention_mask), up to `batch_size` a batch
    (fewer under an exit criterion that reads logits at a large vocabulary, see PEEK_BYTES). `depth`: how deep
    each position runs (`DepthPolicy`); `stats` receives generate's counts and the time decoding took."""
    depth = depth or DepthPolicy()
    responses: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    peeks = depth.exit is not None and parse_exit(depth.exit).reads == "logits"
    start = 0
    while start < len(order):
        rows = min(batch_size, len(order) - start)
        if peeks:  # rows x width x vocab of logits per step: fewer rows when they would exceed PEEK_BYTES
            width = len(prompts[order[start + rows - 1]])
            rows = max(1, min(rows, PEEK_BYTES // (width * model.spec.model.vocab * PEEK_COPIES * 4)))
        chunk, start = order[start : start + rows], start + rows
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        real = torch.zeros(len(chunk), width, dtype=torch.bool)
        for row, i in enumerate(chunk):  # left-padded: every prompt ends at the last column
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            real[row, width - len(prompts[i]):] = True
        began = time.perf_counter()
        mask = None if bool(real.all()) else real
        out = model.generate(ids, max_new_tokens, eos_id=eos_id, attention_mask=mask, depth=depth, stats=stats)
        if stats is not None:  # decoding time alone, for tokens/s
            stats.seconds += time.perf_counter() - began
        for row, i in zip(out[:, width:].tolist(), chunk):
            responses[i] = row[: row.index(eos_id)] if eos_id in row else row
    return responses


def decode_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 64,
                   depth: DepthPolicy | None = None, stats: DecodeStats | None = None) -> list[str]:
    """`decode_responses` as text."""
    rows = decode_responses(model, prompts, max_new_tokens, tokenizer.eos_id, batch_size, depth, stats)
    return [tokenizer.decode(row, skip_special=True) for row in rows]


def evaluate_model(model, tokenizer, dcfg, n: int = 200, ema=None, max_new_tokens: int = 32, root=None,
                   depth: DepthPolicy | None = None, stats: DecodeStats | None = None) -> dict:
    """{"tasks": {name: {"accuracy", "n"}}, "accuracy": overall, "n": total}; with model.halting also "steps"
    (mean steps per position decoded), "max_steps" and "saved" (the fraction of steps halting spared).
    `depth`: how deep each position runs (`DepthPolicy`: all_steps, threshold, an exit criterion, compiled
    decoding); `stats` receives generate's counts and the decoding time."""

    split = _eval_split(dcfg, root)
    samples = split.samples[:n]
    if not samples:
        return {"tasks": {}, "accuracy": 0.0, "n": 0}
    prompts = [tokenizer.encode(format_sample(s)[0]) for s in samples]
    was_training = model.training
    model.eval()
    stats = DecodeStats() if stats is None else stats
    with ema_weights(model, ema):
        answers = decode_answers(model, tokenizer, prompts, max_new_tokens, depth=depth, stats=stats)
    model.train(was_training)
    correct: dict[str, list[float]] = defaultdict(list)
    for s, a in zip(samples, answers):
        correct[s.task or "data"].append(float(split.score(s, a) >= 1.0))
    tasks = {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(correct.items())}
    total = sum(len(v) for v in correct.values())
    res = {"tasks": tasks, "accuracy": sum(sum(v) for v in correct.values()) / total, "n": total}
    if stats.positions:  # halting per step: what it spared
        mean = stats.mean_steps
        res.update(steps=mean, max_steps=stats.max_steps, saved=1.0 - mean / stats.max_steps)
    return res


_GRIDS: dict = {}


@torch.no_grad()
def evaluate_grids(model, gcfg: GridConfig, n: int = 200, ema=None, all_segments: bool = False,
                   batch_size: int = 64) -> dict:
    """Solved held-out puzzles (the predicted grid is a solution: `grids.solved`), with the segments each
    used: {"tasks": {name:
    {"accuracy", "n"}}, "accuracy", "n", "segments": mean segments run, "max_segments", "saved":
    the fraction of segments halting spared}. Rows halt when their head says so unless `all_segments`."""
    rows = held_out_set(gcfg)
    count = min(n, len(rows))
    if not count:
        return {"tasks": {}, "accuracy": 0.0, "n": 0}
    sup = Supervisor(model)
    was_training = model.training
    model.eval()
    solved, used = [], []
    device = model.embed.weight.device
    with ema_weights(model, ema):
        for start in range(0, count, batch_size):
            batch = to_device(rows.batch(torch.arange(start, min(start + batch_size, count))), device)
            logits, steps = sup.solve(batch, all_segments=all_segments)
            solved += grid_solved(rows.tasks[start:start + len(steps)], batch["input_ids"], logits, rows.side)
            used += steps.tolist()
    model.train(was_training)
    per_task: dict[str, list[float]] = defaultdict(list)
    for name, ok in zip(rows.tasks[:count], solved):
        per_task[name].append(float(ok))
    segments = sup.spec.segments
    return {"tasks": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(per_task.items())},
            "accuracy": sum(solved) / count, "n": count, "segments": sum(used) / count, "max_segments": segments,
            "saved": 1.0 - sum(used) / (count * segments)}


def load_run(run_dir: str | Path, use_ema: bool = True, backend: str = "auto", device: str = "auto",
             allow_nonfinite: bool = False):
    """(model, tokenizer, spec, checkpoint path) of a run's newest checkpoint, EMA weights by default, on
    `device` with `backend` (placement.py; whatever device trained it: checkpoints hold CPU tensors). A run
    still training may prune the checkpoint while it is read: then the newest one is read (ckpt.read_latest).
    Weights are checked (ckpt.check_tensors: NaN or infinity refused unless `allow_nonfinite`), and the
    tokenizer against the model's vocabulary."""

    def read(last: Path):
        spec = load_spec(last / "spec.yaml")
        place = resolve(backend, device)
        model = hrmspec.compile(spec, backend=place.backend)
        ckpt.load_model_state(model, ckpt.model_tensors(last), last, allow_nonfinite)  # single-file or sharded
        ema = ckpt.model_tensors(last, "ema") if use_ema else None
        if ema is not None:
            params = dict(model.named_parameters())
            ckpt.check_tensors({k: p.detach() for k, p in params.items()}, ema, f"{last} (EMA)", allow_nonfinite)
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(ema[name])
        tokenizer = None if spec.objective.type == "grid" else Tokenizer.load(last)
        if tokenizer is not None:
            tokenizer.check_fits(spec.model.vocab, str(last / "tokenizer.json"))
        return model.to(place.device).eval(), tokenizer, spec, last

    return ckpt.read_latest(run_dir, read, missing=f"no checkpoint in {run_dir}/checkpoints: train first "
                                                   f"(hrmspec train SPEC --out {run_dir})")


def evaluate_run(run_dir: str | Path, n: int = 200, tasks: list[str] | None = None, use_ema: bool = True,
                 all_segments: bool = False, backend: str = "auto", device: str = "auto",
                 depth: DepthPolicy | None = None, allow_nonfinite: bool = False) -> dict:
    """Evaluate the newest checkpoint of a run; writes run_dir/eval.json. `all_segments`: a spec with
    halting runs every segment instead of stopping where its head says. `backend` and `device`: see
    load_run. `depth` (`DepthPolicy`): a spec with model.halting at every step or another threshold; an exit
    criterion (adaptive depth), evaluated against full depth (runtime/evaluate/adaptive_eval.py); compiled
    decoding (runtime/execution/decode.py), for a spec with a fixed unrolling."""

    depth = depth or DepthPolicy()
    run_dir = Path(run_dir)
    model, tokenizer, spec, last = load_run(run_dir, use_ema, backend, device, allow_nonfinite)
    why = compile_refusal(model, depth.exit) if depth.compile else None
    if why:  # refused before anything is decoded
        raise HrmspecError(f"--compile: {why}")
    if depth.exit is not None:
        depth = checked(model, depth)  # a criterion or a spec it cannot run: refused before decoding
    data = dict(spec.data)
    if spec.objective.type == "grid":
        if tasks:
            data["grids"] = tasks
        try:
            res = evaluate_grids(model, GridConfig.from_dict(data), n=n, all_segments=all_segments)
        except DataError as e:
            raise CheckpointError(str(e)) from None
        res["checkpoint"] = str(last)
        _write_eval(run_dir, res)
        return res
    if tasks:
        data["tasks"] = tasks
    dcfg = DataConfig.from_dict(data)
    cfg = TrainConfig.from_dict(dict(spec.train))
    if depth.exit is not None:
        res = compare_depths(evaluate_model, model, tokenizer, dcfg, n, cfg.max_new_tokens, run_dir, depth)
    else:
        res = evaluate_model(model, tokenizer, dcfg, n=n, max_new_tokens=cfg.max_new_tokens, root=run_dir,
                             depth=depth)
    res["checkpoint"] = str(last)
    _write_eval(run_dir, res)
    return res


def _write_eval(run_dir: Path, res: dict) -> None:
    """eval.json, through a temp file renamed over it: a link in its place is replaced, never followed."""
    path = run_dir / "eval.json"
    with writing(path):
        write_text_atomic(path, json.dumps(res, indent=2))
