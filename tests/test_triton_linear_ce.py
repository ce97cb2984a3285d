"""Fused linear + cross-entropy against torch F.cross_entropy(h @ W.T): compiled on the CUDA device when
there is one (`pytest -m gpu`), in the interpreter on CPU tensors otherwise (the tests' conftest chooses
before triton is imported). Vocabularies beside the vocabulary tile, no rows, huge and non-finite
hidden states with the reference's behaviour as the oracle.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from numerics import around, assert_same_nonfinite, assert_within, edge_values

triton = pytest.importorskip("triton")

from hrmspec.backends.reference.naive import cross_entropy  # noqa: E402
from hrmspec.backends.triton.launch import KernelError  # noqa: E402
from hrmspec.backends.triton.linear_ce import (  # noqa: E402
    IGNORE_INDEX,
    MAX_BLOCK_V,
    compile_many,
    default_chunk_rows,
    linear_cross_entropy,
)

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-4}
# vocabularies beside the explicit tiles drawn below and beside the default tile (min(4096, next_pow2(V)))
VOCABS = (1, 3, *around(64, 256, MAX_BLOCK_V))


def _inputs(N, d, V, dtype, seed, ignored=0.25, edge="none"):
    g = torch.Generator().manual_seed(seed)
    h = edge_values(torch.randn(N, d, generator=g), edge, g).to(dtype)
    W = (torch.randn(V, d, generator=g) / max(1, d) ** 0.5 * 2).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignored] = IGNORE_INDEX
    return h, W, labels


def _reference(h, W, labels, upstream):
    hf, Wf = h.detach().cpu().float().requires_grad_(), W.detach().cpu().float().requires_grad_()
    loss = F.cross_entropy(hf @ Wf.T, labels.cpu(), ignore_index=IGNORE_INDEX, reduction="sum")
    return (loss.detach(), *torch.autograd.grad(loss * upstream, (hf, Wf)))


def _close(got, ref, dtype, what, n=1):
    """inf and NaN where the reference has them; fp32 within 1e-4 of the largest value, half types within
    numerics.assert_within (n: the length of the reduction behind each element)."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    got = got.detach().cpu().float()
    finite = assert_same_nonfinite(got, ref, what)
    got, ref = got[finite], ref[finite]
    if dtype not in TOL:
        assert_within(got, ref, dtype, n, what)
        return
    tol = TOL[dtype]
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _check(N, d, V, dtype, chunk_rows, block_v, device, seed=0, upstream=1.5, ignored=0.25, edge="none"):
    h, W, labels = _inputs(N, d, V, dtype, seed, ignored, edge)
    hl, Wl = h.to(device).requires_grad_(), W.to(device).requires_grad_()
    loss, n_tokens = linear_cross_entropy(hl, Wl, labels.to(device), chunk_rows=chunk_rows, block_v=block_v)
    assert loss.dtype == torch.float32 and loss.shape == () and not n_tokens.requires_grad
    assert int(n_tokens) == int((labels != IGNORE_INDEX).sum())
    dh, dW = torch.autograd.grad(loss * upstream, (hl, Wl))
    assert dh.dtype == dtype and dW.dtype == dtype
    ref_loss, ref_dh, ref_dW = _reference(h, W, labels, upstream)
    what = f"N={N} d={d} V={V} {dtype} chunk={chunk_rows} block_v={block_v} edge={edge}"
    tol = TOL.get(dtype, 1e-2)
    loss = loss.detach().cpu()
    assert_same_nonfinite(loss, ref_loss, f"{what} loss")
    if ref_loss.isfinite():
        torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol, msg=lambda m: f"{what} loss: {m}")
    _close(dh, ref_dh, dtype, f"{what} dh", V)  # dh sums over the vocabulary,
    _close(dW, ref_dW, dtype, f"{what} dW", N)  # dW over the rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_odd_sizes_chunks_smaller_than_n(dtype, kernel_device):
    # V = 1000 over vocab blocks of 256: three full blocks and a tail of 232; 37 rows in chunks of 8
    _check(37, 24, 1000, dtype, chunk_rows=8, block_v=256, device=kernel_device)


