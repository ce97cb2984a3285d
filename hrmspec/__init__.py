"""hrmspec: a compiler for Hierarchical Recurrent Models.

    import hrmspec
    model = hrmspec.compile("specs/hrm-text-tiny.yaml")      # a torch.nn.Module
    out = model(input_ids, prefix_mask=prefix, labels=labels)
"""

from hrmspec.compile import compile
from hrmspec.errors import CheckpointError, HrmspecError, SpecError
from hrmspec.spec import load_spec

__version__ = "0.1.0"


def from_hf(directory, **kwargs):
    """Load a transformers `hrm_text` checkpoint directory as a CompiledModel."""
    from hrmspec.runtime.interop.convert import from_hf as _from_hf

    return _from_hf(directory, **kwargs)


__all__ = ["CheckpointError", "HrmspecError", "SpecError", "compile", "from_hf", "load_spec", "__version__"]
