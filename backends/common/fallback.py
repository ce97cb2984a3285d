"""Fallbacks: a kernel backend that cannot run an op on some tensors runs the reference op instead,
and says so. A fallback is reported, never silent, and never a wrong result.

Each fallback is reported twice:

- a `UserWarning` ("triton backend: rms_norm: <reason>; running the reference op instead"), once per
  (backend, op, reason) and process, so a training log is not flooded;
- to every `record_fallbacks()` block that is open, on every call:

      with record_fallbacks() as fell:
          model(ids).loss.backward()
      assert not fell, fell          # [Fallback(backend, op, reason), ...]

A test that asserts "nothing falls back" must use the recorder: the warning is not repeated in a
process that has already seen it. Recorders are process-wide (autograd may run a backward in
another thread), so an open recorder also sees the fallbacks of other threads.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Fallback:
    backend: str
    op: str
    reason: str


_recorders: list[list[Fallback]] = []
_warned: set[Fallback] = set()
_lock = threading.Lock()


@contextmanager
def record_fallbacks() -> Iterator[list[Fallback]]:
    """Collect every fallback reported while the block runs, in order."""
    fell: list[Fallback] = []
    with _lock:
        _recorders.append(fell)
    try:
        yield fell
    finally:
        with _lock:  # by identity: an enclosing recorder may hold an equal list
            del _recorders[next(i for i, r in enumerate(_recorders) if r is fell)]


def report_fallback(backend: str, op: str, reason: str, stacklevel: int = 4) -> None:
    """`backend` runs the reference for `op` because of `reason`: record it, and warn the first time."""
    event = Fallback(backend, op, reason)
    with _lock:
        for fell in _recorders:
            fell.append(event)
        first = event not in _warned
        _warned.add(event)
    if first:
        warnings.warn(f"{backend} backend: {op}: {reason}; running the reference op instead", stacklevel=stacklevel)


def forget_warnings() -> None:
    """Warn again for fallbacks already warned about (tests that check the warning itself)."""
    with _lock:
        _warned.clear()


__all__ = ["Fallback", "forget_warnings", "record_fallbacks", "report_fallback"]
