"""Tensor names: an official HRM / TRM checkpoint's state dict <-> ours, names and shapes checked.

`pretrain.py` (of sapientinc/HRM and of TinyRecursiveModels) saves with torch.save the state dict
of the ACT loss head, `ACTLossHead(model)`, compiled by torch.compile unless DISABLE_COMPILE is set:
every name is `[_orig_mod.]model.inner.<name>`. Its tensors are ours renamed, none split or fused:

    official (after model.inner.)         shape                  ours
    embed_tokens.embedding_weight         (vocab, d)             embed.weight
    lm_head.weight                        (vocab, d)             head.weight
    q_head.weight, q_head.bias            (2, d), (2,)           halting.weight, halting.bias
    puzzle_emb.weights                    (identifiers, dim)     puzzle.weight
    embed_pos.embedding_weight            (P + seq_len, d)       positions.weight
    H_init, L_init                        (d,)                   init_z_H, init_z_L (TRM: init_y, init_z)
    {H,L}_level.layers.i.                                        stacks.{H,L}.layers.i. (TRM: L_level is stacks.net)
        self_attn.qkv_proj.weight         (3 heads x hd, d)      attn.qkvg.weight: rows [q; k; v], no gate rows
        self_attn.o_proj.weight           (d, heads x hd)        attn.o.weight
        mlp.gate_up_proj.weight           (2 ffn, d)             mlp.gate_up.weight: rows [gate; up]
        mlp.down_proj.weight              (d, ffn)               mlp.down.weight
        mlp_t.gate_up_proj.weight         (2 ffn_t, P + seq_len) token.gate_up.weight (mlp_t, in place of
        mlp_t.down_proj.weight            (P + seq_len, ffn_t)   token.down.weight     self_attn)

The file holds parameters in fp32 and the persistent buffers H_init and L_init in the model's
forward dtype (bfloat16 by default); the rotary tables and the sparse embedding's per-batch copies
are not persistent, so not in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from hrmspec.errors import CheckpointError
from hrmspec.runtime.artifacts.checkpoint import read_pt
from hrmspec.runtime.interop.hf_weights import tensor_problems
from hrmspec.runtime.interop.hrm_config import HrmArch, Roles, Sizes
from hrmspec.spec.schema import Spec

INNER = "model.inner."  # the loss head's model, and the ACT wrapper's inner model
COMPILED = "_orig_mod."  # torch.compile's module around the loss head
# ours -> official, per layer: the sublayer that mixes positions, then the MLP
ATTENTION = {"attn.qkvg.weight": "self_attn.qkv_proj.weight", "attn.o.weight": "self_attn.o_proj.weight"}
TOKEN_MLP = {"token.gate_up.weight": "mlp_t.gate_up_proj.weight", "token.down.weight": "mlp_t.down_proj.weight"}
MLP = {"mlp.gate_up.weight": "mlp.gate_up_proj.weight", "mlp.down.weight": "mlp.down_proj.weight"}
INIT_BUFFERS = ("H_init", "L_init")  # held in the forward dtype


def official_names(spec: Spec, r: Roles) -> dict[str, str]:
    """Our state-dict name -> the official one after `model.inner.`."""
    m = spec.model
    out = {"embed.weight": "embed_tokens.embedding_weight", "head.weight": "lm_head.weight",
           "halting.weight": "q_head.weight", "halting.bias": "q_head.bias",
           f"init_{r.z_H}": "H_init", f"init_{r.z_L}": "L_init"}
    if m.puzzle is not None:
        out["puzzle.weight"] = "puzzle_emb.weights"
    if m.positions == "learned":
        out["positions.weight"] = "embed_pos.embedding_weight"
    levels = {r.L: "L_level"} if r.H == r.L else {r.H: "H_level", r.L: "L_level"}
    for module, level in levels.items():
        spec_of = m.module(module)
        layer = (TOKEN_MLP if spec_of.block.attention.type == "token_mlp" else ATTENTION) | MLP
        for i in range(spec_of.layers):
            out.update({f"stacks.{module}.layers.{i}.{ours}": f"{level}.layers.{i}.{theirs}"
                        for ours, theirs in layer.items()})
    return out


# --------------------------------------------------------------------------- reading


def read_hrm_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an official checkpoint file under their names after `model.inner.`. The file
    is read with weights_only=True: tensors and plain containers only, never a pickled object."""
    state = read_pt(path)
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor) as pretrain.py saves it, "
                              f"found {type(state).__name__}")
    out = {}
    for key, t in state.items():
        name = key.removeprefix(COMPILED)
        if not name.startswith(INNER):
            raise CheckpointError(f"{path}: tensor '{key}' is not under '{INNER}': expected the state dict of the "
                                  f"ACT loss head pretrain.py saves ([{COMPILED}]{INNER}<name>)")
        out[name[len(INNER):]] = t
    return out


