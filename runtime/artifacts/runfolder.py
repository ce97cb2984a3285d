"""A run folder is one run's, and a stopped run can always be continued.

    lock        the trainer holds an exclusive lock on `<out>/.lock` (fcntl.flock) while it runs;
                a second trainer on the same folder stops at once with one line naming the first.
                The lock file is opened with O_NOFOLLOW and never truncated: a link in its place
                is refused, and nothing outside the folder is ever emptied
    jail        every file the run writes into its folder is written through a temp file renamed
                over it, or (metrics.jsonl, .lock) opened with O_NOFOLLOW: a symbolic link planted
                in the folder is replaced or refused, its target never written (files.py)
    where       --out may not be the filesystem root, the home folder, an hrmspec checkpoint, a
                run's checkpoints/ or a folder of other files (`check_out_folder`)
    refuse      a new run (no --resume) into a folder that holds a run's checkpoints or metrics is
                refused; `--overwrite` deletes them first (only them: other files stay)
    signals     SIGTERM (what schedulers send) and SIGINT (Ctrl-C) stop training after the step in
                flight, write a checkpoint of it, and exit 143 / 130; `--resume` continues from it

Under torchrun rank 0 holds the lock and writes; every rank stops at the same step (the stop flag
is all-reduced each step).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import threading
from pathlib import Path

from hrmspec.runtime.artifacts import checkpoint as ckpt
from hrmspec.runtime.artifacts.config import TrainError
from hrmspec.runtime.artifacts.files import LINK_REFUSED, RUN_FOLDER, open_lock_nofollow, protected_folder

LOCK = ".lock"
HOLDER_BYTES = 64  # the lock file's content: "pid N", padded, overwritten in place
# what a run writes and --overwrite deletes, with RUN_FOLDERS
RUN_FILES = ("metrics.jsonl", "eval.json", "readout.json", "wandb-id.txt")
RUN_FOLDERS = ("checkpoints", "tensorboard", "wandb")  # the event files too: the new run's steps are not shown twice


class TrainInterrupted(TrainError):
    """Training stopped by a signal after writing a checkpoint; the CLI exits 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class RunLock:
    """An exclusive lock on a run folder for the life of a trainer (released by `release` or at exit)."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.fd: int | None = open_lock_nofollow(self.path)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self.fd, HOLDER_BYTES, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise TrainError(f"{out} is in use by a trainer ({holder}): wait for it to finish, or train into "
                                 "another --out") from None
            raise
        # overwritten in place, never truncated: the holder's line padded to the bytes a reader reads
        os.pwrite(self.fd, f"pid {os.getpid()}".ljust(HOLDER_BYTES).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def check_out_folder(out: Path) -> None:
    """Refuse an --out that is no place for a run, before anything is written into it: the filesystem root,
    the home folder, an hrmspec checkpoint, a run's checkpoints/ folder, or an existing folder of other
    files (one with entries but no run in it: a new run starts in a new or empty folder)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder")
    if out.is_symlink() and not out.exists():
        raise TrainError(f"--out {out} {LINK_REFUSED}")
    why = protected_folder(out)
    if why == RUN_FOLDER or not out.is_dir():
        return
    if why:
        raise TrainError(f"--out {out} is {why}, not a place for a run: train into a new folder")
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise TrainError(f"--out {out} cannot be read: {e.strerror}") from None
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise TrainError(f"--out {out} is a folder of other files ({len(entries)}: {shown}), not a run folder: "
                         "train into a new or empty folder")


def check_new_run(out: Path, overwrite: bool) -> None:
    """Refuse to start a new run over an existing one, unless `overwrite` (then delete its files).
    A link in place of one of them is removed itself, never what it points to."""
    found = ckpt.list_checkpoints(out)
    metrics = out / "metrics.jsonl"
    if not found and not metrics.is_symlink() and not (metrics.exists() and metrics.stat().st_size):
        return
    if not overwrite:
        what = f"checkpoints up to {found[-1].name}" if found else "a metrics.jsonl"
        raise TrainError(f"{out} already holds a run ({what}): continue it with --resume, or start afresh with "
                         "--overwrite (deletes its checkpoints and metrics)")
    for folder in RUN_FOLDERS:
        if (out / folder).is_symlink():
            (out / folder).unlink()
        else:
            shutil.rmtree(out / folder, ignore_errors=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for labelled in out.glob("eval-*.json"):  # one evaluation per configuration (eval-full.json, ...)
        labelled.unlink(missing_ok=True)


class StopSignals:
    """While active, SIGTERM and SIGINT only set `received`; the loop stops at the end of the step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._note)
        return self

    def _note(self, signum, frame) -> None:
        if self.received is not None:  # a second one: act as if the run had not caught the first
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = signum

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


__all__ = ["RunLock", "StopSignals", "TrainInterrupted", "check_new_run", "check_out_folder"]
