"""The fusion pass: which regions it finds, that fused bodies compute what the layers compute, the
memory traffic it reports, and deterministic kernel names."""

import re

import networkx as nx
import pytest
import torch
import torch.nn.functional as F

from hrmspec.backends import get_backend
from hrmspec.graph import build_graph
from hrmspec.graph.body import module_body
from hrmspec.graph.fusion import fuse, fuse_model, region_kernel, saving
from hrmspec.graph.plan import module_plan
from hrmspec.ir.kernel import kernel_name
from hrmspec.mask import Mask
from hrmspec.runtime.execution import Context, ModuleStack
from hrmspec.spec import load_spec, load_spec_text

reference = get_backend("reference")

EXPR = "x * rsqrt(mean(x*x) + eps) * (1 + w)"


def _spec(tiny_text, **over):
    return load_spec_text(tiny_text, overrides={"model.modules.L.layers": 2, "model.modules.H.layers": 2, **over})


def _fused(spec, module="L", arity=2):
    body = module_body(spec.model.module(module), spec.model, arity)
    return body, fuse(body)


def _regions(fused):
    return [list(o.members) for o in fused.ops if o.members]


# -- regions ---------------------------------------------------------------------------------------------
def test_pre_norm_regions(tiny_text):
    df, fused = _fused(_spec(tiny_text))
    assert _regions(fused) == [
        ["inject", "0.attn_norm"], ["0.rope"], ["0.attn.gate"], ["0.attn_residual", "0.mlp_norm"], ["0.mlp.act"],
        ["0.mlp_residual", "1.attn_norm"], ["1.rope"], ["1.attn.gate"], ["1.attn_residual", "1.mlp_norm"],
        ["1.mlp.act"], ["1.mlp_residual", "exit_norm"],
    ]
    ops = {o.members[-1]: o for o in fused.ops if o.members}
    # the residual stream leaves an add + norm region beside the normed value; the exit region writes y only
    assert len(ops["0.mlp_norm"].program.outputs) == 2
    assert len(ops["exit_norm"].program.outputs) == 1
    assert fused.output == "exit_norm:y"


def test_post_and_sandwich_regions(tiny_text):
    _, fused = _fused(_spec(tiny_text, **{"model.block.norm.place": "post"}))
    regions = _regions(fused)
    assert regions[0] == ["inject"]  # nothing to fuse the injection with: post-norm layers start with a matmul
    assert ["0.attn_residual", "0.attn_norm"] in regions and ["0.mlp_residual", "0.mlp_norm"] in regions
    assert regions[-1] == ["1.mlp_residual", "1.mlp_norm", "exit_norm"]  # norm(x + r), then the exit norm

    _, fused = _fused(_spec(tiny_text, **{"model.block.norm.place": "sandwich", "model.block.mlp": "gelu"}))
    regions = _regions(fused)
    assert ["0.attn_out_norm", "0.attn_residual", "0.mlp_norm"] in regions
    assert ["0.mlp_out_norm", "0.mlp_residual", "1.attn_norm"] in regions
    assert ["0.mlp.act"] in regions and regions[-1] == ["1.mlp_out_norm", "1.mlp_residual", "exit_norm"]


def test_single_input_call_has_no_injection_and_no_exit_norm(tiny_text):
    spec = _spec(tiny_text, **{"model.modules.L.exit_norm": "none", "model.block.attention.rope_theta": None})
    _, fused = _fused(spec, "L", arity=1)
    regions = _regions(fused)
    assert regions[0] == ["0.attn_norm"] and regions[-1] == ["1.mlp_residual"]
    assert not any("rope" in r[0] for r in regions)


def test_every_op_in_one_node_and_the_fused_graph_is_a_dag(tiny_text):
    for place in ("pre", "post", "sandwich"):
        body, fused = _fused(_spec(tiny_text, **{"model.block.norm.place": place}))
        g = fused.graph()
        assert nx.is_directed_acyclic_graph(g)
        seen = [x for o in fused.ops for x in (o.members or (o.name,))]
        assert sorted(seen) == sorted(o.name for o in body.ops)
        order = {n: i for i, n in enumerate(g.graph["order"])}
        assert all(order[a] < order[b] for a, b in g.edges)  # the op order is an execution order
        written = set(fused.inputs) | {"rope.cos", "rope.sin"}
        for o in fused.ops:  # every tensor is written before it is read
            assert set(o.reads) <= written, (o.name, set(o.reads) - written)
            written |= set(o.writes)


