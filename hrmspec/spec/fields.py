"""Reading one mapping of a spec document, with the error messages every section shares.

`Fields` wraps one mapping of a parsed `Source` (see `hrmspec.spec.source`): its typed getters
(`integer`, `number`, `boolean`, `choice`, `text`) check a value and, when it is wrong, raise a
`SpecError` naming file:line:col, the field path, what was expected and what was found. `finish`
then rejects every key that was not read, so a typo is never silently ignored. The section
validators (`block`, `schedule`, `credit`, `model`, `load`) are written in terms of it.

The tables here drive the hints: `_KEYS` lists the keys of each kind of mapping, so a key written
at the wrong level ('mlp' under model instead of model.block) is pointed to where it belongs;
`_RESERVED` names keys the language will grow into; `_EXAMPLES` shows what a missing required key
holds.
"""

from __future__ import annotations

import math
from typing import Any

from hrmspec.errors import SpecError, close_match
from hrmspec.halting import HALTING
from hrmspec.spec.source import PathT, Source, dotted

REQUIRED = object()  # the default of a getter whose key must be present

# The keys of each kind of mapping, for "did you mean" hints across levels ('mlp' written under
# model instead of model.block) and to tell a misspelt required key from a valid optional one.
_KEYS: dict[str, tuple[str, ...]] = {
    "the top level": ("name", "extends", "model", "objective", "supervision", "train", "data", "eval"),
    "model": tuple(
        "vocab d_model heads head_dim ffn expansion max_seq_len final_norm block modules states schedule "
        "output head init embed_scale credit puzzle positions halting".split()
    ),
    "model.halting": ("type", *sorted({p.name for k in HALTING.values() if k.scope == "step" for p in k.params})),
    "model.puzzle": ("identifiers", "dim", "positions"),
    "supervision": ("segments", "halting"),
    "supervision.halting": ("type", *sorted({p.name for k in HALTING.values() if k.scope == "segment"
                                             for p in k.params})),
    "model.block": ("norm", "attention", "mlp"),
    "model.block.norm": ("type", "eps", "affine", "place", "expr", "params"),
    "model.block.attention": ("type", "rope_theta", "mask", "bias", "qk_bias"),
    "model.modules.<name>": ("layers", "exit_norm", "ffn", "expansion", "norm", "attention", "mlp"),
    "model.states.<name>": ("init",),
    "model.schedule (a repeat block)": ("repeat", "do"),
    "model.init": ("type", "std"),
    "model.credit": ("depth", "last", "per_cycle", "truncate", "priority"),
    "model.credit.depth": ("from", "to", "warmup"),
    "objective": ("type", "loss", "steps"),
}

# Keys the language will grow into; written today, they say so instead of "unknown key".
_RESERVED = {
    "model": {
        "prelude": "layers before the recurrence: write a module called once, outside any repeat",
        "coda": "layers after the recurrence: write a module called once, outside any repeat",
        "adapters": "a module's adapter comes with cat(...) injection: call it as R(cat(s, e))",
    },
}

# What a required key holds, shown when it is missing.
_EXAMPLES = {
    "vocab": "vocab: 65536",
    "d_model": "d_model: 1536",
    "heads": "heads: 12",
    "schedule": 'schedule: [{repeat: 2, do: ["z_L = L(z_L + z_H)", "z_H = H(z_H + z_L)"]}]',
    "modules": "modules: {L: {layers: 2}, H: {layers: 2}}",
    "states": "states: {z_H: {init: embed}, z_L: {init: buffer}}",
    "layers": "layers: 4",
    "init": "init: embed",
    "repeat": "repeat: 2",
    "sample": "repeat: {sample: lognormal_poisson, mean: 32, sigma: 0.5}",
    "do": 'do: ["z_H = H(z_H + z_L)"]',
    "from": "depth: {from: 2, to: 5, warmup: 0.2}",
    "model": "model: {vocab: 512, d_model: 128, heads: 4, ...}",
    "expr": 'expr: "x * rsqrt(mean(x*x) + eps) * (1 + w)", params: {w: zeros}',
}


