"""A module on a kernel backend runs the fusion pass's body (runtime/execution/stack.py): only the
kernels the plan lists (those `hrmspec check` and the golden snapshots cover), no more saved
activations than op by op, and a call frees what it no longer needs. (That the fused body computes
what the op-by-op one does, and both what the layers written by hand do: tests/test_fusion.py.)"""


import pytest
import torch

import hrmspec
from hrmspec.backends import get_backend
from hrmspec.backends.common.fallback import record_fallbacks
from hrmspec.graph import build_graph
from hrmspec.graph.fusion import fuse_model
from hrmspec.graph.plan import module_plan
from hrmspec.mask import Mask
from hrmspec.runtime.execution import Context, ModuleStack
from hrmspec.spec import load_spec_text

EXPR = "x * rsqrt(mean(x*x) + eps) * (1 + w)"
CONFIGS = {
    "pre": {},
    "pre-affine": {"model.block.norm.affine": True},
    "post-gelu": {"model.block.norm.place": "post", "model.block.mlp": "gelu"},
    "geglu": {"model.block.mlp": "geglu"},
    "sandwich-affine-plain": {"model.block.norm.place": "sandwich", "model.block.norm.affine": True,
                              "model.block.attention.type": "plain"},
    "sandwich-expr-norope": {"model.block.norm": {"type": "expr", "expr": EXPR, "params": {"w": "normal"},
                                                  "place": "sandwich"}, "model.block.attention.rope_theta": None},
    "expr-no-exit": {"model.modules.L.exit_norm": "none",
                     "model.block.norm": {"type": "expr", "expr": EXPR, "params": {"w": "normal"}}},
}

reference = get_backend("reference")


def _spec(tiny_text, **over):
    return load_spec_text(tiny_text, overrides={"model.modules.L.layers": 2, "model.modules.H.layers": 2, **over})


def _context(spec, B, T, dtype):
    m = spec.model.module("L")
    mask = Mask("causal")
    theta = m.block.attention.rope_theta
    rope = {} if theta is None else {theta: reference.rope_tables(torch.arange(T).expand(B, T), spec.model.head_dim,
                                                                  theta, dtype)}
    return Context(mask={m.block.attention.mask: mask}, rope=rope)


def _stack(spec, ops, fused, arities=(1, 2)):
    return ModuleStack("L", *module_plan(spec.model.module("L"), spec.model, arities, fused), ops)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_call_frees_what_no_later_op_reads(tiny_text, name):
    """The call's environment: every read was written before, and only the output outlives the call."""
    spec = _spec(tiny_text, **CONFIGS[name])
    for fused in (False, True):
        s = _stack(spec, reference, fused, (2,))
        body = s.bodies[2]
        live = set(body.inputs)
        for seg in s._segments[2]:  # the ops in order, each with what it frees
            for op, drop in zip(seg.ops or (seg.attention,), seg.drops):
                assert {t for t in op.reads if not t.startswith("rope.")} <= live, op.name
                live |= set(op.writes)
                live -= set(drop)
        assert live == {body.output}


def _batch(B=2, T=7, vocab=61):
    gen = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, vocab, (B, T), generator=gen), torch.randint(0, vocab, (B, T), generator=gen)
    prefix = torch.zeros(B, T, dtype=torch.bool)
    prefix[:, :3] = True
    return ids, labels, prefix


@pytest.mark.parametrize("name", ["pre", "sandwich-affine-plain", "geglu"])
def test_kernel_backend_runs_only_the_planned_kernels(tiny_text, c_ops, monkeypatch, name):
    spec = load_spec_text(tiny_text, overrides={"model.modules.L.layers": 2, "model.modules.H.layers": 1,
                                                **CONFIGS[name]})
    torch.manual_seed(0)
    model = hrmspec.compile(spec, backend=c_ops.name)
    ref = hrmspec.compile(spec, backend="reference")
    ref.load_state_dict(model.state_dict())
    monkeypatch.setattr(c_ops, "_ops", {})  # record the ops this model creates
    ids, labels, prefix = _batch()
    with record_fallbacks() as fell:
        out = model(ids, prefix_mask=prefix, labels=labels)
        out.loss.backward()
    assert not fell, fell  # nothing falls back to the reference
    plan = fuse_model(build_graph(spec))
    planned = {(k.direction, k.program.hash) for k in plan.kernels}
    ran = set()
    for op in c_ops._ops.values():
        ran.add(("fwd", op.program.hash))
        if op._backward is not None:
            ran.add(("bwd", op._backward.program.hash))
    assert ran and ran <= planned, sorted(ran - planned)
    regions = {k.forward.name for k in plan.kernels}
    assert {op.program.name for op in c_ops._ops.values()} == regions  # every region runs as its kernel
    out_r = ref(ids, prefix_mask=prefix, labels=labels)
    out_r.loss.backward()
    torch.testing.assert_close(out.logits, out_r.logits, rtol=1e-4, atol=1e-5)
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * float(b.grad.abs().max()),
                                   msg=lambda msg, n=n: f"{n}: {msg}")


