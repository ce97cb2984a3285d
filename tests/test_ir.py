"""The Kernel IR: building, canonical form and hashing, validation, the expression parser, the evaluator."""

import pytest
import torch
import torch.nn.functional as F

from hrmspec.errors import Location, SpecError
from hrmspec.ir import (
    IRError,
    ProgramBuilder,
    add_rms_norm,
    builtin_programs,
    evaluate,
    gelu,
    mean,
    parse_expr,
    parse_norm_expr,
    rms_norm,
    rsqrt,
    sigmoid_gate,
    simplify,
    swiglu,
)
from hrmspec.ir.functions import max as rmax
from hrmspec.ir.functions import sum as rsum
from hrmspec.ir.functions import where


def _rms(eps=1e-6):
    b = ProgramBuilder("rms_norm")
    x, w = b.row("x"), b.vector("w")
    b.output("y", x * rsqrt(mean(x * x) + eps) * w)
    return b.build()


# -- building, canonical form, hashing --------------------------------------------------------------
def test_builder_kinds_and_broadcast():
    b = ProgramBuilder("k")
    x, w, s = b.row("x"), b.vector("w"), b.scalar("s")
    assert (x + w).kind == "row"
    assert (s * w).kind == "row"  # a per-row scalar times a weight is a row
    assert mean(x).kind == "scalar"
    assert (mean(x) + s).kind == "scalar"
    assert rsum(w).kind == "scalar"
    assert (w + 1.0).kind == "vector"
    assert (x < s).node.dtype == "bool"


def test_same_program_same_hash_whatever_the_build_order():
    p1 = _rms()
    b = ProgramBuilder("other_name")
    w, x = b.vector("w"), b.row("x")
    dead = x.exp()  # unused: dropped by canonicalisation  # noqa: F841
    ms = mean(x * x)
    b.output("y", x * rsqrt(ms + 1e-6) * w)
    p2 = b.build()
    # inputs declared in another order are another signature, hence another hash ...
    assert p1.hash != p2.hash
    # ... but the same declarations and DAG give the same nodes and hash
    b = ProgramBuilder("rms_norm")
    x, w = b.row("x"), b.vector("w")
    _ = (x * 2).exp()
    ms = mean(x * x)
    b.output("y", x * rsqrt(ms + 1e-6) * w)
    p3 = b.build()
    assert p3 == p1 and p3.hash == p1.hash and p3.nodes == p1.nodes
    assert _rms(1e-5).hash != p1.hash
    assert rms_norm().hash == p1.hash  # the library builds the same DAG


def test_hash_consing_shares_common_subexpressions():
    b = ProgramBuilder("cse")
    x = b.row("x")
    a, c = x.sigmoid() * x, x * x.sigmoid()  # commutative operands are ordered canonically
    assert a.i == c.i
    b.output("y", a + c)
    p = b.build()
    assert [n.op for n in p.nodes].count("sigmoid") == 1


def test_simplification_rules():
    b = ProgramBuilder("s")
    x = b.row("x")
    assert (x + 0.0).i == x.i and (x * 1.0).i == x.i and (x.__neg__().__neg__()).i == x.i and (x / 1.0).i == x.i
    assert (x * 0.0).const_value() == 0.0
    assert (x - x).const_value() == 0.0
    assert (x**1).i == x.i and (x**0).const_value() == 1.0
    assert (b.const(2.0) * 3.0).const_value() == 6.0
    assert (2.0 * (3.0 * x)).node.op == "mul" and 6.0 in [b.nodes[s].arg for s in (2.0 * (3.0 * x)).node.srcs]
    assert where(x < 1.0, x, x).i == x.i
    assert where(b.const(1.0) < 2.0, x, x * 3).i == x.i  # a folded comparison picks a branch


def test_simplify_is_idempotent_and_keeps_the_hash():
    for p in builtin_programs().values():
        assert simplify(p) == p
        assert simplify(simplify(p)).hash == p.hash


def test_pretty_print():
    text = str(_rms())
    assert text.splitlines()[0].startswith("rms_norm(x: row, w: vector) -> (y: row)")
    assert "mean" in text and "rsqrt" in text and "1e-06" in text and "y <- %" in text


