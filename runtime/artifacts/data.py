"""Instruction–response samples: where they come from and how they are laid out as text.

A sample is one instruction and its response, optionally with a *condition* (HRM-Text trains
with conditions such as ``direct`` or ``cot`` that tell the model which kind of answer to give).
Samples come from a JSONL file or from reasoning-gym's procedural tasks.

Chat format. ``format_sample`` renders a sample as two strings, the prompt (the prefix, which the
model sees bidirectionally and is not trained on) and the response (trained on)::

    prompt   = "<|im_start|>" + ["<|" + condition + "|>"] + instruction + "<|im_end|>"
    response = response + "<|box_end|>"

For example ``{"instruction": "Calculate 2 + 3.", "response": "5", "condition": "direct"}`` becomes
``<|im_start|><|direct|>Calculate 2 + 3.<|im_end|>`` and ``5<|box_end|>``. ``<|box_end|>`` ends a
response, so generation stops there. Every marker is a single special token of the tokenizer
(``hrmspec.runtime.artifacts.tokenizer``); text that happens to contain a marker's spelling is read as
that marker.

JSONL format: one object per line, ``{"instruction": str, "response": str, "condition": str|null}``
(``condition`` optional).
"""

from __future__ import annotations

import difflib
import json
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

from hrmspec import progress
from hrmspec.errors import HrmspecError
from hrmspec.spec.source import quoted

PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BOX_END = "<|box_end|>"  # end of a response: the eos token
DEFAULT_CONDITIONS = ("direct", "cot")

# Reasoning-gym datasets draw item i from Random(seed + i), so a training set of `size` items
# uses seeds [seed, seed + size). Evaluation starts this far away, which keeps the two ranges apart.
EVAL_SEED_OFFSET = 100_000_000

_CONDITION_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


class DataError(HrmspecError, ValueError):
    """A problem with training data or its configuration, worded for the person who wrote it."""


@dataclass
class Sample:
    instruction: str
    response: str
    condition: str | None = None  # rendered as the special token <|condition|> in the prompt
    task: str | None = None  # reasoning-gym task name, or None for samples from a file
    meta: dict[str, Any] = field(default_factory=dict)  # for answer checking; gym: {"entry": entry}


@dataclass
class DataStats:
    read: int = 0  # lines or generated entries looked at
    kept: int = 0  # samples returned
    bad: int = 0  # malformed lines skipped (skip_bad=True)
    empty: int = 0  # samples dropped because the response was empty
    excluded: int = 0  # eval entries dropped because the same question is in the training set

    def __add__(self, other: DataStats) -> DataStats:
        return DataStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def _close(name: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(m) for m in match)}?)" if match else ""


def config_from_dict(cls: type, d: Mapping[str, Any] | None, where: str, what: str = "") -> Any:
    """`cls(**d)` for a dataclass `cls`, an unknown key named with the nearest known ones."""
    d = dict(d or {})
    names = [f.name for f in fields(cls)]
    for key in d:
        if key not in names:
            raise DataError(f"{where}: unknown key {key!r}{_close(key, names)}{what}; known keys: {', '.join(names)}")
    return cls(**d)


def condition_token(condition: str) -> str:
    """The special token a condition is rendered as: 'direct' -> '<|direct|>'."""
    if not _CONDITION_RE.match(condition):
        raise DataError(f"condition {quoted(condition)} must be letters, digits, '_' or '-' (e.g. 'direct', 'cot')")
    return f"<|{condition}|>"


def format_sample(sample: Sample) -> tuple[str, str]:
    """(prompt_text, response_text) in the chat format of the module docstring."""
    cond = condition_token(sample.condition) if sample.condition else ""
    return f"{IM_START}{cond}{sample.instruction}{IM_END}", f"{sample.response}{BOX_END}"


