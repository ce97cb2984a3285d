"""Stop rules: one class per rule of hrmspec/halting.py, and what the driver asks of a rule.

The driver (runtime/execution/driver.py) walks the loop step by step and, after every step t, asks
its rule which running positions stop (`after`); once the loop is done the rule says what the head
reads and what the loss adds (`finish`). The rules here act inside one forward, per position; T is
the loop's count and h_t each position's output state after step t.

    EveryStep  (no halting)  every position runs every step; the head reads h_T. With
                             `objective.steps: sum` the loss is sum_t L_t over the steps' outputs.
    Act        p_t = sigmoid(w . h_t + b). A position halts at the first step N whose cumulative
               probability reaches the threshold (1 - epsilon), sum_{t<=N} p_t >= threshold, or at T.
               Its weights are p_t for t < N and the remainder R = 1 - sum_{t<N} p_t at N: they sum
               to one. The head reads sum_t w_t h_t, and the loss adds weight (tau) x the ponder cost
               N + R, averaged over the positions the loss counts (labels != -100). Training and
               inference halt alike.
    ExitGate   lambda_t = sigmoid(w . h_t + b), the probability of exiting at step t once there. The
               exit distribution p_t = lambda_t prod_{j<t} (1 - lambda_j) for t < T and
               p_T = prod_{j<T} (1 - lambda_j) sums to one (computed in log space). In training
               every position runs every step, the LM head scores every step's output, and the loss
               of a token is sum_t p_t L_t - weight (beta) x H(p) (Ouro; `exit_gate_loss`). At
               inference a token exits at the first step whose cumulative exit probability reaches the
               threshold q (or at T), and the head reads that step's state.
    Ponder     PonderNet: the exit gate's distribution and expected loss, regularised by
               weight (beta) x KL(p || g), g the geometric prior of parameter `prior` (lambda_p)
               truncated as p is: g_t = lambda_p (1 - lambda_p)^(t-1) for t < T, g_T the rest,
               (1 - lambda_p)^(T-1). Inference as the exit gate's.

`RULES` maps each step rule of hrmspec/halting.py to its class. The segment rules (q_learning, bce:
`SegmentRule`) stop whole samples between segments of deep supervision (runtime/execution/
supervision.py). The exit criteria at inference (kl, entropy, latent, cosine, argmax, none:
runtime/execution/adaptive.py) are stop rules too (`CriterionRule`), without a head or a loss.

Halting logits that are not finite are a `HaltingError` naming the step (or segment), the row and the
position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hrmspec.errors import HrmspecError
from hrmspec.runtime.execution.losses import IGNORE_INDEX, token_losses


class HaltingError(HrmspecError):
    """A halting head's logits are not finite: training cannot go on from this state."""


# ---------------------------------------------------------------------------------- the math


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


def geometric_log_probs(prior: float, T: int, device=None) -> torch.Tensor:
    """log g (T,): the geometric distribution of parameter `prior` truncated at T, its tail at T:
    g_t = prior (1 - prior)^(t-1) for t < T, g_T = (1 - prior)^(T-1)."""
    t = torch.arange(T, dtype=torch.float32, device=device)
    log_g = math.log(prior) + t * math.log1p(-prior)
    log_g[-1] = (T - 1) * math.log1p(-prior)
    return log_g


def ponder_loss(step_losses: torch.Tensor, log_p: torch.Tensor, beta: float, prior: float) -> torch.Tensor:
    """Per token: sum_t p_t L_t + beta KL(p || g), g the truncated geometric prior (`geometric_log_probs`)."""
    p = log_p.exp()
    log_g = geometric_log_probs(prior, log_p.shape[-1], log_p.device)
    return (p * step_losses).sum(-1) + beta * (p * (log_p - log_g)).sum(-1)


