"""Halting: every rule that stops computing early during training, one entry each.

    rule        scope    head               training loss                              stops
    q_learning  segment  2 logits / sample  BCE(q_halt, solved) + BCE(q_cont, target)  q_halt > q_continue
    bce         segment  2 logits / sample  BCE(q_halt, solved)                        q_halt > 0
    act         step     1 logit / position the output's + weight x (N + R)            cumulative p >= threshold
    exit_gate   step     1 logit / position sum_t p_t L_t - weight x H(p)              cumulative exit >= threshold
    ponder      step     1 logit / position sum_t p_t L_t + weight x KL(p || G(prior)) cumulative halt >= threshold

A *segment* rule (deep supervision, `supervision.halting`) stops a whole sample between segments of
the schedule (runtime/execution/supervision.py); a *step* rule (`model.halting`) stops each position
between steps of the schedule's loop inside one forward (runtime/execution/rules.py). The exit
criteria at inference (`--exit kl:1e-3`, ...), which need no head and no training, are the `Criterion`
registry in runtime/execution/adaptive.py.

An entry says what the spec loader accepts (its parameters with their defaults and ranges), which
per-step loss it trains with (`objective.steps`), and what `show` prints; the runtime's class of the same
name (`RULES` in runtime/execution/rules.py, `Supervisor` for the segment rules) computes it. A new
rule is an entry here and its class there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    name: str
    default: float
    lo: float  # inclusive
    hi: float = math.inf  # inclusive
    positive: bool = False  # lo excluded
    doc: str = ""


@dataclass(frozen=True)
class HaltingKind:
    name: str
    scope: str  # "segment": whole samples between segments; "step": positions between steps of the loop
    params: tuple[Param, ...]
    steps: str | None  # the objective.steps a step rule trains with (None: a segment rule)
    stops: str  # when a sample or position stops, for `show` ({threshold} and the other params filled in)
    trains: str  # what training adds, for `show`
    reference: str  # where the rule comes from
    head: str = "halting head"  # what `show` calls its head's parameters

    def defaults(self) -> dict[str, float]:
        return {p.name: p.default for p in self.params}


_THRESHOLD = "the cumulative probability at which a position stops"
_SEGMENT = (Param("exploration", 0.1, 0.0, 1.0, doc="in training, the probability of a random minimum of segments"),
            Param("weight", 0.5, 0.0, doc="of the halting losses beside the token loss"))
HALTING: dict[str, HaltingKind] = {k.name: k for k in (
    HaltingKind("q_learning", "segment", _SEGMENT, None, "q_halt > q_continue, or at the last segment",
        "weight x (BCE(q_halt, the whole answer right) + BCE(q_continue, the next segment's Q target))",
        "HRM (arXiv 2506.21734)"),
    HaltingKind("bce", "segment", _SEGMENT, None, "q_halt > 0, or at the last segment",
        "weight x BCE(q_halt, the whole answer right)",
        "TRM (arXiv 2510.04871)"),
    HaltingKind("act", "step", (
        Param("threshold", 0.99, 0.0, 1.0, positive=True, doc=_THRESHOLD + " (1 - epsilon)"),
        Param("weight", 0.01, 0.0, doc="tau, times the ponder cost N + R")),
        "last", "its cumulative halting probability reaches the threshold {threshold:g} (1 - epsilon)",
        "the head reads the halting-weighted states; weight {weight:g} x the ponder cost N + R",
        "Graves, ACT (arXiv 1603.08983); Universal Transformers (arXiv 1807.03819)"),
    HaltingKind("exit_gate", "step", (
        Param("threshold", 0.5, 0.0, 1.0, positive=True, doc=_THRESHOLD + " (q)"),
        Param("weight", 0.1, 0.0, doc="beta, times the exit distribution's entropy (subtracted)")),
        "expected", "its cumulative exit probability reaches the threshold {threshold:g} (q)",
        "the expected loss over the steps' exits, less {weight:g} x the exit distribution's entropy",
        "Ouro (arXiv 2510.25741)", "exit gate"),
    HaltingKind("ponder", "step", (
        Param("threshold", 0.5, 0.0, 1.0, positive=True, doc=_THRESHOLD + " (0.5: the median exit step)"),
        Param("weight", 0.01, 0.0, doc="beta, times KL(p || the geometric prior)"),
        Param("prior", 0.2, 0.0, 1.0, positive=True, doc="lambda_p: the prior's probability of halting at each step")),
        "expected", "its cumulative halting probability reaches the threshold {threshold:g}",
        "the expected loss over the steps' halts, plus {weight:g} x KL(p || Geometric({prior:g}) truncated)",
        "PonderNet (arXiv 2107.05407)"),
)}

STEP_TYPES = tuple(name for name, k in HALTING.items() if k.scope == "step")
SEGMENT_TYPES = tuple(name for name, k in HALTING.items() if k.scope == "segment")


def describe_rule(name: str, values: dict[str, float]) -> tuple[str, str]:
    """(when it stops, what training adds) of rule `name` with its parameter values, for `show`."""
    k = HALTING[name]
    return k.stops.format(**values), k.trains.format(**values)


__all__ = ["HALTING", "SEGMENT_TYPES", "STEP_TYPES", "HaltingKind", "Param", "describe_rule"]
