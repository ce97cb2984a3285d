"""The kernel cache: generated source in content-addressed files, one implementation for every backend.

What a device compiles is the text of a file, so a kernel can always be traced back to the file
that produced it (Triton even requires it: it compiles a kernel from the source of the file its
function was defined in, read back with `inspect`). Every generated source is written to

    $HRMSPEC_CACHE (default ~/.cache/hrmspec/kernels) / <kernel name>_<key><suffix>
    key = sha256(source, *key parts)[:16]

where the key parts name what compiles it (Triton: its version and the target; C: the dialect
and the toolchain), so each toolchain gets its own file. The file ends with a checksum line of the
text above it, a comment in the file's language (`# hrmspec-checksum: ...` in Python,
`// hrmspec-checksum: ...` in C). Before a file is used it is compared, byte for byte, with the
text just generated for it: a half-written (a crash, a full disk) or edited file — even one whose
checksum line was edited to match — is written again, and so is anything that is not a regular
file (a symlink is replaced, never read or written through). Writes go to a temporary file renamed
into place, so concurrent processes never read a partial file.

Nothing from disk runs as code. The cache file is where a kernel's text lives for the compilers
and for tracebacks, but what is compiled is the text this process generated and compared
(`verified_text`), never the file read again later: `load_module` compiles that text with
`compile()` into a fresh module, registers it with `linecache` under the file's name (so `inspect`,
and through it Triton, reads the same text) and never goes through the import system, whose
bytecode lookup would prefer a `.pyc` planted in `__pycache__`. No bytecode is written either.
"""

from __future__ import annotations

import hashlib
import linecache
import os
import stat
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from hrmspec.errors import HrmspecError

CHECKSUM = "hrmspec-checksum: "
COMMENT = {".py": "# ", ".cu": "// ", ".cl": "// ", ".c": "// "}  # how a line comment starts, by file suffix

MAX_SOURCE = 1 << 24  # bytes: far above any generated kernel; a bigger cache file is never read whole

_verified: dict[Path, str] = {}  # cache file -> the text this process generated and wrote or compared
_loaded: dict[Path, ModuleType] = {}
_lock = threading.Lock()


class CacheError(HrmspecError):
    """The kernel cache folder cannot be written (HRMSPEC_CACHE is under a file, or read-only)."""


def cache_dir() -> Path:
    return Path(os.environ.get("HRMSPEC_CACHE") or Path.home() / ".cache" / "hrmspec" / "kernels")


def checksum_prefix(suffix: str) -> str:
    """What the last line of a cache file with this suffix starts with."""
    return COMMENT[suffix] + CHECKSUM


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def source_key(source: str, key: Sequence[str]) -> str:
    return _digest("\0".join((source, *key)))[:16]


def _read_file(path: Path, limit: int) -> str | None:
    """The text of `path` when it is a regular file of at most `limit` bytes; None otherwise (missing,
    a symlink, a fifo or a folder, too big, unreadable, not UTF-8). A symlink is not followed."""
    try:
        # O_NONBLOCK: a fifo planted in place of a kernel file must not hang the open
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1).decode()
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


def is_valid(path: Path) -> bool:
    """True when the file ends with the checksum of everything before its last line."""
    path = Path(path)
    text = _read_file(path, MAX_SOURCE)
    if text is None:
        return False
    body, _, last = text.rstrip("\n").rpartition("\n")
    prefix = checksum_prefix(path.suffix)
    return last.startswith(prefix) and last[len(prefix):] == _digest(body + "\n")


def _cannot_write(path: Path, e: OSError) -> CacheError:
    """The one-line error for a cache file that cannot be written, naming the setting that chose its folder."""
    folder = path.parent
    why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror or str(e)
    if os.environ.get("HRMSPEC_CACHE"):
        return CacheError(f"HRMSPEC_CACHE={os.environ['HRMSPEC_CACHE']!r}: cannot write {path.name} in the kernel "
                          f"cache folder {folder}: {why}")
    return CacheError(f"cannot write {path.name} in the kernel cache folder {folder}: {why} (set HRMSPEC_CACHE to "
                      "another folder)")


def write_source(name: str, source: str, suffix: str, key: Sequence[str]) -> Path:
    """The cache file holding `source` (written, or rewritten if missing, corrupt or not a regular
    file); `key` names what will compile it (see the module docstring). `verified_text` gives
    the text from now on."""
    path = cache_dir() / f"{name}_{source_key(source, key)}{suffix}"
    text = source if source.endswith("\n") else source + "\n"
    expected = text + checksum_prefix(suffix) + _digest(text) + "\n"
    if _read_file(path, len(expected.encode())) != expected:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}_", suffix=".tmp")
        except OSError as e:
            raise _cannot_write(path, e) from e
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(expected)
            os.replace(tmp, path)  # replaces a symlink itself, never what it points to
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise _cannot_write(path, e) from e
            raise
    _verified[path] = expected
    return path


def verified_text(path: Path) -> str:
    """The text of a cache file as `write_source` generated and checked it in this process. What
    is on disk now is not read: it may have been changed since."""
    try:
        return _verified[Path(path)]
    except KeyError:
        raise ValueError(f"{path} was not written by write_source in this process; refusing to use it") from None


def load_module(path: Path) -> ModuleType:
    """The Python cache file `path` (from `write_source`) as a module, once per process: its
    checked text compiled and run in a fresh module, never imported (no bytecode read or written)."""
    path = Path(path)
    with _lock:
        if path not in _loaded:
            text = verified_text(path)
            filename = str(path)
            # inspect (and Triton, which reads a kernel's source through it) asks linecache for the
            # file's lines: give it this text; an mtime of None keeps checkcache from rereading the disk
            linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
            code = compile(text, filename, "exec", dont_inherit=True)
            mod_name = f"hrmspec_kernel_{path.stem}"
            module = ModuleType(mod_name)
            module.__file__ = filename
            sys.modules[mod_name] = module  # Triton resolves globals through the function's module
            try:
                exec(code, module.__dict__)
            except BaseException:
                del sys.modules[mod_name]
                raise
            _loaded[path] = module
        return _loaded[path]


__all__ = ["CHECKSUM", "COMMENT", "CacheError", "cache_dir", "checksum_prefix", "is_valid", "load_module",
           "source_key", "verified_text", "write_source"]
