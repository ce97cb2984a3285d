"""The specs shipped with hrmspec (`specs/*.yaml`, installed as the package `hrmspec.specs`).

`shipped_specs_dir` finds their folder; `resolve_spec_path` lets `load_spec("hrm-text-tiny")` name
a shipped spec instead of a file. `hrmspec.spec.source` also lists them to hint at a spec file
that was not found.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def shipped_specs_dir() -> Path:
    """The folder of shipped specs (installed as the package hrmspec.specs)."""
    found = importlib.util.find_spec("hrmspec.specs")
    if found is not None and found.submodule_search_locations:
        return Path(list(found.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[2] / "specs"


def resolve_spec_path(spec: str | Path) -> Path:
    """A file path as given, or a shipped spec's file when `spec` is a bare name such as `hrm-text-tiny`."""
    p = Path(spec)
    if p.exists() or p.suffix in (".yaml", ".yml") or "/" in str(spec):
        return p
    shipped = shipped_specs_dir() / f"{spec}.yaml"
    return shipped if shipped.exists() else p