def check_finite(logits: torch.Tensor, running: torch.Tensor, step: int, what: str) -> None:
    """A HaltingError naming the step, row and position of the first running position whose logit is not finite."""
    bad = running & ~torch.isfinite(logits)
    if bool(bad.any()):
        row, pos = (int(i) for i in bad.nonzero()[0])
        value = float(logits[row, pos].detach())
        raise HaltingError(f"{what} is not finite at step {step} of row {row}, position {pos} (logit {value}): "
                           "the run cannot go on from here; lower train.lr, or resume from an earlier checkpoint")


# ---------------------------------------------------------------------------------- step rules


class StepRule:
    """What the driver asks after each step of the loop; this one runs every step (no halting, or
    `objective.steps: sum`, which scores each step's output), and the head reads the last step's state.

    `after(t, loop)` returns the running positions that stop after step t, given the walk `loop` (its
    output states `loop.h` after the step, the positions still `loop.running`: runtime/execution/
    driver.py); `finish(result)` fills what the head reads (`result.hidden`) and the loss terms."""

    def __init__(self, model, h: torch.Tensor, labels: torch.Tensor | None, T: int, threshold: float | None):
        self.model, self.labels, self.T = model, labels, T
        halting = model.spec.model.halting
        self.threshold = threshold if threshold is not None else halting.threshold if halting is not None else None
        self.P = model.prefix_len
        self.counted = None if labels is None else labels != IGNORE_INDEX
        self.weights = torch.zeros(*h.shape[:2], T, device=h.device)  # (B, N, T)
        self.summed = labels is not None and model.spec.objective.steps == "sum"
        self.loss_sum = None

    def start(self, loop) -> None:
        """Before the first step (the calls before the loop have run)."""

    def end(self, loop) -> None:
        """After the last step, before the calls after the loop."""

    def after(self, t: int, loop) -> torch.Tensor:
        h, running = loop.h, loop.running
        if self.summed:
            step = self.model.head_output(h, self.labels, return_logits=False).loss_sum
            self.loss_sum = step if self.loss_sum is None else self.loss_sum + step
        self.weights[..., t - 1] = 1.0 if self.summed or t == self.T else 0.0
        return running & (t == self.T)

    def finish(self, result) -> None:
        if self.loss_sum is not None:
            result.loss_sum, result.n_tokens = self.loss_sum, self.counted.sum()

    def logits(self, h: torch.Tensor, running: torch.Tensor, t: int, what: str) -> torch.Tensor:
        """(B, N) fp32: the step head on h, checked finite at the running positions."""
        a = self.model.step_logits(h)
        check_finite(a, running, t, what)
        return a


EveryStep = StepRule


class Act(StepRule):
    """ACT: halt where the cumulative halting probability reaches the threshold; the head reads the
    halting-weighted sum of the states, the loss adds weight x the ponder cost."""

    def __init__(self, *args):
        super().__init__(*args)
        shape = self.weights.shape[:2]
        self.cum = torch.zeros(shape, device=self.weights.device)
        self.remainder = torch.zeros_like(self.cum)
        self.mixture = 0.0

    def after(self, t, loop):
        h, running = loop.h, loop.running
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


