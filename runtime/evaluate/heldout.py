"""Evaluation: greedy decoding of held-out samples, scored by each task's own answer checker.

For reasoning-gym tasks the score is the dataset's `score_answer(answer, entry)`; for JSONL data it
is an exact match of the response. A sample counts as correct when its score is 1.

Beside the accuracy, the held-out loss: the task-completion loss of the same samples' response tokens,
teacher-forced (one forward over the prompt and the response, as training computes it), the mean per
token, and its perplexity exp(loss); for grids the mean cross-entropy per cell of the final logits. It
moves long before an answer comes out exactly right, so small runs still rank. A few samples (prompt,
expected, got) come with each result.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

import hrmspec
from hrmspec.errors import CheckpointError, HrmspecError
from hrmspec.runtime.artifacts import checkpoint as ckpt
from hrmspec.runtime.artifacts.config import TrainConfig
from hrmspec.runtime.artifacts.data import DataConfig, DataError, encode_samples, format_sample, load_split
from hrmspec.runtime.artifacts.files import write_text_atomic, writing
from hrmspec.runtime.artifacts.grids import GridConfig, load_grids, render
from hrmspec.runtime.artifacts.grids import solved as grid_solved
from hrmspec.runtime.artifacts.packing import pack
from hrmspec.runtime.artifacts.placement import resolve, to_device
from hrmspec.runtime.artifacts.puzzle_data import SOURCE as PUZZLES
from hrmspec.runtime.artifacts.puzzle_data import PuzzleSource, is_puzzle_source
from hrmspec.runtime.artifacts.tokenizer import Tokenizer
from hrmspec.runtime.evaluate.adaptive_eval import checked, compare_depths
from hrmspec.runtime.evaluate.puzzles import evaluate_puzzles
from hrmspec.runtime.evaluate.weights import ema_weights
from hrmspec.runtime.execution.adaptive import parse_exit
from hrmspec.runtime.execution.depth import DecodeStats, DepthPolicy
from hrmspec.runtime.execution.generate import compile_refusal
from hrmspec.runtime.execution.losses import IGNORE_INDEX, token_losses
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


EXAMPLES = 3  # sample predictions (prompt, expected, got) an evaluation reports
EXAMPLE_CHARS = 200  # each of their texts cut to this many characters
LOSS_TOKENS = 8192  # token positions of one forward of the held-out loss (rows x row length)
LOSS_LOGITS = 1 << 25  # under stablemax, the logits of one such forward (positions x vocab)


def evaluate_model(model, tokenizer, dcfg, n: int = 200, ema=None, max_new_tokens: int = 32, root=None,
                   depth: DepthPolicy | None = None, stats: DecodeStats | None = None, loss: bool = True,
                   examples: int = EXAMPLES) -> dict:
    """{"tasks": {name: {"accuracy", "n"}}, "accuracy": overall, "n": total, "requested": n, "limited_by": why
    fewer than n ran (None when n ran), "loss" and "perplexity" (`held_out_loss`; None when not `loss`),
    "samples": the first `examples` (prompt, expected, got)}; with model.halting also "steps" (mean steps
    per position decoded), "max_steps" and "saved" (the fraction of steps halting spared).
    `depth`: how deep each position runs (`DepthPolicy`: all_steps, threshold, an exit criterion, compiled
    decoding); `stats` receives generate's counts and the decoding time."""

    split = _eval_split(dcfg, root)
    samples = split.samples[:n]
    limit = {"requested": n, "limited_by": _text_limit(dcfg, len(split.samples)) if len(samples) < n else None}
    if not samples:
        return {"tasks": {}, "accuracy": 0.0, "n": 0, **limit, "loss": None, "perplexity": None, "samples": []}
    prompts = [tokenizer.encode(format_sample(s)[0]) for s in samples]
    was_training = model.training
    model.eval()
    stats = DecodeStats() if stats is None else stats
    with ema_weights(model, ema):
        answers = decode_answers(model, tokenizer, prompts, max_new_tokens, depth=depth, stats=stats)
        scored = held_out_loss(model, tokenizer, samples, depth) if loss else {"loss": None, "perplexity": None}
    model.train(was_training)
    correct: dict[str, list[float]] = defaultdict(list)
    for s, a in zip(samples, answers):
        correct[s.task or "data"].append(float(split.score(s, a) >= 1.0))
    tasks = {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(correct.items())}
    total = sum(len(v) for v in correct.values())
    res = {"tasks": tasks, "accuracy": sum(sum(v) for v in correct.values()) / total, "n": total, **limit, **scored,
           "samples": [_example(s.instruction, s.response, a) for s, a in zip(samples[:examples], answers)]}
    if stats.positions:  # halting per step: what it spared
        mean = stats.mean_steps
        res.update(steps=mean, max_steps=stats.max_steps, saved=1.0 - mean / stats.max_steps)
    return res


