"""`hrmspec check` and `hrmspec compile --emit` on the triton backend, and the triton backend running a
whole model forward and backward against the reference."""

import json
import re

import pytest
import torch
from mask_oracle import loop_mask

pytest.importorskip("triton")

import hrmspec  # noqa: E402
import hrmspec.check  # noqa: E402
from hrmspec.backends import get_backend  # noqa: E402
from hrmspec.backends.common.contract import OpTable  # noqa: E402
from hrmspec.backends.common.fallback import record_fallbacks  # noqa: E402
from hrmspec.backends.common.limits import MAX_WIDTH  # noqa: E402
from hrmspec.check import check_kernels  # noqa: E402
from hrmspec.cli import main  # noqa: E402
from hrmspec.graph import build_graph  # noqa: E402
from hrmspec.graph.fusion import KernelInfo, fuse_model  # noqa: E402
from hrmspec.ir import rms_norm  # noqa: E402
from hrmspec.mask import Mask  # noqa: E402
from hrmspec.spec import load_spec_text  # noqa: E402

pytestmark = pytest.mark.gpu  # the checks and the whole-model runs use the kernel device
EXPR_NORM = '    norm: {type: expr, expr: "x * rsqrt(mean(x*x) + eps) * (1 + w)", params: {w: zeros}}\n'


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HRMSPEC_CACHE", str(tmp_path_factory.mktemp("kernels")))
        yield


@pytest.fixture
def expr_spec(tmp_path, tiny_text):
    path = tmp_path / "tiny-expr.yaml"
    path.write_text(tiny_text.replace("  modules:\n", "  block:\n" + EXPR_NORM + "  modules:\n"))
    return path


def test_check_prints_the_table_and_exits_0(expr_spec, capsys):
    assert main(["check", str(expr_spec)]) == 0
    out = capsys.readouterr().out
    plan = fuse_model(build_graph(hrmspec.load_spec(expr_spec)))
    assert f"all {len(plan.kernels)} kernels ok" in out
    for k in plan.kernels:  # every kernel, forward and backward, is a row of the table
        assert re.search(rf"{k.name}\s+{k.direction}\s+{k.width}\s+\d\.\de-\d\d", out), k.name
    assert "hrm_add_expr_norm_fwd_" in out and "hrm_add_expr_norm_bwd_" in out
    if hrmspec.check.ptxas_available():
        assert "sm_80" in out and "sm_90" in out and "FAIL" not in out
        rows = [line for line in out.splitlines() if line.strip().startswith("hrm_")]
        assert len(rows) == len(plan.kernels) and all(line.count(" ok ") == 2 for line in rows), rows


def test_a_wrong_kernel_fails_the_check_with_exit_1(expr_spec, capsys, monkeypatch):
    real = hrmspec.check.evaluate

    def off_by_a_bit(program, inputs, *args):  # the reference moves; the kernels no longer match it
        return {k: v + 1e-2 for k, v in real(program, inputs, *args).items()}

    monkeypatch.setattr(hrmspec.check, "evaluate", off_by_a_bit)
    assert main(["check", str(expr_spec), "--no-compile", "--draws", "1"]) == 1
    out = capsys.readouterr().out
    plan = fuse_model(build_graph(hrmspec.load_spec(expr_spec)))
    forwards = sum(k.direction == "fwd" for k in plan.kernels)
    assert forwards >= 4  # add + norm, rope, gate, swiglu, last add + exit norm
    # the forwards fail; a shift has no gradient, so a backward matches unless it reads a stored
    # forward output (add + norm reads h), which now comes shifted from the reference
    reading = sum(k.direction == "bwd" and bool(set(k.program.input_names) & set(k.forward.output_names))
                  for k in plan.kernels)
    assert reading == 1
    failed = forwards + reading
    assert f"{failed} of {len(plan.kernels)} kernels failed" in out and out.count(" FAIL") == failed


@pytest.mark.fallback
def test_a_row_too_wide_is_a_reported_fallback(kernel_device, fresh_fallback_warnings):
    program = rms_norm(affine=False)
    wide = KernelInfo("hrm_rms_norm_fwd_wide", "fwd", program, program, MAX_WIDTH + 1)
    [c] = check_kernels([wide], compile=False)
    assert c.ok and c.error is None and "reference op" in c.fallback
    x = torch.randn(2, MAX_WIDTH + 1, device=kernel_device)
    with pytest.warns(UserWarning, match="exceed"), record_fallbacks() as fell:
        y = get_backend("triton").rms_norm(x, 1e-6)
    assert [(f.backend, f.op) for f in fell] == [("triton", "rms_norm")] and "exceed" in fell[0].reason
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=1e-6))


