"""The public entry point: spec in, CompiledModel out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hrmspec.backends import get_backend
from hrmspec.graph.build import build_graph
from hrmspec.graph.plan import execution_plan
from hrmspec.spec.load import load_spec
from hrmspec.spec.schema import Spec


def compile(  # noqa: A001 - the verb is the API
    spec: str | Path | Spec,
    backend: str = "reference",
    overrides: dict[str, Any] | None = None,
    progress: float = 1.0,
):
    """Load `spec` (a path, a shipped spec's name or a Spec), build its graph and return a
    `CompiledModel` on `backend`. `overrides` maps dotted keys to values exactly like
    `--set` (e.g. {"model.d_model": 256}). `progress` sets the credit plan's training progress."""
    from hrmspec.runtime.execution import CompiledModel  # torch: loaded by those who run models

    loaded = load_spec(spec, overrides)
    ops = get_backend(backend)
    graph = build_graph(loaded, progress)
    plan = execution_plan(graph, fused=ops.fuses)
    model = CompiledModel(plan, ops, graph, backend=backend)
    model.set_progress(progress)
    return model
