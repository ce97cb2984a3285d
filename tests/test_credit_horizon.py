"""The credit horizon at run time: parameter by parameter, the gradient of a compiled model equals that of
an explicit reimplementation that runs every call with gradient and detaches the outputs of the calls
the credit rule leaves out — for every credit mode, at drawn cycle counts, depths and training progress.

The calls that carry gradient are worked out here from each mode's definition (docs/spec-language.md),
call by call, not read from the plan; the plan's flags must agree with them too.
"""

import math

import torch
import torch.nn.functional as F
import yaml
from hypothesis import given
from hypothesis import strategies as st

import hrmspec
from hrmspec.spec import load_spec_text
from hrmspec.spec.grammar import INPUT

VOCAB = 23


def hrm_text(H: int, L: int, credit, z_L: str) -> str:
    model = {
        "vocab": VOCAB, "d_model": 16, "heads": 2, "ffn": 24,
        "modules": {"L": {"layers": 1}, "H": {"layers": 1}},
        "states": {"z_H": {"init": "embed"}, "z_L": {"init": z_L}},
        "schedule": [{"repeat": H, "do": [{"repeat": L, "do": ["z_L = L(z_L + z_H)"]}, "z_H = H(z_H + z_L)"]}],
        "output": "z_H",
        "credit": credit,
    }
    return yaml.safe_dump({"name": "horizon", "model": model}, sort_keys=False)


def expected_flags(H: int, L: int, credit, progress: float) -> list[bool]:
    """Which calls carry gradient, by each mode's definition. Calls in order: for each of the H cycles,
    L calls of L then one call of H."""
    order = [m for _ in range(H) for m in ["L"] * L + ["H"]]
    cycle = [i // (L + 1) for i in range(len(order))]
    n = len(order)
    if credit == "none":
        return [True] * n
    if credit == "last_cycle":  # the whole last H cycle
        return [c == H - 1 for c in cycle]
    if "last" in credit:  # the last k calls, whatever their module
        return [i >= n - credit["last"] for i in range(n)]
    if "per_cycle" in credit:  # L's trailing calls per cycle, the list left-padded with 1s; H always
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
def credits(draw, H: int, L: int):
    n = H * (L + 1)
    mode = draw(st.sampled_from(["none", "last", "last_cycle", "per_cycle", "depth"]))
    if mode in ("none", "last_cycle"):
        return mode
    if mode == "last":
        return {"last": draw(st.integers(1, n + 1))}
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
       progress=st.sampled_from([0.0, 0.1, 0.3, 1.0]), seed=st.integers(0, 2**16))
def test_gradient_comes_only_from_the_calls_the_credit_rule_flags(data, H, L, z_L, progress, seed):
    credit = data.draw(credits(H, L))
    torch.manual_seed(seed)
    model = hrmspec.compile(load_spec_text(hrm_text(H, L, credit, z_L)))
    if z_L == "learned":
        with torch.no_grad():
            model.state_params["z_L"].normal_()
    model.set_progress(progress)
    want = expected_flags(H, L, credit, progress)
    assert model.grad_flags == want, (credit, progress)
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
