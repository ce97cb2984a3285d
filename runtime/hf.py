"""Hugging Face `hrm_text` import/export, and hrmspec's own checkpoint format.

transformers' `HrmTextForCausalLM` is one point in the space of specs: two stacks L and H of
equal pre-norm gated-attention SwiGLU layers, each capped by an RMSNorm, run as

    repeat H_cycles: { repeat L_cycles: { z_L = L(z_L + z_H) };  z_H = H(z_H + z_L) }

from z_H = the scaled token embedding and z_L = a fixed vector (`model.z_L_init`). So an HF
checkpoint converts to a spec plus a state dict, and back, with no change to the math. The
tensors differ only by name and by how projections are fused:

    ours (per layer)        HF module (state_dict())           HF file (model.safetensors)
    attn.qkvg  [q;k;v;g]    self_attn.{q,k,v,gate}_proj        attn.gqkv_proj  [g;q;k;v] (biases unfused)
    attn.o                  self_attn.o_proj                   attn.o_proj
    mlp.gate_up [gate;up]   mlp.{gate,up}_proj                 mlp.gate_up_proj [gate;up]
    mlp.down                mlp.down_proj                      mlp.down_proj

`stacks.{L,H}.layers.i.` is `model.{L,H}_module.layers.i.` in HF; `embed`, `init_z_L` and `head`
are `model.embed_tokens`, `model.z_L_init` and `lm_head` (absent from files when tied). Files
are written in the layout `save_pretrained` writes (which the released checkpoints use) and
read in either layout.

hrmspec's own checkpoint is a directory with `spec.yaml` (the resolved spec document) and
`model.safetensors` (the CompiledModel's state_dict, buffers included). See docs/hf.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from hrmspec.errors import CheckpointError, SpecError
from hrmspec.runtime.files import read_json, read_tensors, write_tensors, write_text_atomic
from hrmspec.spec.load import load_spec, load_spec_text
from hrmspec.spec.schema import Repeat, Spec, Statement, lecun_std

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
SPEC_FILE = "spec.yaml"

STACKS = ("L", "H")
_ATTN_ROWS = ("q", "k", "v", "gate")  # our fused qkvg, top to bottom
_GQKV_ROWS = ("gate", "q", "k", "v")  # the fused gqkv_proj of HF checkpoint files
_DEFAULT_BP = [2]  # HrmTextConfig's L_bp_cycles default

# HrmTextConfig's defaults, so that a sparse config.json reads here exactly as transformers reads it
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151808,
    "hidden_size": 1536,
    "intermediate_size": 4096,
    "num_hidden_layers": 16,
    "num_attention_heads": 12,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "H_cycles": 2,
    "L_cycles": 3,
    "L_bp_cycles": _DEFAULT_BP,
    "embedding_scale": None,
    "prefix_lm": True,
}


# --------------------------------------------------------------------------- config <-> spec


class _Config:
    """Typed reads of an HF config dict; errors name the file and the key."""

    def __init__(self, config: Mapping[str, Any], source: str):
        self.config, self.source = config, source

    def fail(self, key: str, message: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {key}: {message}")

    def get(self, key: str) -> Any:
        v = self.config.get(key)
        return _HF_DEFAULTS.get(key) if v is None else v

    def integer(self, key: str, minimum: int = 1) -> int:
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.fail(key, f"expected an integer >= {minimum}, found {v!r}")
        return v

    def number(self, key: str) -> float:
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise self.fail(key, f"expected a non-negative number, found {v!r}")
        return float(v)

    def boolean(self, key: str) -> bool:
        v = self.get(key)
        if not isinstance(v, bool):
            raise self.fail(key, f"expected true or false, found {v!r}")
        return v


def _rope_theta(c: _Config) -> float:
    """rope_theta of a default-type rotary embedding, from `rope_parameters` or the legacy keys."""
    params = c.config.get("rope_parameters")
    if params is None:
        legacy = c.config.get("rope_scaling") or {}
        params = {"rope_theta": c.config.get("rope_theta", 10000.0), **legacy}
    if not isinstance(params, dict):
        raise c.fail("rope_parameters", f"expected a mapping, found {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise c.fail("rope_parameters", f"rope_type '{kind}' is not supported, only 'default'")
    theta = params.get("rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta < 1:
        raise c.fail("rope_parameters.rope_theta", f"expected a number >= 1, found {theta!r}")
    return float(theta)


def spec_from_hf_config(config: Mapping[str, Any], name: str = "hrm-text", source: str = CONFIG_FILE) -> Spec:
    """The spec of a transformers `hrm_text` config (the dict of its config.json).

    Raises CheckpointError, naming `source` and the key, for configs hrmspec cannot run exactly.
    """
    c = _Config(config, source)
    model_type = config.get("model_type", "hrm_text")
    if model_type != "hrm_text":
        raise c.fail("model_type", f"expected 'hrm_text', found {model_type!r}; only HRM-Text models convert")
    if c.get("hidden_act") != "silu":
        raise c.fail("hidden_act", f"only 'silu' (SwiGLU) is supported, found {c.get('hidden_act')!r}")
    if c.boolean("mlp_bias"):
        raise c.fail("mlp_bias", "MLP biases are not supported (set mlp_bias: false)")
    if c.number("attention_dropout") != 0:
        raise c.fail("attention_dropout", "attention dropout is not supported (set 0.0)")
    # HrmTextConfig rewrites num_hidden_layers to per_stack * H_cycles * (L_cycles + 1), one KV cache
    # slot per stack call, and keeps the real depth in num_layers_per_stack; legacy files lack the latter
    per_stack = (
        "num_layers_per_stack" if config.get("num_layers_per_stack") is not None else "num_hidden_layers"
    )
    init_range = c.number("initializer_range")
    if not 0 < init_range <= 1:
        raise c.fail("initializer_range", f"expected a number in (0, 1], found {init_range!r}")
    scale = c.get("embedding_scale")
    scale = 1.0 / init_range if scale is None else c.number("embedding_scale")
    bp = c.get("L_bp_cycles")
    if not isinstance(bp, list) or not all(type(n) is int and n >= 0 for n in bp):
        raise c.fail("L_bp_cycles", f"expected a list of non-negative integers, found {bp!r}")
    stack = {"layers": c.integer(per_stack), "exit_norm": "rms"}
    doc = {
        "name": name,
        "model": {
            "vocab": c.integer("vocab_size"),
            "d_model": c.integer("hidden_size"),
            "heads": c.integer("num_attention_heads"),
            "head_dim": c.integer("head_dim"),
            "ffn": c.integer("intermediate_size"),
            "max_seq_len": c.integer("max_position_embeddings"),
            "block": {
                "norm": {"type": "rms", "eps": c.number("rms_norm_eps"), "affine": False, "place": "pre"},
                "attention": {
                    "type": "gated",
                    "rope_theta": _rope_theta(c),
                    "mask": "prefix_lm" if c.boolean("prefix_lm") else "causal",
                    "bias": c.boolean("attention_bias"),
                },
                "mlp": "swiglu",
            },
            "modules": {"L": dict(stack), "H": dict(stack)},
            "states": {"z_H": {"init": "embed"}, "z_L": {"init": "buffer"}},
            "schedule": [
                {
                    "repeat": c.integer("H_cycles"),
                    "do": [
                        {"repeat": c.integer("L_cycles"), "do": ["z_L = L(z_L + z_H)"]},
                        "z_H = H(z_H + z_L)",
                    ],
                }
            ],
            "output": "z_H",
            "head": "tied" if c.boolean("tie_word_embeddings") else "untied",
            "init": {"type": "normal", "std": init_range},
            "embed_scale": scale,
            # HrmTextModel left-pads L_bp_cycles with 1s to H_cycles, as per_cycle does: [] is all 1s
            "credit": {"per_cycle": {"L": list(bp) or [1] * c.integer("H_cycles")}},
        },
        "objective": "task_completion",
    }
    try:
        return load_spec_text(yaml.safe_dump(doc, sort_keys=False), file=f"<spec converted from {source}>")
    except SpecError as e:
        raise CheckpointError(f"{source}: the config does not make a valid spec:\n{e}") from None


def _is_statement(item: Any, target: str, module: str, inputs: set[str]) -> bool:
    return (
        isinstance(item, Statement)
        and (item.target, item.module) == (target, module)
        and len(item.inputs) == 2
        and set(item.inputs) == inputs
    )


def _hf_cycles(spec: Spec) -> tuple[int, int] | None:
    """(H_cycles, L_cycles) if the schedule is HRM-Text's, else None."""
    s = spec.model.schedule
    if len(s) != 1 or not isinstance(s[0], Repeat) or len(s[0].body) != 2:
        return None
    inner, h_call = s[0].body
    if not isinstance(inner, Repeat) or len(inner.body) != 1:
        return None
    if not _is_statement(inner.body[0], "z_L", "L", {"z_L", "z_H"}):
        return None
    if not _is_statement(h_call, "z_H", "H", {"z_H", "z_L"}):
        return None
    return s[0].count, inner.count


