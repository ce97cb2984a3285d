"""Training checkpoints, written so that a crash never leaves a broken one.

A run directory holds ``checkpoints/step_<N>/`` folders. Each is written in full under a
temporary name, every file fsynced, then renamed into place (a rename is atomic on POSIX), so a
reader sees either the previous set of checkpoints or the new one — never half a checkpoint.
The newest complete folder is the one to resume from; older ones beyond `keep` are pruned, each
first renamed out of the way (to a `.tmp-` name) and then deleted, so a reader sees a checkpoint
whole or not at all. `read_latest` holds the newest one (a shared flock on its trainer.pt) while it
reads it, and pruning skips a checkpoint held (it is pruned at a later save): a reader never sees
its checkpoint vanish, and a checkpoint is damaged only when it is still there and cannot be read.

A save that fails (a full disk: torch and safetensors raise their own errors then) is one
CheckpointError line; its temp folder is removed and the previous checkpoint stays. Nothing is
written through a link: the files go into a folder this save made, and a link named like the
checkpoint, or in place of `checkpoints/`, is removed or refused, never followed.

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

import fcntl
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from hrmspec.errors import CheckpointError
from hrmspec.runtime.artifacts.files import LINK_REFUSED, disk_full, fsync_path, read_tensors, reason
from hrmspec.runtime.artifacts.sharded import is_sharded, read_sharded

PREFIX = "step_"
MARKER = "trainer.pt"  # written last: a folder with it is a complete checkpoint; readers lock it (read_latest)
READ_ATTEMPTS = 8  # checkpoints pruned away while read, in a row, before `read_latest` gives up
T = TypeVar("T")


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
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdecimal()
            and p.is_dir() and (p / "trainer.pt").exists()]
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
    final = root / f"{PREFIX}{step:08d}"
    if root.is_symlink():
        raise CheckpointError(f"{root} {LINK_REFUSED}; no checkpoint is written through it")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = staged if staged is not None else Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {final}: {_failure(e)}") from None
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
        if final.exists() or final.is_symlink():  # the same step from an earlier, interrupted run (or a link)
            _remove(final)
        os.rename(tmp, final)
        fsync_path(root)
    except Exception as e:  # OSError; torch.save's RuntimeError and safetensors' error on a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(run_dir)
        kept = f"; the previous checkpoint {prev} is intact" if prev else ""
        raise CheckpointError(f"could not write checkpoint {final}: {_failure(e)}{kept}") from None
    except BaseException:  # interrupted: no temp folder left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        _prune(old)
    for stale in root.glob(".tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _failure(e: BaseException) -> str:
    """Why a save failed, in one line, saying so when the disk may be full."""
    full = "; the disk may be full" if disk_full(e) else ""
    return f"{reason(e)}{full}"


def _remove(folder: Path) -> None:
    """Delete a checkpoint so that a reader sees it whole or not at all: renamed out of the way (one atomic
    step), then deleted. A link is removed itself, never what it points to."""
    if folder.is_symlink():
        folder.unlink(missing_ok=True)
        return
    shutil.rmtree(_set_aside(folder), ignore_errors=True)


def _set_aside(folder: Path) -> Path:
    """`folder` renamed to a `.tmp-` name (which no reader lists, and the next save deletes); its new path."""
    gone = folder.with_name(f".tmp-pruned-{folder.name}-{os.getpid()}")
    try:
        os.rename(folder, gone)
    except OSError:
        return folder
    return gone


def _prune(folder: Path) -> None:
    """Remove an old checkpoint unless a reader holds it (`read_latest`): then it stays until a later save
    prunes it. The exclusive lock is held while the folder is renamed away, so a reader either holds the
    checkpoint whole or finds it gone."""
    if folder.is_symlink():
        folder.unlink(missing_ok=True)
        return
    try:
        fd = os.open(folder / MARKER, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:  # no marker (or a link in its place): nobody can hold it
        _remove(folder)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # read now: pruned at a later save
            return
        gone = _set_aside(folder)
    finally:
        os.close(fd)  # the lock goes with it: a reader waiting for it finds the checkpoint gone
    shutil.rmtree(gone, ignore_errors=True)


_GONE = -1  # `_hold`: the checkpoint was pruned (or replaced) before it could be held


def _hold(folder: Path) -> int | None:
    """A descriptor of `folder`'s marker holding a shared lock on it: the trainer does not prune a checkpoint
    while a reader holds it. _GONE when the checkpoint was pruned or replaced before the lock was taken,
    None when it cannot be locked here (a read-only copy without lock support): read unheld."""
    try:
        fd = os.open(folder / MARKER, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return _GONE
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # the trainer holds its exclusive lock only while renaming
    except OSError:
        os.close(fd)
        return None
    if not _same(folder, fd):
        os.close(fd)
        return _GONE
    return fd


def _same(folder: Path, fd: int) -> bool:
    """`folder`'s marker is still the file `fd` holds: the checkpoint was neither pruned nor replaced."""
    try:
        now, held = os.stat(folder / MARKER), os.fstat(fd)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def read_latest(run_dir: str | os.PathLike, read: Callable[[Path], T], missing: str | None = None) -> T:
    """`read(folder)` of the run's newest checkpoint, while a trainer may be saving and pruning. The checkpoint
    is held (a shared lock on its marker) while it is read, so the trainer does not prune it then; one pruned
    between being listed and held is skipped for the then-newest, up to READ_ATTEMPTS times. An error while
    reading a checkpoint still there is the checkpoint's (it is damaged), and raised.
    `missing`: the message when the run has no checkpoint."""
    last = None
    for _ in range(READ_ATTEMPTS):
        last = latest_checkpoint(run_dir)
        if last is None:  # none, or the listing missed the newest while the one before it was pruned: again
            continue
        held = _hold(last)
        if held == _GONE:
            continue
        try:
            return read(last)
        except Exception:
            if held is None and not last.is_dir():  # read unheld, and pruned meanwhile
                continue
            if held is not None and not _same(last, held):  # replaced by a save of the same step
                continue
            raise
        finally:
            if held is not None:
                os.close(held)
    if last is None:
        raise CheckpointError(missing or f"no checkpoint in {run_dir}/checkpoints")
    raise CheckpointError(f"{run_dir}: {READ_ATTEMPTS} checkpoints in a row were pruned before they could be read; "
                          "the trainer saves faster than they can be listed: raise train.save_every or train.keep")


