"""The token MLP (`attention: {type: token_mlp}`, TRM's mlp_t): a gated MLP across the positions of
fixed-length rows, with its residual and post-norm per channel. Checked against the layer written
by hand in float64, on the kernel backends against the reference (values and gradients, nothing
falling back), its parameter count against TRM's width rule, and its errors."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import compare_grads

import hrmspec
from hrmspec.backends.common.fallback import record_fallbacks
from hrmspec.errors import SpecError
from hrmspec.graph import build_graph
from hrmspec.graph.analysis import analyse
from hrmspec.runtime.execution.stack import LengthError
from hrmspec.spec import load_spec, load_spec_text

SPEC = """
name: token-mlp
model:
  vocab: 6
  d_model: D
  heads: 2
  expansion: 4
  max_seq_len: S
  block:
    norm: {type: rms, eps: 1.0e-5, place: post}
    attention: {type: token_mlp}
    mlp: swiglu
  modules: {net: {layers: 2, exit_norm: none}}
  states: {y: {init: buffer}, z: {init: buffer}}
  schedule:
    - repeat: 2
      do: [{repeat: 2, do: ["z = net(z + y + x)"]}, "y = net(y + z)"]
  output: y
  puzzle: {identifiers: 2, positions: P}
objective: {type: grid, loss: stablemax}
"""


def spec_for(d=8, s=6, p=2, **over):
    return load_spec_text(SPEC.replace("D", str(d)).replace("S", str(s)).replace("P", str(p)), overrides=over or None)


def _rms(x, eps=1e-5):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _swiglu(x, gate_up, down):
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def net_by_hand(model, x):
    """One call of `net` written out: per layer, the token MLP over the positions of each channel
    (residual and norm there too), then the channel MLP with its residual and post-norm."""
    w = dict(model.stacks["net"].named_parameters())
    for i in range(2):
        t = x.transpose(1, 2)  # (B, d, S): a row per channel
        t = _rms(t + _swiglu(t, w[f"layers.{i}.token.gate_up.weight"], w[f"layers.{i}.token.down.weight"]))
        x = t.transpose(1, 2)
        x = _rms(x + _swiglu(x, w[f"layers.{i}.mlp.gate_up.weight"], w[f"layers.{i}.mlp.down.weight"]))
    return x


@settings(max_examples=12, deadline=None)
@given(d=st.sampled_from([4, 8, 12]), s=st.integers(1, 9), p=st.integers(1, 3), seed=st.integers(0, 99))
def test_a_call_is_the_token_mlp_layer_written_by_hand(d, s, p, seed):
    torch.manual_seed(seed)
    model = hrmspec.compile(spec_for(d, s, p)).double()
    x = torch.randn(3, s + p, d, dtype=torch.float64)
    ctx = model.context(3, s + p, None, None, None)
    got = model.stacks["net"](x, ctx)
    torch.testing.assert_close(got, net_by_hand(model, x), rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [pytest.param("c", marks=pytest.mark.needs_cc),
                                     pytest.param("opencl", marks=pytest.mark.needs_opencl), "triton"])
def test_kernel_backends_compute_what_the_reference_does(backend, kernel_device):
    if backend == "triton":
        pytest.importorskip("triton")
    device = kernel_device if backend == "triton" else torch.device("cpu")  # host C and PoCL run on the CPU
    spec = spec_for()
    torch.manual_seed(0)
    ref = hrmspec.compile(spec)
    with torch.no_grad():  # zero-initialised parameters (the puzzle vectors) moved, so a misbound one shows;
        for prm in ref.parameters():  # small steps: eight calls with norms over 8 positions amplify rounding
            prm.add_(0.02 * torch.randn_like(prm))
    ref.to(device)
    other = hrmspec.compile(spec, backend=backend).to(device)
    other.load_state_dict(ref.state_dict())
    ids, pid = torch.randint(1, 6, (3, 6), device=device), torch.tensor([0, 1, 1], device=device)
    logits = []
    for m in (ref, other):
        with record_fallbacks() as fell:
            out = m(ids, puzzle_ids=pid)
            out.logits.float().square().mean().backward()
        logits.append(out.logits)
        if m is other:
            assert not fell, f"fell back: {fell}"
    torch.testing.assert_close(logits[1], logits[0], rtol=2e-4, atol=2e-4)
    assert compare_grads(ref, other, rtol=2e-3, atol=2e-4) == len(list(ref.parameters()))  # every one has a gradient


def test_trm_mlp_width_and_parameter_count_follow_trm():
    spec = load_spec("trm-mlp")
    a = spec.model.module("net").block.attention
    # a SwiGLU over the 81 + 16 positions at expansion 4: round(4 * 97 * 2 / 3) up to a multiple of 256
    assert a.type == "token_mlp" and a.ffn == 512
    d, L, V, ffn = 512, 2, 11, spec.model.module("net").block.ffn
    per_layer = 2 * a.ffn * 97 + 97 * a.ffn + 2 * ffn * d + ffn * d
    want = L * per_layer + 2 * V * d + 1 * d + (2 * d + 2)  # layers, embed + head, puzzle vector, halting head
    assert analyse(build_graph(spec)).params == want
    assert sum(q.numel() for q in hrmspec.compile(spec).parameters()) == want


def test_rows_of_another_length_and_misplaced_widths_are_clear_errors():
    model = hrmspec.compile(spec_for())
    with pytest.raises(LengthError, match="rows of 5 positions where the spec says 8"):
        model(torch.randint(1, 6, (2, 3)), puzzle_ids=torch.zeros(2, dtype=torch.long))
    with pytest.raises(SpecError, match="unexpected key 'ffn' with attention type 'plain'"):
        spec_for(**{"model.block.attention": {"type": "plain", "ffn": 8}})
    explicit = spec_for(**{"model.block.attention": {"type": "token_mlp", "ffn": 24}})
    assert explicit.model.module("net").block.attention.ffn == 24
