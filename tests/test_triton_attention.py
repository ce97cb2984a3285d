"""The flash-attention template in the interpreter against SDPA with a mask built by loops; the
blocks it visits; the printed source.

TRITON_INTERPRET=1 must be set before triton is imported (see tests/test_triton_backend.py).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

triton = pytest.importorskip("triton")

from mask_oracle import Case, assert_sound, cases  # noqa: E402

from hrmspec.backends.triton import attention as attn  # noqa: E402
from hrmspec.backends.triton import cache  # noqa: E402
from hrmspec.backends.triton.aot import interpreting  # noqa: E402
from hrmspec.backends.triton.launch import KernelError  # noqa: E402
from hrmspec.mask import Mask  # noqa: E402

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


def _qkv(B, H, S, hd, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, hd, generator=g).to(dtype) for _ in range(4)]  # q, k, v, d_out


def _reference(case, q, k, v, d_out):
    """SDPA in fp32 on the (possibly half) inputs with the loop mask, and its gradients."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, attn_mask=case.loop())
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
    B, S = case.batch, case.q_len
    q, k, v, d_out = _qkv(B, H, S, hd, dtype, seed)
    cfg = attn.Config(*tiles)
    out, lse, fmap, seen = attn.attention_forward(q, k, v, case.mask, cfg, record=True)
    dq, dk, dv, bmap, seen_b = attn.attention_backward(q, k, v, out, lse, d_out, case.mask, cfg, record=True)
    ref = _reference(case, q, k, v, d_out)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
        _close(got, want, dtype, f"{_spec(case).tag} S={S} hd={hd} tiles={tiles} {name}")
    states = fmap.states.repeat_interleave(H, 0)
    assert torch.equal(seen, states) and torch.equal(seen_b[:, 0], states) and torch.equal(seen_b[:, 1], states)
    assert torch.equal(bmap.states, fmap.states)  # the same tiles here, so the same map
    assert_sound(case.mask, S, fmap.states, *tiles)


def _spec(case: Case) -> attn.MaskSpec:
    return attn.MaskSpec.of(case.mask)


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
    _check(Case(kind, prefix, doc, None, 1, 33), 2, 32, dtype, (16, 16))


@pytest.mark.parametrize("hd", [8, 24])
def test_head_dims_padded_to_a_power_of_two(hd):
    prefix = torch.zeros(2, 33, dtype=torch.bool)
    prefix[:, :5] = True
    _check(Case("prefix_lm", prefix, None, 11, 2, 33), 1, hd, torch.float32, (16, 32))


def test_autograd_function_with_default_tiles():
    B, H, S, hd = 2, 2, 64, 16
    prefix = torch.zeros(B, S, dtype=torch.bool)
    prefix[:, :10] = True
    doc = torch.cat([torch.zeros(B, 40, dtype=torch.long), torch.ones(B, 24, dtype=torch.long)], 1)
    case = Case("prefix_lm", prefix, doc, None, B, S)
    q, k, v, d_out = _qkv(B, H, S, hd, torch.float32, 3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attn.flash_attention(*leaves, case.mask)
    grads = torch.autograd.grad(out, leaves, d_out)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out.detach(), *grads), _reference(case, q, k, v, d_out)):
        _close(got, want, torch.float32, name)


@settings(max_examples=10, deadline=None)
@given(case=cases(seq_lens=(1, 7, 33, 64)), tiles=st.sampled_from(TILES))
def test_the_printed_predicate_run_by_the_kernel_is_the_loop_mask(case, tiles):
    """With q = k = 0 every allowed key gets the same weight, and with v[k] the k-th unit vector the
    output row of a query is 1/n on its n allowed keys and 0 elsewhere: the kernel's mask, read off."""
    B, S = case.batch, case.q_len
    zeros = torch.zeros(B, 1, S, S)
    eye = torch.eye(S).expand(B, 1, S, S).contiguous()
    out, _, _, _ = attn.attention_forward(zeros, zeros, eye, case.mask, attn.Config(*tiles))
    assert torch.equal(out > 0, case.loop())


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
