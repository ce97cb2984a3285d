"""Halting inside one forward, per step of the schedule's loop: Universal Transformer's ACT and Ouro's exit gate.

A *step* is one iteration of the schedule's outermost `repeat` (statements before the loop run once,
`loop_layout`). After every step t a one-logit head (`model.step_head`) reads each position's output
state h_t. With T the loop's count:

    act        p_t = sigmoid(w . h_t + b). A position halts at the first step N whose cumulative
               probability reaches the threshold (1 - epsilon), sum_{t<=N} p_t >= threshold, or at T.
               Its weights are p_t for t < N and the remainder R = 1 - sum_{t<N} p_t at N: they sum
               to one. The head reads sum_t w_t h_t, and the loss adds weight (tau) x the ponder cost
               N + R, averaged over the positions the loss counts (labels != -100). Training and
               inference halt alike.
    exit_gate  lambda_t = sigmoid(w . h_t + b), the probability of exiting at step t once there. The
               exit distribution p_t = lambda_t prod_{j<t} (1 - lambda_j) for t < T and
               p_T = prod_{j<T} (1 - lambda_j) sums to one (computed in log space). In training
               every position runs every step, the LM head scores every step's output, and the loss
               of a token is sum_t p_t L_t - weight (beta) x H(p), L_t the objective's token loss at
               step t. At inference a token exits at the first step whose cumulative exit
               probability reaches the threshold q (or at T), and the head reads that step's state.
    steps: sum (no halting) every position runs every step; the loss is sum_t L_t over the steps'
               outputs, the logits those of the last step.

`all_steps=True` runs every step for every position and the head reads the last step's state (what
the model computes without halting). `LoopResult.steps` holds the steps each position ran.

A position that halted is not computed again: its states keep their values (no later call changes
them), a step runs only the rows that still have a running position, and a row whose positions have
all halted is skipped. Attention at a later step still sees a halted position, through this KV
policy: at every attention op of a call of step t, a position that halted at step n < t has the keys
and values it had at the same op of the same call of step n, the latest step it computed. A KV
cache slot of that later call stores those copies, so tokens that exited at different depths share
one cache, and decoding with the cache equals running the whole sequence again. Halting logits that
are not finite are a `HaltingError` naming the step, the row and the position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hrmspec.runtime.execution.losses import IGNORE_INDEX, token_losses
from hrmspec.runtime.execution.stack import KVSlot
from hrmspec.runtime.execution.supervision import HaltingError


@dataclass(frozen=True)
class LoopLayout:
    """The plan's calls (`hrmspec.graph.credit_plan.Call`) by step."""

    prelude: tuple  # the calls before the loop, run once
    steps: tuple[tuple, ...]  # the calls of each iteration of the loop, in order


def loop_layout(calls: tuple) -> LoopLayout:
    """The calls of the unrolled schedule by step: those outside any repeat come first (the spec checks it)."""
    T = 1 + max(c.cycle[0] for c in calls if c.cycle)
    return LoopLayout(tuple(c for c in calls if not c.cycle),
                      tuple(tuple(c for c in calls if c.cycle and c.cycle[0] == t) for t in range(T)))


@dataclass
class LoopResult:
    hidden: torch.Tensor  # (B, N, d): what the head reads (act's mixture, the exit step's state, the last state)
    states: dict[str, torch.Tensor]  # every state after the loop
    steps: torch.Tensor  # (B, N) int: the steps each position ran
    weights: torch.Tensor  # (B, N, T) fp32: each step's weight in the output (exit_gate training: p_t)
    loss_sum: torch.Tensor | None = None  # per-step losses (exit_gate, steps: sum), summed over counted tokens
    n_tokens: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # with per-step losses: the last step's logits, when asked for
    extra_loss: torch.Tensor | None = None  # act: weight x the ponder cost summed over counted positions
    ponder: torch.Tensor | None = None  # act: the mean ponder cost N + R (detached)


# ---------------------------------------------------------------------------------- the rules


