"""The flash-attention template against SDPA with the mask built by loops (tests/mask_oracle.py); the
blocks it visits; the printed source. Compiled on the CUDA device when there is one (`pytest -m gpu`),
in the interpreter on CPU tensors otherwise (the tests' conftest chooses before triton is imported).
"""

import os
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from mask_oracle import Case, assert_sound, cases
from numerics import around, assert_within

triton = pytest.importorskip("triton")

from hrmspec.backends.triton import attention as attn  # noqa: E402
from hrmspec.backends.triton import cache  # noqa: E402
from hrmspec.backends.triton.launch import KernelError  # noqa: E402
from hrmspec.mask import Mask  # noqa: E402

pytestmark = pytest.mark.gpu
TILES = ((16, 16), (16, 32), (32, 16), (32, 32))
# sequence lengths beside every tile size above, and beside two tiles of 32
SEQ_LENS = (1, *around(16, 32, 64))
TOL = {torch.float32: 1e-4}


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("kernels")
        mp.setenv("HRMSPEC_CACHE", str(path))
        yield path


def _qkv(B, H, S, hd, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, S, hd, generator=g) * s).to(dtype) for s in (scale, scale, 1.0, 1.0)]  # q k v d_out


def _reference(case, q, k, v, d_out, allowed=None):
    """SDPA in fp32 on the (possibly half) inputs with the loop mask, and its gradients (CPU)."""
    leaves = [t.detach().cpu().float().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, attn_mask=case.loop() if allowed is None else allowed)
    return (out.detach(), *torch.autograd.grad(out, leaves, d_out.cpu().float()))


# what each result reduces over: out and dq over keys (S), dk and dv over queries (S); scores over hd
def _close(got, ref, dtype, what, n=1, floor=1e-6):
    assert got.shape == ref.shape and got.dtype == dtype, (what, got.shape, ref.shape, got.dtype)
    got = got.detach().cpu().float()
    if dtype not in TOL:
        assert_within(got, ref, dtype, n, what, floor=floor)
        return
    tol = TOL[dtype]
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _check(case, H, hd, dtype, tiles, device, seed=0, scale=1.0):
    """Forward and dq, dk, dv against SDPA; every block the kernels computed is one the host map
    lists (with the same partial/full state), and the map covers every allowed element."""
    B, S = case.batch, case.q_len
    q, k, v, d_out = _qkv(B, H, S, hd, dtype, seed, scale)
    allowed = case.loop()
    ref = _reference(case, q, k, v, d_out, allowed)
    # dq and dk sum terms p (do.v - delta) k (or q) that cancel exactly where a query sees one key: measure
    # them against the size of those terms, not against a zero
    rms = {n: float(t.float().pow(2).mean().sqrt()) for n, t in (("q", q), ("k", k), ("v", v), ("do", d_out))}
    floor = {"dq": rms["do"] * rms["v"] * rms["k"], "dk": rms["do"] * rms["v"] * rms["q"]}
    q, k, v, d_out = (t.to(device) for t in (q, k, v, d_out))
    mask = _on(case.mask, device)
    cfg = attn.Config(*tiles)
    out, lse, fmap, seen = attn.attention_forward(q, k, v, mask, cfg, record=True)
    dq, dk, dv, bmap, seen_b = attn.attention_backward(q, k, v, out, lse, d_out, mask, cfg, record=True)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
        _close(got, want, dtype, f"{_spec(case).tag} S={S} hd={hd} tiles={tiles} scale={scale:g} {name}", S + hd,
               floor=floor.get(name, 1e-6))
    states = fmap.states.repeat_interleave(H, 0)
    assert torch.equal(seen, states) and torch.equal(seen_b[:, 0], states) and torch.equal(seen_b[:, 1], states)
    assert torch.equal(bmap.states, fmap.states)  # the same tiles here, so the same map
    assert_sound(allowed, fmap.states.cpu(), *tiles)


def _on(mask: Mask, device) -> Mask:
    """The mask with its per-token tensors on `device`."""
    prefix, doc = (None if t is None else t.to(device) for t in (mask.prefix, mask.doc))
    return Mask(mask.kind, prefix, doc, mask.window, mask.q_offset)


def _spec(case: Case) -> attn.MaskSpec:
    return attn.MaskSpec.of(case.mask)


# -- numerics --------------------------------------------------------------------------------------------
@given(case=cases(seq_lens=SEQ_LENS), H=st.integers(1, 2), hd=st.sampled_from((8, 16, 17, 32)),
       tiles=st.sampled_from(TILES), scale=st.sampled_from((1.0, 1.0, 4.0)), seed=st.integers(0, 2**16))
def test_forward_and_gradients_match_sdpa_fp32(case, H, hd, tiles, scale, seed, kernel_device):
    _check(case, H, hd, torch.float32, tiles, kernel_device, seed, scale)


