"""Halting per step of the loop (runtime/execution/step_halting.py): ACT's weights and output against a
direct loop, the exit distribution and the exit-gate loss against float64 by hand, inference that stops
where the head says against running every step, the KV policy (generate with the cache equals generate
without it), non-finite logits named by step, row and position, finite gradients, the spec's errors, and
the shipped ut and ouro specs shown, trained and evaluated."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hrmspec
from hrmspec.cli import main
from hrmspec.errors import SpecError
from hrmspec.graph import analyse, build_graph
from hrmspec.runtime.execution.depth import DecodeStats
from hrmspec.runtime.execution.rules import HaltingError, exit_log_probs
from hrmspec.spec import load_spec, load_spec_text

T = 5  # steps of LOOPED's loop
LOOPED = """
name: looped
model:
  vocab: 23
  d_model: 16
  heads: 2
  ffn: 32
  max_seq_len: 32
  modules: {U: {layers: 1}}
  states: {h: {init: embed}}
  schedule:
    - repeat: 5
      do: ["h = U(h)"]
  halting: {type: KIND, threshold: THRESHOLD, weight: 0.05}
objective: {type: task_completion, loss: LOSS}
"""

# calls before the loop, several calls per step, a buffer state: what the KV policy must carry through
NESTED = """
name: nested
model:
  vocab: 31
  d_model: 16
  heads: 2
  ffn: 32
  max_seq_len: 40
  modules: {L: {layers: 1}, H: {layers: 1}}
  states: {z_H: {init: embed}, z_L: {init: buffer}}
  schedule:
    - "z_L = L(z_L + x)"
    - repeat: 4
      do:
        - repeat: 2
          do: ["z_L = L(z_L + z_H)"]
        - "z_H = H(z_H + z_L)"
  output: z_H
  halting: KIND
"""


def looped(kind="act", threshold=0.99, loss="softmax", seed=0, scale=1.0, bias=0.0):
    text = LOOPED.replace("KIND", kind).replace("THRESHOLD", str(threshold)).replace("LOSS", loss)
    return _with_head(hrmspec.compile(load_spec_text(text, "looped.yaml")), seed, scale, bias)


def _with_head(model, seed, scale, bias):
    """A halting head that says something: random weights, so positions stop at different steps."""
    torch.manual_seed(seed)
    model.reset_parameters(seed=seed)
    with torch.no_grad():
        model.step_head.weight.normal_(0, scale)
        model.step_head.bias.fill_(bias)
    return model


def batch(B=3, S=7, vocab=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    labels = torch.randint(0, vocab, (B, S), generator=g)
    labels[:, : S // 3] = -100  # the instruction part is not counted
    return ids, labels


def record_halting_inputs(model) -> list[torch.Tensor]:
    """The output states the halting head reads, step by step (the head itself is unchanged)."""
    seen = []
    real = model.step_logits

    def step_logits(h):
        seen.append(h.detach().double().clone())
        return real(h)

    model.step_logits = step_logits
    return seen


def head64(model, h: torch.Tensor) -> torch.Tensor:
    """The halting head's logits in float64, written out."""
    w, b = model.step_head.weight.detach().double()[0], model.step_head.bias.detach().double()[0]
    return h @ w + b


def act_by_hand(logits: list[torch.Tensor], threshold: float):
    """ACT per position, a direct loop in float64: (weights (.., T), halting step (..))."""
    shape = logits[0].shape
    weights = torch.zeros(*shape, T, dtype=torch.float64)
    steps = torch.zeros(shape, dtype=torch.long)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in shape]).view(-1, len(shape)).tolist():
        total = 0.0
        for t in range(1, T + 1):
            p = 1.0 / (1.0 + math.exp(-float(logits[t - 1][tuple(idx)])))
            if total + p >= threshold or t == T:
                weights[(*idx, t - 1)] = 1.0 - total
                steps[tuple(idx)] = t
                break
            weights[(*idx, t - 1)] = p
            total += p
    return weights, steps


