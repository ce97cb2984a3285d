"""Norms outside the layers: a module's `exit_norm` and the model's `final_norm` take any norm kind —
a kind's name, or a mapping such as an expression norm — and run on every backend."""

import pytest
import torch

import hrmspec
from hrmspec.errors import SpecError
from hrmspec.spec import load_spec_text

GEMMA = "x * rsqrt(mean(x*x) + eps) * (1 + w)"
EXIT_EXPR = {"type": "expr", "expr": GEMMA, "params": {"w": "zeros"}}


def _spec(tiny_text, **over):
    return load_spec_text(tiny_text, overrides={"model.block.norm.eps": 1e-5, **over})


def test_names_and_mappings_read_into_norm_specs(tiny_text):
    spec = _spec(tiny_text, **{"model.modules.L.exit_norm": EXIT_EXPR, "model.modules.H.exit_norm": "none",
                               "model.final_norm": {"type": "rms", "affine": True, "eps": 1e-3}})
    L, H = spec.model.module("L"), spec.model.module("H")
    assert (L.exit_norm.type, L.exit_norm.expr, L.exit_norm.params, L.exit_norm.eps) == ("expr", GEMMA,
                                                                                          (("w", "zeros"),), 1e-5)
    assert H.exit_norm is None
    assert (spec.model.final_norm.type, spec.model.final_norm.affine, spec.model.final_norm.eps) == ("rms", True, 1e-3)
    # the shorthands: a kind's name takes the block norm's eps; final_norm: true is an RMSNorm like the block's
    spec = _spec(tiny_text, **{"model.final_norm": True, "model.block.norm.affine": True})
    assert (spec.model.final_norm.type, spec.model.final_norm.eps, spec.model.final_norm.affine) == ("rms", 1e-5, True)
    assert spec.model.module("L").exit_norm.eps == 1e-5 and not spec.model.module("L").exit_norm.affine
    assert _spec(tiny_text, **{"model.final_norm": False}).model.final_norm is None
    spec = _spec(tiny_text, **{"model.modules.H.exit_norm": "layer", "model.final_norm": "layer"})
    assert (spec.model.module("H").exit_norm.type, spec.model.final_norm.type) == ("layer", "layer")


@pytest.mark.parametrize("value,message", [
    ("expr", "a norm of type expr is written as a mapping"),
    ("rsm", "did you mean 'rms'"),
    ({"type": "expr"}, "missing required key 'expr'"),
    ({"type": "rms", "place": "post"}, "unknown key 'place'"),
    ({"type": "rms", "expr": GEMMA}, "belongs to an expression norm"),
    (3, "expected one of rms .*none or a mapping"),
])
def test_exit_norm_errors_name_the_field_and_the_fix(tiny_text, value, message):
    with pytest.raises(SpecError, match=message) as e:
        _spec(tiny_text, **{"model.modules.L.exit_norm": value})
    assert "model.modules.L.exit_norm" in str(e.value)


def test_final_norm_errors_offer_true_and_false(tiny_text):
    with pytest.raises(SpecError, match=r"expected one of true \| false \| rms \| .*none"):
        _spec(tiny_text, **{"model.final_norm": "yes"})


def test_an_expression_exit_norm_at_zero_weights_is_the_rms_exit_norm(tiny_text):
    """(1 + w) x / rms(x) with w = 0 is the RMSNorm the default exit norm computes: same outputs, and
    w gets a gradient."""
    rms = hrmspec.compile(_spec(tiny_text))
    expr = hrmspec.compile(_spec(tiny_text, **{"model.modules.L.exit_norm": EXIT_EXPR,
                                               "model.modules.H.exit_norm": EXIT_EXPR}))
    assert set(expr.state_dict()) - set(rms.state_dict()) == {"stacks.L.exit_norm.params.w",
                                                              "stacks.H.exit_norm.params.w"}
    expr.load_state_dict(rms.state_dict(), strict=False)
    assert not expr.stacks["L"].exit_norm.params.w.any()  # zeros, as declared
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    out = expr(ids, labels=ids)
    torch.testing.assert_close(out.logits, rms(ids).logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert expr.stacks["H"].exit_norm.params.w.grad.abs().sum() > 0


@pytest.mark.parametrize("over", [
    {"model.modules.L.exit_norm": EXIT_EXPR, "model.final_norm": {"type": "expr", "expr": GEMMA,
                                                                  "params": {"w": "normal"}}},
    {"model.final_norm": True, "model.block.norm.affine": True},
], ids=["expr-exit-and-final", "affine-final"])
def test_standalone_norms_run_as_generated_kernels(tiny_text, c_ops, over):
    """On a C-style backend the exit norm fuses with the last residual into one kernel, and the final
    norm runs as its own; values and every gradient match the reference."""
    spec = _spec(tiny_text, **over)
    torch.manual_seed(0)
    ref = hrmspec.compile(spec)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cl = hrmspec.compile(spec, backend=c_ops.name)
    cl.load_state_dict(ref.state_dict())
    regions = [o.program.name for o in cl.plan.bodies[("L", 2)].ops if o.members]
    assert regions[-1].endswith(spec.model.module("L").exit_norm.type + "_norm" if over.get(
        "model.modules.L.exit_norm") is None else "expr_norm")
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    a, b = ref(ids, labels=ids), cl(ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
    a.loss.backward()
    b.loss.backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), cl.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4 * float(p.grad.abs().max()) + 1e-7,
                                   msg=lambda m, n=n: f"{n}: {m}")