def act_update(p: torch.Tensor, cum: torch.Tensor, running: torch.Tensor, last: bool, threshold: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One ACT step: (weight of this step's state, positions that halt now) from the halting probabilities
    p, the cumulative probabilities `cum` of the steps before and the positions still `running`."""
    stop = running & ((cum + p >= threshold) | last)
    weight = torch.where(stop, 1.0 - cum, torch.where(running, p, torch.zeros_like(p)))
    return weight, stop


def exit_log_probs(gate_logits: torch.Tensor) -> torch.Tensor:
    """log p (..., T) of the exit distribution for the gate's logits at steps 1..T-1 (..., T - 1):
    log p_t = log lambda_t + sum_{j<t} log(1 - lambda_j), log p_T = sum_{j<T} log(1 - lambda_j)."""
    a = gate_logits.float()
    survive = F.logsigmoid(-a).cumsum(-1)  # log prod_{j<=t} (1 - lambda_j)
    before = F.pad(survive, (1, 0))[..., :-1]
    return torch.cat([F.logsigmoid(a) + before, survive[..., -1:]], dim=-1)


def exit_gate_loss(step_losses: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """Per token: sum_t p_t L_t - beta H(p), for the token losses at every step (M, T) and log p (M, T)."""
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    return (p * step_losses).sum(-1) - beta * entropy


def check_finite(logits: torch.Tensor, running: torch.Tensor, step: int, what: str) -> None:
    """A HaltingError naming the step, row and position of the first running position whose logit is not finite."""
    bad = running & ~torch.isfinite(logits)
    if bool(bad.any()):
        row, pos = (int(i) for i in bad.nonzero()[0])
        value = float(logits[row, pos].detach())
        raise HaltingError(f"{what} is not finite at step {step} of row {row}, position {pos} (logit {value}): "
                           "the run cannot go on from here; lower train.lr, or resume from an earlier checkpoint")


# ---------------------------------------------------------------------------------- running the loop


class StepSlot(KVSlot):
    """One attention op of one call inside the loop: applies the KV policy (see the module docstring) to
    the call's new keys and values, then extends the KV cache's slot, if there is one."""

    def __init__(self, loop: StepLoop, key: tuple[int, int], inner: KVSlot | None):
        super().__init__()
        self.loop, self.key, self.inner = loop, key, inner

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loop = self.loop
        latest = loop.latest.get(self.key)  # every row's keys and values of its latest computed step
        if latest is not None and loop.some_halted:
            keep = loop.running_rows[:, None, :, None]
            k = torch.where(keep, k, loop.pick(latest[0]))
            v = torch.where(keep, v, loop.pick(latest[1]))
        if loop.rows is not None:
            k, v = latest[0].index_copy(0, loop.rows, k), latest[1].index_copy(0, loop.rows, v)
        loop.latest[self.key] = (k, v)
        if self.inner is not None:
            k, v = self.inner.extend(k, v)
        return loop.pick(k), loop.pick(v)


class StepLoop:
    """One forward through the loop: the states, which rows and positions still compute, the KV policy's keys.
    Also the driver of exits at inference (runtime/execution/adaptive.py), which sets `running` itself."""

    def __init__(self, model, z: dict, ctx, context_of, cache):
        self.model, self.z, self.cache, self.ctx, self.context_of = model, z, cache, ctx, context_of
        self.full_ctx, self.contexts = ctx, {}
        self.track = torch.is_grad_enabled()
        h = z[model.spec.model.output]
        self.running = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)  # (B, N)
        self.rows: torch.Tensor | None = None  # the rows this step computes (None: all)
        self.running_rows = self.running
        self.some_halted = False
        self.latest: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def pick(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t.index_select(0, self.rows)

    def begin_step(self) -> None:
        """Compute only the rows with a running position, on their own masks and rotary tables."""
        live = self.running.any(-1)
        self.some_halted = not bool(self.running.all())
        if bool(live.all()):
            self.rows, self.ctx = None, self.full_ctx
        else:
            self.rows = live.nonzero().squeeze(-1)
            key = tuple(self.rows.tolist())
            if key not in self.contexts:
                self.contexts[key] = self.context_of(self.rows)
            self.ctx = self.contexts[key]
        self.running_rows = self.pick(self.running)

    def call(self, call, offset: int | None) -> None:
        """Run `call` (at `offset` in its step; None before the loop) on the computed rows; halted positions
        keep their states."""
        model, z = self.model, self.z
        inner = None if self.cache is None else self.cache.slots[call.index]
        slots = inner
        if offset is not None:
            n = model.stacks[call.module].attention_ops
            slots = [StepSlot(self, (offset, i), None if inner is None else inner[i]) for i in range(n)]
        with torch.set_grad_enabled(self.track and model.grad_flags[call.index]):
            new = model.stacks[call.module]([self.pick(z[name]) for name in call.inputs], self.ctx, slots)
            old = z[call.target].to(new.dtype)
            if self.some_halted:
                new = torch.where(self.running_rows[..., None], new, self.pick(old))
            z[call.target] = new if self.rows is None else old.index_copy(0, self.rows, new)

    def fill_cache(self, steps: tuple[tuple, ...]) -> None:
        """Steps no position reached: their cache slots take every position's latest keys and values."""
        if self.cache is None:
            return
        for calls in steps:
            for offset, call in enumerate(calls):
                for i, slot in enumerate(self.cache.slots[call.index]):
                    slot.extend(*self.latest[(offset, i)])


class _Rule:
    """What happens after each step under one halting rule: which running positions stop, and what the
    head reads or the loss scores once the loop is done. This one runs every step (`steps: sum`,
    `all_steps`); the head reads the last step's state."""

    def __init__(self, model, h: torch.Tensor, labels: torch.Tensor | None, T: int, threshold: float | None):
        self.model, self.labels, self.T, self.threshold = model, labels, T, threshold
        self.P = model.prefix_len
        self.counted = None if labels is None else labels != IGNORE_INDEX
        self.weights = torch.zeros(*h.shape[:2], T, device=h.device)  # (B, N, T)
        self.summed = labels is not None and model.spec.objective.steps == "sum"
        self.loss_sum = None

    def after(self, t: int, h: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
        """The running positions that stop after step t, given the output states h after it."""
        if self.summed:
            step = self.model.head_output(h, self.labels, return_logits=False).loss_sum
            self.loss_sum = step if self.loss_sum is None else self.loss_sum + step
        self.weights[..., t - 1] = 1.0 if self.summed or t == self.T else 0.0
        return running & (t == self.T)

    def finish(self, result: LoopResult) -> None:
        if self.loss_sum is not None:
            result.loss_sum, result.n_tokens = self.loss_sum, self.counted.sum()

    def logits(self, h: torch.Tensor, running: torch.Tensor, t: int, what: str) -> torch.Tensor:
        a = self.model.step_logits(h)
        check_finite(a, running, t, what)
        return a


class _Act(_Rule):
    """ACT: halt where the cumulative halting probability reaches the threshold; the head reads the
    halting-weighted sum of the states, the loss adds weight x the ponder cost."""

    def __init__(self, *args):
        super().__init__(*args)
        shape = self.weights.shape[:2]
        self.cum = torch.zeros(shape, device=self.weights.device)
        self.remainder = torch.zeros_like(self.cum)
        self.mixture = 0.0

    def after(self, t, h, running):
        p = torch.sigmoid(self.logits(h, running, t, "the halting head's logit"))
        w, stop = act_update(p, self.cum, running, t == self.T, self.threshold)
        self.cum = self.cum + w
        self.remainder = torch.where(stop, w, self.remainder)
        self.mixture = self.mixture + w.to(h.dtype)[..., None] * h
        self.weights[..., t - 1] = w.detach()
        return stop

    def finish(self, result):
        result.hidden = self.mixture
        ponder = (result.steps + self.remainder)[:, self.P:]
        counted = self.counted if self.counted is not None else torch.ones_like(ponder, dtype=torch.bool)
        result.ponder = ponder[counted].mean().detach() if bool(counted.any()) else ponder.new_zeros(())
        if self.labels is not None:
            result.extra_loss = self.model.spec.model.halting.weight * ponder[counted].sum()


class _ExitTraining(_Rule):
    """The exit gate with a loss: every step runs; the loss is the expected token loss less beta x H(p)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.gate, self.losses = [], []

    def after(self, t, h, running):
        if t < self.T:
            self.gate.append(self.logits(h, running, t, "the exit gate's logit")[:, self.P:][self.counted])
        self.losses.append(_token_losses(self.model, h[:, self.P:][self.counted], self.labels[self.counted]))
        return running & (t == self.T)

    def finish(self, result):
        log_p = exit_log_probs(torch.stack(self.gate, -1))  # (M, T)
        beta = self.model.spec.model.halting.weight
        result.loss_sum = exit_gate_loss(torch.stack(self.losses, -1), log_p, beta).sum()
        result.n_tokens = self.counted.sum()
        self.weights[:, self.P:][self.counted] = log_p.exp().detach()


class _Exit(_Rule):
    """The exit gate at inference: a token exits at the first step whose cumulative exit probability
    1 - prod_{j<=t} (1 - lambda_j) reaches q; the head reads that step's state."""

    def __init__(self, *args):
        super().__init__(*args)
        self.log_survival = torch.zeros(self.weights.shape[:2], device=self.weights.device)
        self.out = None

    def after(self, t, h, running):
        if t < self.T:
            a = self.logits(h, running, t, "the exit gate's logit")
            self.log_survival = torch.where(running, self.log_survival + F.logsigmoid(-a), self.log_survival)
        q = self.threshold
        reached = self.log_survival <= math.log1p(-q) if q < 1 else torch.zeros_like(running)
        stop = running & (reached | (t == self.T))
        self.out = h if self.out is None else torch.where(stop[..., None], h, self.out)
        self.weights[..., t - 1] = stop.float()
        return stop

    def finish(self, result):
        result.hidden = self.out


def run_loop(model, z: dict, ctx, context_of, cache, labels: torch.Tensor | None, return_logits: bool,
             all_steps: bool = False, threshold: float | None = None) -> LoopResult:
    """The schedule of a model with a loop layout (`model.loop`), from the states `z` (the input under
    'x'): halting per step, or a loss over every step (see the module docstring). `context_of(rows)` gives
    the masks and rotary tables of a subset of rows; `cache` is the forward's KV cache or None."""
    m, layout = model.spec.model, model.loop
    halting = None if all_steps or m.halting is None else m.halting
    if halting is None:
        rule = _Rule
    elif halting.type == "act":
        rule = _Act
    else:
        rule = _ExitTraining if labels is not None else _Exit
    loop = StepLoop(model, z, ctx, context_of, cache)
    for call in layout.prelude:
        loop.call(call, None)
    h = z[m.output]
    T = len(layout.steps)
    rule = rule(model, h, labels, T, halting.threshold if halting is not None and threshold is None else threshold)
    steps = torch.zeros(h.shape[:2], dtype=torch.long, device=h.device)
    for t, calls in enumerate(layout.steps, 1):
        loop.begin_step()
        for offset, call in enumerate(calls):
            loop.call(call, offset)
        h = z[m.output]
        steps = steps + loop.running.long()
        loop.running = loop.running & ~rule.after(t, h, loop.running)
        if not bool(loop.running.any()):
            loop.fill_cache(layout.steps[t:])
            break
    result = LoopResult(h, {s.name: z[s.name] for s in m.states}, steps, rule.weights)
    rule.finish(result)
    if result.loss_sum is not None and return_logits:
        result.logits = model.logits_of(h[:, model.prefix_len:])
    return result


def mean_steps(spec, steps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, N) the steps each position takes, from a forward's `steps` and `step_weights`: those it ran, or
    under an exit gate its exit step (in training, where every step runs, the expected one sum_t t p_t)."""
    if spec.model.halting is None or spec.model.halting.type != "exit_gate":
        return steps.float()
    return (weights * torch.arange(1, weights.shape[-1] + 1, device=weights.device)).sum(-1)


def _token_losses(model, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(M,) the objective's token loss of output states h (M, d) against their labels."""
    logits = model.logits_of(h)
    return token_losses(logits[None], labels[None], model.spec.objective.loss)[0]


__all__ = ["LoopLayout", "LoopResult", "StepLoop", "StepSlot", "act_update", "check_finite", "exit_gate_loss",
           "exit_log_probs", "loop_layout", "mean_steps", "run_loop"]
