"""Validate a parsed spec document into a typed `Spec`: the entry points `load_spec` and `load_spec_text`.

Every check names file:line:col, the field path, what was expected and what was found, and a
close match for a misspelt name. Unknown keys are errors: a typo must never be silently ignored.

How the pieces fit: `source` parses YAML keeping every location (and applies `extends:` and
`--set` overrides), `fields` reads one mapping with typed, located checks, and one module per
section validates it: `model` (with `block`, `schedule`, `credit`); this module reads the top level
(name, objective, and the free-form train / data / eval mappings). `schema` holds the resulting
dataclasses, `grammar` the schedule statements, `shipped` the specs that come with hrmspec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hrmspec.capabilities import mask_refusal
from hrmspec.spec.fields import Fields, describe
from hrmspec.spec.halting import check_combinations, read_segment_halting, read_steps
from hrmspec.spec.model import read_model
from hrmspec.spec.schema import ObjectiveSpec, Spec, SupervisionSpec
from hrmspec.spec.shipped import resolve_spec_path, shipped_specs_dir
from hrmspec.spec.source import Source, apply_overrides, parse_yaml, read_source

__all__ = ["load_spec", "load_spec_text", "shipped_specs_dir", "spec_from_source"]

_OBJECTIVES = ("task_completion", "lm", "grid")
_LOSSES = ("softmax", "stablemax")


def spec_from_source(src: Source) -> Spec:
    """Validate a parsed document (see `hrmspec.spec.source`) into a `Spec`."""
    top = Fields(src, (), level="the top level")
    if "extends" in src.data:
        top.fail(
            ("extends",), "'extends' needs a spec file to resolve against", "use load_spec(path)", key=True
        )
    name = top.text("name", Path(src.file).stem)
    if len(name) > 100 or not name.isprintable() or any("\ud800" <= ch <= "\udfff" for ch in name):
        top.fail(("name",), f"expected a printable name of at most 100 characters, found {describe(name)}",
                 "letters, digits, '-', '_' and '.' serve best: the name titles checkpoints and logs")
    model = read_model(src, top)
    obj = top.raw("objective", None)
    supervised = top.raw("supervision", None) is not None
    if obj is None or isinstance(obj, str):
        kind = top.choice("objective", _OBJECTIVES, "task_completion")
        objective = ObjectiveSpec(type=kind, steps=read_steps(None, top, model, supervised, kind == "grid"))
    else:
        g = Fields(src, ("objective",), "task_completion, lm, grid or a mapping {type, loss, steps}", "objective")
        kind = g.choice("type", _OBJECTIVES)
        objective = ObjectiveSpec(type=kind, loss=g.choice("loss", _LOSSES, "softmax"),
                                  steps=read_steps(g, top, model, supervised, kind == "grid"))
        g.finish()
    check_combinations(top, model, supervised, objective.type == "grid")
    _check_masks(src, top, model, objective.type)
    supervision = _supervision(src, top)
    sections = {}
    for key in ("train", "data", "eval"):
        v = top.raw(key, {}) or {}
        if not isinstance(v, dict):
            top.fail((key,), f"expected a mapping, found {describe(v)}")
        sections[key] = v
    top.finish()
    return Spec(name=name, model=model, objective=objective, supervision=supervision, source=src.file, raw=src.data,
                **sections)


def _check_masks(src: Source, top: Fields, model, objective: str) -> None:
    """Every module's attention sound under the objective (hrmspec/capabilities.py): no position may see
    the tokens it learns to predict. The error points at the module's mask (or type) where it is written."""
    for mod in model.modules:
        bad = mask_refusal(mod.block.attention, objective)
        if bad is None:
            continue
        candidates = [("model", "modules", mod.name, "attention", k) for k in ("mask", "type")]
        candidates += [("model", "block", "attention", k) for k in ("mask", "type")]
        where = next((p for p in candidates if p in src.values), ("model", "block"))
        top.fail(where, f"module {mod.name}: {bad[0]}", bad[1])


def _supervision(src: Source, top: Fields) -> SupervisionSpec | None:
    """supervision: {segments, halting} — deep supervision over segments (see SupervisionSpec)."""
    if top.raw("supervision", None) is None:
        return None
    f = Fields(src, ("supervision",), "a mapping {segments, halting}", "supervision",
               "e.g. supervision: {segments: 16, halting: q_learning}")
    segments = f.integer("segments", maximum=4096)
    halting = read_segment_halting(src, f)
    f.finish()
    return SupervisionSpec(segments, halting)


def load_spec(spec: str | Path | Spec, overrides: dict[str, Any] | None = None) -> Spec:
    """Load and validate a spec file (following `extends:`), with dotted-key overrides applied.

    `spec` may also be a shipped spec's name (`hrm-text-tiny`) or an already loaded `Spec`
    (overrides are then applied to its resolved document).
    """
    if isinstance(spec, Spec):
        if not overrides:
            return spec
        src = Source(data=spec.raw, file=spec.source)
    else:
        src = read_source(resolve_spec_path(spec))
    return spec_from_source(apply_overrides(src, overrides))


def load_spec_text(text: str, file: str = "<string>", overrides: dict[str, Any] | None = None) -> Spec:
    """Load a spec from YAML text (tests, notebooks)."""
    return spec_from_source(apply_overrides(parse_yaml(text, file), overrides))
