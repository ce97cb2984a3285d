"""The public entry point: spec in, CompiledModel out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hrmspec.backends import get_backend
from hrmspec.errors import HrmspecError
from hrmspec.graph.analysis import analyse
from hrmspec.graph.build import build_graph
from hrmspec.graph.plan import execution_plan
from hrmspec.spec.load import load_spec
from hrmspec.spec.schema import Spec


class MemoryLimitError(HrmspecError):
    """A model that would not fit in this machine's memory."""


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(need: int, what: str) -> None:
    """Refuse to allocate `need` bytes of `what` when the machine has less available."""
    have = available_bytes()
    if have is not None and need > have:
        raise MemoryLimitError(f"{what} need {need / 2**30:.1f} GiB but this machine has {have / 2**30:.1f} GiB "
                               "available; `hrmspec show` gives the sizes without allocating them")


def compile(  # noqa: A001 - the verb is the API
    spec: str | Path | Spec,
    backend: str = "reference",
    overrides: dict[str, Any] | None = None,
    progress: float = 1.0,
    *,
    copies: int = 1,
    copies_are: str = "fp32 weights",
):
    """Load `spec` (a path, a shipped spec's name or a Spec), build its graph and return a
    `CompiledModel` on `backend`. `overrides` maps dotted keys to values exactly like
    `--set` (e.g. {"model.d_model": 256}). `progress` sets the credit plan's training progress.
    Before any weight is allocated, `copies` fp32 copies of the parameters (`copies_are` says what
    they are: training adds gradients, optimizer moments, the EMA) must fit in available memory."""
    from hrmspec.runtime.execution import CompiledModel  # torch: loaded by those who run models

    loaded = load_spec(spec, overrides)
    ops = get_backend(backend)
    graph = build_graph(loaded, progress)
    check_memory(analyse(graph).params * 4 * copies, f"the {copies_are} of {loaded.name}")
    plan = execution_plan(graph, fused=ops.fuses)
    model = CompiledModel(plan, ops, graph, backend=backend)
    model.set_progress(progress)
    return model