def _not_representable(spec: Spec) -> list[str]:
    """Why `spec` is not an HRM-Text model transformers can run (empty when it is)."""
    m, why = spec.model, []
    names = sorted(mod.name for mod in m.modules)
    if names != ["H", "L"]:
        return [f"modules must be exactly L and H, found {', '.join(names)}"]
    L, H = m.module("L"), m.module("H")
    if L.layers != H.layers:
        why.append(f"L and H must have equal layers, found {L.layers} and {H.layers}")
    if L.block != H.block:
        why.append("L and H must share one block (norm, attention, mlp, ffn)")
    b = L.block
    if (b.norm.type, b.norm.affine, b.norm.place) != ("rms", False, "pre"):
        why.append(f"the block norm must be rms, affine false, place pre; found {b.norm}")
    if b.attention.type != "gated" or b.attention.rope_theta is None:
        why.append("attention must be gated with rotary embeddings (rope_theta set)")
    if b.attention.mask not in ("causal", "prefix_lm"):
        why.append(f"the attention mask must be causal or prefix_lm, found {b.attention.mask}")
    if b.mlp != "swiglu":
        why.append(f"the MLP must be swiglu, found {b.mlp}")
    if L.exit_norm != "rms" or H.exit_norm != "rms":
        why.append("both modules need exit_norm: rms")
    states = {s.name: s.init for s in m.states}
    if set(states) != {"z_H", "z_L"} or states["z_H"] != "embed" or states["z_L"] not in ("buffer", "zeros"):
        why.append(f"states must be z_H (init embed) and z_L (init buffer or zeros), found {states}")
    elif _hf_cycles(spec) is None:
        why.append(
            "the schedule must be [{repeat: H_cycles, do: [{repeat: L_cycles, do: ['z_L = L(z_L + z_H)']},"
            " 'z_H = H(z_H + z_L)']}]"
        )
    if m.output != "z_H":
        why.append(f"the output must be z_H, found {m.output}")
    if m.final_norm:
        why.append("final_norm must be false (the H exit norm precedes the head)")
    if m.d_model % m.heads:
        why.append(f"transformers needs d_model ({m.d_model}) divisible by heads ({m.heads})")
    return why


