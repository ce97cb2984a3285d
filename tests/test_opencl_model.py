"""A whole model on the OpenCL backend (generated C-style row kernels on PoCL) equals the reference."""

import pytest
import torch
from numerics import compare_grads

import hrmspec
from hrmspec.backends import get_backend
from hrmspec.backends.common.fallback import record_fallbacks
from hrmspec.spec import load_spec_text


def test_opencl_backend_runs_a_whole_model_like_the_reference(tiny_text, cl_ops):
    spec = load_spec_text(tiny_text, overrides={"model.modules.L.layers": 1, "model.modules.H.layers": 1})
    torch.manual_seed(0)
    ref = hrmspec.compile(spec, backend="reference")
    ocl = hrmspec.compile(spec, backend="opencl")
    ocl.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 61, (2, 7), generator=gen), torch.randint(0, 61, (2, 7), generator=gen)
    prefix = torch.zeros(2, 7, dtype=torch.bool)
    prefix[:, :3] = True
    out_r = ref(ids, prefix_mask=prefix, labels=labels)
    with record_fallbacks() as fell:
        out_o = ocl(ids, prefix_mask=prefix, labels=labels)
        out_o.loss.backward()
    assert not fell, fell  # every row op runs as a generated kernel: nothing falls back
    out_r.loss.backward()
    torch.testing.assert_close(out_o.logits, out_r.logits, rtol=1e-4, atol=1e-5)
    compared = compare_grads(ref, ocl, rtol=1e-4, atol=lambda g: 1e-5 * float(g.abs().max()))
    assert compared == len(list(ref.parameters()))  # at full credit depth every parameter gets a gradient


@pytest.mark.fallback
def test_opencl_fallback_is_reported(cl_ops, fresh_fallback_warnings):
    x = torch.randn(3, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="opencl backend: rms_norm: torch.float64"), record_fallbacks() as fell:
        y = cl_ops.rms_norm(x, 1e-6)
    assert [(f.backend, f.op) for f in fell] == [("opencl", "rms_norm")]
    torch.testing.assert_close(y, get_backend("reference").rms_norm(x, 1e-6))


def test_unknown_backend_is_a_clear_error():
    from hrmspec.errors import HrmspecError

    with pytest.raises(HrmspecError, match="unknown backend 'opencll'.*did you mean 'opencl'"):
        get_backend("opencll")
