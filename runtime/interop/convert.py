"""Hugging Face `hrm_text` import/export, and hrmspec's own checkpoint format: the load / save functions.

transformers' `HrmTextForCausalLM` is one point in the space of specs, so an HF checkpoint
converts to a spec plus a state dict, and back, with no change to the math:

    hf_config.py     config.json <-> Spec        spec_from_hf_config, hf_config_from_spec
    hf_weights.py    HF tensors <-> ours         to_hf_tensors, from_hf_tensors
    export.py        models out                  state_dict_to_hf, save_hf
    this module      models and directories in   load_hf_state_dict, from_hf, save_checkpoint,
                     and converted               load_checkpoint, import_hf, export_hf

An HF directory holds config.json and model.safetensors (or the shards model.safetensors.index.json
names). hrmspec's own checkpoint is a directory with `spec.yaml` (the resolved spec document) and
`model.safetensors` (the CompiledModel's state_dict, buffers included). See docs/hf.md. Every name
in `__all__` is importable from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

from hrmspec.compile import compile as compile_spec
from hrmspec.errors import CheckpointError
from hrmspec.runtime.artifacts.checkpoint import model_tensors, read_latest
from hrmspec.runtime.artifacts.files import (
    check_output_folder,
    output_folder,
    read_json,
    read_tensors,
    write_tensors,
    write_text_atomic,
    writing,
)
from hrmspec.runtime.artifacts.sharded import is_sharded
from hrmspec.runtime.interop.export import WEIGHTS_FILE, save_hf, state_dict_to_hf
from hrmspec.runtime.interop.hf_config import CONFIG_FILE, hf_config_from_spec, spec_from_hf_config
from hrmspec.runtime.interop.hf_weights import check_names, from_hf_tensors, shard_names, to_hf_tensors
from hrmspec.runtime.interop.huginn import from_huginn_tensors, is_huginn_config, spec_from_huginn_config
from hrmspec.spec.load import load_spec

WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
SPEC_FILE = "spec.yaml"


def load_hf_state_dict(model, tensors: Mapping[str, torch.Tensor], source: str = "<tensors>") -> None:
    """Copy HF tensors (either layout) into `model`; CheckpointError names any tensor that does not fit."""
    hf_config_from_spec(model.spec)
    _load_ours(model, from_hf_tensors(model.spec, tensors, source), source)


def _load_ours(model, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_names(want, tensors, source)
    model.load_state_dict(dict(tensors), strict=True)  # copies, casting to the model's dtype


def _read_hf_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of an HF directory: model.safetensors, else the shards its index names."""
    single = directory / WEIGHTS_FILE
    index = directory / WEIGHTS_INDEX_FILE
    if single.is_file() or not index.is_file():
        return read_tensors(single), str(single)
    weight_map = read_json(index).get("weight_map")
    tensors: dict[str, torch.Tensor] = {}
    root = directory.resolve()
    for shard in shard_names(weight_map, str(index)):
        path = (directory / shard).resolve()
        if path.parent != root:
            raise CheckpointError(f"{index}: shard {str(shard)[:80]!r} is not a file of {directory}; an index names "
                                  "shard files beside it, never other folders")
        tensors.update(read_tensors(path))
    return tensors, str(index)


def from_hf(directory: str | os.PathLike, backend: str = "reference"):
    """Load a transformers `hrm_text` checkpoint directory (config.json + model.safetensors, or a
    sharded model.safetensors.index.json), or a Huginn one (`model_type: huginn_raven`, see
    huginn.py), as a CompiledModel with fp32 parameters."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    config_path = directory / CONFIG_FILE
    config = read_json(config_path)
    name = directory.resolve().name
    if is_huginn_config(config):  # Huginn's released layout; its remote-code .py files are never read
        spec = spec_from_huginn_config(config, name=name or "huginn", source=str(config_path))
        tensors, source = _read_hf_weights(directory)
        model = compile_spec(spec, backend=backend)
        _load_ours(model, from_huginn_tensors(spec, tensors, source), source)
        return model
    spec = spec_from_hf_config(config, name=name or "hrm-text", source=str(config_path))
    tensors, source = _read_hf_weights(directory)
    model = compile_spec(spec, backend=backend)
    load_hf_state_dict(model, tensors, source)
    return model


# --------------------------------------------------------------------------- our checkpoint format


def save_checkpoint(model, directory: str | os.PathLike) -> Path:
    """Write hrmspec's checkpoint: `spec.yaml` (the resolved spec document, so loading needs no
    other file) and `model.safetensors` (the state_dict under our names, buffers included).
    Both are written atomically, weights first, never through a link. An existing checkpoint or run
    folder, or a folder inside a run's checkpoints, is refused: a checkpoint is never overwritten."""
    directory = output_folder(directory)
    doc = {"name": model.spec.name, **{k: v for k, v in model.spec.raw.items() if k != "name"}}
    with writing(directory):
        write_tensors(directory / WEIGHTS_FILE, model.state_dict())
        header = "# the resolved spec of an hrmspec checkpoint; its tensors are in model.safetensors\n"
        write_text_atomic(directory / SPEC_FILE, header + yaml.safe_dump(doc, sort_keys=False))
    return directory


def load_checkpoint(directory: str | os.PathLike, backend: str = "reference"):
    """Load a checkpoint written by save_checkpoint (or a training run's newest checkpoint, with its
    EMA weights) as a CompiledModel on `backend`.
    A tensor missing, unexpected or of the wrong shape for the spec is a CheckpointError."""
    directory = Path(directory)
    if (directory / "checkpoints").is_dir():  # a training run: its newest one, read while the run may prune it
        return read_latest(directory, lambda last: _load_folder(last, backend))
    return _load_folder(directory, backend)


def _load_folder(directory: Path, backend: str):
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    if not spec_path.is_file():
        raise CheckpointError(f"checkpoint file not found: {spec_path}")
    model = compile_spec(load_spec(spec_path), backend=backend)
    if is_sharded(directory) and not weights_path.exists():  # an FSDP run's checkpoint: read its shards
        _load_ours(model, model_tensors(directory), f"{directory}/shards")
    else:
        _load_ours(model, read_tensors(weights_path), str(weights_path))
    ema = model_tensors(directory, "ema")  # training checkpoints keep an EMA of the weights: export that
    if ema is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(ema[name])
    return model


def import_hf(src_dir: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Convert a transformers `hrm_text` directory into an hrmspec checkpoint directory (a new one: an existing
    checkpoint, run folder or the source itself is refused before anything is read)."""
    check_output_folder(out_path, source=src_dir)
    return save_checkpoint(from_hf(src_dir), out_path)


def export_hf(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert an hrmspec checkpoint directory into a transformers `hrm_text` directory (never over a
    checkpoint or run folder, the source included: refused before anything is read)."""
    check_output_folder(out_dir, source=ckpt_path)
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