def hf_config_from_spec(spec: Spec) -> dict[str, Any]:
    """The transformers `hrm_text` config (config.json) of an HRM-Text-shaped spec.

    Credit: `per_cycle` maps to L_bp_cycles (its L list; H entries are dropped, as every HF H
    call carries gradient) and `none` to [L_cycles] * H_cycles, both exactly. `depth` and `last`
    have no HF equivalent and map to HF's default [2]; L_bp_cycles only matters when training.
    """
    why = _not_representable(spec)
    if why:
        raise CheckpointError(
            f"{spec.source}: spec '{spec.name}' is not representable as a transformers hrm_text model:\n  "
            + "\n  ".join(why)
        )
    m = spec.model
    H_cycles, L_cycles = _hf_cycles(spec)
    b, layers = m.module("L").block, m.module("L").layers
    credit = m.credit
    if credit.mode == "per_cycle":
        bp = list(dict(credit.per_cycle).get("L", [L_cycles] * H_cycles))
    elif credit.mode == "none":
        bp = [L_cycles] * H_cycles
    else:
        bp = list(_DEFAULT_BP)
    return {
        "architectures": ["HrmTextForCausalLM"],
        "model_type": "hrm_text",
        "vocab_size": m.vocab,
        "hidden_size": m.d_model,
        "num_attention_heads": m.heads,
        "head_dim": m.head_dim,
        "intermediate_size": b.ffn,
        "num_layers_per_stack": layers,
        "num_hidden_layers": layers * H_cycles * (L_cycles + 1),  # as HrmTextConfig stores it
        "H_cycles": H_cycles,
        "L_cycles": L_cycles,
        "L_bp_cycles": bp,
        "hidden_act": "silu",
        "mlp_bias": False,
        "attention_bias": b.attention.bias,
        "attention_dropout": 0.0,
        "rms_norm_eps": b.norm.eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(b.attention.rope_theta)},
        "prefix_lm": b.attention.mask == "prefix_lm",
        "max_position_embeddings": m.max_seq_len,
        "tie_word_embeddings": m.head == "tied",
        "embedding_scale": m.embed_scale,
        # only used by HF to initialise fresh weights: the std of our init
        "initializer_range": m.init.std if m.init.type == "normal" else lecun_std(m.d_model),
        "use_cache": True,
    }


