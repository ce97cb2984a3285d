"""What training a spec costs: FLOPs from its graph, then GPU-hours, wall time and dollars.

Per token, a training step costs the forward of every module call, plus the backward (2x the
forward) of the calls the credit plan gives gradient, plus the head's forward and backward
(`hrmspec.graph.analysis`). The credit depth ramps during warmup, so the cost per token is a step
function of training progress p in [0, 1]; a run of T tokens costs

    FLOPs = T * integral_0^1 train_flops_per_token(p) dp

(the sum over the ramp's phases of their length times their cost), and a run of n steps of r tokens
each costs r * sum_{s < n} train_flops_per_token(s / n), as the training loop advances the plan.
Attention is counted at the training sequence length. Then

    GPU-hours = FLOPs / (peak bf16 dense FLOP/s * MFU) / 3600,   hours = GPU-hours / GPUs,
    dollars   = GPU-hours * $ per GPU-hour.

The GPU table and the default MFU, with their sources, are in docs/compare.md. Nothing here imports
torch: `hrmspec cost` prices a run on any machine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from statistics import NormalDist

from hrmspec.errors import HrmspecError
from hrmspec.gpus import GPU, GPUS, GPUError, get_gpu
from hrmspec.graph.analysis import analyse, human
from hrmspec.graph.build import build_graph
from hrmspec.graph.credit_plan import credit_depth
from hrmspec.spec.schedule import curriculum_breaks, sample_at, sampled_loop
from hrmspec.spec.schema import CreditSpec, SampleSpec, Spec


class CostError(HrmspecError):
    """A cost or budget argument that cannot be read (a GPU, a token count, an MFU)."""


# A ~1B-parameter model's matmuls (d_model 1536) keep H100 tensor cores busy for about a third of
# the time under FSDP; large dense models reach 40-55%. See docs/compare.md.
DEFAULT_MFU = 0.35

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}

# What a cost can be asked about: far beyond any training run, so that every figure stays a finite number.
MAX_TOKENS = 1e18  # training tokens (the largest published runs are near 1e14)
MIN_MFU = 1e-4  # below this, "utilization" is a typo: hours and dollars would run to infinity
MAX_GPUS = 10**7
MAX_PRICE = 1e6  # dollars per GPU-hour
MAX_SEQ_LEN = 1 << 24  # the largest model.max_seq_len a spec may declare


def parse_count(text: str, what: str = "--tokens", maximum: float = math.inf) -> float:
    """A positive count written as 40B, 500M, 2.5T, 1e9 or 1_000_000 (k, M, B or G, T, P: powers of 1000),
    at most `maximum`."""
    s = str(text).strip().replace("_", "").replace(",", "")
    scale = 1.0
    if s and s[-1].lower() in _SUFFIX:
        scale, s = _SUFFIX[s[-1].lower()], s[:-1]
    try:
        value = float(s) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        shown = str(text)[:40]
        raise CostError(f"{what}: expected a positive count such as 40B, 500M or 1e9, found {shown!r}")
    if value > maximum:
        raise CostError(f"{what}: expected at most {maximum:g}, found {value:g}")
    return value


def parse_fraction(text: str, what: str, minimum: float = 0.0) -> float:
    """A number in (0, 1], e.g. an MFU; with `minimum`, in [minimum, 1]."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        v = math.nan
    if not 0.0 < v <= 1.0 or v < minimum:
        floor = f", at least {minimum:g}" if minimum > 0 else ""
        raise CostError(f"{what}: expected a number in (0, 1]{floor}, found {str(text)[:40]!r}")
    return v


def parse_positive(text: str, what: str, integer: bool = False, maximum: float = math.inf) -> float:
    """A positive number (an integer when `integer`) of at most `maximum`, e.g. a GPU count or a price."""
    try:
        v = int(text) if integer else float(text)
    except (TypeError, ValueError):
        v = math.nan
    if not 0 < v < math.inf:
        kind = "a positive integer" if integer else "a positive number"
        raise CostError(f"{what}: expected {kind}, found {str(text)[:40]!r}")
    if v > maximum:
        most = f"{int(maximum):,}" if integer else f"{maximum:g}"
        raise CostError(f"{what}: expected at most {most}, found {str(text)[:40]}")
    return v


