"""Writing a CompiledModel as a transformers `hrm_text` checkpoint (`CompiledModel.save_hf`).

    config.json          `hf_config_from_spec(model.spec)`, with the weights' dtype
    model.safetensors    the state dict under HF names, in the layout `save_pretrained` writes

Both files are written atomically, never through a link, and never into an hrmspec checkpoint or run
folder (files.output_folder). A spec that transformers cannot run (not HRM-Text-shaped) is a
CheckpointError naming why. Reading checkpoints, and converting directories, is `convert.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hrmspec.runtime.artifacts.files import (
    check_output_folder,
    output_folder,
    write_tensors,
    write_text_atomic,
    writing,
)
from hrmspec.runtime.interop.hf_config import CONFIG_FILE, hf_config_from_spec
from hrmspec.runtime.interop.hf_weights import to_hf_tensors
from hrmspec.runtime.interop.huginn import huginn_reasons, save_huginn

WEIGHTS_FILE = "model.safetensors"


def state_dict_to_hf(model, layout: str = "file") -> dict[str, torch.Tensor]:
    """The model's tensors under HF names (see to_hf_tensors), detached. Raises CheckpointError
    when the model's spec is not HRM-Text-shaped."""
    hf_config_from_spec(model.spec)
    return {k: v.detach() for k, v in to_hf_tensors(model.spec, model.state_dict(), layout).items()}


def save_hf(model, directory: str | os.PathLike) -> Path:
    """Write `model` as a transformers `hrm_text` checkpoint: config.json + model.safetensors,
    each written atomically. `AutoModelForCausalLM.from_pretrained(directory)` loads it. A Huginn-shaped
    model is written in Huginn's released layout instead."""
    directory = check_output_folder(directory)
    if not huginn_reasons(model.spec):  # a Huginn model: its released layout (huginn.py)
        with writing(directory):
            return save_huginn(model, output_folder(directory))
    config = hf_config_from_spec(model.spec)
    config["dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    tensors = state_dict_to_hf(model, layout="file")
    directory = output_folder(directory)
    with writing(directory):
        write_tensors(directory / WEIGHTS_FILE, tensors)
        write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return directory


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "save_hf", "state_dict_to_hf"]
