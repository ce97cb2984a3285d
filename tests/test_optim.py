"""AdamATan2, the learning-rate schedule and the EMA against their definitions."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from hrmspec.runtime.training.optim import EMA, AdamATan2, lr_at


@given(st.integers(1, 6), st.floats(1e-4, 1e-1), st.floats(0.0, 0.5), st.floats(1e-6, 1e3))
def test_adam_atan2_matches_definition(steps, lr, wd, scale):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(7, 5))
    opt = AdamATan2([p], lr=lr, betas=(0.9, 0.95), weight_decay=wd)
    ref, m, v = p.detach().clone(), torch.zeros(7, 5), torch.zeros(7, 5)
    for t in range(1, steps + 1):
        g = torch.randn(7, 5) * scale
        p.grad = g.clone()
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.95 * v + 0.05 * g * g
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.95**t)
        ref = ref * (1 - lr * wd) - lr * 1.27 * torch.atan2(m_hat, v_hat.sqrt())
    torch.testing.assert_close(p.detach(), ref, rtol=1e-5, atol=1e-6)


def test_adam_atan2_is_bounded_and_scale_invariant():
    torch.manual_seed(1)
    a, b = torch.nn.Parameter(torch.zeros(100)), torch.nn.Parameter(torch.zeros(100))
    oa, ob = AdamATan2([a], lr=0.1), AdamATan2([b], lr=0.1)
    g = torch.randn(100)
    a.grad, b.grad = g, g * 1e6
    oa.step()
    ob.step()
    torch.testing.assert_close(a, b)  # no eps: the update does not depend on the gradient's scale
    assert a.abs().max() <= 0.1 * 1.27 * math.pi / 2 + 1e-6


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10, "cosine") == 0.1
    assert lr_at(9, 100, 1.0, 10, "cosine") == 1.0
    assert lr_at(10, 100, 1.0, 10, "cosine") == 1.0
    assert abs(lr_at(100, 100, 1.0, 10, "cosine") - 0.1) < 1e-9
    assert lr_at(50, 100, 1.0, 10, "constant") == 1.0


def test_ema_warms_up_then_follows_decay():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay 1/10 at the first update
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 0.9))
    for _ in range(2000):
        ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], torch.ones(1, 2))
    assert ema.steps == 2001