# --------------------------------------------------------------------------- tensor names


def _dims(spec: Spec) -> tuple[int, int, int, bool]:
    m = spec.model
    b = m.module("L").block
    return m.heads * m.head_dim, b.ffn, m.module("L").layers, b.attention.bias


def to_hf_tensors(
    spec: Spec, tensors: Mapping[str, torch.Tensor], layout: str = "file"
) -> dict[str, torch.Tensor]:
    """Our state-dict names -> HF names. `layout`: "file" (as save_pretrained writes) or "module"
    (HrmTextForCausalLM.state_dict()). Works on any mapping keyed like our state_dict (e.g. grads)."""
    if layout not in ("file", "module"):
        raise ValueError(f"layout must be 'file' or 'module', found {layout!r}")
    inner, ffn, layers, bias = _dims(spec)
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": tensors["embed.weight"]}
    if "init_z_L" in tensors:
        out["model.z_L_init"] = tensors["init_z_L"]
    o_prefix = "attn." if layout == "file" else "self_attn."
    for s in STACKS:
        for i in range(layers):
            ours, hf = f"stacks.{s}.layers.{i}.", f"model.{s}_module.layers.{i}."
            rows = dict(zip(_ATTN_ROWS, tensors[ours + "attn.qkvg.weight"].split(inner), strict=True))
            if layout == "file":
                out[hf + "attn.gqkv_proj.weight"] = torch.cat([rows[r] for r in _GQKV_ROWS])
            else:
                out.update({hf + f"self_attn.{r}_proj.weight": rows[r] for r in _ATTN_ROWS})
            if bias:  # save_pretrained leaves these unfused
                rows = dict(zip(_ATTN_ROWS, tensors[ours + "attn.qkvg.bias"].split(inner), strict=True))
                out.update({hf + f"self_attn.{r}_proj.bias": rows[r] for r in _ATTN_ROWS})
                out[hf + o_prefix + "o_proj.bias"] = tensors[ours + "attn.o.bias"]
            out[hf + o_prefix + "o_proj.weight"] = tensors[ours + "attn.o.weight"]
            gate_up = tensors[ours + "mlp.gate_up.weight"]
            if layout == "file":
                out[hf + "mlp.gate_up_proj.weight"] = gate_up
            else:
                out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate_up.split(ffn)
            out[hf + "mlp.down_proj.weight"] = tensors[ours + "mlp.down.weight"]
    if spec.model.head == "untied":
        out["lm_head.weight"] = tensors["head.weight"]
    elif layout == "module":
        out["lm_head.weight"] = tensors["embed.weight"]
    return out


def _hf_module_shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    """Every tensor of HrmTextForCausalLM.state_dict() and its shape."""
    m = spec.model
    inner, ffn, layers, bias = _dims(spec)
    d = m.d_model
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (m.vocab, d), "model.z_L_init": (d,)}
    for s in STACKS:
        for i in range(layers):
            p = f"model.{s}_module.layers.{i}."
            for r in _ATTN_ROWS:
                shapes[p + f"self_attn.{r}_proj.weight"] = (inner, d)
                if bias:
                    shapes[p + f"self_attn.{r}_proj.bias"] = (inner,)
            shapes[p + "self_attn.o_proj.weight"] = (d, inner)
            if bias:
                shapes[p + "self_attn.o_proj.bias"] = (d,)
            shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (ffn, d)
            shapes[p + "mlp.down_proj.weight"] = (d, ffn)
    shapes["lm_head.weight"] = (m.vocab, d)
    return shapes