@given(case=cases(seq_lens=SEQ_LENS), hd=st.sampled_from((16, 32)), tiles=st.sampled_from(TILES),
       dtype=st.sampled_from((torch.bfloat16, torch.float16)), seed=st.integers(0, 2**16))
def test_half_precision_storage_elementwise(case, hd, tiles, dtype, seed, kernel_device):
    _check(case, 2, hd, dtype, tiles, kernel_device, seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", attn.KINDS)
def test_half_precision_storage(kind, dtype, kernel_device):
    prefix = torch.zeros(1, 33, dtype=torch.bool)
    prefix[0, :9] = True
    prefix[0, 20:25] = True
    doc = torch.tensor([[0] * 20 + [1] * 13])
    _check(Case(kind, prefix, doc, None, 1, 33), 2, 32, dtype, (16, 16), kernel_device)


@pytest.mark.parametrize("hd", [8, 24])
def test_head_dims_padded_to_a_power_of_two(hd, kernel_device):
    prefix = torch.zeros(2, 33, dtype=torch.bool)
    prefix[:, :5] = True
    _check(Case("prefix_lm", prefix, None, 11, 2, 33), 1, hd, torch.float32, (16, 32), kernel_device)


@pytest.mark.parametrize("S", around(attn.default_config(16, "fwd", torch.float32).block_m, low=2))
def test_autograd_function_with_default_tiles(S, kernel_device):
    # lengths beside the tile the device's default config takes (32 in the interpreter, fp32 on a GPU)
    B, H, hd = 2, 2, 16
    prefix = torch.zeros(B, S, dtype=torch.bool)
    prefix[:, : S // 6] = True
    doc = torch.cat([torch.zeros(B, S - S // 3, dtype=torch.long), torch.ones(B, S // 3, dtype=torch.long)], 1)
    doc[1, -2:] = -1  # padding
    case = Case("prefix_lm", prefix, doc, None, B, S)
    q, k, v, d_out = _qkv(B, H, S, hd, torch.float32, 3)
    leaves = [t.to(kernel_device).requires_grad_() for t in (q, k, v)]
    out = attn.flash_attention(*leaves, _on(case.mask, kernel_device))
    grads = torch.autograd.grad(out, leaves, d_out.to(kernel_device))
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out.detach(), *grads), _reference(case, q, k, v, d_out)):
        _close(got, want, torch.float32, name)


@given(case=cases(seq_lens=SEQ_LENS), tiles=st.sampled_from(TILES))
def test_the_printed_predicate_run_by_the_kernel_is_the_loop_mask(case, tiles, kernel_device):
    """With q = k = 0 every allowed key gets the same weight, and with v[k] the k-th unit vector the
    output row of a query is 1/n on its n allowed keys and 0 elsewhere: the kernel's mask, read off."""
    B, S = case.batch, case.q_len
    zeros = torch.zeros(B, 1, S, S, device=kernel_device)
    eye = torch.eye(S, device=kernel_device).expand(B, 1, S, S).contiguous()
    out, _, _, _ = attn.attention_forward(zeros, zeros, eye, _on(case.mask, kernel_device), attn.Config(*tiles))
    assert torch.equal(out.cpu() > 0, case.loop())


def test_an_empty_batch_and_huge_scores(kernel_device):
    # no rows: empty results; scores near 100 (exp overflows fp32 unless the row max is taken first)
    case = Case("causal", None, None, None, 1, 33)
    empty = torch.zeros(0, 2, 33, 16, device=kernel_device)
    out, lse, _, _ = attn.attention_forward(empty, empty, empty, case.mask, attn.Config(16, 16))
    assert out.shape == (0, 2, 33, 16) and lse.shape == (0, 2, 33)
    _check(case, 2, 16, torch.float32, (16, 16), kernel_device, scale=10.0)


# -- visit lists -------------------------------------------------------------------------------------------
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
    causal = Mask("causal")
    with pytest.raises(KernelError, match="must be a hrmspec.mask.Mask, got str"):
        attn.flash_attention(q, q, q, "causal")
    with pytest.raises(KernelError, match="unknown mask kind"):
        attn.MaskSpec("causl")
    with pytest.raises(KernelError, match="one shape"):
        attn.flash_attention(q, q[:, :1], q, causal)
    with pytest.raises(KernelError, match="head dim 256"):
        big = torch.randn(1, 1, 4, 256)
        attn.flash_attention(big, big, big, causal)
    with pytest.raises(KernelError, match=r"doc must be \(B, S\)"):
        attn.flash_attention(q, q, q, Mask("causal", doc=torch.zeros(1, 7, dtype=torch.long)))
    with pytest.raises(KernelError, match="q_offset 0"):
        attn.flash_attention(q, q, q, Mask("causal", q_offset=3))
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
