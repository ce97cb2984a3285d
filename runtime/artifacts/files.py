"""Files that a crash cannot leave half-written, that never write through a link, and readers that turn
damage into clear errors.

A run or output folder is a jail: nothing written into it follows a symbolic link planted there (a
shared or downloaded run folder may hold one, pointing at any file its user can write).

    atomic_write          a temp file made beside the target (O_CREAT|O_EXCL|O_NOFOLLOW), written, fsynced
                          and renamed over it: a link in its place is replaced, its target never touched
    open_append_nofollow  a file appended to (metrics.jsonl): opened with O_NOFOLLOW, a link refused
    open_lock_nofollow    a lock file: opened with O_NOFOLLOW and never truncated, a link refused
    output_folder         a folder a command writes into: not a file, not the filesystem root or the
                          home folder, not a checkpoint, a run folder or the command's input; made
                          when missing
    writing               a failed write (a read-only folder, a full disk: an OSError, torch's or
                          safetensors' own error) as one line naming the file
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

from safetensors import SafetensorError

if TYPE_CHECKING:  # torch is loaded by the functions that write tensors: plot and the CLI start without it
    import torch

from hrmspec.errors import CheckpointError, HrmspecError, SpecError
from hrmspec.spec.source import read_json as read_bounded

LINK_REFUSED = "is a symbolic link; a run folder's files must be regular files"
CHECKPOINT_FILES = ("spec.yaml", "model.safetensors")  # together: an hrmspec checkpoint (convert.py)
RUN_MARKERS = (".lock", "metrics.jsonl", "checkpoints")  # any of them: a run folder (runfolder.py)
RUN_FOLDER = "a training run's folder"
CHECKPOINT = "an hrmspec checkpoint"
INSIDE_CHECKPOINTS = "inside the checkpoints of the run"


class OutputError(HrmspecError):
    """A file or folder that must not, or cannot, be written: a planted link, a checkpoint, a read-only folder."""


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entry list is what makes a rename durable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # not supported on every platform, or a link: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def reason(e: BaseException) -> str:
    """What went wrong, in one line: an OSError's strerror, else the first line of the message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def disk_full(e: BaseException) -> bool:
    """An error a full disk (or quota) raises: ENOSPC / EDQUOT, or torch's and safetensors' own write failures,
    which do not say why."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return isinstance(e, (RuntimeError, SafetensorError))


def refuse_link(path: Path) -> None:
    """One line when `path` is a symbolic link (a file of a run folder must be the folder's own)."""
    if Path(path).is_symlink():
        raise OutputError(f"{path} {LINK_REFUSED}")


def _temp_beside(path: Path) -> Path:
    """A new, empty regular file in `path`'s folder, made by this call: O_EXCL fails on any existing name
    (a planted link included) and O_NOFOLLOW never opens through one."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, flags, 0o644))
            return tmp
        except FileExistsError:
            continue


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write` a temp file beside `path`, fsync it, then rename it over `path`: a reader (or a
    crash) sees the old file or the new one, never half of one. A link at `path` is replaced by the
    new file (`os.replace` renames over the link itself); its target is never opened."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        write(tmp)
        if not stat.S_ISREG(os.lstat(tmp).st_mode):  # swapped for something else while written
            raise OutputError(f"{tmp} {LINK_REFUSED}")
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def _open_nofollow(path: Path, flags: int) -> int:
    """A descriptor of the regular file `path` (made when missing), never through a link; a file with other
    hard links (a name for a file outside the folder) is refused too."""
    path = Path(path)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NONBLOCK", 0), 0o644)  # a planted FIFO must not block the open
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            raise OutputError(f"{path} {LINK_REFUSED}") from None
        raise OutputError(f"cannot open {path}: {reason(e)}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        what = "has other hard links" if stat.S_ISREG(st.st_mode) else "is not a regular file"
        raise OutputError(f"{path} {what}; a run folder's files must be its own regular files")
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)
    return fd


def open_append_nofollow(path: Path) -> IO[str]:
    """`path` opened for appending text (metrics.jsonl), refusing a link in its place."""
    return os.fdopen(_open_nofollow(path, os.O_WRONLY | os.O_APPEND), "a", encoding="utf-8")


def open_lock_nofollow(path: Path) -> int:
    """A read-write descriptor of the lock file `path`, refusing a link in its place. Never truncated
    (no O_TRUNC): whatever the file is, its content is only overwritten in place by its holder."""
    return _open_nofollow(path, os.O_RDWR)


def is_checkpoint(folder: Path) -> bool:
    """An hrmspec checkpoint: spec.yaml with model.safetensors, or a training checkpoint (trainer.pt)."""
    folder = Path(folder)
    return all((folder / f).exists() for f in CHECKPOINT_FILES) or (folder / "trainer.pt").exists()


def is_run_folder(folder: Path) -> bool:
    return any((Path(folder) / m).exists() or (Path(folder) / m).is_symlink() for m in RUN_MARKERS)


def _inside_checkpoints(path: Path) -> Path | None:
    """The run folder whose checkpoints/ folder holds `path` (or is it), else None."""
    for up in (path, *path.parents):
        if up.name == "checkpoints" and (is_run_folder(up.parent) or any(up.glob("step_*"))):
            return up.parent
    return None


def protected_folder(path: Path) -> str:
    """Why nothing may be written into `path` ('' when it may): the filesystem root, the home folder, a
    checkpoint, a run folder or a run's checkpoints/."""
    path = Path(path)
    try:
        real = path.resolve()
    except (OSError, RuntimeError):
        return ""
    if real == Path(real.anchor):
        return "the filesystem root"
    if real == Path.home().resolve():
        return "your home folder"
    run = _inside_checkpoints(real)
    if run is not None:
        return f"{INSIDE_CHECKPOINTS} {run}"
    if real.is_dir() and is_checkpoint(real):
        return CHECKPOINT
    if real.is_dir() and is_run_folder(real):
        return RUN_FOLDER
    return ""


def check_output_folder(path: str | os.PathLike, what: str = "--out", source: str | os.PathLike | None = None) -> Path:
    """Refuse (one line) a folder a command is to write its files into when it is a file, a link to none,
    the filesystem root, the home folder, an hrmspec checkpoint, a run folder, inside a run's checkpoints,
    or the folder of `source` (what the command reads): an output never overwrites one."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise OutputError(f"{what} {path} {LINK_REFUSED}")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    if source is not None and path.exists():
        src = Path(source).resolve()
        if path.resolve() in (src, src.parent if src.is_file() else src):
            raise OutputError(f"{what} {path} is where {source} is read from; an output never overwrites its "
                              "input: write to a new folder")
    why = protected_folder(path)
    if why:
        raise OutputError(f"{what} {path} is {why}; an output never overwrites it: write to a new folder")
    return path


def output_folder(path: str | os.PathLike, what: str = "--out", source: str | os.PathLike | None = None) -> Path:
    """`check_output_folder`, then the folder made when missing (a failure is one line naming it)."""
    path = check_output_folder(path, what, source)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot create the folder ({reason(e)})") from None
    return path


@contextmanager
def replacing(path: str | os.PathLike, what: str = "--out", source: str | os.PathLike | None = None):
    """What `--overwrite` does to an output folder: yields a new, empty folder beside `path` to write into; when
    the block ends without an error, the new folder takes `path`'s place whole (the old one moved aside, then
    deleted), so no file of the old output survives next to the new ones, and a failure leaves the old folder
    as it was. A missing `path` is yielded as it is. Refused (one line) as `check_output_folder` refuses,
    except an hrmspec checkpoint folder of its own (what an import replaces): never the input, a run folder,
    a run's checkpoints, the filesystem root or the home folder."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        yield path
        return
    if path.is_symlink():
        raise OutputError(f"{what} {path} {LINK_REFUSED}")
    if not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    if source is not None:
        src = Path(source).resolve()
        if path.resolve() in (src, src.parent if src.is_file() else src, *src.parents):
            raise OutputError(f"{what} {path} holds {source}, which is read; --overwrite never replaces an input")
    why = protected_folder(path)
    if why and why != CHECKPOINT:
        raise OutputError(f"{what} {path} is {why}; --overwrite replaces a checkpoint or a folder of files, "
                          "never that: write to a new folder")
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    fresh, old = path.parent / f".{path.name}.new-{tag}", path.parent / f".{path.name}.old-{tag}"
    with writing(fresh):
        fresh.mkdir()
    try:
        yield fresh
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    with writing(path):
        os.rename(path, old)
        os.rename(fresh, path)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def writing(path: str | os.PathLike):
    """Turn a failure while writing `path` (a read-only folder, a full disk: an OSError, or torch's and
    safetensors' own errors) into one line naming it."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        full = "; the disk may be full" if disk_full(e) else ""
        raise OutputError(f"cannot write {path}: {reason(e)}{full}") from None


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], atomic: bool = True) -> None:
    """safetensors file of `tensors` (moved to CPU)."""
    from safetensors.torch import save_file

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
        refuse_link(path)
        save_file(own, str(path), metadata={"format": "pt"})


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint file {path}: not a readable safetensors file ({e})") from None


def read_json(path: Path, max_bytes: int = 64 << 20, max_values: int = 2_000_000) -> dict:
    """A JSON object from a checkpoint or a model folder (config.json, a shard index), read with the
    spec reader's bounds on size, values and nesting (hrmspec/spec/source.py): a hostile file is one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        data = read_bounded(path, max_bytes=max_bytes, max_values=max_values)
    except SpecError as e:
        raise CheckpointError(str(e).splitlines()[0]) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
