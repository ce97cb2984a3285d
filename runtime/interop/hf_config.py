"""The transformers `hrm_text` config (the dict of its config.json) <-> an hrmspec Spec.

transformers' `HrmTextForCausalLM` is one point in the space of specs: two stacks L and H of
equal pre-norm gated-attention SwiGLU layers, each capped by an RMSNorm, run as

    repeat H_cycles: { repeat L_cycles: { z_L = L(z_L + z_H) };  z_H = H(z_H + z_L) }

from z_H = the scaled token embedding and z_L = a fixed vector (`model.z_L_init`).
`spec_from_hf_config` reads a config as transformers does (HrmTextConfig's defaults fill missing
keys); `hf_config_from_spec` writes the config of any spec of that shape. Both raise
CheckpointError for what does not map exactly: a config's key by name, a spec's every reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hrmspec.errors import CheckpointError
from hrmspec.runtime.interop.config_reader import ConfigReader, finite_number, spec_from_document
from hrmspec.spec.schema import Repeat, Spec, Statement, lecun_std
from hrmspec.spec.source import quoted

CONFIG_FILE = "config.json"
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


def _rope_theta(c: ConfigReader) -> float:
    """rope_theta of a default-type rotary embedding, from `rope_parameters` or the legacy keys."""
    params = c.config.get("rope_parameters")
    if params is None:
        legacy = c.config.get("rope_scaling") or {}
        params = {"rope_theta": c.config.get("rope_theta", 10000.0), **legacy}
    if not isinstance(params, dict):
        raise c.fail("rope_parameters", f"expected a mapping, found {quoted(params)}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise c.fail("rope_parameters", f"rope_type {quoted(kind)} is not supported, only 'default'")
    theta = params.get("rope_theta", 10000.0)
    if not finite_number(theta) or theta < 1:
        raise c.fail("rope_parameters.rope_theta", f"expected a number >= 1, found {quoted(theta)}")
    return float(theta)


def spec_from_hf_config(config: Mapping[str, Any], name: str = "hrm-text", source: str = CONFIG_FILE) -> Spec:
    """The spec of a transformers `hrm_text` config (the dict of its config.json).

    Raises CheckpointError, naming `source` and the key, for configs hrmspec cannot run exactly.
    """
    c = ConfigReader(config, source, _HF_DEFAULTS)
    model_type = config.get("model_type", "hrm_text")
    if model_type != "hrm_text":
        raise c.fail("model_type", f"expected 'hrm_text', found {quoted(model_type)}; only HRM-Text models convert")
    if c.get("hidden_act") != "silu":
        raise c.fail("hidden_act", f"only 'silu' (SwiGLU) is supported, found {quoted(c.get('hidden_act'))}")
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
        raise c.fail("initializer_range", f"expected a number in (0, 1], found {quoted(init_range)}")
    scale = c.get("embedding_scale")
    scale = 1.0 / init_range if scale is None else c.number("embedding_scale")
    bp = c.get("L_bp_cycles")
    if not isinstance(bp, list) or not all(type(n) is int and n >= 0 for n in bp):
        raise c.fail("L_bp_cycles", f"expected a list of non-negative integers, found {quoted(bp)}")
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
    return spec_from_document(doc, source)


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
    exits = [x.exit_norm for x in (L, H)]
    if any(n is None or (n.type, n.eps, n.affine) != ("rms", b.norm.eps, False) for n in exits):
        why.append("both modules need exit_norm: rms (an RMSNorm without weights, the block norm's eps)")
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
    if m.final_norm is not None:
        why.append("final_norm must be false (the H exit norm precedes the head)")
    if m.halting is not None:
        why.append(f"model.halting ({m.halting.type}) has no transformers equivalent")
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
