"""The layer a module stacks: its norm, attention, MLP kind and MLP width.

`model.block` declares the shared layer; each module under `model.modules` may override any of
its fields. `layer_fields` reads norm / attention / mlp over a base `BlockSpec` (the defaults for
model.block, model.block itself for a module), `width_fields` reads the MLP width as `ffn` or
`expansion`, and `mlp_width` turns those into the width the module uses.

A norm of `type: expr` is parsed into a Kernel IR row program here, so a typo in its expression is
reported at load time, at its column inside the text.
"""

from __future__ import annotations

import re
from typing import Any

from hrmspec.capabilities import ATTENTION
from hrmspec.errors import SpecError
from hrmspec.ir.functions import FUNCTIONS
from hrmspec.ir.parse import parse_norm_expr
from hrmspec.kinds import MLPS, NORMS
from hrmspec.spec.fields import REQUIRED, Fields, describe, near
from hrmspec.spec.schema import AttentionSpec, BlockSpec, NormSpec, swiglu_width
from hrmspec.spec.source import PathT, Source, dotted

# Where an inherited expression norm was written: a module's norm merges over model.block.norm.
_BLOCK_NORM: PathT = ("model", "block", "norm")
_NORM_INITS = ("zeros", "ones", "normal")


def layer_fields(f: Fields, base: BlockSpec) -> tuple[NormSpec, AttentionSpec, str]:
    """norm, attention and mlp read from a mapping (model.block or a module), over `base`."""
    norm = _norm(f.src, f.path + ("norm",), base.norm) if f.has("norm") else base.norm
    attention = (
        _attention(f.src, f.path + ("attention",), base.attention) if f.has("attention") else base.attention
    )
    f.read.update({"norm", "attention"})
    mlp = f.choice("mlp", tuple(MLPS), base.mlp)
    return norm, attention, mlp


def width_fields(f: Fields) -> tuple[int | None, float | None]:
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
    ffn = f.integer("ffn", maximum=1 << 20) if "ffn" in given else None
    expansion = f.number("expansion", lo=0.0, positive=True) if "expansion" in given else None
    return ffn, expansion


def mlp_width(mlp: str, d_model: int, ffn: int | None, expansion: float | None) -> int | None:
    """The MLP width: `ffn` if given, else `expansion` x d_model (2/3 of it, rounded up to a multiple of 256,
    for a gated MLP: the same parameters as a plain one); None if neither."""
    if ffn is not None:
        return ffn
    if expansion is not None:
        return swiglu_width(d_model, expansion) if MLPS[mlp].gated else max(1, round(expansion * d_model))
    return None


def _norm(src: Source, path: PathT, base: NormSpec, place: bool = True) -> NormSpec:
    """A norm mapping over `base`: its type (a kind of `hrmspec.kinds.NORMS`) and the fields that kind
    takes; `place` only for a block's norm (an exit or final norm has no residual to sit in)."""
    keys = "type, eps, affine, place, expr, params" if place else "type, eps, affine, expr, params"
    f = Fields(src, path, f"a mapping {{{keys}}}", "model.block.norm")
    kind = f.choice("type", tuple(NORMS), base.type)
    eps = f.number("eps", base.eps, lo=0.0, hi=1.0, positive=True)
    affine = f.boolean("affine", base.affine)
    at = f.choice("place", ("pre", "post", "sandwich", "pre_post"), base.place) if place else base.place
    if kind == "expr":
        return _expr_norm(f, path, base, eps, at)
    for key in ("expr", "params"):
        if f.has(key):
            f.fail(path + (key,), f"'{key}' belongs to an expression norm, but this norm has type {kind}",
                   "add type: expr", key=True)
    f.finish()
    return NormSpec(type=kind, eps=eps, affine=affine, place=at)


def standalone_norm(f: Fields, key: str, base: NormSpec, default: Any, flag: bool = False) -> NormSpec | None:
    """A norm outside the layers (a module's `exit_norm`, the model's `final_norm`): none, a kind's name
    (with `base`'s eps), or a mapping {type, eps, affine, expr, params}. With `flag` (final_norm),
    true and false are accepted too: true is an RMSNorm with `base`'s eps and affine."""
    v = f.raw(key, default)
    if v is None or v == "none" or v is False:
        return None
    if v is True and flag:
        return NormSpec(type="rms", eps=base.eps, affine=base.affine)
    if isinstance(v, dict):
        return _norm(f.src, f.path + (key,), NormSpec(eps=base.eps), place=False)
    names = tuple(k for k, kind in NORMS.items() if kind.by_name) + ("none",)
    if v not in names:
        shown = " | ".join((("true", "false") if flag else ()) + names)
        hint = near(v, list(names)) if isinstance(v, str) else ""
        if v in NORMS:
            hint = f"a norm of type {v} is written as a mapping, e.g. {key}: {{type: {v}, ...}}"
        f.fail(f.path + (key,), f"expected one of {shown} or a mapping {{type, eps, ...}}, found {describe(v)}", hint)
    return NormSpec(type=v, eps=base.eps, affine=base.affine if flag else False)


def _expr_norm(f: Fields, path: PathT, base: NormSpec, eps: float, place: str) -> NormSpec:
    """type: expr — the text is parsed into a RowProgram now, so a typo is reported at load time,
    at its column inside the expression."""
    if f.has("affine") and f.data["affine"] is True:
        f.fail(path + ("affine",), "'affine' applies to rms norms; an expression norm declares its weights",
               'e.g. expr: "x * rsqrt(mean(x*x) + eps) * w", params: {w: ones}', key=True)
    inherited = base.type == "expr"
    text = f.text("expr", base.expr if inherited else REQUIRED)
    expr_path = path + ("expr",) if f.has("expr") else _BLOCK_NORM + ("expr",)
    params_path = path + ("params",) if f.has("params") or not inherited else _BLOCK_NORM + ("params",)
    params = (base.params or ()) if inherited else ()
    f.read.add("params")
    if f.has("params"):
        g = Fields(f.src, path + ("params",), "a mapping of name -> zeros | ones | normal", "",
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
    f = Fields(src, path, "a mapping {type, rope_theta, mask, bias, qk_bias, ffn}", "model.block.attention")
    theta = f.raw("rope_theta", base.rope_theta)
    if f.has("rope_theta") and theta not in (None, "none"):
        theta = f.number("rope_theta", lo=1.0)
    kind = f.choice("type", tuple(ATTENTION), base.type)  # the kinds hrmspec/capabilities.py declares
    if f.has("ffn") and kind != "token_mlp":
        f.fail(path + ("ffn",), f"unexpected key 'ffn' with attention type '{kind}': it is the width of a "
               "token_mlp", "the MLP's own width is model.ffn or model.expansion", key=True)
    out = AttentionSpec(
        type=kind,
        rope_theta=None if theta == "none" else theta,
        mask=f.choice("mask", ("causal", "prefix_lm", "bidirectional"), base.mask),
        bias=f.boolean("bias", base.bias),
        qk_bias=f.boolean("qk_bias", base.qk_bias),
        ffn=f.integer("ffn", base.ffn) if kind == "token_mlp" else 0,
    )
    f.finish()
    return out
