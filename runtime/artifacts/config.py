"""The `train:` section of a spec, read and checked before anything runs."""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from hrmspec.backends import BACKENDS
from hrmspec.errors import HrmspecError, close_match
from hrmspec.spec.source import quoted

DEVICE_NAMES = "auto | cpu | cuda | cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,3})?")


class TrainError(HrmspecError):
    """A training configuration or run that cannot go on; the message says why and what to do."""


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # packed rows per step (global, over all processes)
    seq_len: int = 256
    optimizer: str = "adam_atan2"  # adam_atan2 | adamw
    lr: float = 1e-3
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup: float = 0.05  # fraction of steps with linear lr warmup
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0: off
    ema: float | None = 0.999  # decay of the parameter EMA; null: off
    dtype: str = "auto"  # auto | fp32 | bf16 (autocast); auto: bf16 on CUDA, fp32 on the CPU
    backend: str = "auto"  # auto | reference | triton | cuda | opencl (runtime/artifacts/placement.py)
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto: CUDA when torch sees a device (cuda:LOCAL_RANK)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_n: int = 64  # held-out samples per periodic evaluation
    readout_rows: int = 8  # rows of the per-cycle readout logged every log_every steps (evaluate/readout.py); 0: off
    save_every: int = 250
    keep: int = 2  # checkpoints kept
    max_nan_steps: int = 5  # non-finite losses in a row before giving up
    tokenizer: str | None = None  # an existing tokenizer.json (else one is trained on the data)
    threads: int = 0  # torch threads; 0: leave torch's default
    max_new_tokens: int = 32  # evaluation decoding budget
    # the puzzle table (model.puzzle) by HRM's sparse sign-SGD: {type: sign_sgd, lr, weight_decay}, the lr on
    # the main schedule; null: it trains with the main optimizer (runtime/training/optim.py: SparseSignSGD)
    puzzle_optimizer: dict | None = None
    # where metrics go (runtime/training/loggers.py): jsonl | tensorboard | wandb, a name or a list of them;
    # null: jsonl, and tensorboard when it is installed
    log: list | None = None
    wandb_project: str | None = None  # the W&B project (log: [wandb]); null: $WANDB_PROJECT, else "hrmspec"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = [f.name for f in fields(cls)]
        for key in d:
            if key not in names:
                hint = close_match(key, names)
                hint = f" ({hint})" if hint else ""
                shown = quoted(key, 40)[1:-1] if isinstance(key, str) else quoted(key)
                raise TrainError(f"train.{shown}: unknown key{hint}; known: {', '.join(names)}")
        for name, (low, high, what) in NUMBERS.items():
            if name in d and not (name == "ema" and d[name] is None):
                d[name] = _checked_number(name, d[name], low, high, what)
        for name, (low, high) in INTEGERS.items():
            if name in d:
                d[name] = _checked_int(name, d[name], low, high)
        if "betas" in d:
            d["betas"] = _betas(d["betas"])
        if d.get("log") is not None:
            d["log"] = _loggers(d["log"])
        if d.get("wandb_project") is not None:
            d["wandb_project"] = _wandb_project(d["wandb_project"])
        if d.get("tokenizer") is not None and not isinstance(d["tokenizer"], str):
            raise TrainError(f"train.tokenizer: expected the path of a tokenizer.json, found {quoted(d['tokenizer'])}")
        cfg = cls(**d)
        if cfg.optimizer not in ("adam_atan2", "adamw"):
            raise TrainError(f"train.optimizer: expected adam_atan2 | adamw, found {quoted(cfg.optimizer)}")
        if cfg.schedule not in ("cosine", "constant"):
            raise TrainError(f"train.schedule: expected cosine | constant, found {quoted(cfg.schedule)}")
        if cfg.dtype not in ("auto", "fp32", "bf16"):
            raise TrainError(f"train.dtype: expected auto | fp32 | bf16, found {quoted(cfg.dtype)}")
        if cfg.puzzle_optimizer is not None:
            cfg.puzzle_optimizer = _puzzle_optimizer(cfg.puzzle_optimizer)
        check_backend_name(cfg.backend, "train.backend")
        check_device_name(cfg.device, "train.device")
        return cfg

    def check_loggers(self) -> None:
        """A TrainError naming the extra to install for the first logger of train.log whose package is missing
        (asked of the installation, not of the spec: a run checks it before it makes its folder, preflight.py)."""
        for name in self.log or ():
            problem = missing_logger(name)
            if problem:
                raise TrainError(problem)