def find_gpu(name: str) -> GPU:
    try:
        return get_gpu(str(name)[:40])
    except GPUError as e:
        raise CostError(f"--gpu: {e}") from None


def training_seq_len(spec: Spec) -> int:
    """The row length attention is counted at: a grid's cells and puzzle positions; else the spec's
    train.seq_len, or model.max_seq_len when the spec has no train: section."""
    return seq_len_and_source(spec)[0]


def seq_len_and_source(spec: Spec) -> tuple[int, str]:
    """`training_seq_len` and where it comes from, in words, e.g. (128, 'train.seq_len'): what `show`
    and `cost` say they assumed."""
    model = spec.model
    if spec.objective.type == "grid":
        prefix = model.puzzle.positions if model.puzzle else 0
        where = f" + {prefix} puzzle position{'s' if prefix > 1 else ''}" if prefix else ""
        return model.max_seq_len + prefix, f"a grid row: model.max_seq_len{where}"
    seq_len = (spec.train or {}).get("seq_len")
    if isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len > 0:
        return seq_len, "train.seq_len"
    return model.max_seq_len, "model.max_seq_len (the spec sets no train.seq_len)"


def credit_phases(credit: CreditSpec) -> list[tuple[float, float]]:
    """The intervals of training progress over which the credit plan stays the same: the depth
    ramp's steps (depth `from + k` from p = warmup * k / (to - from) on), else all of [0, 1]."""
    span = credit.depth_to - credit.depth_from if credit.mode == "depth" else 0
    if span <= 0 or credit.warmup <= 0:
        return [(0.0, 1.0)]
    edges = [min(1.0, credit.warmup * k / span) for k in range(span + 1)] + [1.0]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def count_distribution(sample: SampleSpec, points: int = 400) -> list[tuple[int, float]]:
    """(count, probability) of a sampled loop's count (runtime/training/recurrence.py draws it).
    lognormal_poisson: the Poisson pmf of count - 1 averaged over `points` quantiles of the log-normal
    rate (a midpoint rule in probability); the mass above `max` sits at `max`."""
    if sample.kind == "uniform":
        n = sample.high - sample.low + 1
        return [(min(c, sample.max), 1 / n) for c in range(sample.low, sample.high + 1)]
    mu = math.log(sample.mean) - sample.sigma**2 / 2
    normal = NormalDist()
    rates = [math.exp(mu + sample.sigma * normal.inv_cdf((i + 0.5) / points)) for i in range(points)]
    probs: dict[int, float] = {}
    top = min(sample.max, int(max(rates) + 12 * math.sqrt(max(rates)) + 12))
    for rate in rates:
        pmf, total = math.exp(-rate), 0.0  # P(Poisson = 0)
        for k in range(top):
            probs[k + 1] = probs.get(k + 1, 0.0) + pmf / points
            total += pmf
            pmf *= rate / (k + 1)
        probs[top] = probs.get(top, 0.0) + max(0.0, 1.0 - total) / points  # the tail, capped
    return sorted((c, p) for c, p in probs.items() if p > 1e-12)


