"""Validate a parsed spec document into a typed `Spec`.

Every check names file:line:col, the field path, what was expected and what was found, and a
close match for a misspelt name. Unknown keys are errors: a typo must never be silently ignored.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from hrmspec.errors import SpecError, close_match
from hrmspec.spec.grammar import INPUT, Statement, parse_statement
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
    lecun_std,
    swiglu_width,
)
from hrmspec.spec.source import PathT, Source, apply_overrides, dotted, parse_yaml, read_source

_REQUIRED = object()

# The keys of each kind of mapping, for "did you mean" hints across levels ('mlp' written under
# model instead of model.block) and to tell a misspelt required key from a valid optional one.
_KEYS: dict[str, tuple[str, ...]] = {
    "the top level": ("name", "extends", "model", "objective", "train", "data", "eval"),
    "model": tuple(
        "vocab d_model heads head_dim ffn expansion max_seq_len final_norm block modules states schedule "
        "output head init embed_scale credit".split()
    ),
    "model.block": ("norm", "attention", "mlp"),
    "model.block.norm": ("type", "eps", "affine", "place", "expr", "params"),
    "model.block.attention": ("type", "rope_theta", "mask", "bias"),
    "model.modules.<name>": ("layers", "exit_norm", "ffn", "expansion", "norm", "attention", "mlp"),
    "model.states.<name>": ("init",),
    "model.schedule (a repeat block)": ("repeat", "do"),
    "model.init": ("type", "std"),
    "model.credit": ("depth", "last", "per_cycle", "priority"),
    "model.credit.depth": ("from", "to", "warmup"),
    "objective": ("type",),
}

# Keys the language will grow into; written today, they say so instead of "unknown key".
_RESERVED = {
    "model": {
        "prelude": "layers before the recurrence: write a module called once, outside any repeat",
        "coda": "layers after the recurrence: write a module called once, outside any repeat",
        "act": "adaptive computation time: use a fixed repeat count",
        "adapters": "cat(...) injection through adapters: inject by addition",
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
    "do": 'do: ["z_H = H(z_H + z_L)"]',
    "from": "depth: {from: 2, to: 5, warmup: 0.2}",
    "model": "model: {vocab: 512, d_model: 128, heads: 4, ...}",
    "expr": 'expr: "x * rsqrt(mean(x*x) + eps) * (1 + w)", params: {w: zeros}',
}


def _describe(v: Any) -> str:
    """A found value as the user would write it in YAML."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "nothing (null)"
    if isinstance(v, (dict, list)):
        text = _flow(v)
        kind = "a mapping" if isinstance(v, dict) else "a list"
        return f"{kind} {text}" if len(text) <= 40 else kind
    return repr(v)


