"""The spec language: YAML in, a typed and validated `Spec` out. Knows nothing of torch."""

from hrmspec.spec.grammar import INPUT, Statement, parse_statement
from hrmspec.spec.load import load_spec, load_spec_text
from hrmspec.spec.schema import (
    AttentionSpec,
    BlockSpec,
    CreditSpec,
    InitSpec,
    ModelSpec,
    ModuleSpec,
    NormSpec,
    ObjectiveSpec,
    Repeat,
    Spec,
    StateSpec,
)
from hrmspec.spec.shipped import shipped_specs_dir
from hrmspec.spec.source import parse_override

__all__ = [
    "INPUT",
    "AttentionSpec",
    "BlockSpec",
    "CreditSpec",
    "InitSpec",
    "ModelSpec",
    "ModuleSpec",
    "NormSpec",
    "ObjectiveSpec",
    "Repeat",
    "Spec",
    "StateSpec",
    "Statement",
    "load_spec",
    "load_spec_text",
    "parse_override",
    "parse_statement",
    "shipped_specs_dir",
]
