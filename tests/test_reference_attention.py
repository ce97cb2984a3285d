"""The reference attention (backends/reference/attention.py): blocked, with an online softmax and a
backward from the saved log-sum-exp, against SDPA with a mask built by loops; and its memory."""

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from mask_oracle import Case, cases
from torch.utils._python_dispatch import TorchDispatchMode

from hrmspec.backends import get_backend
from hrmspec.backends.reference.attention import (
    BLOCK_K,
    BLOCK_Q,
    ENGINES,
    Plan,
    attention_backward,
    attention_forward,
    blocked_attention,
    default_engine,
    plan,
)
from hrmspec.mask import Mask

ops = get_backend("reference")

BLOCKS = ((8, 8), (16, 8), (8, 32), (32, 16), (BLOCK_Q, BLOCK_K))
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _qkv(case: Case, H: int, hd: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case.batch, H, case.q_len, hd, generator=g, dtype=torch.float64)
    k, v = (torch.randn(case.batch, H, case.k_len, hd, generator=g, dtype=torch.float64) for _ in range(2))
    d_out = torch.randn(case.batch, H, case.q_len, hd, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, d_out)]


def _sdpa(case: Case, q, k, v, d_out, dtype=None):
    """SDPA with the loop mask (in `dtype`, default the inputs'), and the gradients of q, k, v."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, attn_mask=case.loop())
    return (out.detach(), *torch.autograd.grad(out, leaves, d_out.to(out.dtype)))


def _blocked(case: Case, q, k, v, d_out, blocks, engine):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = blocked_attention(*leaves, case.mask, *blocks, engine=engine)
    return (out.detach(), *torch.autograd.grad(out, leaves, d_out))


def _assert_close(got, want, dtype, what):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, (what, name, g.dtype, g.shape, w.shape)
        tol = TOL[dtype]
        torch.testing.assert_close(g, w.to(dtype), rtol=tol, atol=tol, msg=lambda m, name=name: f"{what} {name}: {m}")


@settings(max_examples=20)
@given(case=cases(seq_lens=(1, 7, 33, 63, 65), offsets=(0, 0, 5, 40), prefix_none=True), H=st.integers(1, 2),
       blocks=st.sampled_from(BLOCKS), dtype=st.sampled_from((torch.float64, torch.float32)),
       engine=st.sampled_from(ENGINES))
def test_values_and_gradients_match_sdpa_with_the_loop_mask(case, H, blocks, dtype, engine):
    q, k, v, d_out = _qkv(case, H, 16, dtype)
    _assert_close(_blocked(case, q, k, v, d_out, blocks, engine), _sdpa(case, q, k, v, d_out), dtype,
                  f"{engine}: {case.kind} doc={case.doc is not None} w={case.window} off={case.q_offset} "
                  f"S={case.q_len} {blocks}")


@functools.cache
def _long_row(kind: str, window: int | None):
    """A row of 500 tokens: two packed documents (200 and 250 tokens, prompts of 70 and 30), padding;
    with its SDPA result (the loop mask over 250,000 pairs is built once per mask)."""
    S = 500
    prefix = torch.zeros(1, S, dtype=torch.bool)
    prefix[0, :70] = prefix[0, 200:230] = True
    doc = torch.cat([torch.zeros(200), torch.ones(250), torch.full((50,), -1)]).long()[None]
    case = Case(kind, prefix, doc, window, 1, S)
    q, k, v, d_out = _qkv(case, 2, 8, torch.float64, seed=1)
    return case, (q, k, v, d_out), _sdpa(case, q, k, v, d_out)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("kind", ["causal", "prefix_lm", "bidirectional"])
def test_long_odd_rows_with_documents_and_a_window(kind, window, engine):
    case, (q, k, v, d_out), want = _long_row(kind, window)
    _assert_close(_blocked(case, q, k, v, d_out, (64, 48), engine), want, torch.float64, f"{engine}: {kind} w={window}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("offset", [0, 24])
def test_half_precision_is_computed_in_fp32_and_rounded_once(dtype, offset, engine):
    """The output is fp32 math rounded to `dtype`: within half an ulp (eps / 2 relative) of the fp32
    result on the same inputs, plus the fp32 error. The gradients also read the rounded output
    (delta = rowsum(do * out)): their error is a few eps relative to their size."""
    prefix = torch.zeros(2, offset + 65, dtype=torch.bool)
    prefix[:, :30] = True
    case = Case("prefix_lm", prefix, None, None, 2, 65, offset)
    q, k, v, d_out = _qkv(case, 2, 32, dtype, seed=2)
    got = _blocked(case, q, k, v, d_out, (32, 16), engine)
    want = _sdpa(case, q, k, v, d_out, torch.float32)
    eps = torch.finfo(dtype).eps
    out, ref = got[0].float(), want[0]
    assert got[0].dtype == dtype
    assert ((out - ref).abs() <= eps / 2 * ref.abs() + 1e-6).all()
    for name, g, w in zip(("dq", "dk", "dv"), got[1:], want[1:]):
        assert g.dtype == dtype
        rms = (g.float() - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()
        assert rms < 4 * eps, f"{name}: relative RMS error {rms:.2e} (eps {eps:.1e})"


@pytest.mark.parametrize("mask", [Mask("prefix_lm", torch.tensor([[1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0]]),
                                       torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, -1]])),
                                  Mask("causal", window=3, q_offset=3), Mask("bidirectional", q_offset=2)],
                         ids=["packed-prefix", "window-offset", "bidirectional-offset"])
@pytest.mark.parametrize("engine", ENGINES)
def test_gradcheck_float64(mask, engine):
    """Every Jacobian entry for the plain-torch tiles; for the fused kernel (an OpenMP region per call,
    slow to start on a busy machine) gradcheck's fast mode, a random projection of the Jacobian."""
    torch.manual_seed(0)
    B, S = 2, 7
    q = torch.randn(B, 2, S - mask.q_offset, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, 2, S, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for bq, bk in ((2, 3), (BLOCK_Q, BLOCK_K)):
        def f(q, k, v, bq=bq, bk=bk):
            return blocked_attention(q, k, v, mask, bq, bk, engine)

        assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=engine == "fused")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_query_with_no_allowed_key_gives_zero_and_zero_gradients(engine):
    """Cannot happen for these masks (a query always sees itself), but a plan may leave a query block
    with no visible key: out 0, lse +inf, no NaN anywhere."""
    mask = Mask("causal")
    q, k, v, d_out = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(4))
    # query block 0 (queries 0-3) visits only key block 1 (keys 4-7), where causal allows nothing;
    # query block 1 visits nothing at all
    p = Plan(4, 4, 8, 8, (((1, True),), ()), memo_bias=False)
    out, lse = attention_forward(q, k, v, mask, p, engine)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse > 0).all()
    grads = attention_backward(q, k, v, out, lse, d_out, mask, p, engine)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_the_op_table_runs_the_blocked_attention():
    assert default_engine(torch.zeros(1)) == "fused"  # on CPU, when torch has the fused kernel
    case = Case("prefix_lm", torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.bool), None, None, 1, 6)
    q, k, v, d_out = _qkv(case, 2, 8, torch.float64)
    torch.testing.assert_close(ops.attention(q, k, v, case.mask), _sdpa(case, q, k, v, d_out)[0])
    with pytest.raises(ValueError, match="6 queries at offset 2 need 8 keys, got 6"):
        ops.attention(q, k, v, Mask("causal", q_offset=2))
    two_rows = Mask("prefix_lm", case.prefix.expand(2, 6))
    with pytest.raises(ValueError, match=r"per-token tensors are \(2, 6\), expected \(batch 3, keys 6\)"):
        ops.attention(q.expand(3, -1, -1, -1), k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1), two_rows)