# -- act ---------------------------------------------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), threshold=st.sampled_from([0.5, 0.9, 0.99]),
       bias=st.sampled_from([-1.5, 0.0, 1.5, -30.0]))
def test_act_weights_sum_to_one_and_the_output_is_the_weighted_sum_of_a_direct_loop(seed, threshold, bias):
    model = looped("act", threshold, seed=seed, bias=bias)
    ids, labels = batch(seed=seed)
    seen = record_halting_inputs(model)
    out = model(ids, labels=labels)
    logits = [head64(model, h) for h in seen]
    weights, steps = act_by_hand(logits, threshold)
    assert torch.equal(out.steps, steps)
    torch.testing.assert_close(out.step_weights.double(), weights, rtol=0, atol=2e-6)
    torch.testing.assert_close(out.step_weights.sum(-1).double(), torch.ones(3, 7, dtype=torch.float64), rtol=0,
                               atol=2e-6)
    mixture = sum(weights[..., t, None] * seen[t] for t in range(len(seen)))
    torch.testing.assert_close(out.hidden.double(), mixture, rtol=0, atol=2e-5)
    assert (out.steps <= T).all()
    if bias == -30.0:  # p ~ 1e-13: every position runs to the last step, which takes the remainder
        assert (out.steps == T).all() and (weights[..., -1] > 0.999).all()
    for t in range(len(seen) - 1):  # a halted position's state no longer changes
        halted = steps <= t + 1
        torch.testing.assert_close(seen[t + 1][halted], seen[t][halted], rtol=0, atol=0)
    # the loss adds weight x the ponder cost N + R, averaged over the counted positions
    R = weights.gather(-1, (steps - 1)[..., None])[..., 0]
    counted = labels != -100
    plain = model.head_output(out.hidden, labels, return_logits=True)
    want = (plain.loss_sum.double() + 0.05 * (steps + R)[counted].sum()) / counted.sum()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)


# -- the exit gate -------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(-30, 30), min_size=1, max_size=6), min_size=1, max_size=4).filter(
    lambda rows: len({len(r) for r in rows}) == 1))
def test_exit_distributions_sum_to_one_and_match_a_direct_float64_computation(rows):
    a = torch.tensor(rows, dtype=torch.float64)
    got = exit_log_probs(a.float()).exp()
    lam = torch.sigmoid(a)
    want = []
    for t in range(a.shape[1] + 1):
        survive = torch.prod(1 - lam[:, :t], dim=1)
        want.append(survive * (lam[:, t] if t < a.shape[1] else 1.0))
    want = torch.stack(want, 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.sum(1).double(), torch.ones(len(rows), dtype=torch.float64), rtol=0, atol=1e-5)


def _token_loss_by_hand(logits: torch.Tensor, label: int, kind: str) -> float:
    row = logits.tolist()
    if kind == "stablemax":
        s = [x + 1.0 if x >= 0 else 1.0 / (1.0 - x) for x in row]
        return -math.log(s[label] / math.fsum(s))
    top = max(row)
    return -(row[label] - top - math.log(math.fsum(math.exp(x - top) for x in row)))


@pytest.mark.parametrize("loss", ["softmax", "stablemax"])
def test_the_exit_gate_loss_is_the_expected_step_loss_less_beta_times_the_entropy(loss):
    model = looped("exit_gate", 0.5, loss, seed=3)
    ids, labels = batch(seed=3)
    seen = record_halting_inputs(model)
    out = model(ids, labels=labels, return_logits=False)
    states = seen + [out.hidden.detach().double()]  # the gate reads steps 1..T-1; the last step is the output
    assert len(states) == T and torch.equal(out.steps, torch.full_like(out.steps, T))
    W = model.head.weight.detach().double()
    total, count = 0.0, 0
    for b, s in (labels != -100).nonzero().tolist():
        lam = [1.0 / (1.0 + math.exp(-float(head64(model, states[t][b, s])))) for t in range(T - 1)]
        p = [lam[t] * math.prod(1 - x for x in lam[:t]) for t in range(T - 1)] + [math.prod(1 - x for x in lam)]
        L = [_token_loss_by_hand(states[t][b, s] @ W.T, int(labels[b, s]), loss) for t in range(T)]
        entropy = -math.fsum(q * math.log(q) for q in p)
        total += math.fsum(q * x for q, x in zip(p, L)) - 0.05 * entropy
        count += 1
        torch.testing.assert_close(out.step_weights[b, s].double(), torch.tensor(p, dtype=torch.float64),
                                   rtol=1e-4, atol=1e-6)
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)


