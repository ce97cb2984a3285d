"""Adaptive depth at inference: each position leaves the schedule's loop when an exit criterion says so.

For a spec whose schedule has one top-level `repeat` (Huginn's core, a looped Transformer, RINS' A^r,
HRM's outer cycle), a forward runs the stages before the loop once, then the loop step by step; after
each step t a criterion compares what a position reads at steps t - 1 and t, and the position exits at
the first step where that change falls below the threshold, or at the cap T (the loop's evaluation count,
or `max_steps`). The stages after the loop then run once, on every position's state at its exit.

    kl:ε        KL(p_{t-1} || p_t) < ε       p_t the next-token distribution of the state after step t
    entropy:ε   |H(p_t) - H(p_{t-1})| < ε    (through the stages after the loop and the head)
    latent:ε    ||s_t - s_{t-1}|| / ||s_t|| < ε    s_t the states the loop assigns, side by side
    cosine:ε    1 - cos(s_t, s_{t-1}) < ε
    argmax:N    argmax p_t unchanged over the last N steps (N + 1 steps with the same argmax)
    none        never: every position runs the cap (full depth)

Step 1 has nothing to compare with, so the earliest exit is step 2 (argmax:N: step N + 1). The criteria
follow Huginn's exit evaluators (seal-rg/recurrent-pretraining), per position instead of per sequence;
the criteria that read p_t run the stages after the loop at every step, on the rows still running, with
the earlier positions' cached keys and values of those stages and nothing stored.

KV cache policy ("latest"): every loop step has its own slots (one per module call and attention op). A
position that exited at step k is computed no more; at every attention op of a call of a later step it
has the keys and values of the same op of the same call at step k, and the cache slots of steps k + 1..T
store those copies (Huginn's latest-available lookup; runtime/execution/driver.py's StepSlot). So
positions that exited at different depths share one cache, every later position attends to every earlier
one at any step, and with `none` the cache, the logits and the tokens equal `generate` at full depth.

Warm start: a decoded token's loop states start from the previous token's states at its exit step (for
the first token, the prompt's last position's) instead of their initial values; the states the loop does
not assign start as usual. It needs a loop that reads the input (x, or a state it does not assign), or a
warm-started token would never see its own input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hrmspec.capabilities import refusal
from hrmspec.errors import HrmspecError, close_match
from hrmspec.runtime.execution.driver import StepLoop, walk
from hrmspec.runtime.execution.stack import KVCache, KVSlot
from hrmspec.spec.schedule import MAX_CALLS, MAX_REPEAT


class AdaptiveError(HrmspecError):
    """An exit criterion that cannot be read, or a spec it cannot apply to."""


# ---------------------------------------------------------------------------------- criteria


class Criterion:
    """Whether each position exits after a step, from the change between what it reads at successive steps.
    `reads` is "latent" (the loop's states, (B, S, k d)), "logits" ((B, S, vocab)) or None (never exits)."""

    name = ""
    reads: str | None = "latent"
    default = 0.0  # Huginn's default threshold

    def __init__(self, threshold: float | None = None):
        self.threshold = self.default if threshold is None else threshold
        self.prev: torch.Tensor | None = None

    def __str__(self) -> str:
        return f"{self.name}:{self.threshold:g}"

    def start(self) -> None:
        """Forget the previous forward's readings."""
        self.prev = None

    def signal(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.float()

    def change(self, prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, raw: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) bool: the positions that exit after this step. `raw` holds the rows `rows` only (None: all);
        the other rows keep their last reading (they run no more)."""
        cur = self.signal(raw)
        if rows is not None:
            cur = self.prev.index_copy(0, rows, cur)
        stop = self.stops(self.prev, cur)
        self.prev = cur
        return stop

    def stops(self, prev: torch.Tensor | None, cur: torch.Tensor) -> torch.Tensor:
        """The change from the last step's reading is below the threshold (never at the first step)."""
        if prev is None:
            return torch.zeros(cur.shape[:2], dtype=torch.bool, device=cur.device)
        return self.change(prev, cur) < self.threshold


class KL(Criterion):
    name, reads, default = "kl", "logits", 1e-3

    def signal(self, raw):
        return F.log_softmax(raw.float(), dim=-1)

    def change(self, prev, cur):  # KL(p_{t-1} || p_t) of log-probabilities
        return (prev.exp() * (prev - cur)).sum(-1)


class Entropy(Criterion):
    name, reads, default = "entropy", "logits", 1e-3

    def signal(self, raw):
        log_p = F.log_softmax(raw.float(), dim=-1)
        return -(log_p.exp() * log_p).sum(-1)

    def change(self, prev, cur):
        return (cur - prev).abs()


class Latent(Criterion):
    name, default = "latent", 0.03

    def change(self, prev, cur):  # a state that stays at zero has converged too: 0 / tiny
        return (cur - prev).norm(dim=-1) / cur.norm(dim=-1).clamp_min(torch.finfo(cur.dtype).tiny)


class Cosine(Criterion):
    name, default = "cosine", 1e-3

    def change(self, prev, cur):
        return 1.0 - F.cosine_similarity(cur, prev, dim=-1)


class Argmax(Criterion):
    """Exit once the argmax has not changed over the last N steps."""

    name, reads, default = "argmax", "logits", 5

    def __str__(self) -> str:
        return f"argmax:{self.threshold}"

    def signal(self, raw):
        return raw.argmax(-1)

    def stops(self, prev, cur):
        self.count = torch.zeros_like(cur) if prev is None else torch.where(cur == prev, self.count + 1, 0)
        return self.count >= self.threshold


class Never(Criterion):
    """Full depth: every position runs the cap."""

    name, reads = "none", None

    def __str__(self) -> str:
        return "none"


CRITERIA: dict[str, type[Criterion]] = {c.name: c for c in (KL, Entropy, Latent, Cosine, Argmax, Never)}
EXAMPLE = "e.g. kl:1e-3, entropy:1e-3, latent:0.03, cosine:1e-3, argmax:5 or none"


def parse_exit(text: str | Criterion) -> Criterion:
    """A criterion from its text, NAME[:THRESHOLD] (the threshold defaults to Huginn's); see the module docstring."""
    if isinstance(text, Criterion):
        return text
    name, _, value = str(text).strip().partition(":")
    name = name.strip().lower()
    if name not in CRITERIA:
        hint = close_match(name, CRITERIA) or EXAMPLE
        raise AdaptiveError(f"--exit {str(text)[:40]!r}: unknown criterion {name[:20]!r}; expected one of "
                            f"{', '.join(CRITERIA)} ({hint})")
    kind = CRITERIA[name]
    if kind is Never:
        if value:
            raise AdaptiveError(f"--exit {str(text)[:40]!r}: 'none' takes no threshold")
        return Never()
    if not value.strip():
        return kind()
    if kind is Argmax:
        digits = value.strip()
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 9 or not 1 <= int(digits) <= MAX_REPEAT:
            raise AdaptiveError(f"--exit {str(text)[:40]!r}: argmax takes a number of steps from 1 to {MAX_REPEAT}, "
                                "e.g. argmax:5")
        return Argmax(int(value))
    try:
        threshold = float(value)
    except ValueError:
        threshold = float("nan")
    if not (0.0 < threshold < math.inf):
        raise AdaptiveError(f"--exit {str(text)[:40]!r}: expected a threshold > 0 after '{name}:', "
                            f"e.g. {name}:{kind.default:g}")
    return kind(threshold)


# ---------------------------------------------------------------------------------- the loop


def loop_stages(model, count: int | None = None):
    """The plan's loop layout (hrmspec/graph/layout.py) with the loop run `count` times (default: its
    evaluation count); an AdaptiveError saying why a spec does not fit."""
    spec = model.spec
    check_loop(spec)
    layout = model.plan.layout
    count = layout.repeat.count if count is None else count
    if not 1 <= count <= MAX_REPEAT:
        raise AdaptiveError(f"--max-steps {count}: expected 1 to {MAX_REPEAT} steps of the loop")
    total = len(layout.calls) + (count - layout.count) * layout.per_step
    if total > MAX_CALLS:
        raise AdaptiveError(f"--max-steps {count}: {spec.name}'s schedule would make {total:,} module calls, "
                            f"more than {MAX_CALLS:,}; lower --max-steps")
    return model.plan.layout_at(count)[0]


def check_loop(spec) -> None:
    """An AdaptiveError saying why the exit driver cannot run a spec, if it cannot (hrmspec/capabilities.py)."""
    refuse = refusal(spec, "exit")
    if refuse:
        raise AdaptiveError(f"{spec.name}: {refuse}")


# ---------------------------------------------------------------------------------- the forward


class _PeekSlot(KVSlot):
    """A slot of a stage after the loop while a criterion reads the logits mid-loop: the cached keys and
    values of earlier positions (of the rows computed) with these appended, stored nowhere."""

    def __init__(self, inner: KVSlot, loop: StepLoop):
        super().__init__()
        self.inner, self.loop = inner, loop

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inner.k is None:
            return k, v
        pick = self.loop.pick
        return torch.cat([pick(self.inner.k), k], dim=2), torch.cat([pick(self.inner.v), v], dim=2)


class CriterionRule:
    """An exit criterion as the driver's stop rule: after each step but the last, the positions whose change
    fell below the threshold stop; all stop after the last. Before the loop it applies a warm start, after
    it keeps the last position's loop states for the next token's."""

    def __init__(self, depth: AdaptiveDepth, cache: KVCache | None, warm: dict[str, torch.Tensor] | None):
        self.depth, self.cache, self.warm = depth, cache, warm

    def start(self, loop: StepLoop) -> None:
        self.depth.criterion.start()
        if self.warm is not None:
            loop.z.update(self.warm)

    def after(self, t: int, loop: StepLoop) -> torch.Tensor:
        crit, layout = self.depth.criterion, self.depth.stages
        if t == layout.count:
            return loop.running
        if crit.reads is None:
            return torch.zeros_like(loop.running)
        if crit.reads == "logits":
            return crit.step(self.peek(loop), loop.rows)
        return crit.step(torch.cat([loop.z[s] for s in layout.states], dim=-1))  # (B, S, k d)

    def end(self, loop: StepLoop) -> None:
        if self.depth.warm_start:
            self.depth.warm = {s: loop.z[s][:, -1:] for s in self.depth.stages.states}

    def peek(self, loop: StepLoop) -> torch.Tensor:
        """(rows, S, vocab): the logits the computed rows would have if they exited now."""
        model = self.depth.model
        seen = {name: loop.pick(t) for name, t in loop.z.items()}
        for call in self.depth.stages.after:
            slots = None if self.cache is None else [_PeekSlot(s, loop) for s in self.cache.slots[call.index]]
            seen[call.target] = model.stacks[call.module]([seen[n] for n in call.inputs], loop.ctx, slots)
        return model.logits_of(seen[model.spec.model.output])


@dataclass
class DepthOutput:
    """What a forward with exits returns (the fields of a ModelOutput it has)."""

    logits: torch.Tensor  # (B, S, vocab)
    steps: torch.Tensor  # (B, S) int: the loop's steps each position ran, its exit step
    hidden: torch.Tensor  # (B, S, d): the output state
    states: dict[str, torch.Tensor]  # every state after the schedule (the loop's at each position's exit)


class AdaptiveDepth:
    """A model's forward with an exit per position from its loop (see the module docstring):
    `AdaptiveDepth(model, "kl:1e-3")(ids, prefix_mask=..., cache=...)` returns a DepthOutput whose `steps`
    (B, S) are the steps each position ran. `generate(..., exit=...)` decodes with it."""

    def __init__(self, model, exit: str | Criterion, max_steps: int | None = None, warm_start: bool = False,
                 init_scale: float = 1.0):
        self.model, self.criterion = model, parse_exit(exit)
        self.stages = loop_stages(model, max_steps if max_steps is not None else model.recurrence)
        if warm_start and not self.stages.injects:
            raise AdaptiveError(
                f"--warm-start: {model.spec.name}'s loop reads only the states it assigns "
                f"({', '.join(self.stages.states)}), so a token started from the previous token's states would "
                "never see its own input; warm start needs a loop that reads x or a state it does not assign")
        self.warm_start, self.init_scale = warm_start, init_scale
        self.warm: dict[str, torch.Tensor] | None = None  # the last position's loop states at its exit

    @property
    def max_steps(self) -> int:
        return self.stages.count

    def new_cache(self) -> KVCache:
        """An empty KV cache: one slot per attention op of every call, each loop step its own."""
        return KVCache([self.model.stacks[c.module].attention_ops for c in self.stages.calls])

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, prefix_mask: torch.Tensor | None = None,
                 cache: KVCache | None = None, doc_ids: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, last_only: bool = False) -> DepthOutput:
        """`doc_ids` and `position_ids` as for the model's forward (with a cache, `doc_ids` covers the cached
        keys too: (B, past + S)). `last_only`: the logits of the last position only, (B, 1, vocab)."""
        model, stages = self.model, self.stages
        S = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        if self.warm_start and cache is None:
            raise ValueError("a warm start carries the loop's states from token to token: decode with a KV cache")
        warm = None
        if self.warm_start and past:
            if self.warm is None or S != 1:
                raise ValueError("a warm start decodes one token at a time after a prompt of the same forward")
            warm = self.warm
        z, ctx, rows_ctx = model.begin(input_ids, prefix_mask, doc_ids, position_ids, init_scale=self.init_scale,
                                       past=past)
        flags = [False] * len(stages.calls)  # no gradient at inference
        steps = walk(model, stages, flags, z, ctx, CriterionRule(self, cache, warm), cache, rows_ctx)
        hidden = z[model.spec.model.output]
        logits = model.logits_of(hidden[:, -1:] if last_only else hidden)
        return DepthOutput(logits, steps, hidden, {s.name: z[s.name] for s in model.spec.model.states})


__all__ = ["CRITERIA", "AdaptiveDepth", "AdaptiveError", "Criterion", "CriterionRule", "DepthOutput", "check_loop",
           "loop_stages", "parse_exit"]
