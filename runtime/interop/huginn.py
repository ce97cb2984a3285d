"""Huginn checkpoints as released (`model_type: huginn_raven`, RavenForCausalLM's layout) <-> hrmspec.

A Huginn directory holds config.json and safetensors weights, and remote-code `.py` files that are
never read or run here. Its model (seal-rg/recurrent-pretraining, `raven_modeling_minimal.py`) is
a point in the spec space, written out in specs/huginn.yaml:

    e = prelude(e)                        e: the token embedding x sqrt(n_embd)
    repeat: {sample: lognormal_poisson, mean: mean_recurrence, sigma: 0.5}
        s = core(cat(s, e))               the linear `adapter` on [s; e], then the core blocks
    s = ln_f(s)                           ln_f on the latent
    h = coda(s)
    h = ln_f(h)                           the same ln_f again, then the tied head

Every block is a SandwichBlock (`place: pre_post`: norm_1 before attention, norm_2 after its
residual add, norm_3 / norm_4 around the MLP), with a bias on q and k (`qk_bias`), rotary embeddings
of base `rope_base`, a fused SwiGLU (`fc` = gate; up). The initial state is a truncated normal of
std sqrt(2 / (5 n_embd)) times the embedding scale sqrt(n_embd): `init: random, std: sqrt(2/5)`.

    official tensor (under transformer.)           ours
    wte.weight (lm_head.weight tied)               embed.weight
    {prelude,core_block,coda}.i.norm_1..4.weight   stacks.<m>.layers.i.{attn_norm, attn_post_norm,
                                                   mlp_norm, mlp_post_norm}.weight
    ....attn.Wqkv.weight, attn.qk_bias             attn.qkvg.weight, attn.qkvg.bias (q and k rows
                                                   permuted per head: Huginn rotates interleaved pairs
                                                   (2i, 2i + 1), hrmspec the halves (i, i + hd/2);
                                                   q . k is the same)
    ....attn.proj.weight                           attn.o.weight
    ....mlp.fc.weight, mlp.proj.weight             mlp.gate_up.weight, mlp.down.weight
    adapter.weight                                 stacks.core.adapter.weight
    ln_f.weight                                    stacks.ln_f.exit_norm.weight (one module, called twice)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hrmspec.errors import CheckpointError
from hrmspec.runtime.artifacts.files import write_tensors, write_text_atomic
from hrmspec.runtime.interop.config_reader import ConfigReader, spec_from_document
from hrmspec.spec.schema import Repeat, Spec
from hrmspec.spec.source import quoted

MODEL_TYPE = "huginn_raven"
IGNORED = ("freqs_cis", "lm_head.weight")  # the rotary table (recomputed) and the head tied to wte
STAGES = {"prelude": "prelude", "core": "core_block", "coda": "coda"}  # our module -> official ModuleList
NORMS = {"norm_1": "attn_norm", "norm_2": "attn_post_norm", "norm_3": "mlp_norm", "norm_4": "mlp_post_norm"}
LINEARS = {"attn.Wqkv": "attn.qkvg", "attn.proj": "attn.o", "mlp.fc": "mlp.gate_up", "mlp.proj": "mlp.down"}
# what the official code can build: anything else is another model
FIXED = {"block_class_name": "SandwichBlock", "norm_class_name": "RMSNorm_llama", "mlp_class_name": "GatedMLP",
         "nonlin_name": "SiLU", "injection_type": "linear"}
DEFAULTS = {"rope_base": 50000.0, "norm_eps": 1e-6, "qk_bias": True, "tie_embeddings": True, "bias": False,
            "block_size": 4096, "mean_backprop_depth": 8, "n_layers_in_prelude": 2, "n_layers_in_coda": 2,
            "n_layers_in_recurrent_block": 4, "mean_recurrence": 32, **FIXED}


def is_huginn_config(config: Mapping[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE


def spec_from_huginn_config(config: Mapping[str, Any], name: str = "huginn", source: str = "config.json") -> Spec:
    """The Spec of a Huginn config.json; CheckpointError naming the key for what does not map."""
    c = ConfigReader(config, source, DEFAULTS)
    for key, want in FIXED.items():
        if c.get(key) != want:
            raise c.fail(key, f"expected {want!r} (what Huginn's code builds), found {quoted(c.get(key))}")
    d = c.integer("n_embd")
    heads = c.integer("num_attention_heads") if "num_attention_heads" in config else c.integer("n_heads")
    if config.get("num_key_value_heads", heads) != heads:
        raise c.fail("num_key_value_heads", f"expected {heads} (no grouped-query attention in this layout), "
                     f"found {quoted(config['num_key_value_heads'])}")
    if d % heads or (d // heads) % 2:
        raise c.fail("n_embd", f"expected a multiple of 2 x num_attention_heads ({heads}), found {d}")
    if c.boolean("bias"):
        raise c.fail("bias", "expected false: linear biases are not part of the released models")
    # the embedding's rows: padded_vocab_size when the config gives one, else vocab_size
    vocab = c.integer("padded_vocab_size" if config.get("padded_vocab_size") is not None else "vocab_size")
    doc = {
        "name": name,
        "model": {
            "vocab": vocab, "d_model": d, "heads": heads, "ffn": c.integer("intermediate_size"),
            "max_seq_len": c.integer("block_size"), "embed_scale": math.sqrt(d),
            "block": {"norm": {"type": "rms", "eps": c.number("norm_eps"), "affine": True, "place": "pre_post"},
                      "attention": {"type": "plain", "rope_theta": c.number("rope_base"), "mask": "causal",
                                    "qk_bias": c.boolean("qk_bias")},
                      "mlp": "swiglu"},
            "modules": {
                "prelude": {"layers": c.integer("n_layers_in_prelude"), "exit_norm": "none"},
                "core": {"layers": c.integer("n_layers_in_recurrent_block"), "exit_norm": "none"},
                "ln_f": {"layers": 0, "exit_norm": {"type": "rms", "eps": c.number("norm_eps"), "affine": True}},
                "coda": {"layers": c.integer("n_layers_in_coda"), "exit_norm": "none"},
            },
            "states": {"e": {"init": "embed"}, "s": {"init": "random", "std": math.sqrt(2 / 5)},
                       "h": {"init": "zeros"}},
            "schedule": [
                "e = prelude(e)",
                {"repeat": {"sample": "lognormal_poisson", "mean": c.integer("mean_recurrence"), "sigma": 0.5},
                 "do": ["s = core(cat(s, e))"]},
                "s = ln_f(s)",
                "h = coda(s)",
                "h = ln_f(h)",
            ],
            "output": "h",
            "head": "tied" if c.boolean("tie_embeddings") else "untied",
            "credit": {"truncate": c.integer("mean_backprop_depth")},
        },
        "objective": "lm",
    }
    return spec_from_document(doc, source)


def huginn_reasons(spec: Spec) -> list[str]:
    """Why `spec` is not a Huginn model (empty: it is one)."""
    m, why = spec.model, []
    names = [mod.name for mod in m.modules]
    if sorted(names) != sorted(["prelude", "core", "ln_f", "coda"]):
        return [f"modules {names}, not prelude, core, ln_f and coda"]
    sched = m.schedule
    shape = [isinstance(st, Repeat) or str(st) for st in sched]
    if shape != ["e = prelude(e)", True, "s = ln_f(s)", "h = coda(s)", "h = ln_f(h)"] or \
            [str(st) for st in sched[1].body] != ["s = core(cat(s, e))"]:
        why.append("the schedule is not prelude, a loop of core(cat(s, e)), ln_f, coda, ln_f")
    for mod in m.modules:
        b = mod.block
        if mod.name == "ln_f":
            if mod.layers or mod.exit_norm is None or not mod.exit_norm.affine or mod.exit_norm.type != "rms":
                why.append("ln_f is not an affine RMSNorm alone")
            continue
        if mod.exit_norm is not None:
            why.append(f"module {mod.name} has an exit norm")
        if (b.norm.type, b.norm.affine, b.norm.place) != ("rms", True, "pre_post"):
            why.append(f"module {mod.name}'s norms are not affine RMSNorms placed pre and post")
        if (b.attention.type, b.attention.mask, b.attention.bias) != ("plain", "causal", False) or \
                b.attention.rope_theta is None:
            why.append(f"module {mod.name}'s attention is not plain causal rotary attention without biases")
        if b.mlp != "swiglu":
            why.append(f"module {mod.name}'s MLP is not a SwiGLU")
    if m.final_norm is not None:
        why.append("a final norm after ln_f")
    if m.head != "tied":
        why.append("the head is not tied to the embedding")
    return why


def _halves(hd: int) -> torch.Tensor:
    """Per head: the official (interleaved) row for each of ours (halves): [0, 2, ..., 1, 3, ...]."""
    return torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])


def _qk_rows(d: int, heads: int, inverse: bool = False) -> torch.Tensor:
    """The row permutation of a fused (q; k; v) projection between the two rotary layouts."""
    hd = d // heads
    per = _halves(hd)
    if inverse:
        per = torch.argsort(per)
    head = torch.cat([h * hd + per for h in range(heads)])
    return torch.cat([head, d + head, 2 * d + torch.arange(d)])


def from_huginn_tensors(spec: Spec, tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Official tensors -> our state dict (every tensor of the model; the caller checks the names)."""
    m = spec.model
    d, heads = m.d_model, m.heads
    rows = _qk_rows(d, heads)

    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        used.add(name)
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor '{name}' is missing; the file is not a complete Huginn "
                                  "checkpoint")
        return tensors[name]

    ours: dict[str, torch.Tensor] = {"embed.weight": get("transformer.wte.weight")}
    for mod in m.modules:
        if mod.name not in STAGES:
            continue
        for i in range(mod.layers):
            theirs, mine = f"transformer.{STAGES[mod.name]}.{i}.", f"stacks.{mod.name}.layers.{i}."
            for a, b in NORMS.items():
                ours[mine + b + ".weight"] = get(theirs + a + ".weight")
            for a, b in LINEARS.items():
                w = get(theirs + a + ".weight")
                ours[mine + b + ".weight"] = w[rows] if a == "attn.Wqkv" else w
            if mod.block.attention.qk_bias:
                bias = get(theirs + "attn.qk_bias").reshape(2, d)  # (2, 1, heads, hd): q's then k's
                ours[mine + "attn.qkvg.bias"] = torch.cat([bias.reshape(-1), torch.zeros(d, dtype=bias.dtype)]
                                                          )[rows][: 2 * d]
    ours["stacks.core.adapter.weight"] = get("transformer.adapter.weight")
    ours["stacks.ln_f.exit_norm.weight"] = get("transformer.ln_f.weight")
    if m.head == "untied":
        ours["head.weight"] = get("lm_head.weight")
    ours.update({f"init_{st.name}": torch.zeros(d) for st in m.states if st.init == "zeros"})  # h's zero start
    extra = [k for k in tensors if k not in used and k not in IGNORED]
    if extra:
        raise CheckpointError(f"{source}: tensors a Huginn model of this config does not have: {extra[:5]}")
    return ours