def encode_samples(samples: Sequence[Sample], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) per sample, ready for ``packing.pack``.

    The two halves are encoded separately so the prompt/response boundary is exact even when
    BPE would otherwise merge across it.
    """
    out = []
    for s in samples:
        prompt, response = format_sample(s)
        out.append((tokenizer.encode(prompt), tokenizer.encode(response)))
    return out


# ---------------------------------------------------------------------------------------------
# JSONL


MAX_LINE_BYTES = 1 << 20  # one JSONL sample


def _parse_line(raw: bytes) -> Sample:
    """One JSONL line -> Sample; raises DataError with the problem and the fix (no location)."""
    if len(raw) > MAX_LINE_BYTES:
        raise DataError(f"the line is {len(raw):,} bytes; a sample is at most {MAX_LINE_BYTES:,}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.object[e.start]:#04x} at column {e.start + 1})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg} at column {e.colno}); "
                        "each line must be one JSON object") from None
    except RecursionError:
        raise DataError("JSON nested too deeply; a line is one flat object") from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}; "
                        'write {"instruction": ..., "response": ...}')
    allowed = ("instruction", "response", "condition")
    for key in obj:
        if key not in allowed:
            raise DataError(f"unknown key {quoted(key)}{_close(key[:100], allowed)}; allowed keys: "
                            f"{', '.join(allowed)}")
    for key in ("instruction", "response"):
        if key not in obj:
            raise DataError(f"missing key {key!r}; every line needs 'instruction' and 'response'")
        if not isinstance(obj[key], str):
            raise DataError(f"{key!r} must be a string, got {type(obj[key]).__name__}")
    cond = obj.get("condition")
    if cond is not None:
        if not isinstance(cond, str):
            raise DataError(f"'condition' must be a string or null, got {type(cond).__name__}")
        condition_token(cond)
    for key in allowed:
        _check_unicode(key, obj.get(key))
    return Sample(obj["instruction"], obj["response"], condition=cond or None)


def _check_unicode(key: str, text: str | None) -> None:
    """JSON may escape half of a UTF-16 pair ("\\ud800"): no text a tokenizer can encode."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{key!r} holds an unpaired surrogate ({text[e.start]!r} at character {e.start + 1}); "
                        "JSON text must be whole Unicode characters") from None


def bounded_lines(f: BinaryIO, limit: int = MAX_LINE_BYTES) -> Iterator[bytes | None]:
    """The lines of a binary file, each read with at most `limit` + 1 bytes in memory: a longer line
    comes as None, and its rest is skipped in bounded chunks (never kept) if the caller reads on."""
    while raw := f.readline(limit + 1):
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw
            continue
        yield None
        while chunk := f.readline(limit):
            if chunk.endswith(b"\n"):
                break


