"""The fusion pass: which regions it finds, that fused bodies compute what the layers compute, the
memory traffic it reports, and deterministic kernel names."""

import re

import networkx as nx
import pytest
import torch

from hrmspec.backends.reference import ops as reference
from hrmspec.backends.triton.printer import kernel_name as printer_kernel_name
from hrmspec.graph import build_graph
from hrmspec.graph.build import body_graph
from hrmspec.graph.fusion import body_dataflow, fuse_body, fuse_model, saving
from hrmspec.ir import evaluate
from hrmspec.mask import Mask
from hrmspec.runtime.blocks import Context, Stack
from hrmspec.spec import load_spec, load_spec_text

EXPR = "x * rsqrt(mean(x*x) + eps) * (1 + w)"


def _spec(tiny_text, **over):
    return load_spec_text(tiny_text, overrides={"model.modules.L.layers": 2, "model.modules.H.layers": 2, **over})


def _fused(spec, module="L", arity=2):
    m = spec.model.module(module)
    df = body_dataflow(m, spec.model, arity, body_graph(m, spec.model))
    return df, fuse_body(df)


def _regions(fused):
    return [list(fused.nodes[n]["members"]) for n in fused.graph["order"] if fused.nodes[n]["op"] == "fused"]


# -- regions ---------------------------------------------------------------------------------------------
def test_pre_norm_regions(tiny_text):
    df, fused = _fused(_spec(tiny_text))
    assert _regions(fused) == [
        ["inject", "0.attn_norm"], ["0.rope"], ["0.attn.gate"], ["0.attn_residual", "0.mlp_norm"], ["0.mlp.act"],
        ["0.mlp_residual", "1.attn_norm"], ["1.rope"], ["1.attn.gate"], ["1.attn_residual", "1.mlp_norm"],
        ["1.mlp.act"], ["1.mlp_residual", "exit_norm"],
    ]
    nodes = {fused.nodes[n]["members"][-1]: fused.nodes[n] for n in fused.graph["order"]
             if fused.nodes[n]["op"] == "fused"}
    # the residual stream leaves an add + norm region beside the normed value; the exit region writes y only
    assert len(nodes["0.mlp_norm"]["program"].outputs) == 2
    assert len(nodes["exit_norm"]["program"].outputs) == 1
    assert fused.graph["output"] == "exit_norm:y"


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
        df, fused = _fused(_spec(tiny_text, **{"model.block.norm.place": place}))
        assert nx.is_directed_acyclic_graph(fused)
        seen = [x for n in fused.nodes for x in fused.nodes[n].get("members", (n,))]
        assert sorted(seen) == sorted(df.nodes)
        assert list(nx.topological_sort(fused))  # a valid execution order exists
        order = {n: i for i, n in enumerate(fused.graph["order"])}
        assert all(order[a] < order[b] for a, b in fused.edges)


def test_modules_called_on_sums_of_different_sizes_get_one_body_each(tiny_text):
    text = tiny_text.replace('"z_H = H(z_H + z_L)"', '"z_H = H(z_H + z_L + x)"')
    plan = fuse_model(build_graph(load_spec_text(text)))
    assert sorted(plan.bodies) == [("H", 3), ("L", 2)]
    first = plan.bodies[("H", 3)].graph["order"][0]
    assert first == "inject+0.attn_norm" and plan.bodies[("H", 3)].nodes[first]["program"].name == "add3_rms_norm"


# -- fused evaluation equals the layers ------------------------------------------------------------------
def _weights(stack):
    """Weight name in the dataflow ('0.attn_norm.w', 'exit_norm.w') -> the Stack's tensor."""
    out = {}
    for name, mod in stack.named_modules():
        if name.startswith("layers."):
            name = name[len("layers."):]
        if getattr(mod, "program", None) is not None:
            out.update({f"{name}.{k}": v for k, v in mod.params.items()})
        elif getattr(mod, "weight", None) is not None and "norm" in name:
            out[f"{name}.w"] = mod.weight
    return out