def _unfuse(spec: Spec, tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """HF tensors in either layout -> the module layout; fused tensors are shape-checked first."""
    inner, ffn, _, _ = _dims(spec)
    d = spec.model.d_model
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        if name in out:
            raise CheckpointError(f"{source}: tensor '{name}' is given twice (fused and unfused)")
        out[name] = t

    def split(
        name: str, t: torch.Tensor, parts: tuple[str, ...], width: int, new: Callable[[str], str]
    ) -> None:
        want = (len(parts) * width, d) if name.endswith(".weight") else (len(parts) * width,)
        _check_shape(name, want, t, source)
        for r, chunk in zip(parts, t.split(width), strict=True):
            put(new(r), chunk)

    for name, t in tensors.items():
        head, sep, tail = name.partition(".attn.gqkv_proj.")
        if sep:
            split(name, t, _GQKV_ROWS, inner, lambda r, h=head, w=tail: f"{h}.self_attn.{r}_proj.{w}")
            continue
        head, sep, tail = name.partition(".mlp.gate_up_proj.")
        if sep:
            split(name, t, ("gate", "up"), ffn, lambda r, h=head, w=tail: f"{h}.mlp.{r}_proj.{w}")
            continue
        put(name.replace(".attn.o_proj.", ".self_attn.o_proj."), t)
    return out


def _check_shape(name: str, want: tuple[int, ...], t: torch.Tensor, source: str) -> None:
    if tuple(t.shape) != tuple(want):
        raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(want)}")


def _check_names(
    want: Mapping[str, tuple[int, ...]],
    got: Mapping[str, torch.Tensor],
    source: str,
    optional: Collection[str] = (),
) -> None:
    """Every expected tensor present with its shape, nothing unexpected; lists all problems at once."""
    problems = [
        f"missing tensor '{n}' of shape {s}" for n, s in want.items() if n not in got and n not in optional
    ]
    problems += [
        f"unexpected tensor '{n}' of shape {tuple(t.shape)}" for n, t in got.items() if n not in want
    ]
    problems += [
        f"tensor '{n}' has shape {tuple(t.shape)}, expected {want[n]}"
        for n, t in got.items()
        if n in want and tuple(t.shape) != tuple(want[n])
    ]
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise CheckpointError(f"{source}: the tensors do not match the model:\n  " + "\n  ".join(shown))


def from_hf_tensors(
    spec: Spec, tensors: Mapping[str, torch.Tensor], source: str = "<tensors>"
) -> dict[str, torch.Tensor]:
    """HF tensors (either layout) -> our state-dict names, every name and shape checked.
    A tied model ignores an `lm_head.weight` (transformers ties it to the embedding)."""
    hf = _unfuse(spec, tensors, source)
    tied = spec.model.head == "tied"
    _check_names(_hf_module_shapes(spec), hf, source, optional=("lm_head.weight",) if tied else ())
    _, _, layers, bias = _dims(spec)
    out = {"embed.weight": hf["model.embed_tokens.weight"], "init_z_L": hf["model.z_L_init"]}
    for s in STACKS:
        for i in range(layers):
            ours, p = f"stacks.{s}.layers.{i}.", f"model.{s}_module.layers.{i}."
            out[ours + "attn.qkvg.weight"] = torch.cat(
                [hf[p + f"self_attn.{r}_proj.weight"] for r in _ATTN_ROWS]
            )
            out[ours + "attn.o.weight"] = hf[p + "self_attn.o_proj.weight"]
            if bias:
                out[ours + "attn.qkvg.bias"] = torch.cat(
                    [hf[p + f"self_attn.{r}_proj.bias"] for r in _ATTN_ROWS]
                )
                out[ours + "attn.o.bias"] = hf[p + "self_attn.o_proj.bias"]
            out[ours + "mlp.gate_up.weight"] = torch.cat(
                [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]
            )
            out[ours + "mlp.down.weight"] = hf[p + "mlp.down_proj.weight"]
    if not tied:
        out["head.weight"] = hf["lm_head.weight"]
    return out


def state_dict_to_hf(model, layout: str = "file") -> dict[str, torch.Tensor]:
    """The model's tensors under HF names (see to_hf_tensors), detached. Raises CheckpointError
    when the model's spec is not HRM-Text-shaped."""
    hf_config_from_spec(model.spec)
    return {k: v.detach() for k, v in to_hf_tensors(model.spec, model.state_dict(), layout).items()}


def load_hf_state_dict(model, tensors: Mapping[str, torch.Tensor], source: str = "<tensors>") -> None:
    """Copy HF tensors (either layout) into `model`; CheckpointError names any tensor that does not fit."""
    hf_config_from_spec(model.spec)
    _load_ours(model, from_hf_tensors(model.spec, tensors, source), source)