# -- inference ---------------------------------------------------------------------------------------------
def record_calls(model, module: str) -> list[torch.Tensor]:
    """Every output of a module's calls (the rows it computed), in order."""
    seen = []
    stack = model.stacks[module]
    real = stack.forward

    def forward(*args, **kwargs):
        y = real(*args, **kwargs)
        seen.append(y.detach().double().clone())
        return y

    stack.forward = forward
    return seen


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["act", "exit_gate"]),
       threshold=st.sampled_from([0.3, 0.6, 0.95]))
def test_halting_at_inference_stops_where_the_head_says(seed, kind, threshold):
    # one position per row, so a row's states do not depend on where the others stopped: running every
    # step and picking by hand must give what halting gives
    model = looped(kind, 0.99, seed=seed, scale=2.0).eval()
    ids = torch.randint(0, 23, (8, 1), generator=torch.Generator().manual_seed(seed))
    every = record_calls(model, "U")
    with torch.no_grad():
        model(ids, all_steps=True)
    assert len(every) == T
    logits = [head64(model, h[:, 0]) for h in every]
    if kind == "act":
        weights, steps = act_by_hand(logits, threshold)
        picked = sum(weights[:, t, None] * every[t][:, 0] for t in range(T))
    else:
        survive, steps = torch.ones(8, dtype=torch.float64), torch.full((8,), T)
        for t in range(T - 1):
            survive = survive * (1 - torch.sigmoid(logits[t]))
            steps = torch.where((steps == T) & (1 - survive >= threshold), t + 1, steps)
        picked = torch.stack([every[int(n) - 1][r, 0] for r, n in enumerate(steps)])
    stopped = record_calls(model, "U")
    with torch.no_grad():
        out = model(ids, threshold=threshold)
    assert torch.equal(out.steps[:, 0], steps)
    W = model.head.weight.detach().double()
    torch.testing.assert_close(out.logits[:, 0].double(), picked @ W.T, rtol=0, atol=1e-4)
    # a step computes only the rows that still run
    assert [len(y) for y in stopped] == [int((steps >= t).sum()) for t in range(1, len(stopped) + 1)]
    assert (torch.equal(torch.tensor(len(stopped)), steps.max()))


@pytest.mark.parametrize("kind", ["act", "exit_gate"])
def test_generate_with_the_cache_equals_generate_without_it(kind):
    spec = load_spec_text(NESTED.replace("KIND", kind), "nested.yaml")
    model = _with_head(hrmspec.compile(spec), 5, 1.5, 0.5).eval()
    prompts = torch.randint(0, 31, (3, 6), generator=torch.Generator().manual_seed(5))
    cached, again = DecodeStats(), DecodeStats()
    with_cache = model.generate(prompts, 8, stats=cached)
    without = model.generate(prompts, 8, use_cache=False, stats=again)
    assert torch.equal(with_cache, without)
    assert cached == again and cached.positions == 3 * (6 + 7)
    assert 1.5 < cached.mean_steps < 3.5  # positions stopped at different steps
    every = model.generate(prompts, 8, all_steps=True, stats=(full := DecodeStats()))
    assert full.steps == 3 * full.max_steps * (6 + 7) and every.shape == with_cache.shape
    # token by token through the cache, the logits and steps of the whole sequence run at once; alone, a
    # row's token that stops early leaves the later steps' cache slots to the policy's copies
    prefix = torch.zeros_like(with_cache, dtype=torch.bool)
    prefix[:, :6] = True
    with torch.no_grad():
        whole = model(with_cache, prefix_mask=prefix)
        for rows in (slice(0, 3), slice(0, 1)):
            cache = model.new_cache()
            parts = [model(prompts[rows], prefix_mask=prefix[rows, :6], cache=cache)]
            parts += [model(with_cache[rows, i:i + 1], cache=cache) for i in range(6, with_cache.shape[1])]
            torch.testing.assert_close(torch.cat([o.logits for o in parts], 1), whole.logits[rows], rtol=0, atol=1e-5)
            assert torch.equal(torch.cat([o.steps for o in parts], 1), whole.steps[rows])
    assert (whole.steps[0, 6:] < 4).any()  # some token of row 0 stopped before the last step


