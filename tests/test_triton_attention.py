"""The flash-attention template in the interpreter against SDPA with the dense mask; block skipping.

TRITON_INTERPRET=1 must be set before triton is imported (see tests/test_triton_backend.py).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import re  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

triton = pytest.importorskip("triton")

from hrmspec.backends.triton import attention as attn  # noqa: E402
from hrmspec.backends.triton import cache  # noqa: E402
from hrmspec.backends.triton.aot import interpreting  # noqa: E402
from hrmspec.backends.triton.launch import KernelError  # noqa: E402
from hrmspec.runtime.masks import dense_mask  # noqa: E402

if not interpreting():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

SEQ_LENS = (1, 7, 33, 64, 100)
TILES = ((16, 16), (16, 32), (32, 16), (32, 32))
TOL = {torch.float32: 1e-4}
RMS_TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}  # relative RMS error of half-precision storage


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("kernels")
        mp.setenv("HRMSPEC_CACHE", str(path))
        yield path


@dataclass
class Case:
    kind: str
    prefix: torch.Tensor  # (B, S) bool
    doc: torch.Tensor | None  # (B, S) int, -1 on padding
    window: int | None

    @property
    def spec(self) -> attn.MaskSpec:
        return attn.MaskSpec(self.kind, self.doc is not None, self.window)

    def dense(self) -> torch.Tensor:
        """(B, 1, S, S) bool: the runtime's dense mask, and-ed with the window."""
        B, S = self.prefix.shape
        m = dense_mask(self.kind, B, S, self.prefix, self.doc)
        if self.window:
            pos = torch.arange(S)
            m = m & ((pos[:, None] - pos[None, :]).abs() < self.window)
        return m


