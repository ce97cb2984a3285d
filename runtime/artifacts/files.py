"""Files that a crash cannot leave half-written, and readers that turn damage into clear errors."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hrmspec.errors import CheckpointError


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entry list is what makes a rename durable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write` a temp file beside `path`, fsync it, then rename it over `path`: a reader (or a
    crash) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], atomic: bool = True) -> None:
    """safetensors file of `tensors` (moved to CPU)."""
    # safetensors refuses tensors that share memory (split rows of one weight, a tied head): copy
    # those; the rest are written as they are, so saving a large model does not double its memory
    cpu = {k: v.detach().cpu() for k, v in tensors.items()}
    storages = Counter(v.untyped_storage().data_ptr() for v in cpu.values())
    own = {
        k: v.clone() if storages[v.untyped_storage().data_ptr()] > 1 else v.contiguous()
        for k, v in cpu.items()
    }
    if atomic:
        atomic_write(path, lambda p: save_file(own, str(p), metadata={"format": "pt"}))
    else:
        save_file(own, str(path), metadata={"format": "pt"})


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint file {path}: not a readable safetensors file ({e})") from None


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