def _flow(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_flow(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_flow(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v)


def _near(name: Any, choices: list[str]) -> str:
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
    hint = _near(key, allowed)
    if hint:
        return hint
    exact = [lv for lv, keys in _KEYS.items() if lv != level and key in keys]
    if exact:
        return f"'{key}' is a key of {' and '.join(exact[:2])}"
    for lv, keys in _KEYS.items():
        if lv != level:
            hint = close_match(str(key), keys)
            if hint:
                return f"{hint} (a key of {lv})"
    return f"allowed keys here: {', '.join(allowed)}" if allowed else ""


class _Fields:
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
            self.fail(self.path, f"expected {what}, found {_describe(node)}", hint)
        self.data: dict = node
        self.read: set = set()

    def fail(self, path: PathT, message: str, hint: str = "", key: bool = False):
        loc = self.src.key_loc(path) if key else self.src.loc(path)
        raise SpecError(message, loc, dotted(path), hint)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = _REQUIRED) -> Any:
        self.read.add(key)
        if key not in self.data:
            if default is _REQUIRED:
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
        hint = f"e.g. {_EXAMPLES[key]}" if key in _EXAMPLES else ""
        unknown = [str(k) for k in self.data if k not in self.read and k not in known]
        if unknown:
            hint += f"{'; ' if hint else ''}found the unknown key '{unknown[0]}'"
        self.fail(self.path, f"missing required key '{key}'", hint, key=True)

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
        v = self.raw(key, default)
        if key not in self.data:
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            what = {1: "a positive integer", 0: "a non-negative integer"}.get(
                minimum, f"an integer >= {minimum}"
            )
            hint = f"write {int(v)}" if isinstance(v, float) and v.is_integer() and v >= minimum else ""
            self.fail(self.path + (key,), f"expected {what}, found {_describe(v)}", hint)
        return v

    def number(
        self,
        key: str,
        default: Any = _REQUIRED,
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
            self.fail(self.path + (key,), f"expected {what}, found {_describe(v)}")
        return float(v)

    def boolean(self, key: str, default: Any = _REQUIRED) -> bool:
        v = self.raw(key, default)
        if key in self.data and not isinstance(v, bool):
            self.fail(self.path + (key,), f"expected true or false, found {_describe(v)}")
        return v

    def choice(self, key: str, choices: tuple, default: Any = _REQUIRED) -> Any:
        v = self.raw(key, default)
        if key in self.data and v not in choices:
            shown = " | ".join(str(c) for c in choices)
            hint = _near(v, list(choices)) if isinstance(v, str) else ""
            self.fail(self.path + (key,), f"expected one of {shown}, found {_describe(v)}", hint)
        return v

    def text(self, key: str, default: Any = _REQUIRED) -> str:
        v = self.raw(key, default)
        if key in self.data and (not isinstance(v, str) or not v):
            self.fail(self.path + (key,), f"expected a non-empty string, found {_describe(v)}")
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


# --------------------------------------------------------------------------- blocks


def _norm(src: Source, path: PathT, base: NormSpec) -> NormSpec:
    f = _Fields(src, path, "a mapping {type, eps, affine, place, expr, params}", "model.block.norm")
    kind = f.choice("type", ("rms", "expr"), base.type)
    eps = f.number("eps", base.eps, lo=0.0, hi=1.0, positive=True)
    affine = f.boolean("affine", base.affine)
    place = f.choice("place", ("pre", "post", "sandwich"), base.place)
    if kind == "rms":
        for key in ("expr", "params"):
            if f.has(key):
                f.fail(path + (key,), f"'{key}' belongs to an expression norm, but this norm has type rms",
                       "add type: expr", key=True)
        f.finish()
        return NormSpec(type="rms", eps=eps, affine=affine, place=place)
    return _expr_norm(f, path, base, eps, place)


# Where an inherited expression norm was written: a module's norm merges over model.block.norm.
_BLOCK_NORM: PathT = ("model", "block", "norm")
_NORM_INITS = ("zeros", "ones", "normal")


def _expr_norm(f: _Fields, path: PathT, base: NormSpec, eps: float, place: str) -> NormSpec:
    """type: expr — the text is parsed into a RowProgram now, so a typo is reported at load time,
    at its column inside the expression."""
    from hrmspec.ir.ops import FUNCTIONS  # the IR only when a spec uses it
    from hrmspec.ir.parse import parse_norm_expr

    if f.has("affine") and f.data["affine"] is True:
        f.fail(path + ("affine",), "'affine' applies to rms norms; an expression norm declares its weights",
               'e.g. expr: "x * rsqrt(mean(x*x) + eps) * w", params: {w: ones}', key=True)
    inherited = base.type == "expr"
    text = f.text("expr", base.expr if inherited else _REQUIRED)
    expr_path = path + ("expr",) if f.has("expr") else _BLOCK_NORM + ("expr",)
    params_path = path + ("params",) if f.has("params") or not inherited else _BLOCK_NORM + ("params",)
    params = (base.params or ()) if inherited else ()
    f.read.add("params")
    if f.has("params"):
        g = _Fields(f.src, path + ("params",), "a mapping of name -> zeros | ones | normal", "",
                    "e.g. params: {w: zeros}")
        params = ()
        for name in list(g.data):
            where = path + ("params", name)
            if not isinstance(name, str) or not name.isidentifier():
                g.fail(where, f"expected a parameter name (an identifier), found {name!r}", key=True)
            if name in ("x", "eps") or name in FUNCTIONS:
                what = "the row" if name == "x" else "the norm's epsilon" if name == "eps" else "a built-in function"
                g.fail(where, f"'{name}' is {what} and cannot be declared as a parameter", "choose another name",
                       key=True)
            params += ((name, g.choice(name, _NORM_INITS)),)
        g.finish()
    f.finish()

    loc, field = f.src.loc(expr_path), dotted(expr_path)
    try:
        program = parse_norm_expr(text, dict(params), eps, name="expr_norm", loc=loc, path=field)
    except SpecError as e:
        unknown = re.match(r"unknown name '(\w+)'", e.message)
        if unknown and not e.hint.startswith("did you mean"):
            name = unknown.group(1)
            hint = f"{e.hint}; a learnable vector is declared under params, e.g. params: {{{name}: zeros}}"
            raise SpecError(e.message, e.loc, e.path, hint) from None
        raise
    used = {n.arg for n in program.nodes if n.op == "input"}
    if "x" not in used:
        raise SpecError("the norm never reads the row 'x'", loc, field, 'e.g. "x * rsqrt(mean(x*x) + eps)"')
    if program.outputs[0].kind != "row":
        raise SpecError(f"'{text.strip()}' gives one number per row; a norm must give a value per channel", loc,
                        field, "multiply the row by it, e.g. x * rsqrt(mean(x*x) + eps)")
    for name, _ in params:
        if name not in used:
            raise SpecError(f"parameter '{name}' is declared but the expression does not use it",
                            f.src.key_loc(params_path + (name,)), dotted(params_path + (name,)),
                            "use it in expr, or remove it")
    return NormSpec(type="expr", eps=eps, affine=False, place=place, expr=text, params=params)


def _attention(src: Source, path: PathT, base: AttentionSpec) -> AttentionSpec:
    f = _Fields(src, path, "a mapping {type, rope_theta, mask, bias}", "model.block.attention")
    theta = f.raw("rope_theta", base.rope_theta)
    if f.has("rope_theta") and theta not in (None, "none"):
        theta = f.number("rope_theta", lo=1.0)
    out = AttentionSpec(
        type=f.choice("type", ("gated", "plain"), base.type),
        rope_theta=None if theta == "none" else theta,
        mask=f.choice("mask", ("causal", "prefix_lm", "bidirectional"), base.mask),
        bias=f.boolean("bias", base.bias),
    )
    f.finish()
    return out


def _layer_fields(f: _Fields, base: BlockSpec) -> tuple[NormSpec, AttentionSpec, str]:
    """norm, attention and mlp read from a mapping (model.block or a module), over `base`."""
    norm = _norm(f.src, f.path + ("norm",), base.norm) if f.has("norm") else base.norm
    attention = (
        _attention(f.src, f.path + ("attention",), base.attention) if f.has("attention") else base.attention
    )
    f.read.update({"norm", "attention"})
    mlp = f.choice("mlp", ("swiglu", "gelu"), base.mlp)
    return norm, attention, mlp


def _width_fields(f: _Fields) -> tuple[int | None, float | None]:
    """(ffn, expansion) from a mapping: an MLP width, or a ratio of d_model; at most one of them."""
    given = [k for k in ("ffn", "expansion") if f.data.get(k) is not None]  # null unsets an inherited value
    f.read.update({"ffn", "expansion"})
    if len(given) == 2:
        f.fail(
            f.path + ("expansion",),
            "expected either 'ffn' (a width) or 'expansion' (a ratio of d_model), found both",
            "remove one of them",
            key=True,
        )
    ffn = f.integer("ffn") if "ffn" in given else None
    expansion = f.number("expansion", lo=0.0, positive=True) if "expansion" in given else None
    return ffn, expansion


def _mlp_width(mlp: str, d_model: int, expansion: float) -> int:
    return swiglu_width(d_model, expansion) if mlp == "swiglu" else max(1, round(expansion * d_model))


# --------------------------------------------------------------------------- schedule


def _schedule(src: Source, path: PathT, items: Any) -> tuple:
    if not isinstance(items, list) or not items:
        raise SpecError(
            f"expected a non-empty list of statements and repeat blocks, found {_describe(items)}",
            src.loc(path),
            dotted(path),
            'e.g. [{repeat: 2, do: ["z_L = L(z_L + z_H)", "z_H = H(z_H + z_L)"]}]',
        )
    out: list = []
    for i, item in enumerate(items):
        p = path + (i,)
        if isinstance(item, dict):
            f = _Fields(src, p, level="model.schedule (a repeat block)")
            if not (f.has("repeat") or f.has("do")) and not any(
                close_match(str(k), ["repeat"]) for k in item
            ):
                f.fail(
                    p,
                    f"expected a statement string or a repeat block {{repeat, do}}, found {_describe(item)}",
                    'quote statements: - "z_H = H(z_H + z_L)"',
                )
            if isinstance(item.get("repeat"), dict):
                f.fail(
                    p + ("repeat",),
                    f"expected a positive integer, found {_describe(item['repeat'])}",
                    "a sampled number of cycles is reserved for a later version; use a fixed count",
                )
            count = f.integer("repeat")
            body = _schedule(src, p + ("do",), f.raw("do"))
            f.finish()
            out.append(Repeat(count=count, body=body))
        else:
            out.append(parse_statement(item, src.loc(p), dotted(p)))
    return tuple(out)


def _statements(schedule: tuple) -> list[Statement]:
    out: list[Statement] = []
    for item in schedule:
        out.extend(_statements(item.body) if isinstance(item, Repeat) else [item])
    return out


def _check_names(st: Statement, modules: list[str], states: list[str]) -> None:
    """Every name in a statement is a declared module or state; errors point at the name's column."""
    target_loc, module_loc, *input_locs = st.name_locs or (st.loc,) * (2 + len(st.inputs))
    if st.module not in modules:
        hint = _near(st.module, modules)
        if not hint:
            what = "a state" if st.module in states else "the input" if st.module == INPUT else ""
            declared = f"declared modules: {', '.join(modules)}"
            hint = f"'{st.module}' is {what}; {declared}" if what else declared
        raise SpecError(f"unknown module '{st.module}'", module_loc, st.path, hint)
    if st.target not in states:
        hint = _near(st.target, states) or (
            f"'{st.target}' is a module; assign to a state"
            if st.target in modules
            else f"declare it under model.states (states: {', '.join(states)})"
        )
        raise SpecError(f"unknown state '{st.target}' on the left of '='", target_loc, st.path, hint)
    for name, loc in zip(st.inputs, input_locs):
        if name != INPUT and name not in states:
            hint = _near(name, states + [INPUT]) or (
                f"'{name}' is a module, not a state"
                if name in modules
                else f"states: {', '.join(states)}; '{INPUT}' is the input embedding"
            )
            raise SpecError(f"unknown state '{name}'", loc, st.path, hint)


# --------------------------------------------------------------------------- credit


def _credit(src: Source, path: PathT, called: list[str]) -> CreditSpec:
    node = src.data["model"].get("credit")
    if node is None or node == "none":
        return CreditSpec(mode="none")
    f = _Fields(
        src,
        path,
        "a mapping with one of depth, last, per_cycle (or the word none)",
        "model.credit",
        _near(node, ["none"]) if isinstance(node, str) else "e.g. credit: {depth: 5, priority: [H, L]}",
    )
    modes = [k for k in ("depth", "last", "per_cycle") if f.has(k)]
    if not modes:
        f.read.update({"depth", "last", "per_cycle", "priority"})
        f.finish()  # a misspelt mode is reported as such
    if len(modes) != 1:
        where = path + (modes[1],) if len(modes) > 1 else path
        f.fail(
            where,
            f"expected exactly one of depth, last, per_cycle; found {' and '.join(modes) or 'none of them'}",
            "e.g. credit: {depth: {from: 2, to: 5, warmup: 0.2}, priority: [H, L]}",
            key=True,
        )
    mode = modes[0]
    if mode != "depth" and f.has("priority"):
        f.fail(
            path + ("priority",),
            f"unexpected key 'priority' with '{mode}' credit: it orders modules for depth credit only",
            key=True,
        )
    if mode == "last":
        k = f.integer("last")
        f.finish()
        return CreditSpec(mode="last", last=k)
    if mode == "per_cycle":
        f.read.add("per_cycle")
        f.finish()
        return CreditSpec(mode="per_cycle", per_cycle=_per_cycle(src, path + ("per_cycle",), called))
    return _depth_credit(f, path, called)


def _per_cycle(src: Source, path: PathT, called: list[str]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    uniq = list(dict.fromkeys(called))
    g = _Fields(
        src,
        path,
        "a mapping of module name -> list of grad calls per cycle",
        hint="e.g. per_cycle: {L: [0, 3]}",
    )
    table = []
    for name in list(g.data):
        if name not in uniq:
            hint = _near(name, uniq) or f"called modules: {', '.join(uniq)}"
            g.fail(path + (name,), f"unknown module '{name}'", hint, key=True)
        counts = g.raw(name)
        if isinstance(counts, int) and not isinstance(counts, bool):
            g.fail(
                path + (name,),
                f"expected a list of non-negative integers, found {counts}",
                f"e.g. [{counts}]",
            )
        if not isinstance(counts, list):
            g.fail(path + (name,), f"expected a list of non-negative integers, found {_describe(counts)}")
        for i, c in enumerate(counts):
            if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                g.fail(path + (name, i), f"expected a non-negative integer, found {_describe(c)}")
        table.append((name, tuple(counts)))
    if not table:
        g.fail(path, "expected at least one module", "e.g. per_cycle: {L: [0, 3]}")
    g.finish()
    return tuple(table)


def _depth_credit(f: _Fields, path: PathT, called: list[str]) -> CreditSpec:
    dpath = path + ("depth",)
    depth = f.raw("depth")
    if isinstance(depth, int) and not isinstance(depth, bool):
        lo = hi = f.integer("depth")
        warmup, from_path = 0.0, dpath
    else:
        d = _Fields(
            f.src,
            dpath,
            "an integer or a mapping {from, to, warmup}",
            "model.credit.depth",
            "e.g. depth: 5, or depth: {from: 2, to: 5, warmup: 0.2}",
        )
        lo = d.integer("from")
        hi = d.integer("to", lo)
        warmup = d.number("warmup", 0.0, lo=0.0, hi=1.0)
        d.finish()
        if hi < lo:
            d.fail(
                dpath + ("to",),
                f"expected 'to' >= 'from' ({lo}), found {hi}",
                "depth ramps up from 'from' to 'to'",
            )
        from_path = dpath + ("from",)
    uniq = list(dict.fromkeys(called))
    prio = f.raw("priority", None)
    if prio is None:
        prio = uniq
    if not isinstance(prio, list) or not all(isinstance(p, str) for p in prio):
        f.fail(
            path + ("priority",), f"expected a list of module names, found {_describe(prio)}", f"e.g. {uniq}"
        )
    for i, name in enumerate(prio):
        if name not in uniq:
            hint = _near(name, uniq) or f"called modules: {', '.join(uniq)}"
            f.fail(path + ("priority", i), f"unknown module '{name}'", hint)
        if name in prio[:i]:
            f.fail(path + ("priority", i), f"expected each module once, found '{name}' twice")
    missing = [m for m in uniq if m not in prio]
    if missing:
        f.fail(
            path + ("priority",),
            f"expected every called module ({', '.join(uniq)}), found no {', '.join(missing)}",
            f"e.g. priority: [{', '.join(prio + missing)}]",
        )
    if lo < len(prio):
        f.fail(
            from_path,
            f"expected a depth of at least {len(prio)} (one grad-carrying call per module), found {lo}",
            f"modules in priority order: {', '.join(prio)}",
        )
    f.finish()
    return CreditSpec(mode="depth", depth_from=lo, depth_to=hi, warmup=warmup, priority=tuple(prio))


# --------------------------------------------------------------------------- model


def _divisor_hint(d_model: int, heads: int) -> str:
    below = max(h for h in range(1, heads) if d_model % h == 0) if heads > 1 else None
    above = min((h for h in range(heads + 1, d_model + 1) if d_model % h == 0), default=None)
    near = " or ".join(str(h) for h in (below, above) if h is not None)
    return f"use heads {near} (divisors of {d_model}), or set head_dim"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _model(src: Source, top: _Fields) -> ModelSpec:
    path: PathT = ("model",)
    top.raw("model")
    f = _Fields(src, path, "a mapping (vocab, d_model, heads, ...)", "model")
    vocab = f.integer("vocab")
    d_model = f.integer("d_model")
    heads = f.integer("heads")
    head_dim = f.integer("head_dim", 0)
    if not head_dim:
        if d_model % heads:
            f.fail(
                path + ("heads",),
                f"expected heads to divide d_model ({d_model}), found {heads}",
                _divisor_hint(d_model, heads),
            )
        head_dim = d_model // heads
    max_seq_len = f.integer("max_seq_len", 2048)
    final_norm = f.boolean("final_norm", False)

    # the shared layer (model.block) and the MLP width (model.ffn or model.expansion)
    bf = _Fields(src, path + ("block",), "a mapping {norm, attention, mlp}", "model.block")
    f.read.add("block")
    norm, attention, mlp = _layer_fields(bf, BlockSpec(NormSpec(), AttentionSpec(), "swiglu", 0))
    bf.finish()
    ffn, expansion = _width_fields(f)
    width = ffn if ffn is not None else _mlp_width(mlp, d_model, expansion) if expansion is not None else 0
    block = BlockSpec(norm, attention, mlp, width)

    modules = _modules(src, path + ("modules",), f, block, d_model, ffn, expansion)
    module_names = [m.name for m in modules]
    uses_rope = [m for m in modules if m.block.attention.rope_theta is not None]
    if uses_rope and head_dim % 2:
        if f.has("head_dim"):
            f.fail(path + ("head_dim",), f"expected an even head_dim (rotary embeddings), found {head_dim}")
        f.fail(
            path + ("heads",),
            f"expected an even head_dim for rotary embeddings, found d_model / heads = {head_dim}",
            "choose heads so that d_model / heads is even, or set rope_theta: none",
        )

    states = _states(src, path + ("states",), f, module_names)
    state_names = [s.name for s in states]

    schedule = _schedule(src, path + ("schedule",), f.raw("schedule"))
    statements = _statements(schedule)
    for st in statements:
        _check_names(st, module_names, state_names)
    called = [st.module for st in statements]
    for m in module_names:
        if m not in called:
            f.fail(
                path + ("modules", m),
                f"module '{m}' is declared but never called in the schedule",
                f'call it, e.g. "{state_names[0]} = {m}({state_names[0]})", or remove it',
                key=True,
            )
    if not any(s.init == "embed" for s in states) and not any(INPUT in st.inputs for st in statements):
        f.fail(
            path + ("states",),
            f"the input never reaches the model: no state has 'init: embed' and no statement reads '{INPUT}'",
            f"e.g. {state_names[0]}: {{init: embed}}, or add '{INPUT}' to a sum",
            key=True,
        )

    output = f.raw("output", state_names[0])
    if output not in state_names:
        hint = _near(output, state_names) or (
            f"'{INPUT}' is the input embedding, not a state"
            if output == INPUT
            else f"states: {', '.join(state_names)}"
        )
        f.fail(path + ("output",), f"expected a state, found {_describe(output)}", hint)
    assigned = [st.target for st in statements]
    if output not in assigned:
        where = path + ("output",) if f.has("output") else path
        f.fail(
            where,
            f"expected the output to be a state the schedule assigns ({', '.join(dict.fromkeys(assigned))}), "
            f"found '{output}'",
            key=not f.has("output"),
        )
    head = f.choice("head", ("tied", "untied"), "untied")

    init = _init(src, path, f)
    scale = f.raw("embed_scale", "auto")
    if scale == "auto":
        # the embedding table is initialised with std s and scaled by 1/s, so z_H starts at unit scale
        scale = 1.0 / (lecun_std(d_model) if init.type == "lecun_normal" else init.std)
    elif isinstance(scale, str) and not _is_number(scale):
        hint = _near(scale, ["auto"]) or "auto: 1 / (the embedding's init std)"
        f.fail(path + ("embed_scale",), f"expected a positive number or auto, found {_describe(scale)}", hint)
    else:
        scale = f.number("embed_scale", positive=True)

    credit = _credit(src, path + ("credit",), called)
    f.read.add("credit")
    f.finish()
    return ModelSpec(
        vocab=vocab,
        d_model=d_model,
        heads=heads,
        head_dim=head_dim,
        block=block,
        modules=tuple(modules),
        states=tuple(states),
        schedule=schedule,
        output=output,
        head=head,
        embed_scale=float(scale),
        init=init,
        credit=credit,
        max_seq_len=max_seq_len,
        final_norm=final_norm,
    )


def _modules(
    src: Source,
    path: PathT,
    f: _Fields,
    block: BlockSpec,
    d_model: int,
    ffn: int | None,
    expansion: float | None,
) -> list[ModuleSpec]:
    f.raw("modules")
    mf = _Fields(
        src, path, "a mapping of module name -> {layers, ...}", hint="e.g. modules: {L: {layers: 2}}"
    )
    if not mf.data:
        mf.fail(path, "expected at least one module", "e.g. modules: {L: {layers: 2}, H: {layers: 2}}")
    modules = []
    for name in list(mf.data):
        mpath = path + (name,)
        if not isinstance(name, str) or not name.isidentifier() or name == INPUT:
            mf.fail(
                mpath,
                f"expected a module name (an identifier other than '{INPUT}'), found {name!r}",
                key=True,
            )
        shorthand = f"write {name}: {{layers: {mf.data[name]}}}" if isinstance(mf.data[name], int) else ""
        g = _Fields(src, mpath, "a mapping {layers, exit_norm, ...}", "model.modules.<name>", shorthand)
        layers = g.integer("layers")
        exit_norm = g.choice("exit_norm", ("rms", "none"), "rms")
        norm, attention, mlp = _layer_fields(g, block)
        own_ffn, own_expansion = _width_fields(g)
        if own_ffn is not None:
            width = own_ffn
        elif own_expansion is not None:
            width = _mlp_width(mlp, d_model, own_expansion)
        elif ffn is not None:
            width = ffn
        elif expansion is not None:
            width = _mlp_width(mlp, d_model, expansion)
        else:
            g.fail(mpath, "expected an MLP width: model.ffn, model.expansion or this module's ffn", key=True)
        g.finish()
        modules.append(
            ModuleSpec(
                name=name, layers=layers, exit_norm=exit_norm, block=BlockSpec(norm, attention, mlp, width)
            )
        )
        mf.read.add(name)
    return modules


_INITS = ("embed", "buffer", "zeros", "learned")


def _states(src: Source, path: PathT, f: _Fields, module_names: list[str]) -> list[StateSpec]:
    f.raw("states")
    sf = _Fields(src, path, "a mapping of state name -> {init}", hint="e.g. states: {z_H: {init: embed}}")
    if not sf.data:
        sf.fail(path, "expected at least one state", "e.g. states: {z_H: {init: embed}}")
    states = []
    for name in list(sf.data):
        spath = path + (name,)
        if name == INPUT:
            sf.fail(spath, f"'{INPUT}' is the input embedding and cannot be declared as a state", key=True)
        if not isinstance(name, str) or not name.isidentifier():
            sf.fail(spath, f"expected a state name (an identifier), found {name!r}", key=True)
        if name in module_names:
            sf.fail(
                spath,
                f"expected distinct module and state names, found '{name}' as both",
                "rename one",
                key=True,
            )
        shorthand = f"write {name}: {{init: {sf.data[name]}}}" if sf.data[name] in _INITS else ""
        g = _Fields(
            src, spath, "a mapping {init: embed | buffer | zeros | learned}", "model.states.<name>", shorthand
        )
        states.append(StateSpec(name=name, init=g.choice("init", _INITS)))
        g.finish()
        sf.read.add(name)
    return states


def _init(src: Source, path: PathT, f: _Fields) -> InitSpec:
    node = f.raw("init", None)
    if node is None:
        return InitSpec()
    if isinstance(node, str):
        return InitSpec(type=f.choice("init", ("lecun_normal", "normal")))
    g = _Fields(src, path + ("init",), "lecun_normal, normal or a mapping {type, std}", "model.init")
    init = InitSpec(
        type=g.choice("type", ("lecun_normal", "normal"), "lecun_normal"),
        std=g.number("std", 0.02, positive=True),
    )
    g.finish()
    return init


# --------------------------------------------------------------------------- document


def spec_from_source(src: Source) -> Spec:
    """Validate a parsed document (see `hrmspec.spec.source`) into a `Spec`."""
    top = _Fields(src, (), level="the top level")
    if "extends" in src.data:
        top.fail(
            ("extends",), "'extends' needs a spec file to resolve against", "use load_spec(path)", key=True
        )
    name = top.text("name", Path(src.file).stem)
    model = _model(src, top)
    obj = top.raw("objective", None)
    if obj is None or isinstance(obj, str):
        objective = ObjectiveSpec(type=top.choice("objective", ("task_completion", "lm"), "task_completion"))
    else:
        g = _Fields(src, ("objective",), "task_completion, lm or a mapping {type}", "objective")
        objective = ObjectiveSpec(type=g.choice("type", ("task_completion", "lm")))
        g.finish()
    sections = {}
    for key in ("train", "data", "eval"):
        v = top.raw(key, {}) or {}
        if not isinstance(v, dict):
            top.fail((key,), f"expected a mapping, found {_describe(v)}")
        sections[key] = v
    top.finish()
    return Spec(name=name, model=model, objective=objective, source=src.file, raw=src.data, **sections)


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
        src = read_source(_resolve_path(spec))
    return spec_from_source(apply_overrides(src, overrides))


def load_spec_text(text: str, file: str = "<string>", overrides: dict[str, Any] | None = None) -> Spec:
    """Load a spec from YAML text (tests, notebooks)."""
    return spec_from_source(apply_overrides(parse_yaml(text, file), overrides))


def _resolve_path(spec: str | Path) -> Path:
    p = Path(spec)
    if p.exists() or p.suffix in (".yaml", ".yml") or "/" in str(spec):
        return p
    shipped = shipped_specs_dir() / f"{spec}.yaml"
    return shipped if shipped.exists() else p


def shipped_specs_dir() -> Path:
    """The folder of shipped specs (installed as the package hrmspec.specs)."""
    import importlib.util

    found = importlib.util.find_spec("hrmspec.specs")
    if found is not None and found.submodule_search_locations:
        return Path(list(found.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[2] / "specs"
