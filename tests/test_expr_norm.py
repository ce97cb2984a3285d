"""Expression norms: `norm: {type: expr, expr: "...", params: {...}}` — load-time errors with
columns, an expression equal to RMSNorm giving the RMS model exactly, and learnable parameters."""

import pytest
import torch

import hrmspec
from hrmspec.backends import get_backend
from hrmspec.backends.common.fallback import record_fallbacks
from hrmspec.cli import main
from hrmspec.errors import SpecError
from hrmspec.kinds import norm_program
from hrmspec.spec import NormSpec, load_spec, load_spec_text

HEAD = """\
name: t
model:
  vocab: 61
  d_model: 32
  heads: 4
  ffn: 48
  block:
"""
TAIL = """\
  modules:
    L: {layers: 1}
    H: {layers: 1}
  states:
    z_H: {init: embed}
    z_L: {init: buffer}
  schedule:
    - repeat: 2
      do:
        - repeat: 2
          do: ["z_L = L(z_L + z_H)"]
        - "z_H = H(z_H + z_L)"
  output: z_H
"""
GEMMA = "x * rsqrt(mean(x*x) + eps) * (1 + w)"


def _text(norm: str, tail: str = TAIL) -> str:
    return HEAD + norm + tail


def test_an_expression_norm_loads_into_the_spec():
    spec = load_spec_text(_text(f'    norm: {{type: expr, expr: "{GEMMA}", params: {{w: zeros}}, eps: 1e-5}}\n'))
    n = spec.model.block.norm
    assert n == NormSpec(type="expr", eps=1e-5, affine=False, place="pre", expr=GEMMA, params=(("w", "zeros"),))
    assert spec.model.module("L").block.norm == n
    assert NormSpec().expr is None and NormSpec().params is None


# (id, the norm as written at line 8, where the error is: line:col, message, hint)
ERRORS = [
    ("unknown-function",
     f'    norm: {{type: expr, expr: "{GEMMA.replace("rsqrt", "rsqrtt")}", params: {{w: zeros}}}}\n',
     "8:35", "model.block.norm.expr: unknown function 'rsqrtt'", "did you mean 'rsqrt'?"),
    ("free-name", "    norm:\n      type: expr\n      expr: x * rsqrt(mean(x*x) + eps) * (1 + v)\n",
     "10:47", "model.block.norm.expr: unknown name 'v'", "declared under params, e.g. params: {v: zeros}"),
    ("misspelt-param", f'    norm: {{type: expr, expr: "{GEMMA.replace("+ w", "+ ww")}", params: {{w: zeros}}}}\n',
     "8:65", "unknown name 'ww'", "did you mean 'w'?"),
    ("bad-syntax", '    norm: {type: expr, expr: "x * (1 + "}\n', "8:35", "'(' was never closed", ""),
    ("unused-param", '    norm: {type: expr, expr: "x * rsqrt(mean(x*x) + eps)", params: {w: ones}}\n',
     "8:69", "parameter 'w' is declared but the expression does not use it", "remove it"),
    ("scalar-result", '    norm: {type: expr, expr: "rsqrt(mean(x*x) + eps)"}\n', "8:31",
     "gives one number per row", "multiply the row by it"),
    ("no-x", '    norm: {type: expr, expr: "w * 2", params: {w: ones}}\n', "8:31", "never reads the row 'x'", ""),
    ("param-is-a-function", '    norm: {type: expr, expr: "x * exp", params: {exp: ones}}\n', "8:50",
     "'exp' is a built-in function", ""),
    ("bad-init", f'    norm: {{type: expr, expr: "{GEMMA}", params: {{w: zero}}}}\n', "8:82",
     "expected one of zeros | ones | normal, found 'zero'", "did you mean 'zeros'?"),
    ("missing-expr", "    norm: {type: expr}\n", "8:5", "missing required key 'expr'", "params: {w: zeros}"),
    ("expr-on-rms", '    norm: {expr: "x"}\n', "8:12", "'expr' belongs to an expression norm", "add type: expr"),
    ("affine-on-expr", '    norm: {type: expr, expr: "x", affine: true}\n', "8:35", "'affine' applies to rms norms",
     "params: {w: ones}"),
]


@pytest.mark.parametrize("norm,where,message,hint", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_the_line_and_column_inside_the_expression(tmp_path, norm, where, message, hint):
    path = tmp_path / "m.yaml"
    path.write_text(_text(norm))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}:{where}: "), str(info.value)
    assert message in info.value.message or message in str(info.value)
    assert hint in info.value.hint