# name -> (lowest, highest, what it is): every integer of the section, checked before anything runs
INTEGERS = {
    "steps": (1, 10**12), "batch_size": (1, 10**7), "seq_len": (1, 10**7), "seed": (0, 2**63 - 1),
    "log_every": (1, 10**12), "eval_every": (0, 10**12), "eval_n": (1, 10**9), "save_every": (1, 10**12),
    "keep": (1, 10**6), "max_nan_steps": (1, 10**9), "threads": (0, 4096), "max_new_tokens": (1, 10**7),
    "readout_rows": (0, 4096),
}
# name -> (lowest, highest, why): finite numbers; `lr` must be above 0, the fractions within [0, 1]
NUMBERS = {
    "lr": (0.0, None, "> 0"), "weight_decay": (0.0, None, ">= 0"), "warmup": (0.0, 1.0, "in [0, 1]"),
    "min_lr_ratio": (0.0, 1.0, "in [0, 1]"), "grad_clip": (0.0, None, ">= 0 (0: off)"),
    "ema": (0.0, 1.0, "in [0, 1) or null (off)"),
}


def _checked_int(name: str, v: object, low: int, high: int) -> int:
    """`v` as an integer in [low, high] (YAML may give 1e3 as a string or a float: whole numbers are taken)."""
    n = _number(v)
    if n is not None and isinstance(n, float) and math.isfinite(n) and n.is_integer() and abs(n) < 2**63:
        n = int(n)
    if not isinstance(n, int) or isinstance(v, bool) or not low <= n <= high:
        top = "" if high == 10**12 else f" and at most {high}"
        raise TrainError(f"train.{name}: expected an integer of at least {low}{top}, found {quoted(v)}")
    return n


def _checked_number(name: str, v: object, low: float, high: float | None, what: str) -> float:
    n = _number(v)
    ok = n is not None and math.isfinite(n) and n >= low and (high is None or n <= high)
    if ok and name == "lr":
        ok = n > 0
    if ok and name == "ema":
        ok = n < 1
    if not ok:
        raise TrainError(f"train.{name}: expected a finite number {what}, found {quoted(v)}")
    return float(n)


def _betas(v: object) -> tuple[float, float]:
    """Adam's (beta1, beta2): two numbers in [0, 1)."""
    items = list(v) if isinstance(v, (list, tuple)) else None
    nums = [_number(b) for b in items] if items is not None else []
    if items is None or len(items) != 2 or any(b is None or not math.isfinite(b) or not 0 <= b < 1 for b in nums):
        raise TrainError(f"train.betas: expected two numbers in [0, 1), e.g. [0.9, 0.95], found {quoted(v)}")
    return (float(nums[0]), float(nums[1]))


def check_backend_name(name: object, key: str) -> str:
    """`name` when it names a backend (or auto), else a TrainError saying what `key` takes."""
    choices = ("auto", *BACKENDS)
    if name not in choices:
        hint = close_match(str(name), choices)
        hint = f" ({hint})" if hint else ""
        raise TrainError(f"{key}: expected {' | '.join(choices)}, found {quoted(name)}{hint}")
    return str(name)


