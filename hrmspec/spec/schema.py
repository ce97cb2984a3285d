"""The typed, immutable form of a spec. Knows nothing of torch.

A `Spec` is what `load_spec` returns after validation: every default filled in, every module's
block resolved (the shared `model.block` with the module's own overrides applied), the schedule
parsed into `Repeat`/`Statement` trees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from hrmspec.halting import HALTING
from hrmspec.spec.grammar import INPUT, Statement

NormPlace = Literal["pre", "post", "sandwich", "pre_post"]
MaskKind = Literal["causal", "prefix_lm", "bidirectional"]


@dataclass(frozen=True)
class NormSpec:
    type: str = "rms"  # a kind of hrmspec.kinds.NORMS: rms, or expr (the norm written as a row expression)
    eps: float = 1e-6
    affine: bool = False  # learnable per-channel weights of the kind (an expr norm declares its own `params`)
    # pre: x + f(norm(x)); post: norm(x + f(x)); sandwich: x + norm(f(norm(x))); pre_post: norm(x + f(norm(x)))
    # (Huginn's SandwichBlock)
    place: NormPlace = "pre"
    # type expr: the text, e.g. "x * rsqrt(mean(x*x) + eps) * (1 + w)", checked against the Kernel IR at load
    expr: str | None = None
    # type expr: the learnable per-channel vectors the text names, (name, init) with init zeros | ones | normal
    params: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class AttentionSpec:
    """The sublayer that mixes positions. gated: sigmoid(W_g x) * attention(x), per channel; plain:
    attention(x); token_mlp: TRM's `mlp_t`, a gated MLP (the block's `mlp` kind) applied across the
    sequence axis, for fixed-length rows (rope, mask and bias do not apply)."""

    type: str = "gated"  # an attention kind of hrmspec/capabilities.py: gated, plain, token_mlp
    rope_theta: float | None = 10000.0  # None: no rotary embedding
    mask: MaskKind = "prefix_lm"
    bias: bool = False
    qk_bias: bool = False  # a learned bias on q and k only, before the rotary embedding (Huginn); in `bias`
    ffn: int = 0  # token_mlp: the hidden width over the sequence axis (set by the loader)


@dataclass(frozen=True)
class BlockSpec:
    """One layer: attention then MLP, each wrapped in residual + norm per `norm.place`."""

    norm: NormSpec
    attention: AttentionSpec
    mlp: str  # a kind of hrmspec.kinds.MLPS: swiglu, gelu
    ffn: int  # hidden width of the MLP


@dataclass(frozen=True)
class ModuleSpec:
    name: str
    layers: int
    exit_norm: NormSpec | None  # MagicNorm caps every module call with a norm (an RMSNorm); None: no exit norm
    block: BlockSpec
    # how a call's states enter: summed (add), or concatenated and mapped back to d_model by the module's
    # learned `adapter` (cat: Huginn's injection; every call of the module then concatenates `inject_arity`)
    inject: Literal["add", "cat"] = "add"
    inject_arity: int = 0


@dataclass(frozen=True)
class StateSpec:
    name: str
    # embed: the scaled token embedding; buffer: a fixed random vector (not trained);
    # zeros: a zero vector; learned: a trained vector; random: drawn afresh at every forward
    # (truncated normal at 3 std, per position: Huginn's initial state)
    init: Literal["embed", "buffer", "zeros", "learned", "random"]
    std: float = 1.0  # random: the standard deviation of the draw


@dataclass(frozen=True)
class SampleSpec:
    """A repeat count drawn per optimizer step in training (the same on every rank).
    lognormal_poisson (Huginn): rate ~ LogNormal(ln mean - sigma^2 / 2, sigma), count = Poisson(rate) + 1,
    so E[count] = mean + 1; uniform: count uniform in [low, high]. Both capped at `max`."""

    kind: Literal["lognormal_poisson", "uniform"]
    mean: float = 0.0  # lognormal_poisson
    sigma: float = 0.5  # lognormal_poisson
    low: int = 1  # uniform
    high: int = 1  # uniform
    max: int = 4096  # no draw exceeds it
    # a recurrence curriculum: the mean (lognormal_poisson) or `high` (uniform) rises from 1 to its value over
    # the first `over` of training, as `schedule` says (hrmspec.spec.schedule.sample_at); None: fixed
    curriculum: Curriculum | None = None


@dataclass(frozen=True)
class Curriculum:
    """How a sampled loop's mean count is raised during training (the retrofitted-recurrence recipe):
    at progress p it is ceil(m * w(min(p / over, 1))) (at least 1), m the full value, w(x) = x (linear) or
    1 - sqrt(1 - x) (1-sqrt: slow at first)."""

    schedule: Literal["linear", "1-sqrt"] = "linear"
    over: float = 0.25  # the fraction of training the rise takes


@dataclass(frozen=True)
class Repeat:
    count: int  # fixed; with `sample`, the count at evaluation (and the one `show` prices by default)
    body: tuple[Repeat | Statement, ...]
    sample: SampleSpec | None = None  # drawn per training step instead of `count`


@dataclass(frozen=True)
class CreditSpec:
    """Which module calls carry gradient (the rest run under no-grad). See hrmspec.graph.credit_plan."""

    mode: Literal["none", "depth", "last", "last_cycle", "per_cycle", "truncate"] = "none"
    depth_from: int = 2
    depth_to: int = 5
    warmup: float = 0.2  # fraction of total training steps over which depth ramps from..to
    priority: tuple[str, ...] = ()
    last: int = 0
    per_cycle: tuple[tuple[str, tuple[int, ...]], ...] = ()  # module -> trailing grad calls per outer cycle
    truncate: int = 0  # truncated backprop: the last k iterations of the outermost repeat (and every call outside it)


@dataclass(frozen=True)
class InitSpec:
    type: Literal["lecun_normal", "normal"] = "lecun_normal"
    std: float = 0.02  # used by `normal`


@dataclass(frozen=True)
class ModelSpec:
    vocab: int
    d_model: int
    heads: int
    head_dim: int
    block: BlockSpec
    modules: tuple[ModuleSpec, ...]
    states: tuple[StateSpec, ...]
    schedule: tuple[Repeat | Statement, ...]
    output: str
    head: Literal["tied", "untied"]
    embed_scale: float
    init: InitSpec
    credit: CreditSpec
    max_seq_len: int = 2048
    # an extra norm before the head (off for MagicNorm models, where the exit norm serves)
    final_norm: NormSpec | None = None
    puzzle: PuzzleSpec | None = None  # learned per-puzzle vectors in front of the tokens (HRM, TRM)
    positions: Literal["none", "learned"] = "none"  # learned: a position table added to the embedding
    halting: StepHaltingSpec | None = None  # halting per iteration of the schedule's loop (act, exit_gate, ponder)

    def module(self, name: str) -> ModuleSpec:
        return next(m for m in self.modules if m.name == name)

    def state(self, name: str) -> StateSpec:
        return next(s for s in self.states if s.name == name)


@dataclass(frozen=True)
class PuzzleSpec:
    """HRM's and TRM's puzzle embeddings: a learned vector per puzzle identifier (zero at init), laid
    over `positions` prefix positions in front of the tokens (zero-padded to positions x d_model)."""

    identifiers: int  # how many puzzle identifiers the table holds
    dim: int  # the width of one puzzle's vector (d_model by default)
    positions: int  # prefix positions (ceil(dim / d_model) by default)


@dataclass(frozen=True)
class ObjectiveSpec:
    # task_completion: loss on response tokens (the last instruction token predicts the first
    # response token); lm: loss on every next token; grid: every position predicts its own label
    # (inputs and labels of one length: puzzles laid out as grids)
    type: Literal["task_completion", "lm", "grid"] = "task_completion"
    loss: Literal["softmax", "stablemax"] = "softmax"  # stablemax: HRM's s(x) = x + 1 | 1 / (1 - x), in fp64
    # the loss over the iterations ("steps") of the schedule's loop: last: the output's (the halting-weighted
    # state under act); sum: the sum of every step's; expected: the expectation under the exit distribution
    steps: Literal["last", "sum", "expected"] = "last"


@dataclass(frozen=True)
class HaltingSpec:
    """When a sample stops being supervised over segments (HRM's and TRM's ACT heads): a 2-logit head
    (q_halt, q_continue) on the first position of the output state, zero weights and bias -5 at init."""

    # a segment rule of hrmspec/halting.py: q_learning (halt when q_halt > q_continue, HRM), bce (q_halt > 0, TRM)
    type: str
    exploration: float = 0.1  # in training, the probability of a random minimum of segments in 2..segments
    weight: float = 0.5  # of the halting losses beside the token loss


@dataclass(frozen=True)
class StepHaltingSpec:
    """Halting inside one forward, per iteration ("step") of the schedule's outermost loop: a one-logit
    head on each position's output state after every step (zero weights, bias -log(steps - 1) at init).
    The rules and their parameters: hrmspec/halting.py; what they compute: runtime/execution/rules.py."""

    type: str  # a step rule of hrmspec/halting.py: act, exit_gate, ponder
    # the cumulative probability at which a position stops: act's 1 - epsilon (0.99); exit_gate's and
    # ponder's: the first step whose cumulative exit (halting) probability reaches it (0.5)
    threshold: float
    # of the halting term in the loss: act's tau (x the ponder cost); exit_gate's beta (x the exit
    # distribution's entropy, subtracted); ponder's beta (x KL to the geometric prior)
    weight: float
    values: tuple[tuple[str, float], ...] = ()  # every parameter of the rule, threshold and weight too

    def value(self, name: str) -> float:
        """A parameter of the rule (its default when the spec did not set it)."""
        return dict(self.values).get(name, HALTING[self.type].defaults().get(name))


@dataclass(frozen=True)
class SupervisionSpec:
    """Deep supervision: the schedule is one segment; a sample runs up to `segments` of them, its
    states carried from one to the next detached, each segment's output supervised (one optimizer
    step per segment in training)."""

    segments: int
    halting: HaltingSpec | None = None  # None: every sample runs all segments


@dataclass(frozen=True)
class Spec:
    name: str
    model: ModelSpec
    objective: ObjectiveSpec
    supervision: SupervisionSpec | None = None  # None: one pass of the schedule per step
    train: dict = field(default_factory=dict)  # validated by the training loop
    data: dict = field(default_factory=dict)  # validated by the data pipeline
    eval: dict = field(default_factory=dict)
    source: str = field(default="<memory>", compare=False)  # the file it was loaded from
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the resolved document


def swiglu_width(d_model: int, expansion: float) -> int:
    """SwiGLU width matching a plain MLP of `expansion`: 2/3 of it, rounded up to a multiple of 256."""
    return math.ceil(round(expansion * d_model * 2 / 3) / 256) * 256


def lecun_std(fan_in: int) -> float:
    return 1.0 / math.sqrt(fan_in)


__all__ = [
    "INPUT",
    "AttentionSpec",
    "BlockSpec",
    "CreditSpec",
    "InitSpec",
    "ModelSpec",
    "HaltingSpec",
    "ModuleSpec",
    "NormSpec",
    "ObjectiveSpec",
    "PuzzleSpec",
    "Repeat",
    "SampleSpec",
    "Spec",
    "StateSpec",
    "Statement",
    "StepHaltingSpec",
    "SupervisionSpec",
]