@st.composite
def rows_and_vocab(draw) -> tuple[int, int]:
    """(N, V): up to 40 rows, up to 8 beside the largest tile (each row loops over the vocabulary)."""
    V = draw(st.sampled_from(VOCABS))
    return draw(st.integers(0, 40 if V < MAX_BLOCK_V // 2 else 8)), V


@given(shape=rows_and_vocab(), d=st.sampled_from((1, 16, 24)), chunk=st.integers(1, 40),
       block_v=st.sampled_from((64, 256, None)), ignored=st.sampled_from((0.0, 0.3, 1.0)),
       dtype=st.sampled_from((torch.float32, torch.float32, torch.bfloat16, torch.float16)),
       edge=st.sampled_from(("none", "none", "zero", "huge", "inf", "nan")), seed=st.integers(0, 1000))
def test_matches_torch_cross_entropy(shape, d, chunk, block_v, ignored, dtype, edge, seed, kernel_device):
    N, V = shape
    # the logits of a chunk are stored in the input dtype, as any fp16 matmul's: a row of h times 1e4
    # takes them past fp16's 65504, where the fp32 reference is still finite
    assume(not (dtype == torch.float16 and edge == "huge"))
    _check(N, d, V, dtype, chunk_rows=chunk, block_v=block_v, device=kernel_device, seed=seed, ignored=ignored,
           edge=edge)


def test_same_pair_as_the_reference_op(kernel_device):
    h, W, labels = _inputs(13, 16, 100, torch.float32, 5)
    loss, n = linear_cross_entropy(h.to(kernel_device), W.to(kernel_device), labels.to(kernel_device), chunk_rows=4)
    ref_loss, ref_n = cross_entropy(h @ W.T, labels)
    torch.testing.assert_close(loss.cpu(), ref_loss)
    assert torch.equal(n.cpu(), ref_n)


def test_all_ignored_rows_give_zero_loss_and_gradients(kernel_device):
    h, W, labels = (t.to(kernel_device) for t in _inputs(9, 16, 50, torch.float32, 1, ignored=1.0))
    h.requires_grad_(), W.requires_grad_()
    loss, n = linear_cross_entropy(h, W, labels, chunk_rows=4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(n) == 0
    assert not h.grad.any() and not W.grad.any()


@pytest.mark.parametrize("wrt", ["h", "W"])
def test_gradient_of_one_input_only(wrt, kernel_device):
    h, W, labels = (t.to(kernel_device) for t in _inputs(11, 16, 70, torch.float32, 2))
    leaf = (h if wrt == "h" else W).requires_grad_()
    loss, _ = linear_cross_entropy(h, W, labels, chunk_rows=5)
    (got,) = torch.autograd.grad(loss, leaf)
    ref = _reference(h, W, labels, 1.0)[1 if wrt == "h" else 2]
    _close(got, ref, torch.float32, f"d{wrt}")


def test_bad_inputs_are_errors(kernel_device):
    h, W, labels = (t.to(kernel_device) for t in _inputs(4, 8, 10, torch.float32, 0, ignored=0.0))
    with pytest.raises(KernelError, match=r"labels\[2\] = 10 is outside"):
        linear_cross_entropy(h, W, torch.tensor([0, 1, 10, IGNORE_INDEX], device=kernel_device))
    with pytest.raises(KernelError, match="expected h"):
        linear_cross_entropy(h, W[:, :3], labels)
    with pytest.raises(KernelError, match="must share one float dtype"):
        linear_cross_entropy(h, W.double(), labels)
    with pytest.raises(KernelError, match="the kernels store fp32, fp16 or bf16"):
        linear_cross_entropy(h.double(), W.double(), labels)


def test_default_chunk_keeps_chunk_logits_near_the_size_of_h():
    assert default_chunk_rows(8192, 65536, 1536) == 256  # 256 x 65536 logits ~ 8192 x 1536 hidden
    assert default_chunk_rows(5, 10, 64) == 5 and default_chunk_rows(1, 100000, 8) == 1


# -- compile-only ----------------------------------------------------------------------------------------------
def _nvidia_tools() -> bool:
    try:
        from triton import knobs

        return os.path.exists(knobs.nvidia.ptxas.path)
    except Exception:
        return False


@pytest.mark.skipif(not _nvidia_tools(), reason="the triton wheel's NVIDIA backend is not available")
def test_kernels_compile_for_sm80_and_sm90_without_spills():
    jobs = [{"direction": d, "dtype": "bf16", "arch": a, "vocab": 65536} for d in ("fwd", "bwd") for a in (80, 90)]
    infos = compile_many(jobs)
    assert len(infos) == 4
    for info in infos:
        assert 0 < info.registers <= 255 and info.spill_stores == 0 and info.spill_loads == 0, str(info)
