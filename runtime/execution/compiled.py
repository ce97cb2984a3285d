"""CompiledModel: the torch.nn.Module a spec compiles to.

The forward pass is the unrolled schedule of the plan `hrmspec.compile` built:

    x   = embed(input_ids) * embed_scale                       # (B, S, d)
    z   = {state: its initial value}                           # e.g. z_H = x, z_L = buffer
    for call in calls:                                         # e.g. L, L, L, H, L, L, L, H
        with grad enabled only if the credit plan says so:
            z[call.target] = stacks[call.module](z[i] for i in call.inputs)   # summed inside
    logits = head(final_norm(z[output]))                       # or, training, only the loss:
    loss   = linear_cross_entropy(z[output], head weight, labels)  # in row chunks, no full logits

Calls outside the credit plan run under no-grad: they keep no activations and gradient stops at
their outputs, so training memory grows with the credit depth, not with the number of cycles.
Each module is a `ModuleStack` holding the parameters its body declares (runtime/execution/stack.py).

The schedule is walked by the one driver (runtime/execution/driver.py) along the plan's loop layout.
A spec with `model.halting` (act, exit_gate, ponder) or `objective.steps: sum` walks its loop with the
stop rule of its halting (runtime/execution/rules.py): a per-step head decides where each position
stops, and the head reads (or the loss scores) what that rule says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import torch
from torch import nn

from hrmspec.capabilities import refusal
from hrmspec.mask import Mask
from hrmspec.runtime.execution.context import Context
from hrmspec.runtime.execution.driver import context_of, walk
from hrmspec.runtime.execution.generate import generate
from hrmspec.runtime.execution.losses import IGNORE_INDEX, token_losses
from hrmspec.runtime.execution.rules import step_rule
from hrmspec.runtime.execution.stack import KVCache, ModuleStack, register_at
from hrmspec.spec.grammar import INPUT
from hrmspec.spec.schedule import sampled_loop
from hrmspec.spec.schema import lecun_std


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, S, vocab); None when called with return_logits=False
    loss: torch.Tensor | None = None  # mean over counted label tokens
    loss_sum: torch.Tensor | None = None  # sum over counted tokens (for distributed averaging)
    n_tokens: torch.Tensor | None = None  # number of counted label tokens
    states: dict[str, torch.Tensor] | None = None  # every state after the schedule (B, P + S, d): a segment's carry
    hidden: torch.Tensor | None = None  # the output state (B, P + S, d), puzzle positions included
    q_logits: torch.Tensor | None = None  # (B, 2) fp32 (q_halt, q_continue) of the halting head, if the spec has one
    # a spec with model.halting or a per-step loss (runtime/execution/rules.py):
    steps: torch.Tensor | None = None  # (B, P + S) int: the loop's steps each position ran
    step_weights: torch.Tensor | None = None  # (B, P + S, T) fp32: each step's weight in the output (or loss)
    ponder: torch.Tensor | None = None  # act: the mean ponder cost N + R over the counted positions


@dataclass
class LoopResult:
    """What a stop rule leaves after walking the loop (runtime/execution/rules.py: `finish`)."""

    hidden: torch.Tensor  # (B, N, d): what the head reads (act's mixture, the exit step's state, the last state)
    steps: torch.Tensor  # (B, N) int: the steps each position ran
    weights: torch.Tensor  # (B, N, T) fp32: each step's weight in the output (an exit distribution in training)
    loss_sum: torch.Tensor | None = None  # per-step losses (an exit distribution, steps: sum) over counted tokens
    n_tokens: torch.Tensor | None = None
    extra_loss: torch.Tensor | None = None  # act: weight x the ponder cost summed over counted positions
    ponder: torch.Tensor | None = None  # act: the mean ponder cost N + R (detached)


class CompiledModel(nn.Module):
    """A spec compiled for one backend. `model(input_ids, ...)` returns a ModelOutput.

    `plan` is the `hrmspec.graph.plan.ExecutionPlan` `hrmspec.compile` builds, `ops` the backend's
    op table, `graph` the ModelGraph the plan was built from (what `hrmspec show` prints)."""

    def __init__(self, plan, ops, graph: nx.DiGraph | None = None, backend: str = "reference"):
        super().__init__()
        spec = plan.spec
        m = spec.model
        self.spec, self.plan, self.ops, self.backend, self.graph = spec, plan, ops, backend, graph
        self.calls = plan.calls
        self.embed = nn.Embedding(m.vocab, m.d_model)
        self.embed_scale = m.embed_scale
        self.stacks = nn.ModuleDict({
            mod.name: ModuleStack(mod.name, plan.params[mod.name],
                                  {arity: b for (name, arity), b in plan.bodies.items() if name == mod.name}, ops)
            for mod in m.modules
        })
        self.state_params = nn.ParameterDict()
        for s in m.states:
            if s.init in ("buffer", "zeros"):
                self.register_buffer(f"init_{s.name}", torch.zeros(m.d_model))
            elif s.init == "learned":
                self.state_params[s.name] = nn.Parameter(torch.zeros(m.d_model))
        # the norm before the head: its weights (if any) at the top level, final_norm.weight
        self._final = {p.path: register_at(self, p.path, nn.Parameter(torch.empty(p.shape)))
                       for p in (plan.final_norm.params if plan.final_norm is not None else ())}
        self.head = nn.Linear(m.d_model, m.vocab, bias=False) if m.head == "untied" else None
        self.prefix_len = m.puzzle.positions if m.puzzle is not None else 0  # P puzzle positions before the tokens
        if m.puzzle is not None:  # one learned vector per puzzle identifier, zero at init
            self.puzzle = nn.Embedding(m.puzzle.identifiers, m.puzzle.dim)
        if m.positions == "learned":
            self.positions = nn.Embedding(m.max_seq_len + self.prefix_len, m.d_model)
        sup = spec.supervision
        if sup is not None and sup.halting is not None:  # (q_halt, q_continue) from the first position
            self.halting = nn.Linear(m.d_model, 2)
        # the forward walks its loop step by step under a stop rule: it halts per step or scores every step
        self.stepwise = m.halting is not None or spec.objective.steps == "sum"
        self.decode_refusal = refusal(spec, "decode")  # why it cannot decode with a KV cache ('' when it can)
        if m.halting is not None:  # act's halting probability, the exit gate or ponder's, per position and step
            self.step_head = nn.Linear(m.d_model, 1)
        self.recurrence: int | None = None  # a sampled loop's count (None: its evaluation count); set_recurrence
        self._at_count: dict[int, tuple] = {}
        self.set_progress(1.0)
        self.reset_parameters()

    # ------------------------------------------------------------------ credit plan

    def set_progress(self, progress: float) -> None:
        """Move the credit plan to a training progress in [0, 1]."""
        self.progress = float(progress)
        self.grad_flags = self.plan.credit.flags(self.progress)

    @property
    def credit_depth(self) -> int | None:
        return self.plan.credit.depth(self.progress)

    def set_recurrence(self, count: int | None) -> None:
        """Run the schedule's sampled loop `count` times from now on (the trainer draws it per step;
        None: the spec's evaluation count). Only for a schedule with a sampled repeat."""
        if count is not None and sampled_loop(self.spec.model.schedule) is None:
            raise ValueError(f"{self.spec.name} has no sampled repeat: its loop counts are fixed")
        self.recurrence = count

    def layout_at(self, count: int | None) -> tuple:
        """The loop layout and the calls' grad flags with the loop run `count` times (None: the plan's)."""
        if count is None:
            return self.plan.layout, self.grad_flags
        if count not in self._at_count:
            if len(self._at_count) > 64:  # counts are drawn per step: keep the plans of a few
                self._at_count.clear()
            self._at_count[count] = self.plan.layout_at(count)
        layout, credit = self._at_count[count]
        return layout, credit.flags(self.progress)

    def schedule_at(self, count: int | None) -> tuple[tuple, list[bool]]:
        """The calls and their grad flags with the loop run `count` times (None: the plan's)."""
        layout, flags = self.layout_at(count)
        return layout.calls, flags

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Truncated normal init (at 2 std): matmul weights LeCun (std 1/sqrt(fan_in)) or a fixed std,
        the other parameters as their op declares (norm weights ones, biases zeros, ...)."""
        m = self.spec.model
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def tn(t: torch.Tensor, std: float) -> None:
            t.copy_(torch.nn.init.trunc_normal_(torch.empty_like(t), 0.0, std, -2 * std, 2 * std, generator=gen))

        def std_of(fan_in: int) -> float:
            return lecun_std(fan_in) if m.init.type == "lecun_normal" else m.init.std

        tn(self.embed.weight, std_of(m.d_model))
        if self.head is not None:
            tn(self.head.weight, std_of(m.d_model))
        if hasattr(self, "positions"):
            tn(self.positions.weight, std_of(m.d_model))
        if hasattr(self, "puzzle"):
            self.puzzle.weight.zero_()
        if hasattr(self, "halting"):  # halting starts almost never: q logits of -5 (HRM, TRM)
            self.halting.weight.zero_()
            self.halting.bias.fill_(-5.0)
        if hasattr(self, "step_head"):  # p (act) or lambda (exit gate) 1 / T at every step and position
            self.step_head.weight.zero_()
            self.step_head.bias.fill_(-math.log(self.plan.layout.count - 1))
        declared = [(stack.weight(p.path), p) for stack in self.stacks.values() for p in stack.param_specs]
        if self.plan.final_norm is not None:
            declared += [(self.final_weight(p.path), p) for p in self.plan.final_norm.params]
        for t, p in declared:  # matmul weights first, in the order the ops come
            if p.init == "fan_in":
                tn(t, std_of(p.fan_in))
        for t, p in declared:
            if p.init == "normal":
                tn(t, 0.02)
            elif p.init in ("zeros", "ones"):
                t.fill_(1.0 if p.init == "ones" else 0.0)
        for s in m.states:
            if s.init == "buffer":
                tn(getattr(self, f"init_{s.name}"), 1.0)
            elif s.init == "learned":
                tn(self.state_params[s.name], 1.0)

    # ------------------------------------------------------------------ forward

    def context(self, B: int, S: int, prefix_mask, doc_ids, position_ids, past: int = 0) -> Context:
        """Masks and rotary tables for this batch, built once and shared by every call."""
        m, device = self.spec.model, self.embed.weight.device
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=device).expand(B, S)
        if past:  # decoding with a cache: queries are positions past.. and come after every cached key; only
            prefix_mask = None  # documents still apply (doc_ids (B, past + S): -1 on a left-padded prompt's padding)
        prefix = None if prefix_mask is None else prefix_mask.to(device=device, dtype=torch.bool)
        doc = None if doc_ids is None else doc_ids.to(device)
        kinds = {mod.block.attention.mask for mod in m.modules}
        masks = {kind: Mask(kind, prefix, doc, q_offset=past) for kind in kinds}
        dtype = self.embed.weight.dtype
        rope = {}
        for theta in {mod.block.attention.rope_theta for mod in m.modules} - {None}:
            rope[theta] = self.ops.rope_tables(position_ids, m.head_dim, theta, dtype)
        return Context(mask=masks, rope=rope)

    def embed_inputs(self, input_ids: torch.Tensor, puzzle_ids: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, P + S, d): the puzzle vectors (zero-padded to P x d) in front of the token embeddings,
        plus the learned positions at `position_ids` (B, P + S) (default 0, 1, ...; both scaled by
        1/sqrt(2), which keeps the variance), times embed_scale."""
        m = self.spec.model
        x = self.embed(input_ids)
        if self.prefix_len:
            if puzzle_ids is None:
                raise ValueError(f"{self.spec.name} puts puzzle vectors in front of the tokens: give puzzle_ids (B,)")
            p = self.puzzle(puzzle_ids).to(x.dtype)  # (B, dim)
            p = torch.nn.functional.pad(p, (0, self.prefix_len * m.d_model - p.shape[-1]))
            x = torch.cat([p.view(-1, self.prefix_len, m.d_model), x], dim=1)
        if m.positions == "learned":
            table = self.positions.weight.to(x.dtype)
            x = 0.707106781 * (x + (table[: x.shape[1]] if position_ids is None else table[position_ids]))
        return x * self.embed_scale

    def initial_states(self, x: torch.Tensor, init_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Every state's value before the schedule, for input embeddings x (B, P + S, d). A random state
        is drawn afresh, truncated normal at 3 std with std `s.std * init_scale` (0: zeros)."""
        z = {}
        drawn = self.random_states(x, init_scale)
        for s in self.spec.model.states:
            if s.init == "embed":
                z[s.name] = x
            elif s.init == "random":
                z[s.name] = drawn[s.name]
            elif s.init == "learned":
                z[s.name] = self.state_params[s.name].to(x.dtype).expand_as(x)
            else:
                z[s.name] = getattr(self, f"init_{s.name}").to(x.dtype).expand_as(x)
        return z

    def random_states(self, x: torch.Tensor, init_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """The states drawn at random (`init: random`), shaped and typed as x, in the spec's order: what
        `initial_states` draws, and what the compiled decode step takes drawn outside its program."""
        z = {}
        for s in self.spec.model.states:
            if s.init == "random":
                std = s.std * init_scale
                z[s.name] = torch.zeros_like(x)
                if std > 0:
                    torch.nn.init.trunc_normal_(z[s.name], 0.0, std, -3 * std, 3 * std)
        return z

    def forward(
        self,
        input_ids: torch.Tensor,
        prefix_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_logits: bool = True,
        puzzle_ids: torch.Tensor | None = None,
        states: dict[str, torch.Tensor] | None = None,
        all_steps: bool = False,
        threshold: float | None = None,
        num_steps: int | None = None,
        init_scale: float = 1.0,
    ) -> ModelOutput:
        """`labels[b, t]` is the token position t should predict (-100: not counted). With labels
        and `return_logits=False` (training) the loss is taken by the backend's chunked
        linear + cross-entropy: the (B, S, vocab) logits never exist at once. `states` starts the
        schedule from given values (a segment's carry) instead of the states' initial ones;
        `puzzle_ids` (B,) pick the puzzle vectors of a spec with `model.puzzle`. With `model.halting`,
        `all_steps` runs every step of the loop without halting and `threshold` replaces the spec's.
        `num_steps` runs a sampled loop that many times (default: `set_recurrence`'s count, else the
        spec's evaluation count); `init_scale` scales the draw of random initial states (0: zeros)."""
        m = self.spec.model
        past = cache.length if cache is not None else 0
        if cache is not None and self.decode_refusal:
            raise ValueError(f"{self.spec.name}: {self.decode_refusal}")
        z, ctx, rows_ctx = self.begin(input_ids, prefix_mask, doc_ids, position_ids, puzzle_ids, states,
                                      init_scale, past)
        layout, flags = self.layout_at(num_steps if num_steps is not None else self.recurrence)
        if cache is not None and len(cache.slots) != len(layout.calls):
            raise ValueError(f"the KV cache holds {len(cache.slots)} calls, this forward makes {len(layout.calls)}: "
                             "make it with new_cache(num_steps) for the same count")
        if self.stepwise:  # halting per step of the loop, or a loss over every step
            rule = step_rule(self, z[m.output], labels, layout.count, all_steps, threshold)
            steps = walk(self, layout, flags, z, ctx, rule, cache, rows_ctx)
            res = LoopResult(z[m.output], steps, rule.weights)
            rule.finish(res)
            hidden = res.hidden
            if res.loss_sum is None:
                out = self.head_output(hidden, labels, return_logits)
            else:
                logits = self.logits_of(hidden[:, self.prefix_len:]) if return_logits else None
                out = ModelOutput(logits=logits, loss_sum=res.loss_sum, n_tokens=res.n_tokens)
            if res.extra_loss is not None:
                out.loss_sum = out.loss_sum + res.extra_loss
            out.steps, out.step_weights, out.ponder = res.steps, res.weights, res.ponder
        else:
            walk(self, layout, flags, z, ctx, cache=cache)
            hidden = z[m.output]
            out = self.head_output(hidden, labels, return_logits)
        if labels is not None:
            out.loss = out.loss_sum / out.n_tokens.clamp(min=1)
        out.states = {s.name: z[s.name] for s in m.states}
        out.hidden = hidden
        if hasattr(self, "halting"):  # in the forward: a data-parallel wrapper sees the head's weights used
            out.q_logits = self.halting_logits(hidden)
        return out

    def begin(self, input_ids: torch.Tensor, prefix_mask=None, doc_ids=None, position_ids=None, puzzle_ids=None,
              states: dict[str, torch.Tensor] | None = None, init_scale: float = 1.0, past: int = 0):
        """What every walk of the schedule starts from: (z, ctx, context_of) — the states before the first
        call (the input x under 'x', each state's initial value or the given `states`), the batch's masks and
        rotary tables, and how to make those of a subset of rows (what the driver needs once some stop).
        The puzzle positions of a spec with `model.puzzle` join the instruction and the row's first document."""
        B, S = input_ids.shape
        P = self.prefix_len
        if P:
            prefix_mask = None if prefix_mask is None else torch.cat(
                [torch.ones_like(prefix_mask[:, :1]).expand(B, P), prefix_mask], 1)
            doc_ids = None if doc_ids is None else torch.cat([doc_ids[:, :1].expand(B, P), doc_ids], 1)
            position_ids = None if position_ids is None else torch.cat(
                [torch.arange(P, device=position_ids.device).expand(B, P), position_ids + P], 1)
        ctx = self.context(B, P + S, prefix_mask, doc_ids, position_ids, past)
        rows_ctx = context_of(self, P + S, past, prefix_mask, doc_ids, position_ids)
        if position_ids is None and past:  # decoding with a cache: these tokens come after the cached ones
            position_ids = torch.arange(past, past + S, device=input_ids.device).expand(B, S)
        x = self.embed_inputs(input_ids, puzzle_ids, position_ids)  # (B, P + S, d)
        z = {INPUT: x, **self.initial_states(x, init_scale), **(states or {})}
        return z, ctx, rows_ctx

    def head_output(self, hidden: torch.Tensor, labels: torch.Tensor | None, return_logits: bool) -> ModelOutput:
        """The head on output states (B, P + S, d): logits, or with labels and `return_logits=False` only
        the loss sum and count (in row chunks; under stablemax from the full logits); without labels,
        `return_logits=False` computes nothing (the caller takes what it needs of `hidden`)."""
        h = hidden[:, self.prefix_len:]  # the tokens' positions predict; the puzzle positions do not
        if labels is not None and self.spec.objective.loss == "stablemax":
            # the chunked kernels compute softmax's loss only: stablemax's from the full logits, in fp64
            logits = self.logits_of(h)
            out = ModelOutput(logits=logits if return_logits else None)
            out.loss_sum, out.n_tokens = token_losses(logits, labels, "stablemax").sum(), (labels != IGNORE_INDEX).sum()
            return out
        if labels is not None and not return_logits:
            if self.plan.final_norm is not None:
                h = self.norm_before_head(h)
            out = ModelOutput(logits=None)
            flat = h.reshape(-1, h.shape[-1])
            W = self.head_weight()
            out.loss_sum, out.n_tokens = self.ops.linear_cross_entropy(flat, W.to(flat.dtype), labels.reshape(-1))
            return out
        if labels is None and not return_logits:  # the output states only (generate takes the last position's)
            return ModelOutput(logits=None)
        out = ModelOutput(logits=self.logits_of(h))  # (B, S, vocab)
        if labels is not None:
            out.loss_sum, out.n_tokens = self.ops.cross_entropy(out.logits, labels)
        return out

    def head_weight(self) -> torch.Tensor:
        return self.head.weight if self.head is not None else self.embed.weight  # (vocab, d)

    def logits_of(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) of output states h (..., d): the norm before the head (if any), then the head."""
        if self.plan.final_norm is not None:
            h = self.norm_before_head(h)
        return h @ self.head_weight().T

    def step_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N) fp32: the per-step halting head (act's halting, the exit gate) on output states (B, N, d)."""
        return self.step_head(h).float().squeeze(-1)

    def halting_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, 2) fp32: (q_halt, q_continue) of the halting head, from the first position of the output state."""
        return self.halting(hidden[:, 0]).float()

    def final_weight(self, path: str) -> torch.Tensor:
        owner, leaf = self._final[path]
        return getattr(owner, leaf)

    def norm_before_head(self, h: torch.Tensor) -> torch.Tensor:
        op = self.plan.final_norm
        weights = {i: self.final_weight(path) for i, path in op.weights.items()}
        return self.ops.row_program(op.program, {"x": h, **weights})["y"]

    def new_cache(self, num_steps: int | None = None) -> KVCache:
        """An empty KV cache for forwards with a sampled loop run `num_steps` times (default: as forward)."""
        layout, _ = self.layout_at(num_steps if num_steps is not None else self.recurrence)
        return KVCache([self.stacks[c.module].attention_ops for c in layout.calls])

    # ------------------------------------------------------------------ conveniences

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Decode a response after each prompt; see hrmspec.runtime.execution.generate.generate."""

        return generate(self, input_ids, max_new_tokens, **kwargs)
