"""Training checkpoints, written so that a crash never leaves a broken one.

A run directory holds ``checkpoints/step_<N>/`` folders. Each is written in full under a
temporary name, every file fsynced, then renamed into place (a rename is atomic on POSIX), so a
reader sees either the previous set of checkpoints or the new one — never half a checkpoint.
The newest complete folder is the one to resume from; older ones beyond `keep` are pruned.

A checkpoint folder holds:

    model.safetensors      weights and buffers (the model's state_dict)
    ema.safetensors        the parameter EMA (when enabled)
    optimizer.pt           optimizer state
    trainer.pt             step, data position, RNG states (torch, numpy, python)
    spec.yaml              the resolved spec
    tokenizer.json         the tokenizer

Every tensor is written from the CPU, so a checkpoint does not depend on the device that trained it
and loads on either side. An FSDP run's checkpoint has each rank's shards (shards/, optimizer.json)
in place of the model, EMA and optimizer files: see sharded.py. `model_tensors` reads the weights of
either layout.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from hrmspec.errors import CheckpointError
from hrmspec.runtime.artifacts.files import fsync_path, read_tensors
from hrmspec.runtime.artifacts.sharded import is_sharded, read_sharded

PREFIX = "step_"


def seed_rngs(seed: int) -> None:
    """Seed every RNG a checkpoint saves (torch's, on each device; numpy's; python's) with the run's seed:
    two runs with one seed draw the same numbers, so a resumed run continues the uninterrupted one's."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """The RNG states of torch (and of this process's CUDA device, once used), numpy and python as
    tensors and plain numbers: what `torch.load(weights_only=True)` reads back (a checkpoint never
    unpickles objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, py_gauss = random.getstate()
    cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() and torch.cuda.is_initialized() else {}
    return {
        **cuda,
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # a CPU-side resume of a CUDA run has no device RNG to set
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(w) for w in p["words"].tolist()), p["gauss"]))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer.pt").exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    spec_raw: dict,
    tokenizer=None,
    optimizer_state: dict | None = None,
    ema_state: dict[str, torch.Tensor] | None = None,
    trainer_state: dict | None = None,
    keep: int = 3,
    staged: Path | None = None,
) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`.

    States are plain (full, unsharded) state dicts. `staged` is a temp folder (from `staging_folder`)
    that already holds files other processes wrote (an FSDP run's shards): the rest is written into it
    and it becomes the checkpoint, with `model_state` None."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = staged if staged is not None else Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        if model_state is not None:
            save_file(_plain(model_state), tmp / "model.safetensors")
        if ema_state is not None:
            save_file(_plain(ema_state), tmp / "ema.safetensors")
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "spec.yaml").write_text(yaml.safe_dump(spec_raw, sort_keys=False))
        if tokenizer is not None:
            tokenizer.save(tmp)
        torch.save({"step": step, "rng": rng_state(), **(trainer_state or {})}, tmp / "trainer.pt")
        for f in tmp.rglob("*"):
            fsync_path(f)
        fsync_path(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier, interrupted run
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(run_dir)
        kept = f"; the previous checkpoint {prev} is intact" if prev else ""
        raise CheckpointError(f"could not write checkpoint {final}: {e.strerror or e}{kept}") from None
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    return final


def staging_folder_name(run_dir: str | os.PathLike, step: int) -> Path:
    """The temp folder every rank of an FSDP run writes checkpoint `step`'s shards into: a name all
    ranks know without talking."""
    return Path(run_dir) / "checkpoints" / f".tmp-{PREFIX}{step:08d}-shards"


def staging_folder(run_dir: str | os.PathLike, step: int) -> Path:
    """Make that folder, empty (rank 0, before the ranks write)."""
    tmp = staging_folder_name(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def model_tensors(folder: Path, part: str = "model") -> dict[str, torch.Tensor] | None:
    """The weights ('model') or their EMA ('ema') of a checkpoint folder, single-file or sharded;
    None when the checkpoint has no such part (a run without EMA)."""
    path = Path(folder) / f"{part}.safetensors"
    if path.exists():
        return read_tensors(path)
    if is_sharded(folder):
        return read_sharded(Path(folder), part) or None
    if part == "model":
        raise CheckpointError(f"{folder} has neither model.safetensors nor shards/: the checkpoint is damaged")
    return None


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load weights, naming any tensor that is missing, unexpected or of the wrong shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    extra = [k for k in tensors if k not in own]
    if missing or extra:
        raise CheckpointError(
            f"{source} does not match its spec: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{source}: tensor '{k}' has shape {tuple(t.shape)}, the spec needs {tuple(own[k].shape)}"
            )
    model.load_state_dict(tensors)


def read_pt(path: Path) -> Any:
    """A `.pt` file of a checkpoint: tensors, containers and plain numbers only. `weights_only=True`
    refuses anything else, so a checkpoint someone hands you cannot run code when it is read. Read onto
    the CPU whatever device wrote it; the trainer moves what it restores to its own device."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # a corrupt file, or one that holds pickled objects
        raise CheckpointError(f"corrupt or unsafe checkpoint file {path}: {_load_failure(e)}") from None


def _load_failure(e: Exception) -> str:
    """What torch.load's error says went wrong, in one line: with weights_only its first lines are
    advice (to load unsafely) and the reason comes after them."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if not lines[0].startswith("Weights only load failed"):
        return lines[0]
    advice = ("Check the documentation", "Please file an issue")
    reason = next((line for line in lines[1:] if not line.startswith(advice)), "not a state dict of tensors")
    return (f"{reason.rstrip('.')}; only tensors, numbers and containers are read (weights_only=True), "
            "never pickled objects")


def read_trainer_state(ckpt: Path) -> dict:
    return read_pt(ckpt / "trainer.pt")
