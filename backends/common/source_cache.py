"""The kernel cache: generated source in content-addressed files, one implementation for every backend.

What a device compiles is the text of a file, so a kernel can always be traced back to the file
that produced it (Triton even requires it: it compiles a kernel from the source file its function
was defined in, read back with `inspect`, so source that was `exec`'d cannot be compiled). Every
generated source is written to

    $HRMSPEC_CACHE (default ~/.cache/hrmspec/kernels) / <kernel name>_<key><suffix>
    key = sha256(source, *key parts)[:16]

where the key parts name what compiles it (Triton: its version and the target; C: the dialect
and the toolchain), so each toolchain gets its own file. The file ends with a checksum line of the
text above it, a comment in the file's language (`# hrmspec-checksum: ...` in Python,
`// hrmspec-checksum: ...` in C). Before a file is used it is compared, byte for byte, with the
text just generated for it: a half-written (a crash, a full disk) or edited file — even one whose
checksum line was edited to match — is written again, so nothing from the cache runs unless it is
exactly what hrmspec generated in this process. Writes go to a temporary file renamed into place, so concurrent
processes never read a partial file. `load_module` imports a Python cache file (Triton's kernels).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

CHECKSUM = "hrmspec-checksum: "
COMMENT = {".py": "# ", ".cu": "// ", ".cl": "// ", ".c": "// "}  # how a line comment starts, by file suffix

_loaded: dict[Path, ModuleType] = {}
_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("HRMSPEC_CACHE") or Path.home() / ".cache" / "hrmspec" / "kernels")


def checksum_prefix(suffix: str) -> str:
    """What the last line of a cache file with this suffix starts with."""
    return COMMENT[suffix] + CHECKSUM


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def source_key(source: str, key: Sequence[str]) -> str:
    return _digest("\0".join((source, *key)))[:16]


def is_valid(path: Path) -> bool:
    """True when the file ends with the checksum of everything before its last line."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    body, _, last = text.rstrip("\n").rpartition("\n")
    prefix = checksum_prefix(path.suffix)
    return last.startswith(prefix) and last[len(prefix):] == _digest(body + "\n")


def write_source(name: str, source: str, suffix: str, key: Sequence[str]) -> Path:
    """The cache file holding `source` (written, or rewritten if missing or corrupt); `key` names
    what will compile it (see the module docstring)."""
    path = cache_dir() / f"{name}_{source_key(source, key)}{suffix}"
    text = source if source.endswith("\n") else source + "\n"
    expected = text + checksum_prefix(suffix) + _digest(text) + "\n"
    try:
        if path.read_text() == expected:
            return path
    except (OSError, UnicodeDecodeError):
        pass  # missing or unreadable: written below
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}_", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(expected)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_module(path: Path) -> ModuleType:
    """Import a Python cache file (once per process)."""
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


__all__ = ["CHECKSUM", "COMMENT", "cache_dir", "checksum_prefix", "is_valid", "load_module", "source_key",
           "write_source"]
