"""Where a run's metrics go: `train.log: [jsonl, tensorboard, wandb]`.

    jsonl        RUN/metrics.jsonl, one JSON object per line: a train record as it is
                 ({"step", "loss", ...}), any other as {"step": N, "<prefix>": record}
                 ({"step": N, "eval": {...}}); read by `hrmspec plot` and cut back on --resume
    tensorboard  event files in RUN/tensorboard (torch's SummaryWriter): every number of a record
                 as a scalar `<prefix>/<key>` (nested mappings as `<prefix>/<key>/<inner>`); a run
                 resumed from step N purges the events logged after N
    wandb        a Weights & Biases run: project train.wandb_project (else $WANDB_PROJECT, else
                 "hrmspec"), named after the run folder, its files in RUN/wandb, the spec as its
                 config; its id is kept in RUN/wandb-id.txt, so --resume continues the same W&B run
                 and a new run (--overwrite) starts another. WANDB_MODE=offline logs without a network

Without train.log a run logs to jsonl, and to tensorboard when it is installed. Only rank 0 logs.
tensorboard and wandb are optional dependencies (`pip install 'hrmspec[tensorboard]'`,
`'hrmspec[wandb]'`), imported when a run opens its loggers; a requested one that is not installed is
refused before the run folder is made (preflight.py: `TrainConfig.check_loggers`).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from hrmspec.runtime.artifacts.config import LOGGERS, TrainConfig, TrainError, config_dict, install_hint, missing_logger
from hrmspec.runtime.artifacts.files import (
    open_append_nofollow,
    reason,
    refuse_link,
    write_text_atomic,
    writing,
)

WANDB_ID = "wandb-id.txt"  # the run's W&B id, kept for --resume
_WANDB_ID_TEXT = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_PROJECT = "hrmspec"


class Logger(Protocol):
    """One place a run's records go. `prefix` names the kind of record: "train" (a logged step), "eval"."""

    def log(self, record: dict, step: int, prefix: str) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """RUN/metrics.jsonl, appended to and flushed line by line, never through a link (files.py)."""

    def __init__(self, out: Path):
        self.path = Path(out) / "metrics.jsonl"
        self.file = open_append_nofollow(self.path)

    def log(self, record: dict, step: int, prefix: str) -> None:
        line = record if prefix == "train" else {"step": step, prefix: record}
        with writing(self.path):
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardLogger:
    """Event files in RUN/tensorboard. A run resumed from step `start` purges the events logged after it (a run
    that died past its last checkpoint), as metrics.jsonl drops its lines: the steps it does again show once."""

    def __init__(self, out: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter

        refuse_link(Path(out) / "tensorboard")  # its event files are written inside the run folder, or not at all
        self.writer = SummaryWriter(log_dir=str(Path(out) / "tensorboard"), purge_step=start + 1 if start else None)

    def log(self, record: dict, step: int, prefix: str) -> None:
        for key, value in scalars(record, prefix):
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run for this run folder: the same run (its id in RUN/wandb-id.txt) when resumed, a new one
    when the folder starts a new run."""

    def __init__(self, out: Path, start: int, config: dict, project: str | None = None):
        import wandb

        out = Path(out)
        refuse_link(out / "wandb")  # W&B's own files: inside the run folder, or not at all
        run_id = wandb_id(out, resume=start > 0)
        try:
            self.run = wandb.init(project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                                  name=out.resolve().name, dir=str(out), config=config, id=run_id, resume="allow")
        except Exception as e:  # no login, no network, a refused id: W&B's own errors
            raise TrainError(f"train.log: wandb could not start a run ({type(e).__name__}: {reason(e)}); log in "
                             "with `wandb login`, or log offline with WANDB_MODE=offline") from None

    def log(self, record: dict, step: int, prefix: str) -> None:
        self.run.log(dict(scalars(record, prefix)), step=step)

    def close(self) -> None:
        failed = sys.exc_info()[0] is not None  # closed while an error (or a stop signal) ends the run
        self.run.finish(exit_code=1 if failed else 0)


def wandb_id(out: Path, resume: bool) -> str:
    """The W&B run id of run folder `out`: the one in RUN/wandb-id.txt when the run resumes, else a new one,
    written there (atomically, never through a link) for the runs that resume it."""
    path = out / WANDB_ID
    refuse_link(path)
    if resume and path.exists():
        if not path.is_file():  # a folder or a FIFO planted there: never read
            raise TrainError(f"{path} is not a regular file; delete it to log this run as a new W&B run")
        try:
            text = path.read_text(encoding="utf-8", errors="replace").strip() if path.stat().st_size <= 256 else ""
        except OSError as e:
            raise TrainError(f"{path} cannot be read: {reason(e)}") from None
        if not _WANDB_ID_TEXT.fullmatch(text):
            raise TrainError(f"{path} does not hold a W&B run id; delete it to log this run as a new W&B run")
        return text
    run_id = secrets.token_hex(8)
    with writing(path):
        write_text_atomic(path, run_id + "\n")
    return run_id


def scalars(record: dict, prefix: str) -> Iterator[tuple[str, float]]:
    """(`prefix/key`, number) for every finite number in `record` (bools and `step` left out), nested
    mappings as `prefix/key/inner`."""
    for key, value in record.items():
        if key == "step" and prefix == "train":
            continue
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            yield from scalars(value, name)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield name, value


class Loggers:
    """The loggers of a run, each sent every record."""

    def __init__(self, loggers: dict[str, Logger]):
        self.loggers = loggers

    @property
    def names(self) -> list[str]:
        return list(self.loggers)

    def log(self, record: dict, step: int, prefix: str) -> None:
        for logger in self.loggers.values():
            logger.log(record, step, prefix)

    def close(self) -> None:
        """Close every logger (one that fails does not keep the others open); the first failure is raised."""
        failed: BaseException | None = None
        for logger in self.loggers.values():
            try:
                logger.close()
            except Exception as e:
                failed = failed or e
        self.loggers = {}
        if failed is not None:
            raise failed


def default_loggers() -> list[str]:
    """What a run logs to without train.log: jsonl, and tensorboard when it can be imported (as before there was
    a choice)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return ["jsonl"]
    return ["jsonl", "tensorboard"]


def open_loggers(names: list[str] | None, out: Path, start_step: int, config: dict,
                 project: str | None = None) -> Loggers:
    """The loggers `names` (train.log; None: `default_loggers()`) of the run in `out`, resumed at `start_step`
    (0: a new run). `config` is what W&B records as the run's config (`run_config`). A logger that is unknown
    or whose package is missing is a TrainError naming what to install; those opened before it are closed."""
    asked = names is not None  # the default takes tensorboard only when it imports
    names = list(names) if asked else default_loggers()
    opened: dict[str, Logger] = {}
    try:
        for name in names:
            if name not in LOGGERS:
                raise TrainError(f"train.log: unknown logger {name!r}; known: {' | '.join(LOGGERS)}")
            problem = missing_logger(name) if asked else None
            if problem:
                raise TrainError(problem)
            try:
                opened[name] = _open(name, Path(out), start_step, config, project)
            except ImportError as e:
                raise TrainError(f"train.log: {name} cannot be imported ({reason(e)}): {install_hint(name)}") from None
    except BaseException:
        Loggers(opened).close()
        raise
    return Loggers(opened)


def _open(name: str, out: Path, start: int, config: dict, project: str | None) -> Logger:
    if name == "jsonl":
        return JsonlLogger(out)
    if name == "tensorboard":
        return TensorBoardLogger(out, start)
    return WandbLogger(out, start, config, project)


def run_config(spec_raw: dict, cfg: TrainConfig) -> dict[str, Any]:
    """The spec as W&B records it: its sections, with train: resolved (every key, defaults filled in), as JSON
    values (a YAML date or set becomes its text)."""
    return json.loads(json.dumps({**spec_raw, "train": config_dict(cfg)}, default=str))


__all__ = ["DEFAULT_PROJECT", "WANDB_ID", "JsonlLogger", "Logger", "Loggers", "TensorBoardLogger", "WandbLogger",
           "default_loggers", "open_loggers", "run_config", "scalars", "wandb_id"]
