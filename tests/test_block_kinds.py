"""Every kind in `hrmspec/kinds.py` on every backend that runs here: a model whose block uses the
kind computes, on the c (host C), opencl (PoCL), triton (interpreter) and inductor backends, what the reference backend
computes — values and every gradient — with nothing falling back, and its kernels are the plan's.
A new norm or MLP kind is tested here by being in the table."""

import pytest
import torch
from numerics import compare_grads

import hrmspec
from hrmspec.backends.common.fallback import record_fallbacks
from hrmspec.kinds import MLPS, NORMS
from hrmspec.spec import load_spec_text
from hrmspec.spec.schema import swiglu_width

GEMMA = "x * rsqrt(mean(x*x) + eps) * (1 + w)"
# a norm of each kind as a block norm and as the exit norm (expr needs its text)
NORM_SPECS = {kind: {"type": kind, "affine": True} if kind != "expr" else
              {"type": "expr", "expr": GEMMA, "params": {"w": "normal"}} for kind in NORMS}
BACKENDS = [pytest.param("c", marks=pytest.mark.needs_cc), pytest.param("opencl", marks=pytest.mark.needs_opencl),
            "triton", "inductor"]


def _model(tiny_text, backend, device, **over):
    """The reference model and the same weights on `backend`, both on `device` (so only the kernels differ)."""
    spec = load_spec_text(tiny_text, overrides={"model.d_model": 16, "model.heads": 2, "model.ffn": 24, **over})
    torch.manual_seed(0)
    ref = hrmspec.compile(spec)
    with torch.no_grad():
        for p in ref.parameters():  # weights away from their init, so a misbound one shows
            p.add_(0.2 * torch.randn_like(p))
    ref.to(device)
    other = hrmspec.compile(spec, backend=backend).to(device)
    other.load_state_dict(ref.state_dict())
    return ref, other


def _same(ref, other, atol=2e-4):
    gen = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 61, (2, 7), generator=gen), torch.randint(0, 61, (2, 7), generator=gen)
    prefix = torch.arange(7)[None].expand(2, 7) < 3
    device = ref.embed.weight.device
    ids, labels, prefix = ids.to(device), labels.to(device), prefix.to(device)
    with record_fallbacks() as fell:
        b = other(ids, prefix_mask=prefix, labels=labels)
        b.loss.backward()
    assert not fell, fell
    a = ref(ids, prefix_mask=prefix, labels=labels)
    a.loss.backward()
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=atol)
    compared = compare_grads(ref, other, rtol=1e-3, atol=lambda g: atol * max(1.0, float(g.abs().max())))
    assert compared == len(list(ref.parameters()))  # at full credit depth every parameter gets a gradient


def _backend(name, kernel_device) -> torch.device:
    """Where the backend's kernels run (host C, PoCL: the CPU); a skip without triton (C, OpenCL: their marks)."""
    if name in ("c", "opencl", "inductor"):  # host C, PoCL and Inductor's C++ run on the CPU
        return torch.device("cpu")
    pytest.importorskip("triton")
    return kernel_device


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mlp", sorted(MLPS))
def test_every_mlp_kind_on_every_backend(tiny_text, backend, mlp, kernel_device):
    device = _backend(backend, kernel_device)
    _same(*_model(tiny_text, backend, device, **{"model.block.mlp": mlp, "model.modules.L.layers": 1,
                                          "model.modules.H.layers": 1}))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_every_norm_kind_on_every_backend_as_block_exit_and_final_norm(tiny_text, backend, norm, kernel_device):
    device = _backend(backend, kernel_device)
    n = NORM_SPECS[norm]
    ref, other = _model(tiny_text, backend, device, **{
        "model.block.norm": {**n, "place": "sandwich"}, "model.modules.L.layers": 1, "model.modules.H.layers": 1,
        "model.modules.L.exit_norm": n, "model.final_norm": n, "model.head": "untied"})
    body = other.plan.bodies[("L", 2)]
    if other.ops.fuses:  # a kernel backend fuses the exit norm with the last residual
        assert body.ops[-1].members[-1] == "exit_norm"
    else:  # inductor compiles the unfused ops, segment by segment
        assert body.ops[-1].name == "exit_norm"
    _same(ref, other)


@pytest.mark.parametrize("mlp", sorted(MLPS))
def test_the_width_rule_of_each_mlp_kind(tiny_text, mlp):
    spec = load_spec_text(tiny_text.replace("  ffn: 48\n", "  expansion: 4\n"), overrides={"model.block.mlp": mlp})
    want = swiglu_width(32, 4) if MLPS[mlp].gated else 4 * 32
    assert spec.model.module("L").block.ffn == want
    gate_up = hrmspec.compile(spec).stacks["L"].weight("layers.0.mlp.gate_up.weight")
    assert gate_up.shape == ((2 if MLPS[mlp].gated else 1) * want, 32)