def test_validation_errors():
    b = ProgramBuilder("v")
    x, s, w = b.row("x"), b.scalar("s"), b.vector("w")
    with pytest.raises(IRError, match="per-row scalar"):
        mean(s)
    with pytest.raises(IRError, match="per-row scalar"):
        rmax(mean(x))
    with pytest.raises(IRError, match="boolean"):
        (x < 0.0) + x
    with pytest.raises(IRError, match="boolean condition"):
        where(x, x, x)
    with pytest.raises(IRError, match="declared twice"):
        b.row("x")
    with pytest.raises(IRError, match="declared a per-row scalar"):
        b.output("o", x * w, kind="scalar")
    with pytest.raises(IRError, match="constant"):
        b.output("c", b.const(1.0))
    with pytest.raises(IRError, match="exponent"):
        x**x
    with pytest.raises(IRError, match="truth value"):
        bool(x < 0.0)
    with pytest.raises(IRError, match="another program"):
        x + ProgramBuilder("other").row("y")
    with pytest.raises(IRError, match="at least one output"):
        ProgramBuilder("empty").build()
    with pytest.raises(IRError, match="takes 2 operands"):
        b.emit("add", x)
    with pytest.raises(IRError, match="cannot cast"):
        x.cast("int8")
    assert b.const(-0.0).i != b.const(0.0).i  # constants are told apart by their bits


def test_serialisation_round_trip():
    import json

    from hrmspec.ir import RowProgram, grad

    for p in builtin_programs().values():
        for q in (p, grad(p)):
            r = RowProgram.from_dict(json.loads(json.dumps(q.to_dict())))
            assert r == q and r.hash == q.hash and r.nodes == q.nodes and str(r) == str(q)


# -- the expression parser ---------------------------------------------------------------------------
def test_parse_norm_expr_is_the_offset_rms_norm():
    p = parse_norm_expr("x * rsqrt(mean(x*x) + eps) * (1 + w)", params={"w": "zeros"}, eps=1e-6)
    assert p.hash == rms_norm(offset=True).hash
    assert p.input("w").init == "zeros" and p.input("w").kind == "vector"
    assert parse_norm_expr("x / sqrt(mean(x ** 2) + eps)").output_names == ("y",)


def test_parse_expr_functions_comparisons_and_constants():
    p = parse_expr("where(g > 0, silu(g) * a, -a / 2) + max(a) - sum(a) ** 2 + pow(square(a), 0.5)",
                   {"g": "row", "a": "row"})
    x = {"g": torch.randn(3, 5), "a": torch.randn(3, 5)}
    g, a = x["g"], x["a"]
    ref = torch.where(g > 0, F.silu(g) * a, -a / 2) + a.amax(-1, keepdim=True) - a.sum(-1, keepdim=True) ** 2 + a.abs()
    torch.testing.assert_close(evaluate(p, x)["y"], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "expr, message, column",
    [
        ("x * rsqrtt(mean(x*x) + eps)", "unknown function 'rsqrtt'", 5),
        ("x * rsqrt(mean(x*x) + epsilon)", "unknown name 'epsilon'", 23),
        ("x * q", "unknown name 'q'", 5),
        ("x @ x", "not allowed", 1),
        ("x if x else x", "conditional", 1),
        ("mean(x) ** x", "expected a constant", 12),
        ("mean(mean(x))", "per-row scalar", 1),
        ("x * (", "never closed", 5),
        ("1 < x < 2", "one comparison", 1),
        ("eps * 2", "does not depend", 1),
        ("x < 0", "comparison", 1),
        ("exp(x, x)", "takes 1 argument", 1),
        ("x.sum()", "expected a function name", 1),
        ("__import__('os')", "unknown function", 1),
    ],
)
def test_parse_errors_name_the_column(expr, message, column):
    with pytest.raises(SpecError, match=message) as e:
        parse_norm_expr(expr, params={"w": "ones"})
    assert f"column {column}:" in str(e.value)
    # with a Location, the column is a file position (0-based col of the string start + offset)
    with pytest.raises(SpecError) as e:
        parse_norm_expr(expr, params={"w": "ones"}, loc=Location("m.yaml", 7, 10), path="model.block.norm.expr")
    assert e.value.loc == Location("m.yaml", 7, 10 + column - 1)
    assert str(e.value).startswith(f"m.yaml:7:{10 + column - 1}: model.block.norm.expr: ")


