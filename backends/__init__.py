"""Backends: one folder per target. `get_backend(name)` returns the op table a CompiledModel runs on."""

from __future__ import annotations

from hrmspec.errors import HrmspecError

BACKENDS = ("reference",)


def get_backend(name: str):
    """The ops of backend `name` (only `reference` so far: torch ops evaluating the graph)."""
    if name == "reference":
        from hrmspec.backends.reference import ops

        return ops
    from hrmspec.errors import close_match

    raise HrmspecError(
        f"unknown backend '{name}'; available: {', '.join(BACKENDS)}" + (f" ({close_match(name, BACKENDS)})"
                                                                         if close_match(name, BACKENDS) else "")
    )