def describe(v: Any) -> str:
    """A found value as the user would write it in YAML."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "nothing (null)"
    if isinstance(v, (dict, list)):
        text = _flow(v)
        kind = "a mapping" if isinstance(v, dict) else "a list"
        return f"{kind} {text}" if len(text) <= 40 else kind
    if isinstance(v, str) and len(v) > 40:  # quoted (control characters escaped) and cut
        return f"{v[:40]!r}... ({len(v):,} characters)"
    if isinstance(v, int) and abs(v) > 10**12:
        return f"an integer of {len(str(abs(v)))} digits"
    return repr(v)


def _flow(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_flow(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_flow(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v)


def near(name: Any, choices: list[str]) -> str:
    """The closest choice to a misspelt name: difflib first, then a prefix ('rope' -> 'rope_theta')."""
    hint = close_match(str(name), choices)
    if hint:
        return hint
    s = str(name).lower()
    if len(s) >= 3:
        for c in choices:
            if c.lower().startswith(s) or (len(c) >= 3 and s.startswith(c.lower())):
                return f"did you mean '{c}'?"
    return ""


def _key_hint(key: Any, allowed: list[str], level: str) -> str:
    """Why an unknown key is unknown: a misspelling here, or a key that belongs somewhere else."""
    hint = near(key, allowed)
    if hint:
        return hint
    own = [k for k in _KEYS.get(level, ()) if k not in allowed]  # this section's keys that another form takes
    hint = near(key, own)
    if hint:
        return f"{hint} (a key of {level} that does not go with the others here)"
    exact = [lv for lv, keys in _KEYS.items() if lv != level and key in keys]
    if exact:
        return f"'{key}' is a key of {' and '.join(exact[:2])}"
    for lv, keys in _KEYS.items():
        if lv != level:
            hint = close_match(str(key), keys)
            if hint:
                return f"{hint} (a key of {lv})"
    return f"allowed keys here: {', '.join(allowed)}" if allowed else ""


class Fields:
    """Reads the keys of one mapping in the document, then rejects whatever was not read."""

    def __init__(self, src: Source, path: PathT, what: str = "a mapping", level: str = "", hint: str = ""):
        self.src, self.path = src, tuple(path)
        self.level = level or (dotted(self.path) or "the top level")
        node: Any = src.data
        for p in self.path:
            if isinstance(node, dict):
                node = node.get(p)
            elif isinstance(node, list) and isinstance(p, int) and p < len(node):
                node = node[p]
            else:
                node = None
        if node is None:
            node = {}
        if not isinstance(node, dict):
            self.fail(self.path, f"expected {what}, found {describe(node)}", hint)
        self.data: dict = node
        self.read: set = set()

    def fail(self, path: PathT, message: str, hint: str = "", key: bool = False):
        loc = self.src.key_loc(path) if key else self.src.loc(path)
        raise SpecError(message, loc, dotted(path), hint)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = REQUIRED) -> Any:
        self.read.add(key)
        if key not in self.data:
            if default is REQUIRED:
                self._missing(key)
            return default
        return self.data[key]

    def _missing(self, key: str) -> None:
        known = _KEYS.get(self.level, ())
        for k in self.data:
            if k not in self.read and k not in known and close_match(str(k), [key]):
                self.fail(
                    self.path + (k,),
                    f"unknown key '{k}'",
                    f"did you mean '{key}'? (it is required)",
                    key=True,
                )
        self._misplaced(key)
        self._nested(key)
        hint = f"e.g. {_EXAMPLES[key]}" if key in _EXAMPLES else ""
        unknown = [str(k) for k in self.data if k not in self.read and k not in known]
        if unknown:
            hint += f"{'; ' if hint else ''}found the unknown key '{unknown[0]}'"
        self.fail(self.path, f"missing required key '{key}'", hint, key=True)

    def _misplaced(self, key: str) -> None:
        """A required key written one level out (a dedented `do:`, `schedule:` at column 1) is an error
        at the key as written, saying where it belongs."""
        for depth in range(len(self.path) - 1, -1, -1):
            outer = self.path[:depth]
            level = dotted(outer) or "the top level"
            if (*outer, key) not in self.src.keys or key in _KEYS.get(level, (key,)):
                continue
            found = "at the top level" if not outer else f"under `{level}:`"
            here = self.src.keys[(*outer, key)]
            into = self.path[-1]
            owner = (f"the list item `{dotted(self.path)}`" if isinstance(into, int) else f"`{into}:`")
            beside = [k for k in self.data if self.path + (k,) in self.src.keys]
            hint = (f"indent it (and what it holds) to column {self.src.keys[self.path + (beside[0],)].col}, "
                    f"beside `{beside[0]}:`" if beside else "")
            raise SpecError(f"`{key}:` was found {found} (line {here.line}); it belongs under {owner}", here,
                            dotted(self.path), hint)

    def _nested(self, key: str) -> None:
        """A required key written one level in, under a sibling (`states:` indented under `modules:`), is an
        error at the key as written."""
        for sibling in self.data:
            here = self.src.keys.get((*self.path, sibling, key))
            if here is None or key in _KEYS.get(dotted(self.path + (sibling,)), ()):
                continue
            column = self.src.keys[(*self.path, sibling)].col
            raise SpecError(f"`{key}:` is indented under `{sibling}:`; it belongs beside it under "
                            f"`{dotted(self.path) or 'the top level'}:`", here, dotted((*self.path, sibling, key)),
                            f"indent `{key}:` to the column of `{sibling}:` ({column})")

    def integer(self, key: str, default: Any = REQUIRED, minimum: int = 1, maximum: int = 2**31 - 1) -> int:
        v = self.raw(key, default)
        if key not in self.data:
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            what = {1: "a positive integer", 0: "a non-negative integer"}.get(
                minimum, f"an integer >= {minimum}"
            )
            hint = f"write {int(v)}" if isinstance(v, float) and v.is_integer() and v >= minimum else ""
            self.fail(self.path + (key,), f"expected {what}, found {describe(v)}", hint)
        if v > maximum:  # every count fits an int32; sizes have tighter limits
            found = f"{v:,}" if v < 10**12 else describe(v)
            self.fail(self.path + (key,), f"expected at most {maximum:,}, found {found}",
                      "hrmspec's limit: larger values would not fit in memory or time")
        return v

    def number(
        self,
        key: str,
        default: Any = REQUIRED,
        lo: float = -math.inf,
        hi: float = math.inf,
        positive: bool = False,
    ) -> float:
        v = self.raw(key, default)
        if key not in self.data:
            return v
        if isinstance(v, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or not (lo <= v <= hi) or (positive and v <= 0):
            if positive and hi == math.inf:
                what = "a positive number"
            elif (lo, hi) == (-math.inf, math.inf):
                what = "a number"
            else:
                what = f"a number in [{lo:g}, {hi:g}]" if not positive else f"a number in ({lo:g}, {hi:g}]"
            self.fail(self.path + (key,), f"expected {what}, found {describe(v)}")
        return float(v)

    def boolean(self, key: str, default: Any = REQUIRED) -> bool:
        v = self.raw(key, default)
        if key in self.data and not isinstance(v, bool):
            self.fail(self.path + (key,), f"expected true or false, found {describe(v)}")
        return v

    def choice(self, key: str, choices: tuple, default: Any = REQUIRED) -> Any:
        v = self.raw(key, default)
        if key in self.data and v not in choices:
            shown = " | ".join(str(c) for c in choices)
            hint = near(v, list(choices)) if isinstance(v, str) else ""
            self.fail(self.path + (key,), f"expected one of {shown}, found {describe(v)}", hint)
        return v

    def text(self, key: str, default: Any = REQUIRED) -> str:
        v = self.raw(key, default)
        if key in self.data and (not isinstance(v, str) or not v):
            self.fail(self.path + (key,), f"expected a non-empty string, found {describe(v)}")
        return v

    def finish(self) -> None:
        for key in self.data:
            if key in _RESERVED.get(self.level, {}):
                self.fail(
                    self.path + (key,),
                    f"'{key}' is reserved for a later version and not supported yet",
                    _RESERVED[self.level][key],
                    key=True,
                )
            if key not in self.read:
                allowed = sorted(k for k in self.read if isinstance(k, str))
                self.fail(
                    self.path + (key,), f"unknown key '{key}'", _key_hint(key, allowed, self.level), key=True
                )
