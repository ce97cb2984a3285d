"""The kernel cache: generated source in content-addressed files, imported with importlib.

Triton compiles a kernel from the source file its function was defined in (it reads it back
with `inspect`), so source that was `exec`'d cannot be compiled: every kernel is written to

    $HRMSPEC_CACHE (default ~/.cache/hrmspec/kernels) / <kernel name>_<key>.py
    key = sha256(source, triton version, target)[:16]

and imported from there. The file ends with a checksum line of the source above it; a file that
was half written (a crash, a full disk) or edited fails the check and is written again. Writes
go to a temporary file renamed into place, so concurrent processes never see a partial file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

CHECKSUM_PREFIX = "# hrmspec-checksum: "
_loaded: dict[Path, ModuleType] = {}
_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("HRMSPEC_CACHE") or Path.home() / ".cache" / "hrmspec" / "kernels")


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


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def is_valid(path: Path) -> bool:
    """True when the file ends with the checksum of everything before its last line."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    body, _, last = text.rstrip("\n").rpartition("\n")
    return last.startswith(CHECKSUM_PREFIX) and last[len(CHECKSUM_PREFIX):] == _digest(body + "\n")


def write_source(name: str, source: str, target: str | None = None) -> Path:
    """The cache file holding `source` (written, or rewritten if missing or corrupt)."""
    target = target or target_tag()
    key = _digest("\0".join((source, triton_version(), target)))[:16]
    directory = cache_dir()
    path = directory / f"{name}_{key}.py"
    if path.exists() and is_valid(path):
        return path
    directory.mkdir(parents=True, exist_ok=True)
    text = source if source.endswith("\n") else source + "\n"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}_", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + CHECKSUM_PREFIX + _digest(text) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_module(path: Path) -> ModuleType:
    """Import a cache file (once per process)."""
    path = Path(path).resolve()
    with _lock:
        if path not in _loaded:
            mod_name = f"hrmspec_kernel_{path.stem}"
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module  # Triton resolves globals through the function's module
            spec.loader.exec_module(module)
            _loaded[path] = module
        return _loaded[path]


def load_kernel(name: str, source: str):
    """Write (if needed) and import the module `source`, and return its function `name`."""
    return getattr(load_module(write_source(name, source)), name)
