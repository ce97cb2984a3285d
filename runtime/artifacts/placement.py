"""Where a run computes: the device its tensors live on and the backend whose kernels run there.

    device    auto | cpu | cuda | cuda:N     auto: CUDA when torch sees a device, else the CPU;
                                             under torchrun each process takes cuda:LOCAL_RANK
    backend   auto | reference | inductor | triton | cuda | opencl | c
                                             auto: the generated Triton kernels on CUDA, CPU_BACKEND
                                             on the CPU
    dtype     auto | fp32 | bf16             auto: bf16 autocast on CUDA, fp32 on the CPU

Training (`train.backend`, `train.device`, `train.dtype` or `--backend` / `--device`), `eval` and
`generate` resolve them here, once, before anything is built. A device this machine lacks, or a
backend that cannot run on the device (its package is missing, or its kernels take tensors on
another kind of device) is a `PlacementError`: one line saying what is missing and what to use.

A backend's op table says which device type its kernels take (`device_type`: the interpreter's
Triton and PoCL's OpenCL take CPU tensors, compiled Triton and CUDA C take CUDA ones, the
reference any); that is what a backend is checked against.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from hrmspec.backends import REGISTRY, get_backend
from hrmspec.errors import HrmspecError

# The fastest backend that computes exactly what the reference does on a CPU: the one place a faster
# CPU backend is chosen once there is one (the kernel backends run on a CPU only to prove numerics).
CPU_BACKEND = "reference"
CUDA_BACKENDS = ("triton", "reference")  # auto on CUDA: the first of these that runs here


class PlacementError(HrmspecError):
    """A device or backend this machine cannot run a model on; the message says what to use."""


@dataclass(frozen=True)
class Placement:
    backend: str  # a registry name (backends/__init__.py)
    device: torch.device
    dtype: str  # fp32 | bf16 (autocast)

    def autocast(self) -> AbstractContextManager:
        """The forward's autocast: bf16 on the placement's device type, or none in fp32."""
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def __str__(self) -> str:
        return f"{self.device} ({self.backend} backend, {self.dtype})"


def _env_int(name: str, default: int, low: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise PlacementError(f"the environment variable {name}={text[:40]!r} is not an integer of at least {low}; "
                             "torchrun sets it: unset it, or start the run with torchrun")
    return value


def world_size() -> int:
    """How many processes train together: WORLD_SIZE under torchrun, else 1. WORLD_SIZE above 1 without the
    rendezvous torchrun provides (MASTER_ADDR, MASTER_PORT, RANK) is an error, not a run that hangs."""
    size = _env_int("WORLD_SIZE", 1, 1)
    if size > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if not os.environ.get(k)]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise PlacementError(f"WORLD_SIZE={size} is set but {', '.join(missing)} {verb} not: "
                                 "start a run of several processes with torchrun "
                                 "(torchrun --nproc-per-node N -m hrmspec train ...), or unset WORLD_SIZE")
        rank = _env_int("RANK", 0, 0)
        if rank >= size:
            raise PlacementError(f"RANK={rank} is not below WORLD_SIZE={size}: start the run with torchrun")
    return size


def local_rank() -> int | None:
    """This process's rank on its machine under torchrun, or None outside it."""
    if world_size() > 1:
        return _env_int("LOCAL_RANK", 0, 0)
    return None


def resolve_device(name: str, key: str = "--device", rank: int | None = None) -> torch.device:
    """The device `name` means here (see the module docstring); `rank` is the local rank under torchrun."""
    cuda = torch.cuda.is_available()
    if name == "auto":
        name = "cuda" if cuda else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not cuda:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
        raise PlacementError(f"{key} {name}: torch sees no CUDA device here (torch {torch.__version__}, {build}); "
                             f"use {key} cpu, or auto (CUDA where there is one)")
    count = torch.cuda.device_count()
    if name == "cuda":
        index = rank or 0
    elif rank is not None and _env_int("LOCAL_WORLD_SIZE", 1, 1) > 1:
        raise PlacementError(f"{key} {name}: under torchrun each process takes the device of its local rank; "
                             f"use {key} cuda (or auto)")
    else:
        index = int(name.split(":")[1])
    if index >= count:
        raise PlacementError(f"{key} {name if rank is None else f'cuda (local rank {rank})'}: this machine has "
                             f"{count} CUDA device{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def resolve_backend(name: str, device: torch.device, keys: tuple[str, str] = ("--backend", "--device")) -> str:
    """The backend `name` means on `device`, checked to run there; `keys` name the settings in messages."""
    key = keys[0]
    if name == "auto":
        if device.type == "cpu":
            return CPU_BACKEND
        runs = [b for b in CUDA_BACKENDS if not REGISTRY[b].missing() and _takes(b, device)]
        return runs[0] if runs else "reference"
    try:
        get_backend(name)  # its packages and devices: the registry's own one-line reason otherwise
    except HrmspecError as e:
        raise PlacementError(f"{key} {name}: {e}") from None
    if not _takes(name, device):
        raise PlacementError(f"{key} {name}: {_mismatch(name, device, keys)}")
    return name


def _takes(backend: str, device: torch.device) -> bool:
    """Whether the kernels of `backend` take tensors on `device` (the reference takes any)."""
    kind = getattr(get_backend(backend), "device_type", None)
    return kind is None or kind == device.type


def _mismatch(backend: str, device: torch.device, keys: tuple[str, str]) -> str:
    """Why `backend`'s kernels cannot run on `device`, and what to use instead."""
    kind = get_backend(backend).device_type
    if backend == "triton" and kind == "cpu":  # a GPU here, but the interpreter was asked for
        return (f"TRITON_INTERPRET is set, so Triton's kernels run in its interpreter on CPU tensors, not on {device}; "
                f"unset it, or use {keys[1]} cpu")
    if backend == "triton":
        return (f"Triton's kernels run on CUDA here (the interpreter is off on a machine with a GPU); use {keys[1]} "
                "cuda, or start with TRITON_INTERPRET=1 to run them in the interpreter on the CPU")
    other = "reference, c or opencl" if device.type == "cpu" else "triton, cuda or reference"
    return f"its kernels take {kind.upper()} tensors, not {device.type.upper()} ones; on {device} use {keys[0]} {other}"


def resolve(backend: str = "auto", device: str = "auto", dtype: str = "auto", keys: tuple[str, str] = (
        "--backend", "--device"), rank: int | None = None) -> Placement:
    """The placement of a run: device first (the backend depends on it), then backend and dtype."""
    dev = resolve_device(device, keys[1], rank)
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    return Placement(resolve_backend(backend, dev, keys), dev, dtype)


def to_device(tree: Any, device: torch.device | str) -> Any:
    """`tree` (tensors in dicts, lists and tuples) with every tensor on `device`; other leaves as they are."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device) for v in tree)
    return tree


__all__ = ["CPU_BACKEND", "Placement", "PlacementError", "local_rank", "resolve", "resolve_backend",
           "resolve_device", "to_device"]