class RunFlops:
    """Training FLOPs per token of one spec as a function of training progress (credit plan, head and
    attention at `seq_len` included), the forward FLOPs per token, and the parameters."""

    def __init__(self, spec: Spec, seq_len: int | None = None):
        self.spec = spec
        self.seq_len = seq_len or training_seq_len(spec)
        self._at: dict = {}
        self._exact: dict = {}
        self.loop = sampled_loop(spec.model.schedule)
        credit = spec.model.credit
        # past this count every further iteration of a sampled loop adds the same cost (see _at_count)
        self.linear = 3 + (credit.truncate if credit.mode == "truncate" else credit.last if credit.mode == "last"
                           else credit.depth_to if credit.mode == "depth" else 0)
        stats = analyse(build_graph(spec, 1.0), seq_len=self.seq_len)
        self.params = stats.params
        self.forward = stats.forward_flops_per_token
        if self.loop is not None:  # at the expected count: the forward is affine in it
            one, two = (analyse(build_graph(spec, 1.0, recurrence=n), seq_len=self.seq_len).forward_flops_per_token
                        for n in (1, 2))
            self.forward = one + (sum(n * p for n, p in count_distribution(self.loop.sample)) - 1) * (two - one)

    def _phase(self, progress: float) -> tuple:
        """What the cost of a step depends on at `progress`: the credit depth, and the sampler a recurrence
        curriculum has reached (both never go down as progress grows)."""
        sample = sample_at(self.loop.sample, progress) if self.loop is not None else None
        return credit_depth(self.spec.model.credit, progress), sample

    def at(self, progress: float) -> float:
        """Training FLOPs per token of a step at `progress` (the plan changes only with the credit depth and
        a curriculum's mean count); with a sampled loop, the expectation over its count."""
        key = self._phase(progress)
        if key not in self._at:
            if self.loop is None:
                self._at[key] = self._at_count(progress, None)
            else:
                self._at[key] = sum(p * self._at_count(progress, n) for n, p in count_distribution(key[1]))
        return self._at[key]

    def _at_count(self, progress: float, count: int | None) -> float:
        """Training FLOPs per token at `progress` with a sampled loop run `count` times. Past a few
        iterations each more one adds the same cost (a no-grad iteration under truncate, a full one
        otherwise), so counts beyond `self.linear` are extrapolated from the last two."""
        if count is not None and count > self.linear:
            a, b = self._at_count(progress, self.linear - 1), self._at_count(progress, self.linear)
            return b + (count - self.linear) * (b - a)
        key = (credit_depth(self.spec.model.credit, progress), count)
        if key not in self._exact:
            stats = analyse(build_graph(self.spec, progress, recurrence=count), seq_len=self.seq_len)
            sup = self.spec.supervision
            # q-learning's continue target is one more forward of the segment, without gradient
            extra = stats.forward_flops_per_token if sup is not None and sup.halting is not None and \
                sup.halting.type == "q_learning" else 0.0
            self._exact[key] = stats.train_flops_per_token + extra
        return self._exact[key]

    @cached_property
    def mean(self) -> float:
        """Training FLOPs per token averaged over a whole run (the integral over progress)."""
        edges = {0.0, 1.0, *(x for phase in credit_phases(self.spec.model.credit) for x in phase)}
        if self.loop is not None:
            edges |= set(curriculum_breaks(self.loop.sample))
        edges = sorted(edges)
        return sum((b - a) * self.at((a + b) / 2) for a, b in zip(edges, edges[1:]) if b > a)

    @property
    def start(self) -> float:
        return self.at(0.0)

    @property
    def end(self) -> float:
        return self.at(1.0)

    def per_step(self, steps: int) -> list[float]:
        """Training FLOPs per token of each of `steps` optimizer steps, as the loop sets progress = s / steps."""
        return [self.at(s / steps) for s in range(steps)]

    def phases(self, steps: int) -> list[tuple[int, float]]:
        """`per_step(steps)` run-length encoded: (how many steps in a row, their training FLOPs per token),
        found in O(phases * log steps), never a list of every step. The cost changes only with the credit
        depth and a curriculum's count, which never fall as progress grows: a binary search finds where each
        phase ends."""
        out, first = [], 0
        while first < steps:
            phase = self._phase(first / steps)
            lo, hi = first + 1, steps  # the first step of another phase is in [lo, hi]; hi: none
            while lo < hi:
                mid = (lo + hi) // 2
                if self._phase(mid / steps) == phase:
                    lo = mid + 1
                else:
                    hi = mid
            out.append((lo - first, self.at(first / steps)))
            first = lo
        return out

    def summed(self, steps: int, upto: int | None = None) -> float:
        """sum(per_step(steps)[:upto]) in O(phases): the training FLOPs per token of a row, summed over the
        first `upto` (default all) of `steps` steps."""
        left, total = steps if upto is None else max(0, min(upto, steps)), 0.0
        for count, flops in self.phases(steps):
            total += min(count, left) * flops
            left -= min(count, left)
        return total