@st.composite
def cases(draw, seq_lens=SEQ_LENS, batch=(1, 2), sorted_docs=True):
    """Packed rows: documents of random lengths, each starting with a random-length prefix, then
    padding (doc -1); without documents, one sample per row with a random prefix length. With
    sorted_docs=False, doc ids and prefix bits are arbitrary (for the soundness of block skipping)."""
    kind = draw(st.sampled_from(attn.KINDS))
    B, S = draw(st.integers(*batch)), draw(st.sampled_from(seq_lens))
    documents = draw(st.booleans())
    window = draw(st.none() | st.integers(1, 40))
    prefix = torch.zeros(B, S, dtype=torch.bool)
    doc = torch.full((B, S), -1, dtype=torch.int64)
    if not sorted_docs:
        seed = draw(st.integers(0, 2**16))
        g = torch.Generator().manual_seed(seed)
        prefix = torch.rand(B, S, generator=g) < draw(st.sampled_from((0.0, 0.3, 0.9)))
        doc = torch.randint(-1, draw(st.integers(1, 4)), (B, S), generator=g)
        return Case(kind, prefix, doc if documents else None, window)
    for b in range(B):
        end = S - (draw(st.integers(0, S // 4)) if documents else 0)
        t, d = 0, 0
        while t < end:
            n = draw(st.integers(1, end - t)) if documents else S
            prefix[b, t:t + draw(st.integers(0, n))] = True
            doc[b, t:t + n] = d
            t, d = t + n, d + 1
    return Case(kind, prefix, doc if documents else None, window)


def _qkv(B, H, S, hd, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, hd, generator=g).to(dtype) for _ in range(4)]  # q, k, v, d_out


def _reference(case, q, k, v, d_out):
    """SDPA in fp32 on the (possibly half) inputs, and its gradients."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, attn_mask=case.dense())
    return (out.detach(), *torch.autograd.grad(out, leaves, d_out.float()))


def _close(got, ref, dtype, what):
    assert got.shape == ref.shape and got.dtype == dtype, (what, got.shape, ref.shape, got.dtype)
    got = got.float()
    if dtype in RMS_TOL:
        rms = (got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-6)
        assert rms < RMS_TOL[dtype], f"{what}: relative RMS error {rms:.2e}"
        return
    tol = TOL[dtype]
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _check(case, H, hd, dtype, tiles, seed=0):
    """Forward and dq, dk, dv against SDPA; every block the kernels computed is one the host map
    lists (with the same partial/full state), and the map covers every allowed element."""
    B, S = case.prefix.shape
    q, k, v, d_out = _qkv(B, H, S, hd, dtype, seed)
    cfg = attn.Config(*tiles)
    out, lse, fmap, seen = attn.attention_forward(q, k, v, case.spec, case.prefix, case.doc, cfg, record=True)
    dq, dk, dv, bmap, seen_b = attn.attention_backward(q, k, v, out, lse, d_out, case.spec, case.prefix, case.doc,
                                                       cfg, record=True)
    ref = _reference(case, q, k, v, d_out)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
        _close(got, want, dtype, f"{case.spec.tag} S={S} hd={hd} tiles={tiles} {name}")
    states = fmap.states.repeat_interleave(H, 0)
    assert torch.equal(seen, states) and torch.equal(seen_b[:, 0], states) and torch.equal(seen_b[:, 1], states)
    assert torch.equal(bmap.states, fmap.states)  # the same tiles here, so the same map
    _assert_sound(case, fmap.states, *tiles)


def _block_reduce(mask, bm, bn):
    """(B, nQ, nK): any / all of the dense (B, S, S) mask over each block's valid elements."""
    B, S, _ = mask.shape
    nq, nk = -(-S // bm), -(-S // bn)
    padded = torch.zeros(B, nq * bm, nk * bn, dtype=torch.int8)
    valid = torch.zeros_like(padded)
    padded[:, :S, :S] = mask.to(torch.int8)
    valid[:, :S, :S] = 1
    blocks = padded.view(B, nq, bm, nk, bn).sum((2, 4))
    return blocks > 0, blocks == valid.view(B, nq, bm, nk, bn).sum((2, 4))


def _assert_sound(case, states, bm, bn):
    any_, all_ = _block_reduce(case.dense()[:, 0], bm, bn)
    assert not (any_ & (states == attn.SKIP)).any(), "a block with an allowed element was skipped"
    assert not (~all_ & (states == attn.FULL)).any(), "a block with a masked element was marked full"


# -- numerics --------------------------------------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(case=cases(), H=st.integers(1, 2), hd=st.sampled_from((16, 32)), tiles=st.sampled_from(TILES))
def test_forward_and_gradients_match_sdpa_fp32(case, H, hd, tiles):
    _check(case, H, hd, torch.float32, tiles)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", attn.KINDS)
def test_half_precision_storage(kind, dtype):
    prefix = torch.zeros(1, 33, dtype=torch.bool)
    prefix[0, :9] = True
    prefix[0, 20:25] = True
    doc = torch.tensor([[0] * 20 + [1] * 13])
    _check(Case(kind, prefix, doc, None), 2, 32, dtype, (16, 16))


@pytest.mark.parametrize("hd", [8, 24])
def test_head_dims_padded_to_a_power_of_two(hd):
    prefix = torch.zeros(2, 33, dtype=torch.bool)
    prefix[:, :5] = True
    _check(Case("prefix_lm", prefix, None, 11), 1, hd, torch.float32, (16, 32))


def test_autograd_function_with_default_tiles():
    B, H, S, hd = 2, 2, 64, 16
    prefix = torch.zeros(B, S, dtype=torch.bool)
    prefix[:, :10] = True
    doc = torch.cat([torch.zeros(B, 40, dtype=torch.long), torch.ones(B, 24, dtype=torch.long)], 1)
    case = Case("prefix_lm", prefix, doc, None)
    q, k, v, d_out = _qkv(B, H, S, hd, torch.float32, 3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attn.flash_attention(*leaves, "prefix_lm", prefix=prefix, doc=doc)
    grads = torch.autograd.grad(out, leaves, d_out)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out.detach(), *grads), _reference(case, q, k, v, d_out)):
        _close(got, want, torch.float32, name)


# -- block skipping ----------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(case=cases(seq_lens=(1, 5, 31, 64, 97, 130), batch=(1, 3), sorted_docs=False),
       bm=st.sampled_from((8, 16, 32, 64)), bn=st.sampled_from((8, 16, 32, 64)))
def test_block_map_never_skips_an_allowed_element(case, bm, bn):
    B, S = case.prefix.shape
    _assert_sound(case, attn.block_states(case.spec, B, S, case.prefix, case.doc, bm, bn), bm, bn)


@settings(max_examples=100, deadline=None)
@given(case=cases(seq_lens=(1, 5, 31, 64, 97, 130), batch=(1, 3)), bm=st.sampled_from((8, 16, 32)),
       bn=st.sampled_from((8, 16, 32)))
def test_block_map_is_exact_for_packed_documents(case, bm, bn):
    # doc ids increase along the row (no padding) and prefixes lead their documents: then the block
    # summaries lose nothing, and a block is skipped exactly when the dense mask is empty there
    if case.doc is not None:
        case.doc = torch.where(case.doc < 0, case.doc.max() + 1, case.doc)
    case.window = None
    B, S = case.prefix.shape
    states = attn.block_states(case.spec, B, S, case.prefix, case.doc, bm, bn)
    any_, all_ = _block_reduce(case.dense()[:, 0], bm, bn)
    assert torch.equal(states != attn.SKIP, any_)
    if case.kind != "prefix_lm":  # prefix_lm marks a block full only if one rule covers all of it
        assert torch.equal(states == attn.FULL, all_)


def test_skipped_block_counts():
    S, tile = 100, 16  # 7 x 7 blocks
    none = torch.zeros(1, S, dtype=torch.bool)
    count = {}
    for name, spec, doc in [("causal", attn.MaskSpec("causal"), None),
                            ("bidirectional", attn.MaskSpec("bidirectional"), None),
                            ("window", attn.MaskSpec("causal", window=16), None),
                            ("docs", attn.MaskSpec("causal", documents=True), torch.arange(S)[None] // 40)]:
        states = attn.block_states(spec, 1, S, none, doc, tile, tile)
        count[name] = (int((states == attn.PARTIAL).sum()), int((states == attn.FULL).sum()))
    assert count["causal"] == (7, 21)  # the diagonal is partial, the 21 blocks below it are full
    assert count["bidirectional"] == (0, 49)
    assert count["window"] == (13, 0)  # the diagonal and the first sub-diagonal
    # documents [0, 40), [40, 80), [80, 100): blocks 0, 1 | 3, 4 | 5, 6, and block 2 holds documents 0 and 1;
    # partial: the diagonal and (2, 0), (2, 1), (3, 2), (4, 2); full: (1, 0), (4, 3), (6, 5); 14 of 28 causal
    assert count["docs"] == (7 + 4, 3)


def test_visit_lists_order_partial_then_full():
    states = torch.tensor([[[2, 0, 1, 2], [0, 0, 0, 0]]], dtype=torch.int8)
    num, idx = attn.visit_lists(states)
    assert num.tolist() == [[[1, 0], [2, 0]]]
    assert idx[0, 0, 0, :1].tolist() == [2] and idx[0, 1, 0, :2].tolist() == [0, 3]


# -- the printed source ------------------------------------------------------------------------------------
SPECS = [attn.MaskSpec(k, d, w) for k in attn.KINDS for d in (False, True) for w in (None, 64)]


def _memory_accesses(src: str) -> list[str]:
    """The text of every tl.load(...) / tl.store(...) call, across line breaks."""
    calls = []
    for m in re.finditer(r"tl\.(load|store)\(", src):
        depth, i = 0, m.end() - 1
        while True:
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            if depth == 0:
                break
            i += 1
        calls.append(" ".join(src[m.start():i + 1].split()))
    return calls


def test_source_is_deterministic_and_prints_the_predicate(kernel_cache):
    for spec in SPECS:
        for direction in ("fwd", "bwd"):
            name = attn.kernel_name(spec, direction)
            assert re.fullmatch(rf"hrm_attn_{spec.tag}_{direction}_[0-9a-f]{{8}}", name)
            src = attn.render(spec, direction, name)
            assert src == attn.render(spec, direction, name) and name == attn.kernel_name(spec, direction)
            assert f"return {spec.predicate()}" in src
            assert ("(k_pos <= q_pos)" in src) == (spec.kind != "bidirectional")
            assert ("tl.load(PREFIX" in src) == (spec.kind == "prefix_lm")
            assert ("tl.load(DOC" in src) == spec.documents
            assert (f"< {spec.window})" in src) == bool(spec.window)
            assert "libdevice" not in src and "inline_asm" not in src
            calls = _memory_accesses(src)
            assert len(calls) >= 4
            for call in calls:  # tiles and per-token loads are masked; list entries are in range
                assert "mask=" in call or re.match(r"tl\.(load|store)\((KV_|Q_|VISIT)", call), call
            compile(src, name, "exec")
    names = {attn.kernel_name(s, d) for s in SPECS for d in ("fwd", "bwd")}
    assert len(names) == 2 * len(SPECS)
    attn.load(SPECS[0], "fwd")
    path = cache.write_source(attn.kernel_name(SPECS[0], "fwd"), attn.render(SPECS[0], "fwd",
                                                                              attn.kernel_name(SPECS[0], "fwd")))
    assert path.parent == kernel_cache and cache.is_valid(path)


def test_errors_name_the_problem():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(KernelError, match="unknown mask kind"):
        attn.flash_attention(q, q, q, "causl")
    with pytest.raises(KernelError, match="one shape"):
        attn.flash_attention(q, q[:, :1], q, "causal")
    with pytest.raises(KernelError, match="head dim 256"):
        big = torch.randn(1, 1, 4, 256)
        attn.flash_attention(big, big, big, "causal")
    with pytest.raises(KernelError, match="doc must be"):
        attn.flash_attention(q, q, q, "causal", doc=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(KernelError, match="window"):
        attn.MaskSpec("causal", window=0)


# -- compile-only: sm_80 and sm_90 in a fresh process --------------------------------------------------------
def _nvidia_tools() -> bool:
    try:
        from triton import knobs

        return os.path.exists(knobs.nvidia.ptxas.path)
    except Exception:
        return False


needs_ptxas = pytest.mark.skipif(not _nvidia_tools(), reason="the triton wheel's NVIDIA backend is not available")
COMPILE_SPECS = [("causal", False, None), ("prefix_lm", True, None), ("bidirectional", False, None),
                 ("causal", True, 256)]


def _jobs(specs, head_dims, archs=(80, 90)):
    return [{"kind": k, "documents": d, "window": w, "direction": direction, "head_dim": hd, "dtype": "bf16",
             "arch": arch} for k, d, w in specs for hd in head_dims for direction in ("fwd", "bwd") for arch in archs]


def _assert_no_spills(infos):
    for info in infos:
        assert 0 < info.registers <= 255 and info.spill_stores == 0 and info.spill_loads == 0, str(info)


@needs_ptxas
def test_prefix_lm_document_kernels_compile_without_spills():
    # the HRM-Text setting (packed PrefixLM, head dim 128) on sm_80; every kind on both archs is `slow`
    infos = attn.compile_many(_jobs([("prefix_lm", True, None)], (128,), archs=(80,)))
    assert [re.sub(r"_[0-9a-f]{8}\[.*", "", i.name) for i in infos] == ["hrm_attn_prefix_lm_doc_fwd",
                                                                        "hrm_attn_prefix_lm_doc_bwd"]
    _assert_no_spills(infos)


@pytest.mark.slow
@needs_ptxas
def test_all_mask_kinds_compile_without_spills_at_head_dims_64_and_128():
    infos = attn.compile_many(_jobs(COMPILE_SPECS, (64, 128)))
    assert len(infos) == len(COMPILE_SPECS) * 2 * 2 * 2
    _assert_no_spills(infos)