def test_compile_emit_writes_every_kernel_and_an_index(expr_spec, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", str(expr_spec), "--backend", "triton", "--emit", str(out)]) == 0
    index = json.loads((out / "kernels.json").read_text())
    plan = fuse_model(build_graph(hrmspec.load_spec(expr_spec)))
    assert [e["kernel"] for e in index] == [k.name for k in plan.kernels]
    for e in index:
        source = (out / e["source"]).read_text()
        assert f"def {e['kernel']}(" in source and "@triton.jit" in source
        assert e["direction"] in ("fwd", "bwd") and e["runs_in"] and e["region"]
    assert (out / "graph.json").exists() and (out / "spec.yaml").exists()
    assert f"wrote {len(index)} kernels" in capsys.readouterr().out


def test_the_triton_backend_has_the_reference_op_table():
    reference, triton = get_backend("reference"), get_backend("triton")
    assert isinstance(triton, OpTable) and triton.name == "triton" and triton.fuses and not reference.fuses
    names = {n for n in dir(reference) if not n.startswith("_") and callable(getattr(reference, n))}
    assert names <= set(dir(triton))
    assert triton.reference is reference  # what its kernels fall back to


@pytest.mark.parametrize("kind", ["causal", "prefix_lm", "bidirectional"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_the_template_runs_every_mask_from_its_fields(kind, packed, window, kernel_device):
    prefix = torch.zeros(2, 7, dtype=torch.bool)
    prefix[0, :3] = prefix[0, 4:6] = True
    prefix[1, :1] = True
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, -1], [3, 3, 3, 3, 3, 3, 3]]) if packed else None
    mask = Mask(kind, *(None if t is None else t.to(kernel_device) for t in (prefix, docs)), window)
    q, k, v = (torch.randn(2, 2, 7, 8) for _ in range(3))
    with record_fallbacks() as fell:  # no fallback: the template takes every mask kind, documents, a window
        out = get_backend("triton").attention(*(t.to(kernel_device) for t in (q, k, v)), mask)
    assert not fell, fell
    allowed = loop_mask(kind, 2, 7, prefix, docs, window)  # brute force, padding (doc -1) included
    torch.testing.assert_close(out.cpu(), torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed))


@pytest.mark.fallback
def test_decoding_with_a_cache_runs_the_reference_attention_with_a_warning(kernel_device, fresh_fallback_warnings):
    mask = Mask("causal", q_offset=5)  # 2 new queries after 5 cached keys
    q, k, v = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    with pytest.warns(UserWarning, match="query and key lengths differ"), record_fallbacks() as fell:
        out = get_backend("triton").attention(*(t.to(kernel_device) for t in (q, k, v)), mask).cpu()
    assert [f.op for f in fell] == ["attention"]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=loop_mask("causal", 1, 2, q_offset=5))
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("norm", ["rms", "expr"])
def test_triton_backend_runs_a_whole_model_like_the_reference(tiny_text, norm, kernel_device):
    text = tiny_text if norm == "rms" else tiny_text.replace("  modules:\n", "  block:\n" + EXPR_NORM + "  modules:\n")
    over = {"model.modules.L.layers": 1, "model.modules.H.layers": 1}
    spec = load_spec_text(text, overrides=over)
    torch.manual_seed(0)
    # both on the kernel device: the difference is the generated kernels, not CPU against GPU matmuls
    ref = hrmspec.compile(spec, backend="reference").to(kernel_device)
    tri = hrmspec.compile(spec, backend="triton").to(kernel_device)
    tri.load_state_dict(ref.state_dict())
    if norm == "expr":  # non-zero offsets, so the norm weights matter
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name.endswith("params.w"):
                    p.normal_(0, 0.1)
        tri.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 61, (2, 7), generator=gen), torch.randint(0, 61, (2, 7), generator=gen)
    prefix = torch.zeros(2, 7, dtype=torch.bool)
    prefix[:, :3] = prefix[0, 4] = True
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0] * 7])  # two samples packed into the first row
    ids, labels, prefix, docs = (t.to(kernel_device) for t in (ids, labels, prefix, docs))
    out_r = ref(ids, prefix_mask=prefix, doc_ids=docs, labels=labels)
    with record_fallbacks() as fell:
        out_t = tri(ids, prefix_mask=prefix, doc_ids=docs, labels=labels, return_logits=False)  # as in training
        out_t.loss.backward()
        with torch.no_grad():
            logits = tri(ids, prefix_mask=prefix, doc_ids=docs).logits
    assert not fell, fell  # every generated op runs (attention, the loss too): nothing falls back
    out_r.loss.backward()
    assert out_t.logits is None
    torch.testing.assert_close(out_t.loss, out_r.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, out_r.logits, rtol=1e-4, atol=1e-5)
    grads = 0
    for (name, p_r), (_, p_t) in zip(ref.named_parameters(), tri.named_parameters()):
        assert (p_r.grad is None) == (p_t.grad is None), name
        if p_r.grad is not None:
            torch.testing.assert_close(p_t.grad, p_r.grad, rtol=1e-4, atol=1e-5 * float(p_r.grad.abs().max()),
                                       msg=lambda m, name=name: f"{name}: {m}")
            grads += 1
    assert grads == len(list(ref.parameters()))