# -- errors and gradients ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["act", "exit_gate"])
def test_non_finite_halting_logits_name_the_step_the_row_and_the_position(kind):
    model = looped(kind, 0.99, scale=0.0, bias=-3.0)  # p = 0.05: every position runs every step
    ids, labels = batch()
    real = model.step_logits
    calls = []

    def poisoned(h):
        a = real(h)
        calls.append(1)
        if len(calls) == 2:
            a = a.clone()
            a[1, 4] = float("inf") if kind == "act" else float("nan")
        return a

    model.step_logits = poisoned
    with pytest.raises(HaltingError, match=r"not finite at step 2 of row 1, position 4 \(logit (inf|nan)\)"):
        model(ids, labels=labels)
    with torch.no_grad():
        model.step_head.bias.fill_(float("nan"))
    model.step_logits = real
    with pytest.raises(HaltingError, match=r"not finite at step 1 of row 0, position 0"):
        model(ids)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["act", "exit_gate"]),
       scale=st.sampled_from([0.3, 3.0, 30.0]))
def test_gradients_are_finite_and_reach_the_head(seed, kind, scale):
    model = looped(kind, 0.9, seed=seed, scale=scale)
    ids, labels = batch(seed=seed)
    model(ids, labels=labels, return_logits=False).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.step_head.bias.grad.abs() > 0 or model.step_head.weight.grad.abs().sum() > 0


# -- steps: sum --------------------------------------------------------------------------------------------
def test_a_sum_over_steps_scores_every_steps_output():
    text = LOOPED.replace("  halting: {type: KIND, threshold: THRESHOLD, weight: 0.05}\n", "").replace(
        "loss: LOSS}", "steps: sum}")
    model = hrmspec.compile(load_spec_text(text, "sum.yaml"))
    ids, labels = batch()
    seen = record_calls(model, "U")
    out = model(ids, labels=labels, return_logits=False)
    W = model.head.weight.detach().double()
    counted = labels != -100
    want = sum(torch.nn.functional.cross_entropy(h[counted] @ W.T, labels[counted], reduction="sum") for h in seen)
    assert len(seen) == T and out.loss.item() == pytest.approx(want.item() / counted.sum().item(), rel=1e-5)


# -- the spec ----------------------------------------------------------------------------------------------
BASE = LOOPED.replace("KIND", "act").replace("THRESHOLD", "0.99").replace("LOSS", "softmax")


def edit(old, new, text=BASE):
    assert text.count(old) == 1
    return text.replace(old, new)


