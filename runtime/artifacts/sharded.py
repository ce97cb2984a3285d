"""Sharded checkpoints of FSDP2 runs, written and read with torch.distributed.checkpoint (DCP).

Under FSDP each rank holds a slice of every weight, EMA and optimizer moment. A sharded checkpoint
has each rank write the slices it holds to a file of its own, so no rank ever gathers the full
state (which would not fit in one rank's memory for the models FSDP is for). The files are DCP's
safetensors layout (`HuggingFaceStorageWriter(save_distributed=True)`): every file's JSON header
records the offsets of its slices, so reading needs no pickled metadata file, only safetensors
headers. A sharded checkpoint folder holds

    shards/shard-<rank+1>-model-00001-of-00001.safetensors
                      per rank: its slices of model.<name>, ema.<name>, optim.<name>.<moment>
    optimizer.json    the optimizer's parameter groups (hyper-parameters and parameter names)
    trainer.pt, spec.yaml, tokenizer.json      as in a single-file checkpoint (checkpoint.py)

DCP reads any layout into any other: a run resumes on another number of ranks, under DDP, or in one
process. `read_sharded` reads one part in one process as full tensors; `consolidate` writes a
checkpoint's single-file layout (model.safetensors, ema.safetensors) from its shards, for tools
that read files directly. `eval`, `generate` and `export-hf` read either layout.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from hrmspec.errors import CheckpointError
from hrmspec.runtime.artifacts.files import write_tensors, write_text_atomic

SHARDS = "shards"
GROUPS_FILE = "optimizer.json"
PARTS = ("model", "ema", "optim")


@contextmanager
def _one_process_is_meant():
    """DCP warns when it runs without a process group; here that is the intent (a reader, one rank)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / SHARDS).is_dir()


def _flat(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema) -> tuple[dict[str, torch.Tensor], list]:
    """Every tensor to save under one flat name (what a safetensors file holds), and the optimizer's
    parameter groups. Tensors are this rank's shards (DTensors) under FSDP, whole tensors otherwise."""
    flat = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    if ema is not None:
        flat.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    optim = get_optimizer_state_dict(model, optimizer)  # keyed by parameter name; made if still empty
    for name, moments in optim["state"].items():
        for key, value in moments.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"optimizer state {name}.{key} is not a tensor; it cannot be sharded")
            flat[f"optim.{name}.{key}"] = value
    return flat, optim["param_groups"]


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema) -> None:
    """Every rank writes its shards into `folder/shards`; rank 0 the parameter groups. Collective:
    every rank calls it, with `folder` the same (shared) path."""
    flat, groups = _flat(model, optimizer, ema)
    rank = dist.get_rank() if dist.is_initialized() else 0
    with _one_process_is_meant():
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(folder / SHARDS), save_distributed=True),
                 no_dist=not dist.is_initialized())
    if rank == 0:
        write_text_atomic(folder / GROUPS_FILE, json.dumps(groups, indent=1))


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema) -> None:
    """Load a sharded checkpoint into a model (sharded or not), its optimizer and EMA, whatever the
    number of ranks that wrote it. Collective under torchrun."""
    flat, groups = _flat(model, optimizer, ema)
    _check_names(folder, flat)
    with _one_process_is_meant():
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(folder / SHARDS)), no_dist=not dist.is_initialized())
    set_model_state_dict(model, {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")})
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if key.startswith("optim."):
            name, moment = key[len("optim."):].rsplit(".", 1)
            state.setdefault(name, {})[moment] = value
    saved_groups = _read_groups(folder)
    if [g["params"] for g in saved_groups] != [g["params"] for g in groups]:
        raise CheckpointError(f"{folder}/{GROUPS_FILE}: its parameter groups do not match the model's")
    for g in saved_groups:  # JSON has no tuples
        g.update({k: tuple(v) for k, v in g.items() if k == "betas"})
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": saved_groups})
    if ema is not None:  # dcp.load filled the shadow tensors in place; this is for a copy it made instead
        for name, shadow in ema.shadow.items():
            loaded = flat[f"ema.{name}"]
            if loaded is not shadow:
                shadow.copy_(loaded)


def _read_groups(folder: Path) -> list[dict]:
    try:
        groups = json.loads((folder / GROUPS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}/{GROUPS_FILE} cannot be read ({type(e).__name__}); the checkpoint is "
                              "damaged") from None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise CheckpointError(f"{folder}/{GROUPS_FILE} is not a list of parameter groups; the checkpoint is damaged")
    return groups


def _metadata(folder: Path):
    try:
        return HuggingFaceStorageReader(str(folder / SHARDS)).read_metadata()
    except Exception as e:  # a truncated or foreign file: safetensors' own error, in one line
        raise CheckpointError(f"{folder}/{SHARDS} cannot be read: {str(e).splitlines()[0] if str(e) else e!r}"
                              ) from None


def _check_names(folder: Path, flat: dict[str, torch.Tensor]) -> None:
    """The checkpoint holds exactly the tensors the model needs, at their full shapes."""
    saved = _metadata(folder).state_dict_metadata
    missing = [k for k in flat if k not in saved]
    extra = [k for k in saved if k not in flat]
    if missing or extra:
        raise CheckpointError(f"{folder} does not match its spec: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in flat.items():
        if tuple(saved[k].size) != tuple(v.shape):
            raise CheckpointError(f"{folder}: tensor '{k}' has shape {tuple(saved[k].size)}, the spec needs "
                                  f"{tuple(v.shape)}")


def read_sharded(folder: Path, part: str) -> dict[str, torch.Tensor]:
    """One part of a sharded checkpoint ('model', 'ema' or 'optim') as full tensors, read in this
    process alone from every rank's file."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}")
    saved = _metadata(folder).state_dict_metadata
    full = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in saved.items()
            if k.startswith(part + ".")}
    if full:
        with _one_process_is_meant():
            dcp.load(full, storage_reader=HuggingFaceStorageReader(str(folder / SHARDS)), no_dist=True)
    return {k[len(part) + 1:]: v for k, v in full.items()}


def consolidate(folder: Path) -> list[Path]:
    """Write `folder`'s single-file layout (model.safetensors, and ema.safetensors when the run kept
    an EMA) from its shards. Each file is written atomically; the shards stay. Returns the files."""
    folder = Path(folder)
    if not is_sharded(folder):
        raise CheckpointError(f"{folder} is not a sharded checkpoint (no {SHARDS}/ folder)")
    written = []
    for part in ("model", "ema"):
        tensors = read_sharded(folder, part)
        if not tensors and part == "model":
            raise CheckpointError(f"{folder / SHARDS} holds no model shards: nothing to consolidate (a save that "
                                  "did not finish, or shards copied without their files)")
        if tensors:
            path = folder / f"{part}.safetensors"
            write_tensors(path, tensors)
            written.append(path)
    return written
