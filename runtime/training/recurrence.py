"""The repeat count of a sampled loop, drawn per optimizer step.

The draw is a function of the run's seed and the step alone (its own generator, seeded from both),
so every rank under torchrun draws the same count without talking, and a resumed run draws the
counts the uninterrupted one would have. Huginn's sampler (arXiv 2502.05171):

    rate  ~ LogNormal(ln(mean) - sigma^2 / 2, sigma)     E[rate] = mean
    count = Poisson(rate) + 1                            E[count] = mean + 1

and a uniform count in [low, high] for RINS-style stochastic recursion; both capped at `max`. A
curriculum (`curriculum: {schedule: linear | 1-sqrt, over: f}`) raises the mean (the high end) from 1
over the first fraction f of training; the count of a step then depends on its progress too, which is
itself a function of the step: a resumed run still draws what the uninterrupted one would.
"""

from __future__ import annotations

import math

import torch

from hrmspec.spec.schedule import sample_at
from hrmspec.spec.schema import SampleSpec


def draw_count(sample: SampleSpec, seed: int, step: int, progress: float = 1.0) -> int:
    """The loop count of optimizer step `step` of a run seeded `seed`, at training `progress` (a curriculum
    sets the mean from it: hrmspec.spec.schedule.sample_at)."""
    sample = sample_at(sample, progress)
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    if sample.kind == "lognormal_poisson":
        mu = math.log(sample.mean) - sample.sigma**2 / 2
        rate = torch.empty(1, dtype=torch.float64).log_normal_(mu, sample.sigma, generator=g) if sample.sigma > 0 \
            else torch.full((1,), sample.mean, dtype=torch.float64)
        count = int(torch.poisson(rate, generator=g).item()) + 1
    else:
        count = int(torch.randint(sample.low, sample.high + 1, (1,), generator=g).item())
    return min(count, sample.max)


def expected_count(sample: SampleSpec, progress: float = 1.0) -> float:
    """E[count] at training `progress`, before the cap (the cap lowers it by a negligible amount at sensible
    settings)."""
    sample = sample_at(sample, progress)
    return sample.mean + 1 if sample.kind == "lognormal_poisson" else (sample.low + sample.high) / 2