SCHEDULE = '    - repeat: 5\n      do: ["h = U(h)"]\n'
ERRORS = [  # (edited spec, file:line:col, message, hint)
    (edit(SCHEDULE, '    - "h = U(h)"\n'), "x.yaml:13:3", "model.halting: halting works per iteration of the "
     "schedule's loop, but the schedule has no repeat block", 'schedule: [{repeat: 8, do: ["h = U(h)"]}]'),
    (edit(SCHEDULE, SCHEDULE + '    - "h = U(h)"\n'), "x.yaml:14:8", "model.schedule[1]: halting reads the "
     "output state after each iteration of the loop, but this statement runs after it", "move it inside the loop"),
    (edit(SCHEDULE, SCHEDULE * 2), "x.yaml:14:7", "model.schedule[1]: expected one outermost loop for halting, "
     "found a second repeat block", "merge the loops"),
    (edit("repeat: 5", "repeat: 1"), "x.yaml:12:15", "model.schedule[0].repeat: expected at least 2 iterations",
     "repeat: 8"),
    (edit("{type: act,", "{type: q_learning,"), "x.yaml:14:19", "model.halting.type: 'q_learning' halts whole "
     "samples between segments", "supervision: {segments: 16, halting: q_learning}"),
    (edit("  states: {h: {init: embed}}\n", "  states: {h: {init: embed}, g: {init: zeros}}\n").replace(
        '["h = U(h)"]', '["g = U(h + g)"]').replace('    - repeat', '    - "h = U(h + x)"\n    - repeat'),
     "x.yaml:3:1", "model: halting reads the output state after each iteration of the loop, but 'h' is not assigned "
     "inside it", "a state the loop assigns"),
    (edit("  halting:", "  credit: {last: 2}\n  halting:"), "x.yaml:14:11", "model.credit: 'last' credit gives "
     "gradient to the calls at the end of the schedule", "credit: none"),
    (edit("  halting:", "  credit: last_cycle\n  halting:"), "x.yaml:14:11", "model.credit: 'last_cycle' credit "
     "gives gradient to the calls at the end of the schedule", "credit: none"),
    (edit("loss: softmax}", "steps: sum}"), "x.yaml:15:43", "objective.steps: expected steps: last with act",
     ""),
    (edit("  halting: {type: act, threshold: 0.99, weight: 0.05}\n", "").replace("loss: softmax}", "steps: expected}"),
     "x.yaml:14:43", "objective.steps: steps: expected is the expectation under an exit distribution",
     "model.halting: {type: exit_gate}"),
    (edit("  halting: {type: act, threshold: 0.99, weight: 0.05}\n", "").replace(SCHEDULE, '    - "h = U(h)"\n')
     .replace("loss: softmax}", "steps: sum}"), "x.yaml:13:36", "objective.steps: steps: sum works per iteration",
     "wrap the recurrence"),
    (BASE + "supervision: {segments: 4}\n", "x.yaml:14:3", "model.halting: per-step halting (model.halting) and "
     "deep supervision", "keep one"),
    (edit("{type: act, threshold: 0.99", "{type: act, threshold: 1.5"), "x.yaml:14:35",
     "model.halting.threshold: expected a number in (0, 1], found 1.5", ""),
    (edit("  halting: {type: act, threshold: 0.99, weight: 0.05}\n", "  act: {max_steps: 4}\n"), "x.yaml:14:3",
     "model.act: unknown key 'act'", "halting: {type: act"),
    (edit("{type: act, threshold: 0.99, weight: 0.05}", "{type: ponder, prior: 0}"), "x.yaml:14:34",
     "model.halting.prior: expected a number in (0, 1], found 0", ""),
    (edit("{type: act, threshold: 0.99, weight: 0.05}", "{type: act, prior: 0.3}"), "x.yaml:14:24",
     "model.halting.prior: 'prior' is a parameter of ponder, not of act", "act takes threshold, weight"),
    (edit("{type: act, threshold: 0.99, weight: 0.05}", "{type: ponder, prio: 0.3}"), "x.yaml:14:27",
     "model.halting.prio: unknown key 'prio'", "did you mean 'prior'?"),
]


@pytest.mark.parametrize("text, where, message, hint", ERRORS)
def test_a_schedule_or_spec_that_cannot_halt_is_an_error_at_its_place(text, where, message, hint):
    with pytest.raises(SpecError) as e:
        load_spec_text(text, "x.yaml")
    first, *rest = str(e.value).split("\n")
    assert first.startswith(f"{where}: {message}"), str(e.value)
    assert hint in "\n".join(rest)


