"""Backward passes fed an upstream gradient other than 1: a loss scaled by a number (negative, zero, tiny,
a mean's 1 / n), and per-row outputs given a random cotangent, also in layouts a `.sum()` never makes.

A backward that ignored its incoming gradient, applied it twice, or applied it to the wrong rows passes
every test that backpropagates `loss.backward()` with a gradient of exactly 1. Here:

- linear + cross-entropy: the chunked driver with the reference's torch steps, the reference backend's
  op, and the Triton softmax steps (in the interpreter without a GPU), against the fp64 gradient of
  g * cross_entropy(h W^T) over the full logits;
- the row ops of the kernel backends (Triton, host C) on the launcher paths `check_row_op` does not take
  (it feeds every output of `RowFunction` a random cotangent already): programs flattened to (B S, h hd)
  rows, an output that does not reach the loss, rope on q and k with one or both cotangents, per-row
  scalar outputs under leading dims, and cotangents that are transposed or strided views.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import close, reduction_lengths

from hrmspec.backends import get_backend
from hrmspec.backends.common.chunked_linear_ce import IGNORE_INDEX, chunked_linear_cross_entropy
from hrmspec.backends.reference.linear_ce import TORCH_STEPS
from hrmspec.ir import ProgramBuilder, add_rms_norm, gelu, mean, rms_norm, swiglu

UPSTREAM = (-0.37, 2.5, 0.0, 1e-3)  # scalings of the loss: a sign flip, a factor, nothing at all, a small one


def _ce_inputs(N, V, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, d, generator=gen, dtype=torch.float64) * 2).to(dtype)
    W = (torch.randn(V, d, generator=gen, dtype=torch.float64) / d**0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < 0.3] = IGNORE_INDEX
    return h, W, labels


def _ce_reference(h, W, labels, g):
    """The loss sum and the fp64 gradients of g * (sum of token losses) over the full logits."""
    h64, W64 = h.detach().cpu().double().requires_grad_(), W.detach().cpu().double().requires_grad_()
    loss = F.cross_entropy(h64 @ W64.T, labels.cpu(), ignore_index=IGNORE_INDEX, reduction="sum")
    return (loss.detach(), *torch.autograd.grad(loss, (h64, W64), torch.tensor(g, dtype=torch.float64)))


TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _assert_grads(got, want, dtype, what):
    for a, b, name in zip(got, want, ("dh", "dW")):
        assert a.dtype == dtype, (what, name, a.dtype)
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.double().cpu(), b, rtol=TOL[dtype], atol=TOL[dtype] * scale,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("g", UPSTREAM)
def test_chunked_linear_ce_scales_its_gradients_by_the_upstream_gradient(g, dtype):
    h, W, labels = _ce_inputs(13, 37, 8, dtype, seed=int(abs(g) * 100))
    hl, Wl = h.clone().requires_grad_(), W.clone().requires_grad_()
    loss, n = chunked_linear_cross_entropy(hl, Wl, labels, TORCH_STEPS, chunk_rows=4)  # four chunks
    got = torch.autograd.grad(loss, (hl, Wl), torch.tensor(g, dtype=loss.dtype))
    ref_loss, *want = _ce_reference(h, W, labels, g)
    _assert_grads(got, want, dtype, f"g={g}")
    if g == 0.0:
        assert not got[0].any() and not got[1].any()


@pytest.mark.parametrize("g", UPSTREAM)
def test_reference_backend_loss_scaled_and_as_a_mean(g):
    # the op the reference table runs, as a training step uses it: the token mean, loss_sum / n, scaled
    ops = get_backend("reference")
    h, W, labels = _ce_inputs(11, 29, 6, torch.float32, seed=3)
    hl, Wl = h.clone().requires_grad_(), W.clone().requires_grad_()
    loss, n = ops.linear_cross_entropy(hl, Wl, labels)
    assert not n.requires_grad
    (g * loss / n).backward()
    _, *want = _ce_reference(h, W, labels, g / int((labels != IGNORE_INDEX).sum()))
    _assert_grads((hl.grad, Wl.grad), want, torch.float32, f"mean, g={g}")


def test_two_losses_of_one_driver_add_their_upstream_gradients():
    # one autograd node used twice (two heads on one h, say): each call's backward gets its own g
    h, W, labels = _ce_inputs(9, 17, 5, torch.float64, seed=5)
    hl = h.clone().requires_grad_()
    a, _ = chunked_linear_cross_entropy(hl, W, labels, TORCH_STEPS, chunk_rows=2)
    b, _ = chunked_linear_cross_entropy(hl, W * 0.5, labels, TORCH_STEPS, chunk_rows=5)
    (-0.7 * a + 3.0 * b).backward()
    want = _ce_reference(h, W, labels, -0.7)[1] + _ce_reference(h, W * 0.5, labels, 3.0)[1]
    torch.testing.assert_close(hl.grad, want, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("g", UPSTREAM)
def test_triton_linear_ce_scales_its_gradients_by_the_upstream_gradient(g, dtype, kernel_device):
    pytest.importorskip("triton")
    from numerics import assert_within

    from hrmspec.backends.triton.linear_ce import linear_cross_entropy

    N, V, d = 21, 300, 16  # the vocabulary in two blocks of 256, the rows in chunks of 8
    h, W, labels = _ce_inputs(N, V, d, torch.float32, seed=7)
    h, W = h.to(dtype), W.to(dtype)
    hl, Wl = h.to(kernel_device).requires_grad_(), W.to(kernel_device).requires_grad_()
    loss, _ = linear_cross_entropy(hl, Wl, labels.to(kernel_device), chunk_rows=8, block_v=256)
    got = torch.autograd.grad(loss, (hl, Wl), torch.tensor(g, device=kernel_device))
    _, *want = _ce_reference(h, W, labels, g)
    for a, b, name, n in zip(got, want, ("dh", "dW"), (V, N)):
        assert a.dtype == dtype
        a, b = a.detach().cpu().float(), b.float()
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())),
                                       msg=lambda m, name=name: f"g={g} {name}: {m}")
        else:  # dh sums over the vocabulary, dW over the rows
            assert_within(a, b, dtype, n, f"g={g} {dtype} {name}")
        if g == 0.0:
            assert not a.any()


# -- the row ops of the kernel backends ---------------------------------------------------------------------
# the kernel backends that run on a CPU: Triton in its interpreter, host C (skipped, with the reason, without a
# C compiler: tests/conftest.py)
BACKENDS = [pytest.param("triton"), pytest.param("c", marks=pytest.mark.needs_cc)]


def _table(backend: str):
    if backend == "triton":
        pytest.importorskip("triton")
    return get_backend(backend)


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HRMSPEC_CACHE", str(tmp_path_factory.mktemp("kernels")))
        yield


def _device(backend, kernel_device):
    return kernel_device if backend == "triton" else torch.device("cpu")


def _strided_randn(shape, gen, how: str) -> torch.Tensor:
    """A random tensor of `shape` laid out as `how`: contiguous, transposed in its last two dims (no unit
    stride along a row), or every other element of a larger buffer."""
    if how == "transposed":
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2)
    if how == "strided":
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., ::2]
    return torch.randn(*shape, generator=gen)


def _grads(outs, leaves, cots):
    used = [k for k in cots]
    return torch.autograd.grad([outs[k] for k in used], leaves, [cots[k] for k in used], allow_unused=True)


def _compare(program, got, want, leaves_names, rows, width, what):
    _, n_grad = reduction_lengths(program, rows, width)
    for name, a, b in zip(leaves_names, got, want):
        assert (a is None) == (b is None), (what, name)
        if b is not None:
            close(a.cpu(), b, b.dtype, f"{what} d_{name}", n_grad[name])


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_flattened_elementwise_programs_take_a_random_cotangent(backend, how, kernel_device):
    # (B, S, h, hd) rows of an elementwise program run as B*S rows of h*hd (KernelTable.row_program): the
    # cotangent of the (B, S, h, hd) output must reach the flattened kernel's backward element for element
    ops, ref = _table(backend), get_backend("reference")
    device = _device(backend, kernel_device)
    gen = torch.Generator().manual_seed(11)
    shape = (2, 3, 4, 6)
    for program in (swiglu(), gelu()):
        inputs = {n: torch.randn(shape, generator=gen) for n in program.input_names}
        cot = _strided_randn(shape, gen, how)
        leaves_k = [t.to(device).requires_grad_() for t in inputs.values()]
        leaves_r = [t.clone().requires_grad_() for t in inputs.values()]
        out_k = ops.row_program(program, dict(zip(inputs, leaves_k)))
        out_r = ref.row_program(program, dict(zip(inputs, leaves_r)))
        close(out_k["y"].cpu(), out_r["y"].detach(), torch.float32, f"{backend} {program.name} y")
        got = _grads(out_k, leaves_k, {"y": cot.to(device)})
        want = _grads(out_r, leaves_r, {"y": cot})
        _compare(program, got, want, list(inputs), 24, 24, f"{backend} {program.name} {how}")


@pytest.mark.gpu
@pytest.mark.parametrize("used", ["h", "y"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_output_that_does_not_reach_the_loss(backend, dtype, used, kernel_device):
    # add + rms_norm writes h and y; when only one reaches the loss, autograd hands the other's cotangent
    # as None and RowFunction must use zeros for it, not the other output's gradient
    program = add_rms_norm()
    ops, device = _table(backend), _device(backend, kernel_device)
    gen = torch.Generator().manual_seed(13)
    rows, width = 5, 129
    inputs = {"x": torch.randn(rows, width, generator=gen), "r": torch.randn(rows, width, generator=gen),
              "w": torch.randn(width, generator=gen)}
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    cot = _strided_randn((rows, width), gen, "transposed").to(dtype)
    leaves_k = [t.to(device).requires_grad_() for t in inputs.values()]
    leaves_r = [t.clone().requires_grad_() for t in inputs.values()]
    out_k = ops.row_program(program, dict(zip(inputs, leaves_k)))
    out_r = get_backend("reference").row_program(program, dict(zip(inputs, leaves_r)))
    got = _grads(out_k, leaves_k, {used: cot.to(device)})
    want = _grads(out_r, leaves_r, {used: cot})
    if used == "h":  # h = x + r alone: w gets nothing, x and r get the cotangent itself
        assert want[2] is None or not want[2].any()
    _compare(program, [torch.zeros_like(t) if a is None else a for a, t in zip(got, inputs.values())],
             [torch.zeros_like(t) if b is None else b for b, t in zip(want, inputs.values())],
             list(inputs), rows, width, f"{backend} {dtype} only {used}")


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["both", "q", "k"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_takes_random_cotangents_on_either_output(backend, which, kernel_device):
    # RopeFunction's backward gets d_qr and d_kr; with one of them None (only q or only k reaches the
    # loss) it must use zeros for that one
    ops, ref, device = _table(backend), get_backend("reference"), _device(backend, kernel_device)
    B, S, h, hd = 2, 5, 3, 8
    gen = torch.Generator().manual_seed(17)
    proj = torch.randn(B, S, 2, h, hd, generator=gen)  # q and k as views of one projection
    cos, sin = ref.rope_tables(torch.randint(0, 40, (B, S), generator=gen), hd, 10000.0, torch.float32)
    cots = {"q": _strided_randn((B, S, h, hd), gen, "transposed"), "k": _strided_randn((B, S, h, hd), gen, "strided")}
    leaf_k, leaf_r = proj.to(device).requires_grad_(), proj.clone().requires_grad_()
    out_k = dict(zip("qk", ops.rope_qk(leaf_k[:, :, 0], leaf_k[:, :, 1], cos.to(device), sin.to(device))))
    out_r = dict(zip("qk", ref.rope_qk(leaf_r[:, :, 0], leaf_r[:, :, 1], cos, sin)))
    used = {"both": "qk", "q": "q", "k": "k"}[which]
    (got,) = torch.autograd.grad([out_k[u] for u in used], leaf_k, [cots[u].to(device) for u in used])
    (want,) = torch.autograd.grad([out_r[u] for u in used], leaf_r, [cots[u] for u in used])
    close(got.cpu(), want, torch.float32, f"{backend} rope, cotangent on {which}")
    for i, part in enumerate("qk"):
        assert bool(got[:, :, i].any()) == (part in used), (which, part)  # nothing leaks into the other


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_scalar_outputs_under_leading_dims_take_strided_cotangents(backend, kernel_device):
    # outputs of both kinds over (B, S) rows: the per-row scalar m (B, S) and the row y (B, S, D), each
    # with a random cotangent in a layout of its own
    b = ProgramBuilder("scalars")
    x, s, w = b.row("x"), b.scalar("s"), b.vector("w")
    m = mean(x * w) * s
    b.output("y", (x - m) * w + s)
    b.output("m", m)
    program = b.build()
    ops, device = _table(backend), _device(backend, kernel_device)
    gen = torch.Generator().manual_seed(19)
    B, S, D = 3, 4, 33
    inputs = {"x": torch.randn(B, S, D, generator=gen), "s": torch.randn(B, S, generator=gen),
              "w": torch.randn(D, generator=gen)}
    cots = {"y": _strided_randn((B, S, D), gen, "strided"), "m": torch.randn(S, B, generator=gen).t()}
    leaves_k = [t.to(device).requires_grad_() for t in inputs.values()]
    leaves_r = [t.clone().requires_grad_() for t in inputs.values()]
    out_k = ops.row_program(program, dict(zip(inputs, leaves_k)))
    out_r = get_backend("reference").row_program(program, dict(zip(inputs, leaves_r)))
    got = _grads(out_k, leaves_k, {k: c.to(device) for k, c in cots.items()})
    want = _grads(out_r, leaves_r, cots)
    _compare(program, got, want, list(inputs), B * S, D, f"{backend} scalars")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_op_used_twice_gets_the_sum_of_its_cotangents(backend, kernel_device):
    # y feeds two consumers with different scalings: autograd sums 0.3 c1 - 2 c2 before the row op's backward
    program = rms_norm()
    ops, device = _table(backend), _device(backend, kernel_device)
    gen = torch.Generator().manual_seed(23)
    x, w = torch.randn(4, 65, generator=gen), torch.randn(65, generator=gen)
    c1, c2 = torch.randn(4, 65, generator=gen), torch.randn(4, 65, generator=gen)
    grads = []
    for table, dev in ((ops, device), (get_backend("reference"), torch.device("cpu"))):
        leaves = [x.to(dev).requires_grad_(), w.to(dev).requires_grad_()]
        y = table.row_program(program, {"x": leaves[0], "w": leaves[1]})["y"]
        ((0.3 * y * c1.to(dev)).sum() - (2.0 * y * c2.to(dev)).sum()).backward()
        grads.append([t.grad.cpu() for t in leaves])
    _compare(program, grads[0], grads[1], ["x", "w"], 4, 65, f"{backend} used twice")
