"""Everything a run would refuse about a spec, found before anything runs: what `hrmspec validate` reports
beyond the model, and what `train` and `compare` check before they create or lock a folder.

The spec loader (hrmspec/spec/) checks `model:`, `objective:` and `supervision:`; the `train:` and
`data:` sections are read by the runtime (config.py, data.py, grids.py) when a run starts. Preflight runs
those same readers on the spec up front, one key at a time so that every bad key is reported, and adds
the checks across sections:

    train.seq_len        at most model.max_seq_len (a text run packs rows of train.seq_len tokens)
    train.tokenizer      a tokenizer.json that loads and fits model.vocab
    model.vocab          at least the bytes and special tokens a trained tokenizer needs
    data.path, eval_path files that exist (relative to the spec's folder)

Each problem is a SpecError at the file:line:col of the key (or the `--set` option that gave it), so a
refused `train` leaves no folder behind and names the place to fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hrmspec.errors import MAX_PROBLEMS, HrmspecError, SpecError, SpecProblems
from hrmspec.runtime.artifacts.config import TrainConfig
from hrmspec.runtime.artifacts.data import DataConfig, parse_tasks
from hrmspec.spec.schema import Spec
from hrmspec.spec.shipped import resolve_spec_path
from hrmspec.spec.source import Source, apply_overrides, read_source

_PREFIX = re.compile(r"((?:train|data)(?:\.[A-Za-z_][\w-]*)*):\s*")


def source_of(spec: str | Path, overrides: dict[str, Any] | None) -> Source:
    """The located document of a spec file (or shipped name) with its `--set` overrides, as the loader saw it."""
    return apply_overrides(read_source(resolve_spec_path(spec)), overrides)


def problems(spec: Spec, src: Source | None = None, run: bool = True) -> list[SpecError]:
    """Every problem a run of `spec` would meet in its train: and data: sections and across sections;
    `src` locates them (without it, each names its key only). `run=False` (validate): a spec without a
    data: section is a model to inspect (show, cost, compare --data), not refused for it."""
    found: list[SpecError] = []

    def add(e: HrmspecError, fallback: tuple[str, ...]) -> None:
        text = str(e)
        m = _PREFIX.match(text)
        path = tuple(m.group(1).split(".")) if m else fallback
        message = text[m.end():] if m else text
        loc = src.key_loc(path) if src is not None else None
        found.append(SpecError(message.split("\n")[0], loc, ".".join(path)))

    cfg = _train(spec, add)
    try:  # a logger whose package is missing: refused with the command that installs it
        if cfg is not None:
            cfg.check_loggers()
    except HrmspecError as e:
        add(e, ("train", "log"))
    if run or spec.raw.get("data"):
        _data(spec, add)
    if cfg is not None and spec.objective.type != "grid":
        _across(spec, cfg, add)
    return sorted(found, key=lambda e: (e.loc is None, str(e.loc.file) if e.loc else "",
                                        e.loc.line if e.loc else 0, e.loc.col if e.loc else 0))


def check(spec: Spec, src: Source | None = None, run: bool = True) -> None:
    """Raise every problem of `problems` at once."""
    found = problems(spec, src, run)
    if found:
        raise found[0] if len(found) == 1 else SpecProblems(found)


def _train(spec: Spec, add) -> TrainConfig | None:
    section = spec.train if spec.train is not None else {}
    if not isinstance(section, dict):
        add(SpecError(f"expected a mapping of training settings, found {type(section).__name__}"), ("train",))
        return None
    bad = False
    for key, value in section.items():  # one key at a time: every bad key is reported
        try:
            TrainConfig.from_dict({key: value})
        except HrmspecError as e:
            add(e, ("train", str(key)))
            bad = True
    if bad:
        return None
    try:
        return TrainConfig.from_dict(dict(section))
    except HrmspecError as e:
        add(e, ("train",))
        return None


def _data(spec: Spec, add) -> None:
    section = spec.data if spec.data is not None else {}
    if not isinstance(section, dict):
        add(SpecError(f"expected a mapping, found {type(section).__name__}"), ("data",))
        return
    if spec.objective.type == "grid" and section.get("source") == "hrm_dataset":
        from hrmspec.runtime.artifacts.puzzle_data import PuzzleSource  # numpy: it reads the folder's arrays

        try:
            source = PuzzleSource.from_dict(dict(section))
            root = Path(spec.source).parent
            if not Path(source.path).is_absolute():
                source.path = str(root / source.path)
            train = TrainConfig.from_dict(dict(spec.train or {}))
            source.training_split(spec.model, train.batch_size, train.seed)
        except HrmspecError as e:
            add(e, ("data", "path"))
        return
    if spec.objective.type == "grid":
        from hrmspec.runtime.artifacts.grids import GridConfig  # torch: a grid spec's data needs it

        try:
            GridConfig.from_dict(dict(section))
        except HrmspecError as e:
            add(e, ("data",))
        return
    try:
        cfg = DataConfig.from_dict(dict(section))
    except HrmspecError as e:
        add(e, ("data",))
        return
    if cfg.source == "reasoning_gym" and cfg.tasks is not None:
        try:
            parse_tasks(cfg.tasks)
        except HrmspecError as e:
            add(e, ("data", "tasks"))
    root = Path(spec.source).parent
    for key in ("path", "eval_path"):
        value = getattr(cfg, key)
        if cfg.source == "jsonl" and isinstance(value, str) and not (root / value).expanduser().is_file():
            add(SpecError(f"no such file: {root / value} (relative paths are read from the spec's folder)"),
                ("data", key))


def _across(spec: Spec, cfg: TrainConfig, add) -> None:
    model = spec.model
    if cfg.seq_len > model.max_seq_len:
        given = "train" in spec.raw and "seq_len" in (spec.raw.get("train") or {})
        add(SpecError(f"{cfg.seq_len}{'' if given else ' (the default)'} is longer than model.max_seq_len "
                      f"{model.max_seq_len}: lower train.seq_len, or raise model.max_seq_len"),
            ("train", "seq_len") if given else ("model", "max_seq_len"))
    if cfg.tokenizer:
        from hrmspec.runtime.artifacts.tokenizer import Tokenizer

        try:
            Tokenizer.load(Path(cfg.tokenizer).expanduser()).check_fits(model.vocab, "train.tokenizer")
        except HrmspecError as e:
            add(SpecError(str(e).removeprefix("train.tokenizer: ")), ("train", "tokenizer"))
    else:
        from hrmspec.runtime.artifacts.tokenizer import min_vocab_size

        need = min_vocab_size()
        if model.vocab < need:
            add(SpecError(f"{model.vocab} is below the {need} tokens a trained byte-level tokenizer needs "
                          "(256 bytes and the special tokens): raise model.vocab"), ("model", "vocab"))


__all__ = ["MAX_PROBLEMS", "SpecProblems", "check", "problems", "source_of"]