def test_a_step_type_under_supervision_says_where_it_belongs():
    text = BASE.replace("  halting: {type: act, threshold: 0.99, weight: 0.05}\n", "") + \
        "supervision: {segments: 4, halting: exit_gate}\n"
    with pytest.raises(SpecError, match="halts positions between steps.*\n  hint: write it under model: halting"):
        load_spec_text(text, "x.yaml")


def test_defaults_by_type():
    act = load_spec_text(BASE.replace("{type: act, threshold: 0.99, weight: 0.05}", "act"), "x.yaml")
    gate = load_spec_text(BASE.replace("{type: act, threshold: 0.99, weight: 0.05}", "exit_gate"), "x.yaml")
    ponder = load_spec_text(BASE.replace("{type: act, threshold: 0.99, weight: 0.05}", "ponder"), "x.yaml")
    assert (act.model.halting.threshold, act.model.halting.weight, act.objective.steps) == (0.99, 0.01, "last")
    assert (gate.model.halting.threshold, gate.model.halting.weight, gate.objective.steps) == (0.5, 0.1, "expected")
    h = ponder.model.halting
    assert (h.threshold, h.weight, h.value("prior"), ponder.objective.steps) == (0.5, 0.01, 0.2, "expected")


def test_a_sampled_repeat_is_the_schedules_last_loop():
    text = BASE.replace("  halting: {type: act, threshold: 0.99, weight: 0.05}\n", "").replace(
        SCHEDULE, '    - repeat: {sample: uniform, low: 1, high: 3}\n      do: ["h = U(h)"]\n' + SCHEDULE)
    with pytest.raises(SpecError, match=r"x.yaml:14:15: model.schedule\[1\].repeat: a repeat after the sampled one"):
        load_spec_text(text, "x.yaml")


# -- the shipped specs -------------------------------------------------------------------------------------
TINY = {"ut": ["model.ffn=64"], "ouro": ["model.ffn=64", "model.modules.net.layers=1"]}
SMALL = ["model.vocab=320", "model.d_model=32", "model.heads=2", "model.max_seq_len=64", "data.size=120",
         "data.eval_size=8", "train.steps=2", "train.batch_size=4", "train.log_every=1", "train.max_new_tokens=4"]


@pytest.mark.parametrize("name, kind, threshold, steps", [("ut", "act", "0.99", 8), ("ouro", "exit_gate", "0.5", 4)])
def test_show_prints_the_halting_and_the_cost_of_each_step(capsys, name, kind, threshold, steps):
    assert main(["show", name, "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    assert f"Halting: {kind}" in out and f"at most {steps} steps" in out and f"threshold {threshold}" in out
    assert "Cost per step at sequence length 256" in out
    table = out.split("Cost per step")[1].split("Cost per token")[0]
    assert [line.split()[1] for line in table.splitlines() if line[:1] == "│"] == [str(t) for t in range(1, steps + 1)]


@pytest.mark.parametrize("name", ["ut", "ouro"])
def test_the_shipped_spec_trains_on_the_cpu_and_evaluates_with_halting(tmp_path, capsys, name):
    sets = [a for kv in SMALL + TINY[name] for a in ("--set", kv)]
    run = tmp_path / name
    assert main(["train", name, "--out", str(run), "--no-progress", *sets]) == 0
    model = hrmspec.compile(load_spec(run / "checkpoints" / "step_00000002" / "spec.yaml"))
    assert analyse(build_graph(model.spec)).params == model.num_parameters()
    assert main(["eval", str(run), "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "steps per position:" in out and "spared by halting" in out
    assert main(["eval", str(run), "--n", "4", "--all-steps"]) == 0
    most = model.plan.layout.count
    assert f"steps per position: {most}.00 of {most} (0.0%" in capsys.readouterr().out
    assert main(["generate", str(run), "Spell this word backward: cat", "--max-new-tokens", "3",
                 "--threshold", "0.2"]) == 0
    assert "steps per position:" in capsys.readouterr().out