@dataclass(frozen=True)
class Estimate:
    spec: str
    params: int
    seq_len: int
    tokens: float
    flops_per_token: float  # the run's mean
    flops_per_token_start: float
    flops_per_token_end: float
    forward_flops_per_token: float
    flops: float
    gpu: str
    peak_tflops: float
    mfu: float
    gpus: int
    gpu_hours: float
    hours: float
    price: float  # dollars per GPU-hour
    dollars: float

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(spec: Spec, tokens: float, gpu: GPU, mfu: float = DEFAULT_MFU, gpus: int = 1,
             price: float | None = None, seq_len: int | None = None) -> Estimate:
    """The cost of training `spec` on `tokens` tokens with `gpus` GPUs of kind `gpu` at `mfu`."""
    run = RunFlops(spec, seq_len)
    flops = tokens * run.mean
    gpu_hours = flops / (gpu.bf16_tflops * 1e12 * mfu) / 3600
    price = gpu.dollars_per_hour if price is None else price
    return Estimate(spec.name, run.params, run.seq_len, tokens, run.mean, run.start, run.end, run.forward, flops,
                    gpu.key, gpu.bf16_tflops, mfu, gpus, gpu_hours, gpu_hours / gpus, price, gpu_hours * price)


def report(e: Estimate, gpu: GPU, credit: CreditSpec) -> list[tuple[str, str]]:
    """(quantity, value) rows of an estimate, for a table."""
    rows = [
        ("parameters", f"{e.params:,}"),
        ("sequence length (attention)", str(e.seq_len)),
        ("forward FLOPs per token", human(e.forward_flops_per_token)),
    ]
    if e.flops_per_token_start != e.flops_per_token_end:
        ramp = f"depth {credit.depth_from} -> {credit.depth_to} over the first {credit.warmup:.0%}"
        rows += [(f"training FLOPs per token at the start (depth {credit.depth_from})", human(e.flops_per_token_start)),
                 (f"training FLOPs per token after warmup (depth {credit.depth_to})", human(e.flops_per_token_end)),
                 (f"training FLOPs per token, run mean ({ramp})", human(e.flops_per_token))]
    else:
        rows.append(("training FLOPs per token", human(e.flops_per_token)))
    return rows + [
        ("tokens", f"{e.tokens:,.0f}"),
        ("training FLOPs", f"{e.flops:.3e}"),
        ("GPU", f"{gpu.name}: {e.peak_tflops:g} TFLOP/s bf16 dense, MFU {e.mfu:g}"),
        ("GPU-hours", _amount(e.gpu_hours)),
        (f"wall time on {e.gpus} GPU{'s' if e.gpus > 1 else ''}",
         f"{_amount(e.hours)} h ({e.hours / 24:,.2f} days)" if e.hours >= 1 else f"{_amount(e.hours * 60)} min"),
        ("cost", f"${_amount(e.dollars)} at ${e.price:g} per GPU-hour"),
    ]


def _amount(x: float) -> str:
    """1344.9 -> '1,345', 42.03 -> '42.0', 0.0123 -> '0.0123': three significant digits at least."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.3g}"


__all__ = ["DEFAULT_MFU", "GPUS", "GPU", "MAX_GPUS", "MAX_PRICE", "MAX_SEQ_LEN", "MAX_TOKENS", "MIN_MFU", "CostError",
           "Estimate", "RunFlops", "credit_phases", "estimate", "find_gpu", "parse_count", "parse_fraction",
           "parse_positive", "report", "seq_len_and_source", "training_seq_len"]
