"""Progress for the slow steps before a run's first step: generating data, training a tokenizer,
compiling. Off by default (a library call prints nothing); the `train` and `compare` commands turn it on.

On a terminal each step is a live spinner that ends in one line with its time; in a log (not a
terminal) the same line is printed when the step ends. Lines go to stdout: stderr holds only errors.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

_enabled = False


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


@contextmanager
def shown() -> Iterator[None]:
    """Progress on for the duration (a command), off again after it, whatever it was before."""
    global _enabled
    was, _enabled = _enabled, True
    try:
        yield
    finally:
        _enabled = was


@contextmanager
def step(what: str) -> Iterator[None]:
    """Report `what` (e.g. "generating 10,000 training samples of basic_arithmetic") while it runs, then
    how long it took; nothing when progress is off or the step fails (the error says enough)."""
    if not _enabled:
        yield
        return
    start = time.perf_counter()
    if sys.stdout.isatty():
        console = Console()
        with console.status(f"{what} ..."):
            yield
        console.print(f"{what}: {time.perf_counter() - start:.1f} s")
    else:
        yield
        print(f"{what}: {time.perf_counter() - start:.1f} s", flush=True)


__all__ = ["enable", "enabled", "shown", "step"]