def _needed(tensors: Mapping[str, torch.Tensor], name: str, why: str, source: str) -> torch.Tensor:
    if name not in tensors:
        raise CheckpointError(f"{source}: missing tensor '{INNER}{name}', which {why}")
    t = tensors[name]
    if t.dim() != 2:
        raise CheckpointError(f"{source}: tensor '{INNER}{name}' has shape {tuple(t.shape)}, "
                              "expected a table (rows, width)")
    return t


def sizes_from_tensors(a: HrmArch, tensors: Mapping[str, torch.Tensor], seq_len: int | None, source: str,
                       arch_source: str) -> Sizes:
    """The sizes all_config.yaml leaves to the dataset: vocab and puzzle identifiers from the tables'
    rows, seq_len from a table over the positions (learned positions, an mlp_t) or from `seq_len`
    (which must agree)."""
    vocab = _needed(tensors, "embed_tokens.embedding_weight", "every model has", source).shape[0]
    identifiers = 0
    if a.puzzle_emb_ndim:
        why = f"arch.puzzle_emb_ndim {a.puzzle_emb_ndim} in {arch_source} says it has"
        identifiers = _needed(tensors, "puzzle_emb.weights", why, source).shape[0]
    table = None  # a table with a row per position of a row: the puzzle positions, then seq_len
    if a.pos_encodings == "learned":
        table = "embed_pos.embedding_weight", "arch.pos_encodings learned"
    elif a.mlp_t:
        table = "L_level.layers.0.mlp_t.down_proj.weight", "arch.mlp_t"
    if table is not None:
        name, key = table
        rows = _needed(tensors, name, f"{key} in {arch_source} says it has", source).shape[0]
        found = rows - a.puzzle_emb_len
        if found < 1 or seq_len not in (None, found):
            raise CheckpointError(f"{source}: tensor '{INNER}{name}' has {rows} rows: {a.puzzle_emb_len} puzzle "
                                  f"positions and seq_len {found}, not {seq_len}; give the seq_len the model was "
                                  "trained at, or none")
        seq_len = found
    elif seq_len is None:
        raise CheckpointError(f"{source}: the sequence length is not in the checkpoint ({a.pos_encodings} "
                              "positions); give the dataset's seq_len (--seq-len N: 81 for 9 x 9 Sudoku, 900 for "
                              "ARC and 30 x 30 mazes)")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise CheckpointError(f"seq_len must be a positive integer, found {seq_len!r}")
    return Sizes(vocab, identifiers, seq_len)


def load_hrm_tensors(model, r: Roles, tensors: Mapping[str, torch.Tensor], source: str, arch_source: str) -> None:
    """Copy official tensors (names after `model.inner.`) into `model`; the first of every problem
    (missing, unexpected, misshapen tensor) is one CheckpointError line naming the tensor."""
    names = official_names(model.spec, r)
    ours = model.state_dict()
    want = {theirs: tuple(ours[k].shape) for k, theirs in names.items()}
    problems = tensor_problems(want, tensors)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{source}: {problems[0]}{more} under '{INNER}'; check that {arch_source} is the "
                              "config this checkpoint was trained with")
    model.load_state_dict({k: tensors[theirs] for k, theirs in names.items()}, strict=True)


# --------------------------------------------------------------------------- writing


def hrm_tensors(model, r: Roles, forward_dtype: str, compiled: bool = True) -> dict[str, torch.Tensor]:
    """The model's tensors as pretrain.py saves them: official names (with torch.compile's
    `_orig_mod.` prefix when `compiled`), parameters in fp32, H_init and L_init in `forward_dtype`."""
    names = official_names(model.spec, r)
    ours = model.state_dict()
    extra = sorted(set(ours) - set(names))
    if extra:
        raise CheckpointError(f"{model.spec.name}: tensor '{extra[0]}' has no place in an official checkpoint")
    prefix = (COMPILED if compiled else "") + INNER
    dtype = getattr(torch, forward_dtype)
    return {prefix + theirs: ours[k].detach().cpu().to(dtype if theirs in INIT_BUFFERS else torch.float32).clone()
            for k, theirs in names.items()}


__all__ = ["COMPILED", "INNER", "hrm_tensors", "load_hrm_tensors", "official_names", "read_hrm_tensors",
           "sizes_from_tensors"]
