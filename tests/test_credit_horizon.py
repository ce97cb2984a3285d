"""The credit horizon at run time: parameter by parameter, the gradient of a compiled model equals that of
an explicit reimplementation that runs every call with gradient and detaches the outputs of the calls
the credit rule leaves out — for every credit mode, at drawn cycle counts, depths and training progress.

The calls that carry gradient are worked out here from each mode's definition (docs/spec-language.md),
call by call, not read from the plan; the plan's flags must agree with them too.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given
from hypothesis import strategies as st

import hrmspec
from hrmspec.spec import load_spec_text
from hrmspec.spec.grammar import INPUT

VOCAB = 23


PRELUDE, CODA = "z_L = L(z_L + z_H)", "z_H = H(z_H + z_L)"  # calls before and after the loop


def hrm_text(H: int, L: int, credit, z_L: str, around: tuple[str, ...] = ()) -> str:
    loop = {"repeat": H, "do": [{"repeat": L, "do": ["z_L = L(z_L + z_H)"]}, "z_H = H(z_H + z_L)"]}
    model = {
        "vocab": VOCAB, "d_model": 16, "heads": 2, "ffn": 24,
        "modules": {"L": {"layers": 1}, "H": {"layers": 1}},
        "states": {"z_H": {"init": "embed"}, "z_L": {"init": z_L}},
        "schedule": [PRELUDE] * ("prelude" in around) + [loop] + [CODA] * ("coda" in around),
        "output": "z_H",
        "credit": credit,
    }
    return yaml.safe_dump({"name": "horizon", "model": model}, sort_keys=False)


def expected_flags(H: int, L: int, credit, progress: float, around: tuple[str, ...] = ()) -> list[bool]:
    """Which calls carry gradient, by each mode's definition. Calls in order: the prelude's L call if
    any, for each of the H cycles L calls of L then one call of H, the coda's H call if any."""
    calls = [("L", None)] * ("prelude" in around)
    calls += [(m, c) for c in range(H) for m in ["L"] * L + ["H"]]
    calls += [("H", None)] * ("coda" in around)
    order = [m for m, _ in calls]
    cycle = [c for _, c in calls]  # the loop iteration of a call, None outside the loop
    n = len(order)
    if credit == "none":
        return [True] * n
    if credit == "last_cycle":  # from the first call of the last H cycle on: that cycle and the coda
        start = cycle.index(H - 1)
        return [i >= start for i in range(n)]
    if "last" in credit:  # the last k calls, whatever their module
        return [i >= n - credit["last"] for i in range(n)]
    if "truncate" in credit:  # the last k iterations of the loop, and every call outside it
        return [c is None or c >= H - credit["truncate"] for c in cycle]
    if "per_cycle" in credit:  # L's trailing calls per cycle, the list left-padded with 1s; H always
        assert not around, "per_cycle is drawn without calls outside the loop"
        counts = credit["per_cycle"]["L"]
        counts = [1] * (H - len(counts)) + list(counts)
        flags = []
        for c in range(H):
            flags += [j >= L - counts[c] for j in range(L)] + [True]
        return flags
    # depth d ramps from..to over the warmup; in priority order each module takes its trailing calls,
    # as many as the depth left allows while keeping one for each module after it
    d = credit["depth"]
    ramp = 1.0 if d["warmup"] == 0 else min(1.0, progress / d["warmup"])
    left = d["from"] + math.floor(ramp * (d["to"] - d["from"]) + 1e-9)
    flags = [False] * n
    prio = credit["priority"]
    for rank, module in enumerate(prio):
        mine = [i for i, m in enumerate(order) if m == module]
        take = max(0, min(len(mine), left - (len(prio) - 1 - rank)))
        for i in mine[len(mine) - take:]:
            flags[i] = True
        left -= take
    return flags


