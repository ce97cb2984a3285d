"""Tensor names and layouts: our state dict <-> a transformers `hrm_text` one, names and shapes checked.

The tensors differ only by name and by how projections are fused:

    ours (per layer)        HF module (state_dict())           HF file (model.safetensors)
    attn.qkvg  [q;k;v;g]    self_attn.{q,k,v,gate}_proj        attn.gqkv_proj  [g;q;k;v] (biases unfused)
    attn.o                  self_attn.o_proj                   attn.o_proj
    mlp.gate_up [gate;up]   mlp.{gate,up}_proj                 mlp.gate_up_proj [gate;up]
    mlp.down                mlp.down_proj                      mlp.down_proj

`stacks.{L,H}.layers.i.` is `model.{L,H}_module.layers.i.` in HF; `embed`, `init_z_L` and `head`
are `model.embed_tokens`, `model.z_L_init` and `lm_head` (absent from files when tied). Files
are written in the layout `save_pretrained` writes (which the released checkpoints use) and
read in either layout.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from hrmspec.errors import CheckpointError
from hrmspec.spec.schema import Spec
from hrmspec.spec.source import quoted

STACKS = ("L", "H")
_ATTN_ROWS = ("q", "k", "v", "gate")  # our fused qkvg, top to bottom
_GQKV_ROWS = ("gate", "q", "k", "v")  # the fused gqkv_proj of HF checkpoint files


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


def tensor_problems(
    want: Mapping[str, tuple[int, ...]],
    got: Mapping[str, torch.Tensor],
    optional: Collection[str] = (),
) -> list[str]:
    """What keeps `got` from being exactly the tensors `want` names, with their shapes: missing,
    unexpected and misshapen tensors, in that order (empty when it fits)."""
    problems = [
        f"missing tensor '{n}' of shape {s}" for n, s in want.items() if n not in got and n not in optional
    ]
    problems += [
        f"unexpected tensor '{n}' of shape {tuple(t.shape)}" for n, t in got.items() if n not in want
    ]
    problems += [
        f"tensor '{n}' has shape {tuple(t.shape)}, expected {tuple(want[n])}"
        for n, t in got.items()
        if n in want and tuple(t.shape) != tuple(want[n])
    ]
    return problems


def shard_names(weight_map: Any, source: str) -> list[str]:
    """The shard files a sharded checkpoint's index names (its `weight_map`: tensor name -> file), each
    once and sorted; CheckpointError naming the entry for a map that is not tensor names to file names."""
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{source}: expected a 'weight_map' of tensor name -> shard file, found "
                              f"{quoted(weight_map)}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{source}: weight_map[{quoted(name)}]: expected a shard file name, found "
                                  f"{quoted(shard)}")
    return sorted(set(weight_map.values()))


def check_names(
    want: Mapping[str, tuple[int, ...]],
    got: Mapping[str, torch.Tensor],
    source: str,
    optional: Collection[str] = (),
) -> None:
    """Every expected tensor present with its shape, nothing unexpected; lists all problems at once."""
    problems = tensor_problems(want, got, optional)
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
    check_names(_hf_module_shapes(spec), hf, source, optional=("lm_head.weight",) if tied else ())
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