def test_modules_called_on_sums_of_different_sizes_get_one_body_each(tiny_text):
    text = tiny_text.replace('"z_H = H(z_H + z_L)"', '"z_H = H(z_H + z_L + x)"')
    plan = fuse_model(build_graph(load_spec_text(text)))
    assert sorted(plan.bodies) == [("H", 3), ("L", 2)]
    first = plan.bodies[("H", 3)].ops[0]
    assert first.name == "inject+0.attn_norm" and first.program.name == "add3_rms_norm"


# -- fused evaluation equals the layers ------------------------------------------------------------------
def _rotate_half(x):
    lo, hi = x.chunk(2, dim=-1)
    return torch.cat([-hi, lo], dim=-1)


def naive_module(x, stack, spec, mask, cos, sin):
    """Module L of `spec` written out by hand in torch (B, T, d): the definition the bodies are held to."""
    m, model = spec.model.module("L"), spec.model
    b, h, hd = m.block, model.heads, model.head_dim
    B, T, _ = x.shape
    W = stack.weight

    def norm(name, v, n):
        if n.type == "layer":
            w, b = (W(f"{name}.weight"), W(f"{name}.bias")) if n.affine else (None, None)
            return F.layer_norm(v, (v.shape[-1],), w, b, n.eps)
        y = v * torch.rsqrt((v * v).mean(-1, keepdim=True) + n.eps)
        if n.type == "expr":  # EXPR: x * rsqrt(mean(x*x) + eps) * (1 + w)
            return y * (1 + W(f"{name}.params.w"))
        return y * W(f"{name}.weight") if n.affine else y

    def attention(i, v):
        bias = lambda p: W(f"layers.{i}.attn.{p}.bias") if b.attention.bias else None  # noqa: E731
        proj = F.linear(v, W(f"layers.{i}.attn.qkvg.weight"), bias("qkvg")).view(B, T, -1, h, hd)
        q, k, val = proj[:, :, 0], proj[:, :, 1], proj[:, :, 2]
        if b.attention.rope_theta is not None:
            c, s = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, T, 1, hd)
            q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), val.transpose(1, 2),
                                           attn_mask=mask).transpose(1, 2)
        if b.attention.type == "gated":
            y = torch.sigmoid(proj[:, :, 3]) * y
        return F.linear(y.reshape(B, T, -1), W(f"layers.{i}.attn.o.weight"), bias("o"))

    def mlp(i, v):
        up = F.linear(v, W(f"layers.{i}.mlp.gate_up.weight"))
        if b.mlp in ("swiglu", "geglu"):
            gate, up = up.chunk(2, dim=-1)
            up = (F.silu(gate) if b.mlp == "swiglu" else F.gelu(gate, approximate="tanh")) * up
        else:
            up = F.gelu(up, approximate="tanh")
        return F.linear(up, W(f"layers.{i}.mlp.down.weight"))

    for i in range(m.layers):
        p = f"layers.{i}."
        for part, f in (("attn", attention), ("mlp", mlp)):
            if b.norm.place == "pre":
                x = x + f(i, norm(p + f"{part}_norm", x, b.norm))
            elif b.norm.place == "post":
                x = norm(p + f"{part}_norm", x + f(i, x), b.norm)
            else:
                x = x + norm(p + f"{part}_out_norm", f(i, norm(p + f"{part}_norm", x, b.norm)), b.norm)
    return x if m.exit_norm is None else norm("exit_norm", x, m.exit_norm)


CONFIGS = [
    {},
    {"model.block.norm.place": "post", "model.block.mlp": "gelu"},
    {"model.block.mlp": "geglu"},
    {"model.block.norm": {"type": "layer", "affine": True, "place": "sandwich"}, "model.modules.L.exit_norm": "layer"},
    {"model.block.norm.place": "sandwich", "model.block.norm.affine": True, "model.block.attention.type": "plain",
     "model.block.attention.bias": True},
    {"model.block.norm": {"type": "expr", "expr": EXPR, "params": {"w": "normal"}, "place": "sandwich"},
     "model.block.attention.rope_theta": None},
    {"model.modules.L.exit_norm": "none",
     "model.block.norm": {"type": "expr", "expr": EXPR, "params": {"w": "normal"}}},
]
IDS = ["pre", "post-gelu", "geglu", "layer-sandwich", "sandwich-affine-plain-bias", "sandwich-expr", "expr-no-exit"]


def stack(spec, arity, fused, ops=reference):
    """Module L of `spec` as a ModuleStack, its parameters drawn away from any init (so a misbound
    weight shows)."""
    params, bodies = module_plan(spec.model.module("L"), spec.model, (arity,), fused)
    s = ModuleStack("L", params, bodies, ops).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in s.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return s