def test_parse_error_hints_a_close_name():
    with pytest.raises(SpecError, match="did you mean 'rsqrt'"):
        parse_norm_expr("x * rsqrtt(mean(x*x) + eps)")
    with pytest.raises(SpecError, match="did you mean 'eps'"):
        parse_norm_expr("x * rsqrt(mean(x*x) + epss)")


# -- the evaluator -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_builtins_match_torch(dtype):
    torch.manual_seed(0)
    x, r, w = (torch.randn(2, 3, 37) for _ in range(3))
    w = w[0, 0]
    xs, rs, ws = x.to(dtype), r.to(dtype), w.to(dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]

    def check(prog, inputs, name, ref):
        out = evaluate(prog, inputs)[name]
        assert out.dtype == dtype and out.shape == ref.shape
        torch.testing.assert_close(out.float(), ref.to(dtype).float(), rtol=tol, atol=tol)

    xf, rf, wf = xs.float(), rs.float(), ws.float()
    check(rms_norm(), {"x": xs, "w": ws}, "y", F.rms_norm(xf, (37,), wf, 1e-6))
    check(rms_norm(affine=False), {"x": xs}, "y", F.rms_norm(xf, (37,), None, 1e-6))
    check(rms_norm(offset=True), {"x": xs, "w": ws}, "y", F.rms_norm(xf, (37,), 1 + wf, 1e-6))
    check(add_rms_norm(), {"x": xs, "r": rs, "w": ws}, "h", xf + rf)
    check(add_rms_norm(), {"x": xs, "r": rs, "w": ws}, "y", F.rms_norm(xf + rf, (37,), wf, 1e-6))
    check(sigmoid_gate(), {"g": xs, "a": rs}, "y", torch.sigmoid(xf) * rf)
    check(swiglu(), {"a": xs, "b": rs}, "y", F.silu(xf) * rf)
    check(gelu(), {"x": xs}, "y", F.gelu(xf, approximate="tanh"))


def test_evaluator_scalars_vectors_and_broadcast_outputs():
    b = ProgramBuilder("mix")
    x, s, w = b.row("x"), b.scalar("s"), b.vector("w")
    b.output("m", mean(x) * s)  # a per-row scalar output
    b.output("v", w * 2.0)  # a vector, stored as a row
    b.output("c", s + 1.0, kind="row")  # a scalar broadcast to a row
    p = b.build()
    x, s, w = torch.randn(4, 6), torch.randn(4), torch.randn(6)
    out = evaluate(p, {"x": x, "s": s, "w": w})
    torch.testing.assert_close(out["m"], x.mean(-1) * s)
    torch.testing.assert_close(out["v"], (w * 2).expand(4, 6))
    torch.testing.assert_close(out["c"], (s + 1)[:, None].expand(4, 6))


def test_evaluator_rounding_casts():
    b = ProgramBuilder("r")
    x = b.row("x")
    b.output("y", x.cast("bf16") + x.cast("f16") * 0.5)
    x = torch.randn(3, 9)
    ref = x.bfloat16().float() + x.half().float() * 0.5
    torch.testing.assert_close(evaluate(b.build(), {"x": x})["y"], ref, rtol=0, atol=0)
    b = ProgramBuilder("r2")
    x = b.row("x")
    assert (b.const(1.00001) * 1.0).cast("bf16").const_value() == 1.0  # folded with the same rounding


def test_evaluator_shape_errors():
    p = rms_norm()
    with pytest.raises(IRError, match="missing input"):
        evaluate(p, {"x": torch.randn(2, 4)})
    with pytest.raises(IRError, match="width 5"):
        evaluate(p, {"x": torch.randn(2, 4), "w": torch.randn(5)})
    with pytest.raises(IRError, match="1-d"):
        evaluate(p, {"x": torch.randn(2, 4), "w": torch.randn(1, 4)})