def check_device_name(name: object, key: str) -> str:
    """`name` when it is a device `key` takes (auto, cpu, cuda, cuda:N), else a TrainError. Whether the
    device exists on this machine is asked when a run starts (placement.py), not here."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise TrainError(f"{key}: expected {DEVICE_NAMES}, found {quoted(name)}")
    return name


def _number(v: object) -> float | None:
    """A YAML value as a number: ints and floats, and strings (YAML 1.1 reads 3e-3, without a dot, as a
    string); None for anything else, booleans included."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return None
    try:
        return float(v) if isinstance(v, str) else v
    except (ValueError, OverflowError):
        return None


# train.log's names -> the package each needs (None: nothing beyond hrmspec's own dependencies)
LOGGERS = {"jsonl": None, "tensorboard": "tensorboard", "wandb": "wandb"}
# W&B refuses these in a project name (and names longer than 128 characters)
_WANDB_PROJECT = re.compile(r"[^/\\#?%:\s][^/\\#?%:]{0,127}")


def install_hint(name: str) -> str:
    return f"pip install 'hrmspec[{name}]'"


def missing_logger(name: str) -> str | None:
    """Why logger `name` cannot run here (its package is not installed, with the command that installs it),
    or None. Found without importing the package (tensorboard and wandb take seconds to import)."""
    package = LOGGERS.get(name)
    if package is None:
        return None
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken installation, or a module without a spec
        found = False
    return None if found else f"train.log: {name} is not installed: {install_hint(name)}"


def _loggers(v: object) -> list[str]:
    """train.log checked: a logger's name or a list of them, each known and named once."""
    items = [v] if isinstance(v, str) else v
    known = " | ".join(LOGGERS)
    if not isinstance(items, (list, tuple)):
        raise TrainError(f"train.log: expected a list of loggers ({known}), found {quoted(v)}")
    seen: list[str] = []
    for item in items:
        if not isinstance(item, str) or item not in LOGGERS:
            hint = close_match(item, LOGGERS) if isinstance(item, str) else ""
            hint = f" ({hint})" if hint else ""
            raise TrainError(f"train.log: unknown logger {quoted(item)}{hint}; known: {known}")
        if item in seen:
            raise TrainError(f"train.log: {item} is named twice")
        seen.append(item)
    return seen


def _wandb_project(v: object) -> str:
    if not isinstance(v, str) or not _WANDB_PROJECT.fullmatch(v):
        raise TrainError(f"train.wandb_project: expected a W&B project name (at most 128 characters, none of "
                         f"/ \\ # ? % :), found {quoted(v)}")
    return v


def _puzzle_optimizer(d: object) -> dict:
    """train.puzzle_optimizer checked: {"type": "sign_sgd", "lr": > 0, "weight_decay": >= 0}."""
    key = "train.puzzle_optimizer"
    if not isinstance(d, dict):
        raise TrainError(f"{key}: expected {{type: sign_sgd, lr: ..., weight_decay: ...}} or null, found {d!r}")
    unknown = sorted(set(d) - {"type", "lr", "weight_decay"})
    if unknown:
        raise TrainError(f"{key}.{unknown[0]}: unknown key; known: type, lr, weight_decay")
    if d.get("type") != "sign_sgd":
        raise TrainError(f"{key}.type: expected sign_sgd (HRM's sparse sign-SGD), found {d.get('type')!r}")
    out = {"type": "sign_sgd"}
    for name, low in (("lr", None), ("weight_decay", 0.0)):
        v = _number(d.get(name, 0.0 if name == "weight_decay" else None))
        if v is None or not math.isfinite(v) or (v <= 0 if low is None else v < low):
            raise TrainError(f"{key}.{name}: expected a number {'> 0' if low is None else '>= 0'}, "
                             f"found {d.get(name)!r}")
        out[name] = v
    return out


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


__all__ = ["DEVICE_NAMES", "LOGGERS", "TrainConfig", "TrainError", "check_backend_name", "check_device_name",
           "config_dict", "install_hint", "missing_logger"]