def to_huginn_tensors(model) -> dict[str, torch.Tensor]:
    """Our state dict -> the official tensors; CheckpointError if the spec is not a Huginn model."""
    spec = model.spec
    why = huginn_reasons(spec)
    if why:
        raise CheckpointError(f"{spec.name} is not a Huginn model: " + "; ".join(why))
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    d, heads = spec.model.d_model, spec.model.heads
    back = _qk_rows(d, heads, inverse=True)
    out = {"transformer.wte.weight": sd["embed.weight"], "transformer.adapter.weight": sd["stacks.core.adapter.weight"],
           "transformer.ln_f.weight": sd["stacks.ln_f.exit_norm.weight"]}
    for mod in spec.model.modules:
        if mod.name not in STAGES:
            continue
        for i in range(mod.layers):
            theirs, mine = f"transformer.{STAGES[mod.name]}.{i}.", f"stacks.{mod.name}.layers.{i}."
            for a, b in NORMS.items():
                out[theirs + a + ".weight"] = sd[mine + b + ".weight"]
            for a, b in LINEARS.items():
                w = sd[mine + b + ".weight"]
                out[theirs + a + ".weight"] = w[back] if a == "attn.Wqkv" else w
            if mod.block.attention.qk_bias:
                bias = torch.cat([sd[mine + "attn.qkvg.bias"], torch.zeros(d, dtype=sd[mine + "attn.qkvg.bias"].dtype)])
                out[theirs + "attn.qk_bias"] = bias[back][: 2 * d].reshape(2, 1, heads, d // heads)
    return out


def huginn_config_from_spec(spec: Spec) -> dict[str, Any]:
    """The config.json of a Huginn-shaped spec (the keys RavenConfig reads)."""
    m = spec.model
    mod = {x.name: x for x in m.modules}
    b = mod["core"].block
    loop = m.schedule[1]
    mean = loop.sample.mean if loop.sample is not None else loop.count
    return {
        "architectures": ["RavenForCausalLM"], "model_type": MODEL_TYPE, "n_embd": m.d_model,
        "num_attention_heads": m.heads, "num_key_value_heads": m.heads, "intermediate_size": b.ffn,
        "vocab_size": m.vocab, "padded_vocab_size": m.vocab, "block_size": m.max_seq_len,
        "n_layers_in_prelude": mod["prelude"].layers, "n_layers_in_recurrent_block": mod["core"].layers,
        "n_layers_in_coda": mod["coda"].layers, "mean_recurrence": int(round(mean)),
        "mean_backprop_depth": m.credit.truncate if m.credit.mode == "truncate" else int(round(mean)),
        "rope_base": b.attention.rope_theta, "norm_eps": b.norm.eps, "qk_bias": b.attention.qk_bias,
        "tie_embeddings": True, "bias": False, "state_init": "like-init",
        "sampling_scheme": "poisson-lognormal-filling", **FIXED,
    }


def save_huginn(model, directory: str | os.PathLike) -> Path:
    """Write `model` in Huginn's released layout: config.json + model.safetensors (atomically)."""
    directory = Path(directory)
    tensors = to_huginn_tensors(model)
    config = huginn_config_from_spec(model.spec)
    config["torch_dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    directory.mkdir(parents=True, exist_ok=True)
    write_tensors(directory / "model.safetensors", tensors)
    write_text_atomic(directory / "config.json", json.dumps(config, indent=2) + "\n")
    return directory


__all__ = ["from_huginn_tensors", "huginn_config_from_spec", "huginn_reasons", "is_huginn_config", "save_huginn",
           "spec_from_huginn_config", "to_huginn_tensors"]
