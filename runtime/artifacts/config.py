"""The `train:` section of a spec, read and checked before anything runs."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from hrmspec.backends import BACKENDS
from hrmspec.errors import HrmspecError, close_match

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
    save_every: int = 250
    keep: int = 2  # checkpoints kept
    max_nan_steps: int = 5  # non-finite losses in a row before giving up
    tokenizer: str | None = None  # an existing tokenizer.json (else one is trained on the data)
    threads: int = 0  # torch threads; 0: leave torch's default
    max_new_tokens: int = 32  # evaluation decoding budget
    # the puzzle table (model.puzzle) by HRM's sparse sign-SGD: {type: sign_sgd, lr, weight_decay}, the lr on
    # the main schedule; null: it trains with the main optimizer (runtime/training/optim.py: SparseSignSGD)
    puzzle_optimizer: dict | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = [f.name for f in fields(cls)]
        for key in d:
            if key not in names:
                hint = close_match(key, names)
                hint = f" ({hint})" if hint else ""
                raise TrainError(f"train.{key}: unknown key{hint}; known: {', '.join(names)}")
        for name in ("lr", "weight_decay", "warmup", "min_lr_ratio", "grad_clip", "ema"):
            v = d.get(name)
            if v is not None and _number(v) is None:
                raise TrainError(f"train.{name}: expected a number, found {v!r}")
            if isinstance(v, str):
                d[name] = _number(v)
        cfg = cls(**d)
        for name in ("steps", "batch_size", "seq_len"):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TrainError(f"train.{name}: expected a positive integer, found {v!r}")
        if cfg.optimizer not in ("adam_atan2", "adamw"):
            raise TrainError(f"train.optimizer: expected adam_atan2 | adamw, found {cfg.optimizer!r}")
        if cfg.schedule not in ("cosine", "constant"):
            raise TrainError(f"train.schedule: expected cosine | constant, found {cfg.schedule!r}")
        if cfg.dtype not in ("auto", "fp32", "bf16"):
            raise TrainError(f"train.dtype: expected auto | fp32 | bf16, found {cfg.dtype!r}")
        if cfg.puzzle_optimizer is not None:
            cfg.puzzle_optimizer = _puzzle_optimizer(cfg.puzzle_optimizer)
        check_backend_name(cfg.backend, "train.backend")
        check_device_name(cfg.device, "train.device")
        return cfg


def check_backend_name(name: object, key: str) -> str:
    """`name` when it names a backend (or auto), else a TrainError saying what `key` takes."""
    choices = ("auto", *BACKENDS)
    if name not in choices:
        hint = close_match(str(name), choices)
        raise TrainError(f"{key}: expected {' | '.join(choices)}, found {name!r}" + (f" ({hint})" if hint else ""))
    return str(name)


def check_device_name(name: object, key: str) -> str:
    """`name` when it is a device `key` takes (auto, cpu, cuda, cuda:N), else a TrainError. Whether the
    device exists on this machine is asked when a run starts (placement.py), not here."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise TrainError(f"{key}: expected {DEVICE_NAMES}, found {name!r}")
    return name


def _number(v: object) -> float | None:
    """A YAML value as a number: ints and floats, and strings (YAML 1.1 reads 3e-3, without a dot, as a
    string); None for anything else, booleans included."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return None
    try:
        return float(v) if isinstance(v, str) else v
    except ValueError:
        return None


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


__all__ = ["DEVICE_NAMES", "TrainConfig", "TrainError", "check_backend_name", "check_device_name", "config_dict"]