def read_jsonl(path: str | Path, skip_bad: bool = False,
               condition: str | None = None) -> tuple[list[Sample], DataStats]:
    """Read instruction–response samples from a JSONL file.

    A malformed line raises DataError naming ``file:line`` (or, with ``skip_bad``, is counted in
    ``stats.bad`` and skipped). Samples with an empty response teach nothing under the
    task-completion loss, so they are dropped and counted in ``stats.empty``. ``condition`` is
    the default for lines that do not give their own. Blank lines are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; check data.path / data.eval_path in the spec")
    samples: list[Sample] = []
    stats = DataStats()
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is that line's error, not the file's
        for lineno, raw in enumerate(bounded_lines(f), start=1):
            if raw is not None and not raw.strip():
                continue
            stats.read += 1
            try:
                if raw is None:
                    raise DataError(f"the line is longer than {MAX_LINE_BYTES:,} bytes; a sample is at most "
                                    f"{MAX_LINE_BYTES:,} (the rest of the line was not read)")
                s = _parse_line(raw)
            except DataError as e:
                if skip_bad:
                    stats.bad += 1
                    continue
                raise DataError(f"{path}:{lineno}: {e} "
                                "(or set data.skip_bad: true to skip bad lines)") from None
            if not s.response:
                stats.empty += 1
                continue
            if s.condition is None:
                s.condition = condition
            samples.append(s)
    stats.kept = len(samples)
    return samples, stats


def write_jsonl(path: str | Path, samples: Iterable[Sample]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for s in samples:
            obj = {"instruction": s.instruction, "response": s.response}
            if s.condition:
                obj["condition"] = s.condition
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# reasoning-gym


@dataclass
class GymTask:
    name: str
    weight: float = 1.0  # share of the samples, relative to the other tasks
    config: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the task's config


def _gym_registry() -> dict[str, Any]:
    from reasoning_gym.factory import DATASETS
    return DATASETS


def parse_tasks(tasks: Sequence[str] | Mapping[str, Any], where: str = "data.tasks") -> list[GymTask]:
    """A list of names, or a mapping name -> {weight, config}, as GymTasks; names are checked."""
    registry = _gym_registry()
    out: list[GymTask] = []
    if isinstance(tasks, str):
        tasks = [tasks]
    if isinstance(tasks, Mapping):
        items = list(tasks.items())
    elif isinstance(tasks, Sequence):
        items = [(t, None) for t in tasks]
    else:
        raise DataError(f"{where}: expected a list of task names or a mapping name -> {{weight, config}}")
    if not items:
        raise DataError(f"{where}: no tasks given")
    for name, opts in items:
        if not isinstance(name, str):
            raise DataError(f"{where}: task names must be strings, got {name!r}")
        if name not in registry:
            raise DataError(f"{where}: unknown reasoning-gym task {name!r}{_close(name, registry)}")
        opts = {} if opts is None else opts
        if not isinstance(opts, Mapping):
            raise DataError(f"{where}.{name}: expected {{weight: float, config: {{...}}}}, got {opts!r}")
        for key in opts:
            if key not in ("weight", "config"):
                raise DataError(f"{where}.{name}: unknown key {key!r}{_close(key, ['weight', 'config'])}")
        weight = opts.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            raise DataError(f"{where}.{name}.weight: expected a positive number, got {weight!r}")
        config = opts.get("config")
        if config is not None and not isinstance(config, Mapping):
            raise DataError(f"{where}.{name}.config: expected a mapping of the task's options, got "
                            f"{quoted(config)}")
        config = dict(config or {})
        _check_task_config(name, config, f"{where}.{name}.config")
        out.append(GymTask(name, float(weight), config))
    return out


def _check_task_config(name: str, config: dict[str, Any], where: str) -> None:
    for key in ("size", "seed"):
        if key in config:
            raise DataError(f"{where}.{key}: set data.{key} instead; it is shared by all tasks")
    config_cls = _gym_registry()[name][1]
    known = [f.name for f in fields(config_cls)] if hasattr(config_cls, "__dataclass_fields__") else None
    for key in config:
        if known is not None and key not in known:
            raise DataError(f"{where}: {name} has no option {key!r}{_close(key, known)}; "
                            f"options: {', '.join(k for k in known if k not in ('size', 'seed'))}")


def _split_counts(tasks: Sequence[GymTask], size: int) -> list[int]:
    """Samples per task in proportion to the weights; largest remainders get the leftovers."""
    total = sum(t.weight for t in tasks)
    exact = [size * t.weight / total for t in tasks]
    counts = [int(x) for x in exact]
    order = sorted(range(len(tasks)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: size - sum(counts)]:
        counts[i] += 1
    return counts


def _make_dataset(task: GymTask, size: int, seed: int) -> Any:
    import reasoning_gym
    try:
        return reasoning_gym.create_dataset(task.name, size=size, seed=seed, **task.config)
    except (AssertionError, TypeError, ValueError) as e:
        raise DataError(f"reasoning-gym task {task.name!r} rejected config {task.config}: {e}") from None


def reasoning_gym_samples(
    tasks: Sequence[str] | Mapping[str, Any] | Sequence[GymTask],
    size: int,
    seed: int = 0,
    split: str = "train",
    condition: str | None = None,
    exclude: Mapping[str, set[str]] | None = None,
) -> tuple[list[Sample], dict[str, Any], DataStats]:
    """Generate ``size`` samples from reasoning-gym tasks, mixed by weight.

    ``split="train"`` uses seeds from ``seed``, ``split="eval"`` from ``seed + EVAL_SEED_OFFSET``,
    so the two never share a generator seed. Small task spaces still repeat questions across
    seeds; ``exclude`` (task -> questions, e.g. the training questions) drops those too.

    Returns (samples, datasets, stats): samples are shuffled with ``seed`` so packed rows mix
    tasks, and ``datasets[task]`` is the reasoning-gym object whose ``score_answer(answer,
    sample.meta["entry"])`` grades a generated answer (see ``score_answer``).
    """
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")
    if not isinstance(size, int) or size < 0:
        raise DataError(f"data.size: expected a non-negative integer, got {size!r}")
    if size >= EVAL_SEED_OFFSET:
        raise DataError(f"data.size: at most {EVAL_SEED_OFFSET - 1} samples per split, got {size}")
    if condition is not None:
        condition_token(condition)
    parsed = list(tasks) if tasks and all(isinstance(t, GymTask) for t in tasks) else parse_tasks(tasks)
    base = seed if split == "train" else seed + EVAL_SEED_OFFSET
    samples: list[Sample] = []
    datasets: dict[str, Any] = {}
    stats = DataStats()
    for task, count in zip(parsed, _split_counts(parsed, size), strict=True):
        skip = (exclude or {}).get(task.name, set())
        # Excluded questions leave gaps; draw from a larger range until the quota is met.
        attempt = max(count, 1)
        while True:
            with progress.step(f"generating {attempt:,} {split} samples of {task.name}"):
                ds = _make_dataset(task, attempt, base)
            got, read, dropped, empty = [], 0, 0, 0
            for i in range(len(ds)):
                if len(got) == count:
                    break
                entry = ds[i]
                read += 1
                question, answer = entry["question"], str(entry["answer"])
                if question in skip:
                    dropped += 1
                elif not answer:
                    empty += 1
                else:
                    got.append(Sample(question, answer, condition, task.name, {"entry": entry}))
            if len(got) == count:
                break
            if attempt >= 64 * max(count, 1):
                raise DataError(f"reasoning-gym task {task.name!r}: found only {len(got)} of {count} usable "
                                f"{split} questions; its config allows too few distinct questions")
            attempt *= 4
        datasets[task.name] = ds
        samples += got
        stats += DataStats(read=read, kept=len(got), excluded=dropped, empty=empty)
    random.Random(seed).shuffle(samples)
    return samples, datasets, stats


def score_answer(sample: Sample, answer: str, datasets: Mapping[str, Any] | None = None) -> float:
    """Reward in [0, 1] for a generated answer: the task's own grader, else exact match."""
    if sample.task is not None and datasets and sample.task in datasets and "entry" in sample.meta:
        return float(datasets[sample.task].score_answer(answer, sample.meta["entry"]))
    return float(answer.strip() == sample.response.strip())