def test_a_module_override_is_checked_at_its_own_text(tmp_path):
    tail = TAIL.replace("H: {layers: 1}", 'H: {layers: 1, norm: {type: expr, expr: "x * sigmoidd(x)"}}')
    path = tmp_path / "m.yaml"
    path.write_text(_text("    norm: {type: rms}\n", tail))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    # line 11: '    H: {layers: 1, norm: {type: expr, expr: "' is 45 characters; sigmoidd starts 4 later
    assert str(info.value).startswith(f"{path}:11:50: model.modules.H.norm.expr: unknown function 'sigmoidd'")


def test_an_override_inherits_the_block_expression_and_may_change_eps():
    tail = TAIL.replace("H: {layers: 1}", "H: {layers: 1, norm: {eps: 1.0e-3}}")
    spec = load_spec_text(_text(f'    norm: {{type: expr, expr: "{GEMMA}", params: {{w: ones}}}}\n', tail))
    H = spec.model.module("H").block.norm
    assert (H.type, H.expr, H.params, H.eps) == ("expr", GEMMA, (("w", "ones"),), 1e-3)


def test_the_cli_reports_the_column_and_exits_2(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(_text(ERRORS[0][1]))
    assert main(["validate", str(path)]) == 2
    assert f"{path}:8:35: model.block.norm.expr: unknown function 'rsqrtt'" in capsys.readouterr().err


# -- the runtime -----------------------------------------------------------------------------------------
def _model(norm: dict | None, seed: int = 0, backend: str = "reference"):
    torch.manual_seed(seed)
    text = _text("    norm: {type: rms}\n")
    return hrmspec.compile(load_spec_text(text, overrides={"model.block.norm": norm} if norm else None), backend)


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (2, 9), generator=gen)
    prefix = torch.zeros(2, 9, dtype=torch.bool)
    prefix[:, :4] = True
    return ids, prefix, torch.randint(0, 61, (2, 9), generator=gen)


def test_an_expression_equal_to_rms_norm_reproduces_the_rms_model_exactly():
    rms = _model(None)
    expr = _model({"type": "expr", "expr": "x * rsqrt(mean(x*x) + eps)"})
    assert rms.state_dict().keys() == expr.state_dict().keys()
    expr.load_state_dict(rms.state_dict())
    ids, prefix, _ = _batch()
    with torch.no_grad():
        assert torch.equal(rms(ids, prefix_mask=prefix).logits, expr(ids, prefix_mask=prefix).logits)


def test_a_learnable_offset_norm_trains():
    model = _model({"type": "expr", "expr": GEMMA, "params": {"w": "zeros"}})
    ws = {n: p for n, p in model.named_parameters() if n.endswith("params.w")}
    assert len(ws) == 2 * 2  # L and H, one layer each: attn_norm and mlp_norm (the exit norm stays rms)
    assert all(not w.detach().any() for w in ws.values())
    ids, prefix, labels = _batch()
    model(ids, prefix_mask=prefix, labels=labels).loss.backward()
    for name, w in ws.items():
        assert w.grad is not None and w.grad.isfinite().all() and w.grad.abs().max() > 0, name
    # only the norm parameters move, and they alone lower the loss
    opt = torch.optim.Adam(ws.values(), lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(ids, prefix_mask=prefix, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(w.detach().any() for w in ws.values())


@pytest.mark.gpu
def test_expression_norm_on_the_triton_backend_equals_the_reference(tmp_path, monkeypatch, kernel_device):
    pytest.importorskip("triton")
    monkeypatch.setenv("HRMSPEC_CACHE", str(tmp_path))
    spec = NormSpec(type="expr", eps=1e-6, expr=GEMMA, params=(("w", "normal"),))
    torch.manual_seed(0)
    program = norm_program(spec)
    w = torch.randn(24) * 0.1
    x = torch.randn(2, 5, 24)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    xt, wt = x.to(kernel_device).requires_grad_(), w.to(kernel_device).requires_grad_()
    with record_fallbacks() as fell:
        yt = get_backend("triton").row_program(program, {"x": xt, "w": wt})["y"]
    assert not fell, fell  # a generated kernel, not a reported fallback
    yr = get_backend("reference").row_program(program, {"x": xr, "w": wr})["y"]
    torch.testing.assert_close(yt.cpu(), yr, rtol=1e-5, atol=1e-5)
    cot = torch.randn_like(yr)
    yr.backward(cot)
    yt.backward(cot.to(kernel_device))
    torch.testing.assert_close(xt.grad.cpu(), xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wt.grad.cpu(), wr.grad, rtol=1e-4, atol=1e-5)


def test_show_counts_expression_norm_parameters():
    from hrmspec.graph import analyse, build_graph
    from hrmspec.spec import load_spec

    expr = {"type": "expr", "expr": "x * rsqrt(mean(x*x) + eps) * (1 + w)", "params": {"w": "zeros"}}
    spec = load_spec("hrm-text-tiny", {"model.block.norm": expr})
    model = hrmspec.compile(spec)
    assert analyse(build_graph(spec)).params == model.num_parameters()