@pytest.mark.parametrize("over", CONFIGS, ids=IDS)
@pytest.mark.parametrize("arity", [1, 2])
def test_fused_body_equals_op_by_op_and_the_layers(tiny_text, over, arity):
    """The op-by-op body equals the module written by hand, and the fused body (its regions run by the
    IR's evaluator) the op-by-op one, in values and every gradient."""
    spec = _spec(tiny_text, **over)
    B, T, d = 2, 7, spec.model.d_model
    gen = torch.Generator().manual_seed(1)
    terms = [torch.randn(B, T, d, generator=gen, dtype=torch.float64) for _ in range(arity)]
    cos, sin = reference.rope_tables(torch.arange(T).expand(B, T), spec.model.head_dim, 10000.0, torch.float64)
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)
    kind = spec.model.module("L").block.attention.mask  # prefix_lm with no prefix: causal, as `mask`
    ctx = Context(mask={kind: Mask(kind)}, rope={10000.0: (cos, sin)})
    plain, fused = stack(spec, arity, False), stack(spec, arity, True)
    fused.load_state_dict(plain.state_dict())
    outs, grads = [], []
    for s in (plain, fused):
        leaves = [t.clone().requires_grad_() for t in terms]
        out = s(leaves, ctx)
        out.backward(torch.ones_like(out))
        outs.append(out)
        grads.append([t.grad for t in leaves] + [p.grad for p in s.parameters()])
    with torch.no_grad():
        expect = naive_module(sum(terms), plain, spec, mask, cos, sin)
    torch.testing.assert_close(outs[0], expect, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# -- traffic ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("place", ["pre", "post", "sandwich"])
def test_fused_traffic_is_less_than_op_by_op(tiny_text, place):
    plan = fuse_model(build_graph(_spec(tiny_text, **{"model.block.norm.place": place})))
    assert 0 < plan.fused_bytes < plan.op_bytes and 0 < saving(plan) < 1
    for row in plan.traffic:
        assert row.fused_bytes <= row.op_bytes and row.runs > 0
    assert any(row.fused_bytes < row.op_bytes for row in plan.traffic if "exit_norm" in row.fuses)


def test_traffic_of_hrm_text_1b():
    # per token and call, in elements (d = inner = 1536, ffn = 4096, hd = 128, 16 layers, 2 inputs):
    #   op by op  inject 3d, per layer: attn_norm 2d, rope 4i + 2hd, gate 3i, residuals 3d each, mlp_norm 2d,
    #             swiglu 3f; exit norm 2d
    #   fused     inject + norm 4d, per layer: rope, gate, swiglu as they were, add + norm 4d twice, except
    #             the last residual + exit norm: 3d
    d, i, f, hd, L, calls, B = 1536, 1536, 4096, 128, 16, 8, 2
    op = 3 * d + L * (2 * d + 4 * i + 2 * hd + 3 * i + 3 * d + 2 * d + 3 * f + 3 * d) + 2 * d
    fused = 4 * d + L * (4 * i + 2 * hd + 3 * i + 3 * f + 4 * d) + (L - 1) * 4 * d + 3 * d
    plan = fuse_model(build_graph(load_spec("hrm-text-1b")))
    assert plan.op_bytes == calls * B * op == 10_018_816
    assert plan.fused_bytes == calls * B * fused == 9_183_232
    # add + norm (injection and residuals), rope, gate, swiglu, last residual + exit norm: fwd and bwd
    assert len({k.name for k in plan.kernels}) == 10


def test_show_prints_the_traffic_table(capsys):
    from hrmspec.cli import main

    assert main(["show", "hrm-text-tiny", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "Memory traffic per token" in out and "row ops" in out and "Parameters" in out
    # the body as it is described: L and H share one, its first layer's ops and their weights
    assert "Modules L, H: the ops of a call" in out
    assert "0.attn.qkvg" in out and "weight 512x128" in out and "1.attn.qkvg" not in out


# -- names -----------------------------------------------------------------------------------------------
def test_kernel_names_are_deterministic_and_shared_by_identical_regions(tiny_text):
    spec = _spec(tiny_text, **{"model.block.norm": {"type": "expr", "expr": EXPR, "params": {"w": "zeros"}}})
    a, b = fuse_model(build_graph(spec)), fuse_model(build_graph(spec))
    assert [k.name for k in a.kernels] == [k.name for k in b.kernels]
    for k in a.kernels:
        assert re.fullmatch(rf"hrm_{k.forward.name}_{k.direction}_[0-9a-f]{{8}}", k.name)
        assert k.name == kernel_name(k.program, k.direction, k.forward.name)
    kernels = {region_kernel(o) for o in a.bodies[("L", 2)].ops if o.members}
    # inject + attn_norm, attn_residual + mlp_norm and mlp_residual + attn_norm are one program
    assert len(kernels) == 5