@st.composite
def credits(draw, H: int, L: int, n_around: int = 0):
    n = H * (L + 1) + n_around
    mode = draw(st.sampled_from(["none", "last", "last_cycle", "per_cycle", "depth", "truncate"]))
    if mode in ("none", "last_cycle"):
        return mode
    if mode == "last":
        return {"last": draw(st.integers(1, n + 1))}
    if mode == "truncate":  # up to one past the loop's iterations: then every call
        return {"truncate": draw(st.integers(1, H + 1))}
    if mode == "per_cycle":
        return {"per_cycle": {"L": draw(st.lists(st.integers(0, L + 1), max_size=H))}}
    lo = draw(st.integers(2, n))
    return {"depth": {"from": lo, "to": draw(st.integers(lo, n + 1)), "warmup": draw(st.sampled_from([0.0, 0.5]))},
            "priority": draw(st.permutations(["H", "L"]))}


def detached_loss(model, ids, labels, flags):
    """The forward with every call tracked, the outputs of calls without credit detached."""
    B, S = ids.shape
    ctx = model.context(B, S, None, None, None)
    x = model.embed_inputs(ids)
    z = {INPUT: x, **model.initial_states(x)}
    for call, grad in zip(model.calls, flags):
        out = model.stacks[call.module]([z[name] for name in call.inputs], ctx)
        z[call.target] = out if grad else out.detach()
    logits = model.logits_of(z[model.spec.model.output])
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


def grads(model, loss) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@given(data=st.data(), H=st.integers(1, 3), L=st.integers(1, 3), z_L=st.sampled_from(["buffer", "learned"]),
       progress=st.sampled_from([0.0, 0.1, 0.3, 1.0]), seed=st.integers(0, 2**16),
       around=st.sampled_from([(), ("prelude",), ("coda",), ("prelude", "coda")]))
def test_gradient_comes_only_from_the_calls_the_credit_rule_flags(data, H, L, z_L, progress, seed, around):
    credit = data.draw(credits(H, L, len(around)))
    if "per_cycle" in credit:  # its counts are per loop iteration: calls outside the loop are not its subject
        around = ()
    check_credit(H, L, credit, z_L, progress, seed, around)


@pytest.mark.parametrize("around", [(), ("prelude", "coda")], ids=["loop", "prelude+coda"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_truncated_backprop_keeps_the_last_iterations_and_the_calls_outside_the_loop(k, around):
    # Huginn's rule, drawn above too: of 3 loop iterations the last k (all of them for k > 3), and the
    # prelude and coda always, whatever k
    check_credit(3, 2, {"truncate": k}, "learned", 1.0, seed=k, around=around)


def check_credit(H: int, L: int, credit, z_L: str, progress: float, seed: int, around: tuple[str, ...]) -> None:
    """The compiled model's flags are the rule's, and its gradient that of the explicit detached forward."""
    torch.manual_seed(seed)
    model = hrmspec.compile(load_spec_text(hrm_text(H, L, credit, z_L, around)))
    if z_L == "learned":
        with torch.no_grad():
            model.state_params["z_L"].normal_()
    model.set_progress(progress)
    want = expected_flags(H, L, credit, progress, around)
    assert model.grad_flags == want, (credit, progress, around)
    gen = torch.Generator().manual_seed(seed)
    ids, labels = torch.randint(0, VOCAB, (2, 5), generator=gen), torch.randint(0, VOCAB, (2, 5), generator=gen)

    ours = grads(model, model(ids, labels=labels).loss)
    ref = grads(model, detached_loss(model, ids, labels, want))
    compared = 0
    for name in ours:
        assert (ours[name] is None) == (ref[name] is None), (name, credit, progress)
        if ref[name] is not None:
            torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
            compared += 1
    assert compared > 0  # the last call always carries gradient: its module's weights and the head's get some
    if not all(want):  # the cut is real: backpropagating through every call gives other gradients
        full = grads(model, detached_loss(model, ids, labels, [True] * len(want)))
        assert any(ours[n] is None or not torch.allclose(ours[n], full[n]) for n in full if full[n] is not None)