# ---------------------------------------------------------------------------------------------
# The spec's data: section


@dataclass
class DataConfig:
    source: str = "reasoning_gym"  # reasoning_gym | jsonl
    tasks: Any = None  # reasoning_gym: list of names, or mapping name -> {weight, config}
    size: int = 10_000  # reasoning_gym: training samples
    eval_size: int = 500  # reasoning_gym: held-out samples
    seed: int = 0  # reasoning_gym: generator seed (eval uses seed + EVAL_SEED_OFFSET)
    dedupe_eval: bool = True  # reasoning_gym: drop eval questions that also occur in training
    condition: str | None = None  # default condition token for every sample, e.g. "direct"
    path: str | None = None  # jsonl: training file (relative to the spec's folder)
    eval_path: str | None = None  # jsonl: held-out file
    skip_bad: bool = False  # jsonl: skip and count malformed lines instead of failing

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, where: str = "data") -> DataConfig:
        cfg = config_from_dict(cls, d, where)
        cfg._check(where)
        return cfg

    def _check(self, where: str) -> None:
        def expect(name: str, ok: bool, what: str, hint: str = "") -> None:
            if not ok:
                raise DataError(f"{where}.{name}: expected {what}, got {getattr(self, name)!r}{hint}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        expect("source", self.source in ("reasoning_gym", "jsonl"), "'reasoning_gym' or 'jsonl'",
               _close(str(self.source), ["reasoning_gym", "jsonl"]))
        expect("size", is_int(self.size) and self.size > 0, "a positive integer")
        expect("eval_size", is_int(self.eval_size) and self.eval_size >= 0, "a non-negative integer")
        expect("seed", is_int(self.seed) and self.seed >= 0, "a non-negative integer")
        expect("dedupe_eval", isinstance(self.dedupe_eval, bool), "true or false")
        expect("skip_bad", isinstance(self.skip_bad, bool), "true or false")
        expect("condition", self.condition is None or isinstance(self.condition, str), "a string")
        if self.condition is not None:
            try:
                condition_token(self.condition)
            except DataError as e:
                raise DataError(f"{where}.condition: {e}") from None
        for name in ("path", "eval_path"):
            expect(name, getattr(self, name) is None or isinstance(getattr(self, name), str), "a file path")
        if self.source == "reasoning_gym":
            if self.tasks is None:
                raise DataError(f"{where}.tasks: reasoning_gym needs tasks, e.g. tasks: [basic_arithmetic]")
            parse_tasks(self.tasks, f"{where}.tasks")
        elif self.path is None:
            raise DataError(f"{where}.path: source jsonl needs a path, e.g. path: data/train.jsonl")


@dataclass
class SplitData:
    samples: list[Sample]
    stats: DataStats
    datasets: dict[str, Any] = field(default_factory=dict)  # reasoning-gym task -> dataset (graders)

    def score(self, sample: Sample, answer: str) -> float:
        return score_answer(sample, answer, self.datasets)


def load_split(cfg: DataConfig, split: str = "train", root: str | Path | None = None) -> SplitData:
    """The train or eval samples a DataConfig describes; relative paths resolve against ``root``."""
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")
    if cfg.source == "jsonl":
        rel = cfg.path if split == "train" else cfg.eval_path
        if rel is None:
            return SplitData([], DataStats())
        path = Path(rel) if root is None or Path(rel).is_absolute() else Path(root) / rel
        samples, stats = read_jsonl(path, skip_bad=cfg.skip_bad, condition=cfg.condition)
        return SplitData(samples, stats)
    tasks = parse_tasks(cfg.tasks)
    if split == "train":
        samples, datasets, stats = reasoning_gym_samples(tasks, cfg.size, cfg.seed, "train", cfg.condition)
        return SplitData(samples, stats, datasets)
    exclude = None
    if cfg.dedupe_eval:
        train, _, _ = reasoning_gym_samples(tasks, cfg.size, cfg.seed, "train")
        exclude = {}
        for s in train:
            exclude.setdefault(s.task, set()).add(s.instruction)
    samples, datasets, stats = reasoning_gym_samples(tasks, cfg.eval_size, cfg.seed, "eval",
                                                     cfg.condition, exclude)
    return SplitData(samples, stats, datasets)
