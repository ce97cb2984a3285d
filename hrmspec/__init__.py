"""hrmspec: a compiler for Hierarchical Recurrent Models.

    import hrmspec
    model = hrmspec.compile("specs/hrm-text-tiny.yaml")      # a torch.nn.Module
    out = model(input_ids, prefix_mask=prefix, labels=labels)

    model = hrmspec.from_hrm_checkpoint("checkpoints/step_1000", seq_len=81)   # official HRM / TRM
    carry = hrmspec.initial_carry(model, batch)
    carry, out = hrmspec.act_step(model, carry, batch)
    hrmspec.save_hf(model, "out/")                                          # transformers hrm_text
"""

from hrmspec.compile import compile
from hrmspec.errors import CheckpointError, HrmspecError, SpecError
from hrmspec.spec import load_spec

__version__ = "0.1.0"


def from_hf(directory, **kwargs):
    """Load a transformers `hrm_text` checkpoint directory as a CompiledModel."""
    from hrmspec.runtime.interop.convert import from_hf as _from_hf

    return _from_hf(directory, **kwargs)


def from_hrm_checkpoint(path, config=None, seq_len=None, **kwargs):
    """Load an official HRM / TRM checkpoint (pretrain.py's step_<N> and its all_config.yaml) as a CompiledModel."""
    from hrmspec.runtime.interop.hrm_checkpoint import from_hrm_checkpoint as _from_hrm

    return _from_hrm(path, config, seq_len, **kwargs)


def to_hrm_checkpoint(model, path, **kwargs):
    """Write a CompiledModel as an official HRM / TRM checkpoint directory (model.pt + all_config.yaml)."""
    from hrmspec.runtime.interop.hrm_checkpoint import to_hrm_checkpoint as _to_hrm

    return _to_hrm(model, path, **kwargs)


def save_hf(model, directory) -> None:
    """Write a CompiledModel as a transformers `hrm_text` checkpoint (config.json + model.safetensors)."""
    from hrmspec.runtime.interop.export import save_hf as _save_hf

    _save_hf(model, directory)


def initial_carry(model, batch):
    """The official HRM / TRM ACT interface: the carry before the first `act_step` (every row halted).
    `batch` holds `inputs` (B, S) and `puzzle_identifiers` (B,); see runtime/interop/hrm_act.py."""
    from hrmspec.runtime.interop.hrm_act import initial_carry as _initial_carry

    return _initial_carry(model, batch)


def act_step(model, carry, batch, halt: bool = False):
    """One segment of every row, as the official ACT model's forward: (carry, {"logits", "q_halt_logits",
    "q_continue_logits"[, "target_q_continue"]}). In eval mode rows run every segment unless `halt`."""
    from hrmspec.runtime.interop.hrm_act import act_step as _act_step

    return _act_step(model, carry, batch, halt=halt)


__all__ = ["CheckpointError", "HrmspecError", "SpecError", "compile", "from_hf", "from_hrm_checkpoint", "load_spec",
           "to_hrm_checkpoint", "__version__", "act_step", "initial_carry", "save_hf"]