class ExitGate(StepRule):
    """Ouro's exit gate. Training (with labels): every step runs, the loss is the expected token loss over
    the exit distribution and its regulariser (`loss`). Inference: a token exits at the first step whose cumulative
    exit probability 1 - prod_{j<=t} (1 - lambda_j) reaches q; the head reads that step's state."""

    what = "the exit gate's logit"

    def __init__(self, *args):
        super().__init__(*args)
        self.training = self.labels is not None
        self.gate, self.losses = [], []
        self.log_survival = torch.zeros(self.weights.shape[:2], device=self.weights.device)
        self.out = None

    def loss(self, step_losses: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        """Per token (M,): the expected loss less weight x H(p), the entropy bonus that keeps the exits
        spread (Ouro), for the token losses at every step (M, T) and the exit distribution log p (M, T)."""
        return exit_gate_loss(step_losses, log_p, self.model.spec.model.halting.weight)

    def after(self, t, loop):
        h, running = loop.h, loop.running
        if self.training:
            if t < self.T:
                self.gate.append(self.logits(h, running, t, self.what)[:, self.P:][self.counted])
            self.losses.append(_token_losses(self.model, h[:, self.P:][self.counted], self.labels[self.counted]))
            return running & (t == self.T)
        if t < self.T:
            a = self.logits(h, running, t, self.what)
            self.log_survival = torch.where(running, self.log_survival + F.logsigmoid(-a), self.log_survival)
        q = self.threshold
        reached = self.log_survival <= math.log1p(-q) if q < 1 else torch.zeros_like(running)
        stop = running & (reached | (t == self.T))
        self.out = h if self.out is None else torch.where(stop[..., None], h, self.out)
        self.weights[..., t - 1] = stop.float()
        return stop

    def finish(self, result):
        if not self.training:
            result.hidden = self.out
            return
        log_p = exit_log_probs(torch.stack(self.gate, -1))  # (M, T)
        result.loss_sum = self.loss(torch.stack(self.losses, -1), log_p).sum()
        result.n_tokens = self.counted.sum()
        self.weights[:, self.P:][self.counted] = log_p.exp().detach()


class Ponder(ExitGate):
    """PonderNet: the exit gate's distribution and expected loss, regularised towards a geometric prior."""

    what = "the halting head's logit"

    def loss(self, step_losses, log_p):
        """Per token (M,): the expected loss plus weight x KL(p || g), g the truncated geometric prior."""
        h = self.model.spec.model.halting
        return ponder_loss(step_losses, log_p, h.weight, h.value("prior"))


RULES: dict[str, type[StepRule]] = {"act": Act, "exit_gate": ExitGate, "ponder": Ponder}


def step_rule(model, h: torch.Tensor, labels: torch.Tensor | None, T: int, all_steps: bool = False,
              threshold: float | None = None) -> StepRule:
    """The rule of `model.spec.model.halting` (every step without one, or with `all_steps`)."""
    halting = model.spec.model.halting
    kind = EveryStep if all_steps or halting is None else RULES[halting.type]
    return kind(model, h, labels, T, threshold)


def expected_step(spec, steps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, N) the steps each position takes, from a forward's `steps` and `step_weights`: those it ran, or
    under a rule with an exit distribution its exit step (in training, where every step runs, the expected
    one sum_t t p_t)."""
    halting = spec.model.halting
    if halting is None or not issubclass(RULES[halting.type], ExitGate):
        return steps.float()
    return (weights * torch.arange(1, weights.shape[-1] + 1, device=weights.device)).sum(-1)


def _token_losses(model, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(M,) the objective's token loss of output states h (M, d) against their labels."""
    logits = model.logits_of(h)
    return token_losses(logits[None], labels[None], model.spec.objective.loss)[0]


# ---------------------------------------------------------------------------------- segment rules


class SegmentRule:
    """Halting between segments of deep supervision: the 2-logit head (q_halt, q_continue) on the first
    position of the output state; the losses train it (runtime/execution/supervision.py)."""

    bootstraps = False  # trains q_continue towards the next segment's Q value

    def says_halt(self, q_halt: torch.Tensor, q_continue: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class QLearning(SegmentRule):
    """HRM: halt when q_halt > q_continue; q_continue learns the next segment's value."""

    bootstraps = True

    def says_halt(self, q_halt, q_continue):
        return q_halt > q_continue


class BCE(SegmentRule):
    """TRM: halt when q_halt > 0 (the predicted probability that the whole answer is right passes 1/2)."""

    def says_halt(self, q_halt, q_continue):
        return q_halt > 0


SEGMENT_RULES: dict[str, type[SegmentRule]] = {"q_learning": QLearning, "bce": BCE}


__all__ = ["BCE", "RULES", "SEGMENT_RULES", "Act", "EveryStep", "ExitGate", "HaltingError", "Ponder", "QLearning",
           "SegmentRule", "StepRule", "act_update", "check_finite", "exit_gate_loss", "exit_log_probs",
           "expected_step", "geometric_log_probs", "ponder_loss", "step_rule"]
