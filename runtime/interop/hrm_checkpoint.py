"""Official HRM and TRM checkpoints in and out: the load / save functions and the directory conversions.

An official checkpoint is what `pretrain.py` of sapientinc/HRM or of TinyRecursiveModels writes
into its checkpoint_path: files `step_<N>`, each a torch.save of the ACT loss head's state dict
(hrm_weights.py), and `all_config.yaml`, the training config whose `arch:` section describes the
model (hrm_config.py). The sizes the config leaves to the dataset come from the weights' shapes;
only seq_len must be given when the model has no learned positions and the dataset the config names
(data_path, data_paths) is not at hand. The config's run settings (learning rates, batch, EMA, the
dataset) become the spec's train: and data: sections, so `hrmspec train` repeats the official run;
an export writes them back (hrm_config.py: training_from_config, config_from_training).

    from_hrm_checkpoint(path, config, seq_len)   a CompiledModel with the official ACT interface
    to_hrm_checkpoint(model, directory)          model.pt + all_config.yaml, as pretrain.py writes them
    import_hrm(path, out), export_hrm(ckpt, out) the same, to and from hrmspec checkpoint directories

Reading never unpickles an object (torch.load with weights_only=True), so a checkpoint someone
hands you cannot run code. Everything that does not fit — a file that is not a state dict, a
missing or misshapen tensor, a config option hrmspec cannot run — is one CheckpointError line
naming the file, the key and what would fit. See docs/hrm.md.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import yaml

from hrmspec.compile import compile as compile_spec
from hrmspec.errors import CheckpointError
from hrmspec.runtime.artifacts.files import (
    atomic_write,
    check_output_folder,
    output_folder,
    write_text_atomic,
    writing,
)
from hrmspec.runtime.interop.convert import load_checkpoint, save_checkpoint
from hrmspec.runtime.interop.hrm_config import (
    ARCH_FILE,
    config_from_training,
    hrm_arch_from_spec,
    official_dataset,
    read_arch_file,
    read_config_file,
    read_hrm_arch,
    roles,
    spec_from_hrm_arch,
    training_from_config,
)
from hrmspec.runtime.interop.hrm_weights import hrm_tensors, load_hrm_tensors, read_hrm_tensors, sizes_from_tensors

WEIGHTS_FILE = "model.pt"  # what to_hrm_checkpoint writes; pretrain.py names its files step_<N>


def checkpoint_file(path: str | os.PathLike) -> Path:
    """A checkpoint file as given, or in a directory its model.pt, else its newest step_<N>."""
    path = Path(path)
    if path.is_dir():
        if (path / WEIGHTS_FILE).is_file():
            return path / WEIGHTS_FILE
        steps = [p for p in path.iterdir() if re.fullmatch(r"step_\d+", p.name) and p.is_file()]
        if not steps:
            raise CheckpointError(f"{path}: no checkpoint in it (step_<N> as pretrain.py writes, or {WEIGHTS_FILE})")
        return max(steps, key=lambda p: int(p.name.removeprefix("step_")))
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    return path


def from_hrm_checkpoint(path: str | os.PathLike, config: str | os.PathLike | None = None, seq_len: int | None = None,
                        backend: str = "reference"):
    """Load an official HRM / TRM checkpoint as a CompiledModel with fp32 parameters.

    `path`: a checkpoint file (`step_<N>`) or its directory; `config`: its all_config.yaml (default:
    the one beside the file); `seq_len`: the dataset's sequence length, needed unless the model has
    learned positions. The model has the official ACT interface: `initial_carry(batch)`,
    `act_step(carry, batch)` (runtime/interop/hrm_act.py)."""
    file = checkpoint_file(path)
    config_path = Path(config) if config is not None else file.parent / ARCH_FILE
    arch = read_hrm_arch(read_arch_file(config_path), str(config_path))
    doc = read_config_file(config_path)
    if seq_len is None:  # the dataset the run trained on, when it is here, says it (pretrain.py reads it there)
        meta, _ = official_dataset(doc, config_path.parent)
        found = meta.get("seq_len") if meta else None
        seq_len = found if isinstance(found, int) and not isinstance(found, bool) and found > 0 else None
    tensors = read_hrm_tensors(file)
    sizes = sizes_from_tensors(arch, tensors, seq_len, str(file), str(config_path))
    name = file.resolve().parent.name or arch.model
    train, data, notes = training_from_config(doc, str(config_path), bool(arch.puzzle_emb_ndim), config_path.parent)
    spec = spec_from_hrm_arch(arch, sizes, name=name, source=str(config_path), train=train, data=data)
    model = compile_spec(spec, backend=backend)
    load_hrm_tensors(model, roles(spec), tensors, str(file), str(config_path))
    model.import_notes = notes  # what of the training config could not be carried over
    return model


def to_hrm_checkpoint(model, directory: str | os.PathLike, forward_dtype: str = "bfloat16",
                      compiled: bool = True) -> Path:
    """Write `model` as an official checkpoint: `directory/model.pt` (a torch.save of plain tensors
    under the names pretrain.py saves, with torch.compile's `_orig_mod.` prefix when `compiled`)
    and `directory/all_config.yaml` (its arch section). H_init and L_init are written in
    `forward_dtype`, as the official model holds them. Returns the weights file.

    A spec the official code cannot run is a CheckpointError listing every reason."""
    arch = hrm_arch_from_spec(model.spec, forward_dtype)
    tensors = hrm_tensors(model, roles(model.spec), forward_dtype, compiled)
    directory = output_folder(directory)  # never a checkpoint or run folder; nothing written through a link
    file = directory / WEIGHTS_FILE
    header = (f"# an official training config (pretrain.py): the arch and the run's settings; the weights are in "
              f"{WEIGHTS_FILE}\n"
              "# seq_len, vocab_size and num_puzzle_identifiers come from the dataset, as in pretrain.py\n")
    with writing(directory):
        atomic_write(file, lambda p: torch.save(tensors, p))
        config = {"arch": arch.config(), **config_from_training(model.spec.train or {}, model.spec.data)}
        write_text_atomic(directory / ARCH_FILE, header + yaml.safe_dump(config, sort_keys=False))
    return file


def import_hrm(path: str | os.PathLike, out_dir: str | os.PathLike, config: str | os.PathLike | None = None,
               seq_len: int | None = None) -> Path:
    """Convert an official HRM / TRM checkpoint into an hrmspec checkpoint directory (a new one: an existing
    checkpoint, run folder or the source's folder is refused before anything is read)."""
    check_output_folder(out_dir, source=path)
    model = from_hrm_checkpoint(path, config, seq_len)
    for note in model.import_notes:
        print(f"note: {note}")
    return save_checkpoint(model, out_dir)


def export_hrm(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, forward_dtype: str = "bfloat16") -> Path:
    """Convert an hrmspec checkpoint directory into an official checkpoint (model.pt + all_config.yaml), never
    over a checkpoint or run folder, the source included: refused before anything is read."""
    check_output_folder(out_dir, source=ckpt_path)
    return to_hrm_checkpoint(load_checkpoint(ckpt_path), out_dir, forward_dtype)


__all__ = ["WEIGHTS_FILE", "checkpoint_file", "export_hrm", "from_hrm_checkpoint", "import_hrm",
           "to_hrm_checkpoint"]
