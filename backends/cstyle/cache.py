"""Generated C-style source in content-addressed files, the same scheme as the Triton cache:

    $HRMSPEC_CACHE (default ~/.cache/hrmspec/kernels) / <kernel name>_<key><.cu | .cl>
    key = sha256(source, dialect, toolchain tag)[:16]

What is compiled is the file's text, so a kernel on a device can always be traced back to the
file that produced it. The file ends with a `// hrmspec-checksum: <sha256>` comment of the text
above it (a C comment in both dialects); a half-written or edited file fails the check and is
written again. Writes go to a temporary file renamed into place, so concurrent processes never
read a partial file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from hrmspec.backends.triton.cache import cache_dir

__all__ = ["CHECKSUM_PREFIX", "cache_dir", "is_valid", "source_key", "write_source"]

CHECKSUM_PREFIX = "// hrmspec-checksum: "


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def source_key(source: str, dialect: str, tag: str) -> str:
    return _digest("\0".join((source, dialect, tag)))[:16]


def is_valid(path: Path) -> bool:
    """True when the file ends with the checksum of everything before its last line."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return False
    body, _, last = text.rstrip("\n").rpartition("\n")
    return last.startswith(CHECKSUM_PREFIX) and last[len(CHECKSUM_PREFIX):] == _digest(body + "\n")


def write_source(name: str, source: str, dialect: str, suffix: str, tag: str = "") -> Path:
    """The cache file holding `source` (written, or rewritten if missing or corrupt). `tag` names
    the toolchain that will compile it (a compiler version, a device), so each gets its own file."""
    path = cache_dir() / f"{name}_{source_key(source, dialect, tag)}{suffix}"
    if path.exists() and is_valid(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    text = source if source.endswith("\n") else source + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}_", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + CHECKSUM_PREFIX + _digest(text) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
