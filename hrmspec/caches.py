"""Where compiled code is cached on disk, kept private to the user.

hrmspec's own kernel cache (backends/common/source_cache.py) checks every file against the source it
generates. TorchInductor, which `--backend inductor` and `eval --compile` use, keeps generated Python
and compiled libraries in `/tmp/torchinductor_$USER` by default: a folder in a world-writable place
that another user of the machine can create first and fill. Before the first torch.compile hrmspec
points Inductor at a folder of its own under the user's home (mode 0700), unless
TORCHINDUCTOR_CACHE_DIR already says where.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """~/.cache/hrmspec: the parent of every cache hrmspec keeps."""
    return Path.home() / ".cache" / "hrmspec"


def private_inductor_cache() -> Path | None:
    """Point TorchInductor's on-disk cache at ~/.cache/hrmspec/inductor (made with mode 0700) unless
    TORCHINDUCTOR_CACHE_DIR is set; returns the folder in use, or None when none could be made (then
    Inductor keeps its default)."""
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given:
        return Path(given)
    path = cache_root() / "inductor"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.is_symlink() or path.stat().st_uid != os.getuid():
            return None  # not ours: leave the choice to Inductor
        os.chmod(path, 0o700)
    except OSError:
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


__all__ = ["cache_root", "private_inductor_cache"]
