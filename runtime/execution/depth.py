"""How deep each position runs at inference, as one object from the command line to the driver, and what
decoding counts, as a typed record.

`DepthPolicy` holds every knob of depth at inference: an exit criterion (adaptive depth: `exit`,
`max_steps`, `warm_start`), a halting spec's `all_steps` and `threshold`, the scale of random initial
states (`init_scale`) and compiled decoding (`compile`). `hrmspec eval` / `generate` build one from their
options and hand it down unchanged: evaluation, decoding in batches, `generate`, the forward.

`DecodeStats` is what `generate` counts: tokens decoded, and for a forward that walks its loop step by
step (halting, an exit criterion) the steps each position ran, by depth, for the prompt's positions and
the decoded ones; an evaluation adds the time decoding took.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from hrmspec.runtime.execution.adaptive import Never


@dataclass(frozen=True)
class DepthPolicy:
    exit: object = None  # an exit criterion or its text ("kl:1e-3"): each position leaves the loop on its own
    max_steps: int | None = None  # the loop's cap under an exit criterion (default: its evaluation count)
    warm_start: bool = False  # a decoded token's loop starts from the previous token's exit states
    all_steps: bool = False  # a spec with model.halting: every position runs every step
    threshold: float | None = None  # a spec with model.halting: its threshold instead of the spec's
    init_scale: float = 1.0  # random initial states drawn at this scale (0: zeros)
    compile: bool = False  # the compiled decode step (a fixed unrolling only)

    @classmethod
    def of(cls, policy: DepthPolicy | None = None, **changes) -> DepthPolicy:
        """`policy` (default: full depth) with the given fields changed; an unknown field is a TypeError."""
        names = {f.name for f in fields(cls)}
        unknown = set(changes) - names
        if unknown:
            raise TypeError(f"unknown depth option(s) {', '.join(sorted(unknown))}; "
                            f"expected {', '.join(sorted(names))}")
        return replace(policy or cls(), **changes)

    def full_depth(self) -> DepthPolicy:
        """Every position at the cap: no exit criterion, no warm start (the model as trained, at that count)."""
        return replace(self, exit=Never() if self.exit is not None else None, warm_start=False)

    def __str__(self) -> str:
        parts = [f"exit {self.exit}"] if self.exit is not None else []
        parts += ["a warm start"] if self.warm_start else []
        parts += ["every step"] if self.all_steps else []
        parts += [f"threshold {self.threshold:g}"] if self.threshold is not None else []
        return ", ".join(parts) or "full depth"


@dataclass
class DecodeStats:
    tokens: int = 0  # decoded, eos included
    positions: int = 0  # the prompt's and each token fed back (not the padding after a row's eos)
    steps: int = 0  # the loop's steps they ran, summed
    max_steps: int | None = None  # the loop's cap
    prompt: list[int] = field(default_factory=list)  # prompt positions by the steps they ran (indexed by it)
    decoded: list[int] = field(default_factory=list)  # decoded positions likewise
    seconds: float = 0.0  # decoding time, when an evaluation measures it

    def count(self, steps: torch.Tensor, most: int, part: str) -> None:
        """Record the steps (a flat int tensor) of some positions of `part` ("prompt" or "decoded")."""
        self.positions += steps.numel()
        self.steps += int(steps.sum())
        self.max_steps = most
        for hist in (self.prompt, self.decoded):
            hist.extend([0] * (most + 1 - len(hist)))
        hist = getattr(self, part)
        for d, n in enumerate(torch.bincount(steps, minlength=most + 1).tolist()):
            hist[d] += n

    @property
    def mean_steps(self) -> float | None:
        return self.steps / self.positions if self.positions else None


__all__ = ["DecodeStats", "DepthPolicy"]