def staging_folder_name(run_dir: str | os.PathLike, step: int) -> Path:
    """The temp folder every rank of an FSDP run writes checkpoint `step`'s shards into: a name all
    ranks know without talking."""
    return Path(run_dir) / "checkpoints" / f".tmp-{PREFIX}{step:08d}-shards"


def staging_folder(run_dir: str | os.PathLike, step: int) -> Path:
    """Make that folder, empty (rank 0, before the ranks write)."""
    tmp = staging_folder_name(run_dir, step)
    if tmp.is_symlink():
        tmp.unlink()
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


def check_tensors(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: Path | str,
                  allow_nonfinite: bool = False) -> None:
    """Refuse tensors that do not fit `own` (a model's state dict): a name missing or unexpected, another
    shape, an integer or boolean tensor where the model holds floats (it would be cast without a word), and
    NaN or infinity (a diverged run evaluates to 0% and says nothing) unless `allow_nonfinite`."""
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
        if own[k].is_floating_point() and not t.is_floating_point():
            raise CheckpointError(f"{source}: tensor '{k}' holds {t.dtype}; the model's weights are floating "
                                  f"point ({own[k].dtype}): this is not a checkpoint of this model")
        if not allow_nonfinite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: tensor '{k}' holds {bad} NaN or infinite value{'s' if bad != 1 else ''}"
                                  ": the run diverged before this checkpoint; use an earlier one, or pass "
                                  "--allow-nonfinite to load it anyway")


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path,
                     allow_nonfinite: bool = False) -> None:
    """Load weights once `check_tensors` accepts them."""
    check_tensors(model.state_dict(), tensors, source, allow_nonfinite)
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
    """trainer.pt, its structure checked (a resumed run reads every one of these): step, the data position,
    the RNG states; what a damaged or foreign file lacks is one line naming it."""
    path = ckpt / "trainer.pt"
    state = read_pt(path)

    def need(tree: object, key: str, kind: type | tuple, where: str) -> object:
        value = tree.get(key) if isinstance(tree, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise CheckpointError(f"{path}: '{where}{key}' is missing or not {names}; the checkpoint is damaged or "
                                  "not one hrmspec wrote")
        return value

    for key in ("step",):
        if need(state, key, int, "") < 0:
            raise CheckpointError(f"{path}: 'step' is negative; the checkpoint is damaged")
    data = need(state, "data", dict, "")
    for key in ("epoch", "position"):
        need(data, key, int, "data.")
    rng = need(state, "rng", dict, "")
    need(rng, "torch", torch.Tensor, "rng.")
    numpy_state = need(rng, "numpy", dict, "rng.")
    need(numpy_state, "keys", torch.Tensor, "rng.numpy.")
    need(need(rng, "python", dict, "rng."), "words", torch.Tensor, "rng.python.")
    return state
