"""Deep supervision over segments, with halting: how HRM and TRM train and answer.

The schedule is one *segment*. A sample runs up to `segments` of them, each starting from the
states the last one ended in (carried detached: no gradient crosses a segment), and every
segment's output is supervised. In training one optimizer step is one segment of every row of a
batch (`Supervisor.step`), and the carry persists across optimizer steps:

    reset     a row that halted takes the next batch's sample, its states back to their initial
              values and its segment count to 0
    segment   logits and new states from the carried ones; the halting head reads the first
              position of the output state: q = (q_halt, q_continue)
    halt      at `segments`, or when the head says so — q_learning: q_halt > q_continue (HRM),
              bce: q_halt > 0 (TRM) — unless exploration (probability `exploration`) drew a
              minimum of segments in 2..segments that the row has not reached
    target    q_learning only: sigmoid of the next segment's q (a no-grad forward from the new
              states): q_halt' at the last segment, else max(q_halt', q_continue')

The losses (`Supervisor.loss`): each row's mean token loss (softmax or stablemax), summed over rows,
plus `weight` x (BCE(q_halt, the row's whole answer right) + BCE(q_continue, target)); the
trainer divides by the rows. Metrics count the rows that halted at this step.

At inference (`solve`) a row stops at the segment its head says halt (no exploration) and only
the rows still running are computed; `all_segments=True` runs every segment, as HRM's and TRM's
evaluation does. A q logit that is not finite is an error naming the row and the segment.

Out of training `step` halts a row at the last segment only (as HRM's and TRM's evaluation
does), or, with `halt=True`, where its head says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hrmspec.runtime.execution.losses import IGNORE_INDEX, row_mean, token_losses
from hrmspec.runtime.execution.rules import SEGMENT_RULES, HaltingError
from hrmspec.spec.schema import SupervisionSpec

DATA_KEYS = ("input_ids", "labels", "puzzle_ids")  # what a row of a supervised batch holds


@dataclass
class Carry:
    """What persists across segments, per row."""

    states: dict[str, torch.Tensor]  # every state (B, P + S, d), detached
    steps: torch.Tensor  # (B,) int: segments this row's sample has run
    halted: torch.Tensor  # (B,) bool: the row takes a new sample at the next step
    data: dict[str, torch.Tensor]  # the sample each row works on (DATA_KEYS)


@dataclass
class SegmentOutput:
    logits: torch.Tensor  # (B, S, vocab)
    q_halt: torch.Tensor | None = None  # (B,) fp32
    q_continue: torch.Tensor | None = None
    target_q_continue: torch.Tensor | None = None  # q_learning in training
    metrics: dict[str, float] = field(default_factory=dict)


class Supervisor:
    """Deep supervision of `model` as its spec's `supervision:` section says (see the module docstring)."""

    def __init__(self, model, forward=None):
        """`forward` runs the model's forward (a data-parallel wrapper of it); default: the model."""
        spec = model.spec
        self.model, self.run = model, forward or model
        # without a supervision: section, one segment: the grid objective's plain training step
        self.spec = spec.supervision or SupervisionSpec(segments=1)
        self.halting = self.spec.halting
        self.rule = SEGMENT_RULES[self.halting.type]() if self.halting is not None else None
        self.loss_kind = spec.objective.loss

    # ------------------------------------------------------------------ one segment

    def _forward(self, data: dict[str, torch.Tensor], states: dict[str, torch.Tensor] | None):
        return self.run(data["input_ids"], puzzle_ids=data.get("puzzle_ids"), states=states, return_logits=True)

    def _initial_states(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            x = self.model.embed_inputs(data["input_ids"], data.get("puzzle_ids"))
            return {k: v.detach() for k, v in self.model.initial_states(x).items()}

    def initial_carry(self, batch: dict[str, torch.Tensor]) -> Carry:
        """Every row halted: the first step takes every row's sample from its batch."""
        data = {k: batch[k] for k in DATA_KEYS if k in batch}
        B = data["input_ids"].shape[0]
        device = data["input_ids"].device
        return Carry(self._initial_states(data), torch.zeros(B, dtype=torch.long, device=device),
                     torch.ones(B, dtype=torch.bool, device=device), {k: torch.zeros_like(v) for k, v in data.items()})

    def q_logits(self, out, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_halt, q_continue) of a forward's output, checked finite."""
        q = out.q_logits
        bad = ~torch.isfinite(q).all(-1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            q_halt, q_continue = q[row].detach().tolist()
            raise HaltingError(f"the halting head's logits are not finite at segment {int(steps[row])} of row {row} "
                               f"(q_halt {q_halt}, q_continue {q_continue}): the run cannot go on "
                               "from here; lower train.lr, or resume from an earlier checkpoint")
        return q[:, 0], q[:, 1]

    def says_halt(self, q_halt: torch.Tensor, q_continue: torch.Tensor) -> torch.Tensor:
        return self.rule.says_halt(q_halt, q_continue)

    def step(self, carry: Carry, batch: dict[str, torch.Tensor], training: bool = True,
             halt: bool = False) -> tuple[Carry, SegmentOutput]:
        """One segment of every row: halted rows first take `batch`'s sample (see the module docstring).
        Out of training a row halts at the last segment only, or, with `halt`, where its head says so."""
        reset = carry.halted
        fresh = {k: batch[k] for k in carry.data}
        data = {k: torch.where(reset.view(-1, *[1] * (v.dim() - 1)), fresh[k], v) for k, v in carry.data.items()}
        init = self._initial_states(data)
        states = {k: torch.where(reset.view(-1, 1, 1), init[k], v) for k, v in carry.states.items()}
        steps = torch.where(reset, torch.zeros_like(carry.steps), carry.steps) + 1
        out = self._forward(data, states)
        result = SegmentOutput(out.logits)
        new_states = {k: v.detach() for k, v in out.states.items()}
        if self.halting is not None:  # with gradient: the halting losses train the head
            result.q_halt, result.q_continue = self.q_logits(out, steps)
        with torch.no_grad():
            is_last = steps >= self.spec.segments
            halted = is_last
            if self.halting is not None:
                if training and self.spec.segments > 1:
                    halted = halted | self.says_halt(result.q_halt, result.q_continue)
                    explore = torch.rand(steps.shape, device=steps.device) < self.halting.exploration
                    minimum = torch.randint(2, self.spec.segments + 1, steps.shape, device=steps.device)
                    halted = halted & (steps >= explore * minimum)
                    if self.rule.bootstraps:
                        nxt = self._forward(data, new_states)
                        q_halt, q_cont = self.q_logits(nxt, steps)
                        result.target_q_continue = torch.sigmoid(torch.where(is_last, q_halt,
                                                                             torch.maximum(q_halt, q_cont)))
                elif halt:
                    halted = halted | self.says_halt(result.q_halt, result.q_continue)
        return Carry(new_states, steps, halted, data), result

    # ------------------------------------------------------------------ losses

    def loss(self, carry: Carry, out: SegmentOutput) -> tuple[torch.Tensor, dict[str, float]]:
        """(the segment's loss summed over rows, metrics of the rows that halted at this step)."""
        labels = carry.data["labels"]
        lm = row_mean(token_losses(out.logits, labels, self.loss_kind), labels).sum()
        with torch.no_grad():
            counted = labels != IGNORE_INDEX
            counts = counted.sum(-1)
            right = counted & (out.logits.argmax(-1) == labels)
            solved = right.sum(-1) == counts
            done = carry.halted & (counts > 0)
        total = lm
        metrics = {"rows": float(done.sum()), "lm_loss": float(lm.detach()),
                   "exact": float((done & solved).sum()),
                   "accuracy": float(torch.where(done, right.sum(-1) / counts.clamp(min=1), 0.0).sum()),
                   "steps": float(torch.where(done, carry.steps, 0).sum())}
        if out.q_halt is not None:
            q_halt_loss = F.binary_cross_entropy_with_logits(out.q_halt, solved.to(out.q_halt.dtype), reduction="sum")
            halting = q_halt_loss
            metrics["q_halt_loss"] = float(q_halt_loss.detach())
            metrics["q_halt_accuracy"] = float((done & ((out.q_halt >= 0) == solved)).sum())
            if out.target_q_continue is not None:
                q_cont_loss = F.binary_cross_entropy_with_logits(out.q_continue, out.target_q_continue,
                                                                 reduction="sum")
                halting = halting + q_cont_loss
                metrics["q_continue_loss"] = float(q_cont_loss.detach())
            total = total + self.halting.weight * halting
        return total, metrics

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def solve(self, batch: dict[str, torch.Tensor], all_segments: bool = False,
              q_halt: torch.Tensor | None = None, perturb: Perturb | None = None,
              on_segment: OnSegment | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, S, vocab) of the segment each row stopped at, segments each row ran (B,)).

        A row stops when its halting head says so (without a head, or with `all_segments`, after
        every segment); only the rows still running are computed. `q_halt` (B,), when given, receives
        each row's q_halt logit at the segment it stopped at (0 without a halting head): what the
        official ARC evaluation votes with.

        Two hooks, for test-time scaling and for drawing a solution as it forms: `perturb(states, segment,
        rows)` returns the states a segment starts from (those of the rows still running, `rows` (R,) their
        indices in the batch; e.g. with noise added: noisy trajectories), and `on_segment(segment, rows,
        logits, q_halt)` sees each segment's output (the rows computed (R,), their logits (R, S, vocab),
        their q_halt logits (R,) or None without a head)."""
        data = {k: batch[k] for k in DATA_KEYS if k in batch}
        B = data["input_ids"].shape[0]
        states = {k: v.clone() for k, v in self._initial_states(data).items()}  # written row by row below
        steps = torch.zeros(B, dtype=torch.long, device=data["input_ids"].device)
        logits = None
        running = torch.arange(B, device=steps.device)
        for segment in range(1, self.spec.segments + 1):
            rows = {k: v[running] for k, v in data.items()}
            start = {k: v[running] for k, v in states.items()}
            if perturb is not None:
                start = perturb(start, segment, running)
            out = self._forward(rows, start)
            if logits is None:
                logits = out.logits.new_zeros((B, *out.logits.shape[1:]))
            logits[running] = out.logits
            for k, v in out.states.items():
                states[k][running] = v
            steps[running] = segment
            q_stop = None
            if self.halting is not None and (q_halt is not None or on_segment is not None or not all_segments):
                q_stop, q_continue = self.q_logits(out, steps[running])
                if q_halt is not None:
                    q_halt[running] = q_stop.to(q_halt.dtype)
            if on_segment is not None:
                on_segment(segment, running, out.logits, q_stop)
            if segment == self.spec.segments or self.halting is None or all_segments:
                continue
            running = running[~self.says_halt(q_stop, q_continue)]
            if running.numel() == 0:
                break
        return logits, steps


# solve's hooks: the states a segment starts from; what each segment computed
Perturb = Callable[[dict[str, torch.Tensor], int, torch.Tensor], dict[str, torch.Tensor]]
OnSegment = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


__all__ = ["DATA_KEYS", "Carry", "OnSegment", "Perturb", "SegmentOutput", "Supervisor"]