def _saved_bytes(stack, terms, ctx) -> int:
    """Bytes of distinct storage autograd keeps for backward over one call."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stack([t.clone().requires_grad_() for t in terms], ctx)
    return sum(storages.values())


def test_fused_call_keeps_no_more_than_op_by_op(tiny_text, c_ops):
    spec = _spec(tiny_text, **{"model.d_model": 256, "model.heads": 2})
    fused, plain = _stack(spec, c_ops, True), _stack(spec, c_ops, False)
    for p in fused.parameters():
        torch.nn.init.normal_(p, std=0.1)
    plain.load_state_dict(fused.state_dict())
    B, T = 2, 16
    ctx = _context(spec, B, T, torch.float32)
    terms = [torch.randn(B, T, spec.model.d_model) for _ in range(2)]
    a, b = _saved_bytes(fused, terms, ctx), _saved_bytes(plain, terms, ctx)
    assert 0 < a <= b, (a, b)


@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 5, 3, 6), (3, 4, 2, 10), (2, 3, 4, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_on_projection_views_matches_the_reference(c_ops, shape, dtype):
    """q and k as views of one fused projection (B, S, 4, h, hd), as the attention layer has them."""
    B, S, h, hd = shape
    gen = torch.Generator().manual_seed(sum(shape))
    proj = torch.randn(B, S, 4, h, hd, generator=gen).to(dtype)
    cos, sin = reference.rope_tables(torch.randint(0, 50, (B, S), generator=gen), hd, 10000.0, dtype)
    leaves = [proj.clone().requires_grad_() for _ in range(2)]
    got = c_ops.rope_qk(leaves[0][:, :, 0], leaves[0][:, :, 1], cos, sin)
    want = reference.rope_qk(leaves[1][:, :, 0], leaves[1][:, :, 1], cos, sin)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    cot = [torch.randn(t.shape, generator=gen).to(dtype) for t in want]
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    torch.autograd.backward(got, cot)
    torch.autograd.backward(want, cot)
    torch.testing.assert_close(leaves[0].grad, leaves[1].grad, rtol=tol, atol=tol)
    assert not leaves[0].grad[:, :, 2:].any()  # v and the gate get no gradient from rope


def test_halves_of_rows_do_not_count_as_overlapping():
    from hrmspec.backends.cstyle.launch import _disjoint_bands

    t = torch.empty(4, 10)
    rows = lambda v: v.unsqueeze(1)  # noqa: E731 - [n_outer, n_inner = 1, D], as the launchers see rows
    assert _disjoint_bands(rows(t[:, :5]), rows(t[:, 5:])) and _disjoint_bands(rows(t[:, 5:]), rows(t[:, :5]))
    assert not _disjoint_bands(rows(t[:, :6]), rows(t[:, 5:]))  # one shared column
    assert not _disjoint_bands(rows(t[:, :5]), rows(torch.empty(4, 10)[:, 5:]))  # other storage: spans decide
    u = torch.empty(40)
    assert not _disjoint_bands(rows(u[:36].view(4, 9)[:, :5]), rows(u[4:].view(4, 9)[:, :5]))  # column 4 shared
    q = torch.empty(2, 3, 4, 8)  # (B, S, h, hd) halves seen as outer (B, S), inner (h)
    lo, hi = (v.reshape(6, 4, 4) for v in (q[..., :4], q[..., 4:]))
    assert _disjoint_bands(lo, hi)