@torch.no_grad()
def held_out_loss(model, tokenizer, samples, depth: DepthPolicy | None = None) -> dict:
    """{"loss", "perplexity", "loss_tokens"}: the task-completion loss of `samples`' response tokens, teacher-forced,
    the mean per token (the objective's softmax or stablemax cross-entropy of the head's logits, as a training
    step takes it), and exp(loss). The samples are packed as training packs them, into rows of
    model.max_seq_len (each sample attends to itself only), a sample longer than a row cut at its end. The
    forward runs as `depth` says (a halting spec's all_steps and threshold; under an exit criterion the loop
    at its cap: full depth). None for both when no response token fits, or the loss is not finite."""
    depth = depth or DepthPolicy()
    width = model.spec.model.max_seq_len
    rows, _ = pack(encode_samples(samples, tokenizer), width, "task_completion", pad_id=tokenizer.pad_id)
    options = {"all_steps": depth.all_steps, "threshold": depth.threshold, "init_scale": depth.init_scale}
    if depth.exit is not None:  # full depth: every position runs the cap
        options["num_steps"] = depth.max_steps
    device = model.embed.weight.device
    total, count = 0.0, 0
    tokens = LOSS_TOKENS  # stablemax's loss is taken from the full logits, in fp64: fewer rows at a time
    if model.spec.objective.loss == "stablemax":
        tokens = min(tokens, LOSS_LOGITS // model.spec.model.vocab)
    per = max(1, tokens // width)
    for start in range(0, len(rows), per):
        batch = to_device(rows.batch(range(start, min(start + per, len(rows)))), device)
        labels = batch.pop("labels")
        out = model(**batch, return_logits=False, **options)
        head = model.head_output(out.hidden, labels, return_logits=False)
        total, count = total + float(head.loss_sum), count + int(head.n_tokens)
    return _loss_entry(total, count)


def _loss_entry(total: float, count: int, perplexity: bool = True) -> dict:
    """{"loss": total / count, "loss_tokens": count, "perplexity": exp of it}; None for what is not a finite
    number."""
    mean = total / count if count else None
    if mean is not None and not math.isfinite(mean):
        mean = None
    entry = {"loss": mean, "loss_tokens": count}
    if perplexity:
        entry["perplexity"] = math.exp(mean) if mean is not None and mean < 700 else None
    return entry


def _example(prompt: str, expected: str, got: str) -> dict:
    return {k: v if len(v) <= EXAMPLE_CHARS else v[:EXAMPLE_CHARS - 3] + "..."
            for k, v in (("prompt", prompt), ("expected", expected), ("got", got))}


def sample_lines(res: dict, width: int = 60) -> list[str]:
    """A result's sample predictions, one line each: prompt, expected and got, each cut to `width` characters
    (a grid drawn row / row)."""

    def short(text: str) -> str:
        text = " / ".join(line.strip() for line in text.splitlines()) or "''"
        text = "".join(c if c.isprintable() else "?" for c in text)
        return text if len(text) <= width else text[:width - 3] + "..."

    return [f"  prompt: {short(s['prompt'])} | expected: {short(s['expected'])} | got: {short(s['got'])}"
            for s in res.get("samples") or []]


def _text_limit(dcfg, available: int) -> str:
    """Why a text held-out set holds only `available` samples."""
    if dcfg.source == "jsonl":
        if dcfg.eval_path is None:
            return "no data.eval_path: there is no held-out set"
        return f"data.eval_path holds {available} samples"
    if dcfg.eval_size == available:
        return f"data.eval_size is {dcfg.eval_size}"
    return f"data.eval_size is {dcfg.eval_size}; {available} remain after dropping the training questions"


_GRIDS: dict = {}


@torch.no_grad()
def evaluate_grids(model, gcfg: GridConfig, n: int = 200, ema=None, all_segments: bool = False,
                   batch_size: int = 64, examples: int = EXAMPLES) -> dict:
    """Solved held-out puzzles (the predicted grid is a solution: `grids.solved`), with the segments each
    used: {"tasks": {name: {"accuracy", "n"}}, "accuracy", "n", "requested", "limited_by" (as
    `evaluate_model`), "loss": the mean cross-entropy per cell of the final logits (the objective's softmax
    or stablemax), "segments": mean segments run, "max_segments", "saved": the fraction of segments
    halting spared, "samples": the first `examples` puzzles (prompt, expected and got drawn as grids)}. Rows
    halt when their head says so unless `all_segments`."""
    rows = held_out_set(gcfg)
    count = min(n, len(rows))
    limit = {"requested": n, "limited_by": _grid_limit(gcfg, len(rows)) if count < n else None}
    if not count:
        return {"tasks": {}, "accuracy": 0.0, "n": 0, **limit, "loss": None, "samples": []}
    sup = Supervisor(model)
    was_training = model.training
    model.eval()
    solved, used, shown = [], [], []
    total, cells = 0.0, 0
    device = model.embed.weight.device
    with ema_weights(model, ema):
        for start in range(0, count, batch_size):
            batch = to_device(rows.batch(torch.arange(start, min(start + batch_size, count))), device)
            logits, steps = sup.solve(batch, all_segments=all_segments)
            names = rows.tasks[start:start + len(steps)]
            solved += grid_solved(names, batch["input_ids"], logits, rows.side)
            used += steps.tolist()
            labels = batch["labels"]
            total += float(token_losses(logits, labels, sup.loss_kind).sum())
            cells += int((labels != IGNORE_INDEX).sum())
            for i in range(min(examples - len(shown), len(names))):
                drawn = (render(t.tolist(), rows.side, names[i])
                         for t in (batch["input_ids"][i], labels[i], logits[i].argmax(-1)))
                shown.append(dict(zip(("prompt", "expected", "got"), drawn)))
    model.train(was_training)
    per_task: dict[str, list[float]] = defaultdict(list)
    for name, ok in zip(rows.tasks[:count], solved):
        per_task[name].append(float(ok))
    segments = sup.spec.segments
    return {"tasks": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(per_task.items())},
            "accuracy": sum(solved) / count, "n": count, **limit, **_loss_entry(total, cells, perplexity=False),
            "segments": sum(used) / count, "max_segments": segments, "saved": 1.0 - sum(used) / (count * segments),
            "samples": shown}


def _grid_limit(gcfg: GridConfig, available: int) -> str:
    """Why the held-out puzzles number only `available`."""
    asked = gcfg.eval_size * len(gcfg.tasks())
    if available == asked:
        return f"data.eval_size is {gcfg.eval_size}" + (f" per task ({asked} puzzles)" if asked != gcfg.eval_size
                                                         else "")
    return f"data.eval_size is {gcfg.eval_size}; {available} remain after dropping the puzzles among the training grids"


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


DEFAULT_N = 200  # held-out samples `eval` scores (a dataset folder: every test example)


def evaluate_run(run_dir: str | Path, n: int | None = 200, tasks: list[str] | None = None, use_ema: bool = True,
                 all_segments: bool = False, backend: str = "auto", device: str = "auto",
                 depth: DepthPolicy | None = None, allow_nonfinite: bool = False,
                 data_dir: str | Path | None = None) -> dict:
    """Evaluate the newest checkpoint of a run; writes run_dir/eval-<label>.json (`eval_label`: one file per
    configuration) and run_dir/eval.json (the latest evaluation). `all_segments`: a spec with
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
    cap = depth.max_steps  # as given: a label names the cap only when one was asked for
    if depth.exit is not None:
        depth = checked(model, depth)  # a criterion or a spec it cannot run: refused before decoding
    label = eval_label(DepthPolicy.of(depth, max_steps=cap), all_segments, tasks)
    data = dict(spec.data)
    if data_dir is not None and spec.objective.type != "grid":
        raise CheckpointError(f"--data: a dataset folder of puzzles is for grid runs; {run_dir} trained "
                              f"{spec.objective.type}")
    if data_dir is not None:
        data = {"source": PUZZLES, "path": str(data_dir)}
    if spec.objective.type == "grid" and is_puzzle_source(data):  # an official dataset, officially scored
        try:
            res = evaluate_puzzles(model, PuzzleSource.from_dict(data), n=n, out=run_dir)
        except DataError as e:
            raise CheckpointError(str(e)) from None
        label = "dataset" if data_dir is None else f"data-{Path(data_dir).name}"
    elif spec.objective.type == "grid":
        n = DEFAULT_N if n is None else n
        if tasks:
            data["grids"] = tasks
        try:
            res = evaluate_grids(model, GridConfig.from_dict(data), n=n, all_segments=all_segments)
        except DataError as e:
            raise CheckpointError(str(e)) from None
    else:
        n = DEFAULT_N if n is None else n
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
    write_eval(run_dir, res, label)
    return res


def eval_label(depth: DepthPolicy, all_segments: bool = False, tasks: list[str] | None = None) -> str:
    """The name of an evaluation's configuration, for its file eval-<label>.json: `full` for the default (every
    task of the spec, the spec's own depth), else its options joined by '-': `tasks-A+B`, `exit-<criterion>`,
    `max-steps-N`, `warm-start`, `all-steps`, `threshold-<q>`, `all-segments` (e.g. `exit-kl-0.001-warm-start`)."""
    parts = [f"tasks-{'+'.join(tasks)}"] if tasks else []
    parts += [f"exit-{depth.exit}"] if depth.exit is not None else []
    parts += [f"max-steps-{depth.max_steps}"] if depth.max_steps is not None else []
    parts += ["warm-start"] if depth.warm_start else []
    parts += ["all-steps"] if depth.all_steps else []
    parts += [f"threshold-{depth.threshold:g}"] if depth.threshold is not None else []
    parts += ["all-segments"] if all_segments else []
    return re.sub(r"[^A-Za-z0-9.+_-]", "-", "-".join(parts) or "full")[:LABEL_CHARS]


LABEL_CHARS = 120  # an evaluation's label in a file name


def write_eval(run_dir: Path, res: dict, label: str = "full") -> list[Path]:
    """eval-<label>.json and eval.json (the latest evaluation, whatever its configuration), each through a temp
    file renamed over it: a link in its place is replaced, never followed. The paths written."""
    res["label"] = label
    paths = [run_dir / f"eval-{label}.json", run_dir / "eval.json"]
    for path in paths:
        with writing(path):
            write_text_atomic(path, json.dumps(res, indent=2))
    return paths