def _run(g, inputs, stack, spec, mask, tables):
    """Execute a dataflow or fused body on T tokens: row ops by the IR evaluator, matmuls and
    attention by the Stack's own weights."""
    model = spec.model
    h, hd, T = model.heads, model.head_dim, next(iter(inputs.values())).shape[0]
    env = dict(inputs, **{"rope.cos": tables[0], "rope.sin": tables[1]})
    weights = _weights(stack)

    def read(ref):
        name, _, half = ref.partition("[")
        t = env[name]
        if not half:
            return t
        sl = slice(0, hd // 2) if half == "lo]" else slice(hd // 2, hd)
        if t.shape[-1] == hd:  # a rotary table, the same for every head
            return t[:, sl].unsqueeze(1).expand(T, h, hd // 2).reshape(T * h, hd // 2)
        return t.view(T, h, hd)[..., sl].reshape(T * h, hd // 2)

    for n in g.graph["order"]:
        a = g.nodes[n]
        if a["program"] is not None:
            out = evaluate(a["program"], {**{k: read(r) for k, r in a["rows"].items()},
                                          **{k: weights[w] for k, w in a["weights"].items()}})
            halves = {}
            for k, ref in a["results"].items():
                name, _, half = ref.partition("[")
                if half:
                    halves.setdefault(name, {})[half] = out[k].view(T, h, hd // 2)
                else:
                    env[name] = out[k]
            for name, parts in halves.items():
                env[name] = torch.cat([parts["lo]"], parts["hi]"]], -1).reshape(T, h * hd)
            continue
        layer = stack.layers[int(n.split(".")[0])]
        inner, ffn = h * hd, spec.model.module("L").block.ffn
        if a["op"] == "linear":
            kind = n.split(".", 1)[1]
            qkvg = layer.attn.qkvg.weight.view(-1, inner, model.d_model)  # q, k, v (, gate) stacked
            w = {"attn.q": qkvg[0], "attn.k": qkvg[1], "attn.v": qkvg[2], "attn.g": qkvg[-1],
                 "attn.o": layer.attn.o.weight, "mlp.gate": layer.mlp.gate_up.weight[:ffn],
                 "mlp.up": layer.mlp.gate_up.weight[-ffn:], "mlp.down": layer.mlp.down.weight}[kind]
            env[a["writes"][0]] = env[a["reads"][0]] @ w.T
        else:  # attention over the T tokens of one batch row
            q, k, v = (env[t].view(1, T, h, hd).transpose(1, 2) for t in a["reads"])
            env[a["writes"][0]] = reference.attention(q, k, v, mask).transpose(1, 2).reshape(T, inner)
    return env[g.graph["output"]]


CONFIGS = [
    {},
    {"model.block.norm.place": "post", "model.block.mlp": "gelu"},
    {"model.block.norm.place": "sandwich", "model.block.norm.affine": True, "model.block.attention.type": "plain"},
    {"model.block.norm": {"type": "expr", "expr": EXPR, "params": {"w": "normal"}, "place": "sandwich"},
     "model.block.attention.rope_theta": None},
    {"model.modules.L.exit_norm": "none",
     "model.block.norm": {"type": "expr", "expr": EXPR, "params": {"w": "normal"}}},
]
IDS = ["pre", "post-gelu", "sandwich-affine-plain", "sandwich-expr", "expr-no-exit"]


@pytest.mark.parametrize("over", CONFIGS, ids=IDS)
@pytest.mark.parametrize("arity", [1, 2])
def test_fused_body_equals_op_by_op_and_the_layers(tiny_text, over, arity):
    torch.manual_seed(0)
    spec = _spec(tiny_text, **over)
    m = spec.model.module("L")
    df, fused = _fused(spec, "L", arity)
    stack = Stack(m, spec.model, reference).double()
    T, d = 7, spec.model.d_model
    ins = [torch.randn(T, d, dtype=torch.float64) for _ in range(arity)]
    inputs = dict(zip(df.graph["inputs"], ins))
    cos, sin = reference.rope_tables(torch.arange(T)[None], spec.model.head_dim, 10000.0, torch.float64)
    mask = Mask("causal")
    with torch.no_grad():
        ctx = Context(mask={m.block.attention.mask: mask}, rope={10000.0: (cos, sin)})
        expect = stack(sum(ins)[None], ctx)[0]
        tables = (cos[0, 0], sin[0, 0])
        op_by_op = _run(df, inputs, stack, spec, mask, tables)
        fused_out = _run(fused, inputs, stack, spec, mask, tables)
    torch.testing.assert_close(op_by_op, expect, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused_out, op_by_op, rtol=1e-12, atol=1e-12)


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


# -- names -----------------------------------------------------------------------------------------------
def test_kernel_names_are_deterministic_and_shared_by_identical_regions(tiny_text):
    spec = _spec(tiny_text, **{"model.block.norm": {"type": "expr", "expr": EXPR, "params": {"w": "zeros"}}})
    a, b = fuse_model(build_graph(spec)), fuse_model(build_graph(spec))
    assert [k.name for k in a.kernels] == [k.name for k in b.kernels]
    for k in a.kernels:
        assert re.fullmatch(rf"hrm_{k.forward.name}_{k.direction}_[0-9a-f]{{8}}", k.name)
        assert k.name == printer_kernel_name(k.program, k.direction, k.forward.name)
    body = a.bodies[("L", 2)]
    kernels = {body.nodes[n]["kernel"] for n in body.graph["order"] if body.nodes[n]["op"] == "fused"}
    # inject + attn_norm, attn_residual + mlp_norm and mlp_residual + attn_norm are one program
    assert len(kernels) == 5