def test_rows_up_to_one_block_are_one_tile():
    p = plan(Mask("prefix_lm", torch.ones(4, 256, dtype=torch.bool)), 256, 256)
    assert len(p.rows) == 1 and len(p.rows[0]) == 1
    assert len(plan(Mask("causal"), BLOCK_Q + 1, BLOCK_Q + 1).rows) == 2


# -- memory: nothing of S x S ------------------------------------------------------------------------------
def _causal_packed(S: int) -> Mask:
    prefix = (torch.arange(S) % 300 < 40)[None]
    return Mask("prefix_lm", prefix, (torch.arange(S) // 300)[None])  # documents of 300 tokens, 40-token prompts


@pytest.mark.parametrize("engine", ENGINES)
def test_autograd_saves_no_s_squared_tensor(engine):
    S, hd = 1024, 8
    q, k, v = (torch.randn(1, 1, S, hd, requires_grad=True) for _ in range(3))
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = blocked_attention(q, k, v, _causal_packed(S), engine=engine)
    assert sorted(shapes) == sorted([(1, 1, S, hd)] * 4 + [(1, 1, S)]), shapes  # q, k, v, out, lse
    # what the dense path kept: SDPA saves its (B, 1, S, S) mask
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_packed(S).dense())
    assert max(math.prod(s) for s in shapes) == S * S
    out.sum().backward()


class _Shapes(TorchDispatchMode):
    """Records the number of elements of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("engine", ENGINES)
def test_forward_and_backward_at_4096_allocate_nothing_of_s_squared(engine):
    """Every tensor an op returns, in the forward and the backward: at most one tile for batch x
    heads, or a (B, h, S, hd) tensor. (The fused kernel's per-thread scratch is its own, one tile
    of its own blocks at most.)"""
    S, hd, B, H = 4096, 16, 1, 1
    q, k, v = (torch.randn(B, H, S, hd, requires_grad=True) for _ in range(3))
    mask = _causal_packed(S)
    with _Shapes() as fwd:
        out = blocked_attention(q, k, v, mask, engine=engine)
    with _Shapes() as bwd:
        out.backward(torch.ones_like(out))
    tile, rows = B * H * BLOCK_Q * BLOCK_K, B * H * S * hd
    assert fwd.largest <= max(tile, rows) and bwd.largest <= max(tile, rows), (fwd.largest, bwd.largest)
    assert max(fwd.largest, bwd.largest) * 64 <= S * S


def test_autocast_casts_q_k_v_as_sdpa_does():
    """Under bf16 autocast (rope makes q and k fp32 there, v comes from a bf16 matmul) the op runs in
    bf16 storage like SDPA did, with fp32 math inside; no autocast reaches the tiles."""
    case = Case("causal", None, None, None, 2, 40)
    q, k, v, d_out = _qkv(case, 2, 16, torch.float32, seed=3)
    v = v.bfloat16()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = blocked_attention(*leaves, case.mask, 16, 16, "torch")
        want = F.scaled_dot_product_attention(*(t.detach() for t in leaves), attn_mask=case.loop())
    assert out.dtype == want.dtype == torch.bfloat16
    ref = _sdpa(case, *(t.bfloat16() for t in (q, k, v)), d_out, torch.float32)[0]
    assert ((out.float() - ref).abs() <= torch.finfo(torch.bfloat16).eps / 2 * ref.abs() + 1e-6).all()
    grads = torch.autograd.grad(out, leaves, d_out.bfloat16())
    assert [g.dtype for g in grads] == [torch.float32, torch.float32, torch.bfloat16]


def _flex(mask: Mask, q, k, v):
    """torch's FlexAttention (eager, on the CPU, forward only there) with the mask's rule as its mask_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(mask.mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device="cpu")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")  # eager: the oracle
        return flex_attention(q, k, v, block_mask=block_mask)


@settings(max_examples=10)
@given(case=cases(seq_lens=(1, 7, 33, 65), offsets=(0, 0, 3), prefix_none=True))
def test_the_rule_as_a_flex_attention_mask_mod_gives_the_same_attention(case):
    """The mask rule handed to torch's FlexAttention as its `mask_mod` (`Mask.mask_mod`) and the
    blocked reference attention agree, in float64, on both engines and on tiles smaller than the row."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v, d_out = _qkv(case, 2, 16, torch.float64)
    want = _flex(case.mask, q, k, v)
    for engine in ENGINES:
        for blocks in ((BLOCK_Q, BLOCK_K), (16, 8)):
            got = _blocked(case, q, k, v, d_out, blocks, engine)[0]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10,
                                       msg=lambda m, e=engine, b=blocks: f"{e} {b} {case}: {m}")
