"""A run folder is one run's, and a stopped run can always be continued.

    lock        the trainer holds an exclusive lock on `<out>/.lock` (fcntl.flock) while it runs;
                a second trainer on the same folder stops at once with one line naming the first
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

LOCK = ".lock"
RUN_FILES = ("metrics.jsonl", "eval.json")  # what a run writes and --overwrite deletes, with RUN_FOLDERS
RUN_FOLDERS = ("checkpoints", "tensorboard")  # the event files too: the new run's steps are not shown twice


class TrainInterrupted(TrainError):
    """Training stopped by a signal after writing a checkpoint; the CLI exits 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class RunLock:
    """An exclusive lock on a run folder for the life of a trainer (released by `release` or at exit)."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise TrainError(f"{out} is in use by a trainer ({holder}): wait for it to finish, or train into "
                                 "another --out") from None
            raise
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()}".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def check_new_run(out: Path, overwrite: bool) -> None:
    """Refuse to start a new run over an existing one, unless `overwrite` (then delete its files)."""
    found = ckpt.list_checkpoints(out)
    metrics = out / "metrics.jsonl"
    if not found and not (metrics.exists() and metrics.stat().st_size):
        return
    if not overwrite:
        what = f"checkpoints up to {found[-1].name}" if found else "a metrics.jsonl"
        raise TrainError(f"{out} already holds a run ({what}): continue it with --resume, or start afresh with "
                         "--overwrite (deletes its checkpoints and metrics)")
    for folder in RUN_FOLDERS:
        shutil.rmtree(out / folder, ignore_errors=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


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


__all__ = ["RunLock", "StopSignals", "TrainInterrupted", "check_new_run"]
