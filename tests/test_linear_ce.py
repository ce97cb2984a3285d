"""The chunked linear + cross-entropy every backend shares (backends/common/chunked_linear_ce.py), with its
torch row steps, against cross_entropy of the full logits; and the model's loss path that uses it."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import compare_grads

import hrmspec
from hrmspec.backends.common.chunked_linear_ce import IGNORE_INDEX, chunked_linear_cross_entropy
from hrmspec.backends.reference.linear_ce import TORCH_STEPS
from hrmspec.errors import KernelError
from hrmspec.spec import load_spec_text

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(N, V, d, dtype, seed, ignored=0.3):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, d, generator=gen, dtype=torch.float64) * 2).to(dtype)
    W = (torch.randn(V, d, generator=gen, dtype=torch.float64) / d**0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < ignored] = IGNORE_INDEX
    return h, W, labels


def _full(h, W, labels):
    """loss_sum and the gradients of the full-logits cross-entropy, in fp64."""
    h64, W64 = h.double().requires_grad_(), W.double().requires_grad_()
    loss = F.cross_entropy(h64 @ W64.T, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    loss.backward()
    return loss.detach(), h64.grad, W64.grad


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 40), V=st.integers(2, 300), d=st.integers(1, 24), chunk=st.sampled_from([None, 1, 3, 16]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_chunked_loss_and_gradients_match_full_logits(N, V, d, chunk, dtype, seed):
    h, W, labels = _inputs(N, V, d, dtype, seed)
    h.requires_grad_(), W.requires_grad_()
    loss, n = chunked_linear_cross_entropy(h, W, labels, TORCH_STEPS, chunk_rows=chunk)
    loss.backward()
    ref, dh, dW = _full(h.detach(), W.detach(), labels)
    tol = TOL[dtype]
    assert int(n) == int((labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol * max(1.0, float(ref.abs())))
    for got, want, what in ((h.grad, dh, "dh"), (W.grad, dW, "dW")):
        assert got.dtype == dtype, what
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale, msg=lambda m, w=what: f"{w}: {m}")


def test_default_chunks_are_about_the_size_of_h_and_not_too_thin():
    from hrmspec.backends.common.chunked_linear_ce import MIN_CHUNK_ROWS, default_chunk_rows

    assert default_chunk_rows(8192, 65536, 1536) == 256  # 256 x 65536 logits ~ 8192 x 1536 hidden
    assert default_chunk_rows(4096, 65536, 256) == MIN_CHUNK_ROWS == 64  # 16 rows would be too thin a GEMM
    assert default_chunk_rows(5, 10, 64) == 5 and default_chunk_rows(1, 100000, 8) == 1  # never more than N


def test_every_row_ignored_gives_zero_loss_and_gradients():
    h, W, labels = _inputs(5, 7, 3, torch.float32, 0, ignored=1.0)
    h.requires_grad_()
    loss, n = chunked_linear_cross_entropy(h, W, labels, TORCH_STEPS)
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(n) == 0 and not h.grad.any()


def test_bad_labels_and_shapes_are_errors():
    h, W, _ = _inputs(4, 8, 3, torch.float32, 0)
    with pytest.raises(KernelError, match=r"labels\[1\] = -1 is outside the vocabulary 0..7"):
        chunked_linear_cross_entropy(h, W, torch.tensor([0, -1, 2, 3]), TORCH_STEPS)
    with pytest.raises(KernelError, match="expected h"):
        chunked_linear_cross_entropy(h, W.T.contiguous(), torch.zeros(4, dtype=torch.long), TORCH_STEPS)


@pytest.mark.parametrize("head", ["untied", "tied"])
def test_model_loss_without_logits_equals_the_loss_of_the_logits(tiny_text, head):
    spec = load_spec_text(tiny_text, overrides={"model.modules.L.layers": 1, "model.modules.H.layers": 1,
                                                "model.head": head})
    torch.manual_seed(0)
    a = hrmspec.compile(spec)
    b = hrmspec.compile(spec)
    b.load_state_dict(a.state_dict())
    gen = torch.Generator().manual_seed(3)
    ids, labels = torch.randint(0, 61, (2, 9), generator=gen), torch.randint(0, 61, (2, 9), generator=gen)
    labels[:, :4] = IGNORE_INDEX
    full = a(ids, labels=labels)
    lean = b(ids, labels=labels, return_logits=False)
    assert full.logits is not None and lean.logits is None
    torch.testing.assert_close(lean.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert int(lean.n_tokens) == int(full.n_tokens) == 2 * 5
    full.loss.backward()
    lean.loss.backward()
    assert compare_grads(a, b, rtol=1e-5, atol=1e-6) == len(list(a.parameters()))  # full credit depth: every one
