"""Triton's files in the kernel cache (backends/common/source_cache.py): `<kernel name>_<key>.py`,
key = sha256(source, triton version, target)[:16], loaded from the checked text by `load_module`
(compiled and run in a fresh module, never imported: no bytecode is read or written)."""

from __future__ import annotations

import os
from pathlib import Path

from hrmspec.backends.common.source_cache import cache_dir, is_valid, load_module
from hrmspec.backends.common.source_cache import write_source as _write

SUFFIX = ".py"

__all__ = ["cache_dir", "is_valid", "load_kernel", "load_module", "target_tag", "triton_version", "write_source"]


def triton_version() -> str:
    import triton

    return triton.__version__


def target_tag() -> str:
    """What the source will be compiled for: the interpreter, the active GPU, or 'none'."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "interpret"
    try:
        from triton.runtime import driver

        t = driver.active.get_current_target()
        return f"{t.backend}-{t.arch}-{t.warp_size}"
    except Exception:  # no driver or no device: the source is still valid, only the tag differs
        return "none"


def write_source(name: str, source: str, target: str | None = None) -> Path:
    """The cache file holding the Triton module `source`, for `target` (default: this process's)."""
    return _write(name, source, SUFFIX, (triton_version(), target or target_tag()))


def load_kernel(name: str, source: str):
    """Write (if needed) and load the module `source`, and return its function `name`."""
    return getattr(load_module(write_source(name, source)), name)