def _load_ours(model, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_names(want, tensors, source)
    model.load_state_dict(dict(tensors), strict=True)  # copies, casting to the model's dtype


def _read_hf_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of an HF directory: model.safetensors, else the shards its index names."""
    single = directory / WEIGHTS_FILE
    index = directory / WEIGHTS_INDEX_FILE
    if single.is_file() or not index.is_file():
        return read_tensors(single), str(single)
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: expected a 'weight_map' of tensor name -> shard file")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(read_tensors(directory / shard))
    return tensors, str(index)


def from_hf(directory: str | os.PathLike, backend: str = "reference"):
    """Load a transformers `hrm_text` checkpoint directory (config.json + model.safetensors, or a
    sharded model.safetensors.index.json) as a CompiledModel with fp32 parameters."""
    from hrmspec.compile import compile as compile_spec

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    config_path = directory / CONFIG_FILE
    spec = spec_from_hf_config(
        read_json(config_path), name=directory.resolve().name or "hrm-text", source=str(config_path)
    )
    tensors, source = _read_hf_weights(directory)
    model = compile_spec(spec, backend=backend)
    load_hf_state_dict(model, tensors, source)
    return model


def save_hf(model, directory: str | os.PathLike) -> Path:
    """Write `model` as a transformers `hrm_text` checkpoint: config.json + model.safetensors,
    each written atomically. `AutoModelForCausalLM.from_pretrained(directory)` loads it."""
    directory = Path(directory)
    config = hf_config_from_spec(model.spec)
    config["dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    tensors = state_dict_to_hf(model, layout="file")
    directory.mkdir(parents=True, exist_ok=True)
    write_tensors(directory / WEIGHTS_FILE, tensors)
    write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return directory


# --------------------------------------------------------------------------- our checkpoint format


def save_checkpoint(model, directory: str | os.PathLike) -> Path:
    """Write hrmspec's checkpoint: `spec.yaml` (the resolved spec document, so loading needs no
    other file) and `model.safetensors` (the state_dict under our names, buffers included).
    Both are written atomically, weights first."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    doc = {"name": model.spec.name, **{k: v for k, v in model.spec.raw.items() if k != "name"}}
    write_tensors(directory / WEIGHTS_FILE, model.state_dict())
    header = "# the resolved spec of an hrmspec checkpoint; its tensors are in model.safetensors\n"
    write_text_atomic(directory / SPEC_FILE, header + yaml.safe_dump(doc, sort_keys=False))
    return directory


def load_checkpoint(directory: str | os.PathLike, backend: str = "reference"):
    """Load a checkpoint written by save_checkpoint (or a training run's newest checkpoint, with its
    EMA weights) as a CompiledModel on `backend`.
    A tensor missing, unexpected or of the wrong shape for the spec is a CheckpointError."""
    from hrmspec.compile import compile as compile_spec
    from hrmspec.runtime.checkpoint import latest_checkpoint

    directory = Path(directory)
    if (directory / "checkpoints").is_dir():  # a training run: its newest checkpoint
        directory = latest_checkpoint(directory) or directory
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    if not spec_path.is_file():
        raise CheckpointError(f"checkpoint file not found: {spec_path}")
    model = compile_spec(load_spec(spec_path), backend=backend)
    _load_ours(model, read_tensors(weights_path), str(weights_path))
    ema_path = directory / "ema.safetensors"
    if ema_path.is_file():  # training checkpoints keep an EMA of the weights: export that
        ema = read_tensors(ema_path)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(ema[name])
    return model


def import_hf(src_dir: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Convert a transformers `hrm_text` directory into an hrmspec checkpoint directory."""
    return save_checkpoint(from_hf(src_dir), out_path)


def export_hf(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert an hrmspec checkpoint directory into a transformers `hrm_text` directory."""
    return save_hf(load_checkpoint(ckpt_path), out_dir)


__all__ = [
    "CONFIG_FILE",
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "WEIGHTS_INDEX_FILE",
    "export_hf",
    "from_hf",
    "from_hf_tensors",
    "hf_config_from_spec",
    "import_hf",
    "load_checkpoint",
    "load_hf_state_dict",
    "save_checkpoint",
    "save_hf",
    "spec_from_hf_config",
    "state_dict_to_hf",
    "to_hf_tensors",
]
