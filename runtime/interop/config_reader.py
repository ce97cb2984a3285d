"""Typed reads of a foreign checkpoint's config, and the spec a converted config makes.

A config is a mapping read from JSON (transformers' config.json) or YAML (HRM's and TRM's
all_config.yaml). `ConfigReader` reads it one key at a time with the type it must have; a value
that does not fit is a CheckpointError naming the file and the key:

    all_config.yaml: arch.hidden_size: expected an integer >= 1, found 'wide'

`spec_from_document` validates the spec document built from a config, as `load_spec` would, and
turns a SpecError into a CheckpointError (a config hrmspec cannot run is the checkpoint's problem).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import yaml

from hrmspec.errors import CheckpointError, SpecError
from hrmspec.spec.load import load_spec_text
from hrmspec.spec.schema import Spec
from hrmspec.spec.source import quoted


def finite_number(v: Any) -> bool:
    """A number a float holds: not a bool, NaN, an infinity or an integer too large for a float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


class ConfigReader:
    """Typed reads of a config mapping. `defaults` fill keys that are missing or null (as the
    config's own code would); `prefix` is how errors name the mapping's keys (`arch.`)."""

    def __init__(self, config: Mapping[str, Any], source: str, defaults: Mapping[str, Any] | None = None,
                 prefix: str = ""):
        self.config, self.source, self.defaults, self.prefix = config, source, defaults or {}, prefix

    def fail(self, key: str, message: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {self.prefix}{key}: {message}")

    def get(self, key: str) -> Any:
        v = self.config.get(key)
        return self.defaults.get(key) if v is None else v

    def required(self, key: str) -> Any:
        v = self.get(key)
        if v is None:
            raise self.fail(key, "missing; the file is not a complete config of this model")
        return v

    def integer(self, key: str, minimum: int = 1) -> int:
        v = self.required(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.fail(key, f"expected an integer >= {minimum}, found {quoted(v)}")
        return v

    def number(self, key: str, maximum: float = math.inf) -> float:
        v = self.required(key)
        if not finite_number(v) or not 0 <= v <= maximum:
            bound = "a non-negative number" if maximum == math.inf else f"a number in [0, {maximum:g}]"
            raise self.fail(key, f"expected {bound}, found {quoted(v)}")
        return float(v)

    def boolean(self, key: str) -> bool:
        v = self.required(key)
        if not isinstance(v, bool):
            raise self.fail(key, f"expected true or false, found {quoted(v)}")
        return v

    def text(self, key: str) -> str:
        v = self.required(key)
        if not isinstance(v, str):
            raise self.fail(key, f"expected a string, found {quoted(v)}")
        return v


def spec_from_document(doc: dict, source: str) -> Spec:
    """The Spec of a document converted from the config in `source`; CheckpointError if it is not valid."""
    try:
        return load_spec_text(yaml.safe_dump(doc, sort_keys=False), file=f"<spec converted from {source}>")
    except SpecError as e:
        hint = f" ({e.hint})" if e.hint else ""
        raise CheckpointError(f"{source}: the config does not make a valid spec: {e.path}: {e.message}{hint}") from None


__all__ = ["ConfigReader", "finite_number", "spec_from_document"]
