"""The layers a module stacks: attention + MLP, each in a residual with RMSNorm, and the stack
itself capped by MagicNorm's exit norm. The math lives in the backend's ops table; on a kernel
backend the norms and residual adds run as the fusion pass's regions (runtime/fused.py).

Shapes: B batch, S sequence, d d_model, h heads, hd head_dim, T cached + new keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hrmspec.graph.fusion import norm_program
from hrmspec.ir import evaluate
from hrmspec.mask import Mask
from hrmspec.runtime.fused import CallPlan, plan_call
from hrmspec.spec.schema import BlockSpec, ModelSpec, ModuleSpec, NormSpec


@dataclass
class Context:
    """Per-batch inputs shared by every module call: the masks and the rotary tables."""

    mask: dict[str, Mask]  # mask kind -> the batch's mask (a description: attention never builds S x S)
    rope: dict[float, tuple[torch.Tensor, torch.Tensor]]  # rope_theta -> cos, sin (B, 1, S, hd)


class Norm(nn.Module):
    """RMSNorm, or (spec.type == "expr") a norm the spec writes as a row expression of x.

    An expression norm is a RowProgram (parsed once at load) whose vector inputs are this module's
    parameters, one per name under `params`; the backend runs it with `ops.row_program` (generated
    kernels on triton), or else the IR's torch evaluator, which autograd differentiates."""

    def __init__(self, d: int, eps: float, affine: bool, ops, spec: NormSpec | None = None):
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(d)) if affine and (spec is None or spec.type == "rms") else None
        self.program = None
        if spec is not None and spec.type == "expr":
            self.program = norm_program(spec)
            self.params = nn.ParameterDict({name: nn.Parameter(_init_vector(d, init)) for name, init in spec.params})

    def vector(self, name: str) -> torch.Tensor:
        """The weight bound to the vector input `name` of this norm's program (w: RMSNorm's scale)."""
        return self.weight if self.program is None else self.params[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.program is None:
            return self.ops.rms_norm(x, self.eps, self.weight)
        run = getattr(self.ops, "row_program", None) or evaluate
        return run(self.program, {"x": x, **self.params})["y"]


def _init_vector(d: int, init: str) -> torch.Tensor:
    """An expression norm's parameter: zeros, ones, or normal (std 0.02, truncated at 2 std)."""
    if init == "normal":
        return nn.init.trunc_normal_(torch.empty(d), 0.0, 0.02, -0.04, 0.04)
    return torch.ones(d) if init == "ones" else torch.zeros(d)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, head_dim: int, block: BlockSpec, ops):
        super().__init__()
        a = block.attention
        self.h, self.hd, self.ops = heads, head_dim, ops
        self.gated, self.mask_kind, self.theta = a.type == "gated", a.mask, a.rope_theta
        n_proj = 4 if self.gated else 3
        self.qkvg = nn.Linear(d, n_proj * heads * head_dim, bias=a.bias)  # q, k, v (, gate) in one matmul
        self.o = nn.Linear(heads * head_dim, d, bias=a.bias)

    def forward(self, x: torch.Tensor, ctx: Context, cache: list | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        parts = self.qkvg(x).view(B, S, -1, self.h, self.hd).unbind(2)  # each (B, S, h, hd)
        q, k = parts[:2]
        if self.theta is not None:  # in projection layout: one rope kernel reads q, k and the tables
            q, k = self.ops.rope_qk(q, k, *ctx.rope[self.theta])
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, h, S, hd)
        # a copy, so what attention keeps for backward does not pin the whole fused projection
        v = parts[2].transpose(1, 2).contiguous()
        if cache is not None:  # cache = [k, v] of earlier positions, (B, h, T - S, hd) or None
            if cache[0] is not None:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[0], cache[1] = k, v
        y = self.ops.attention(q, k, v, ctx.mask[self.mask_kind]).transpose(1, 2)  # (B, S, h, hd)
        if self.gated:
            y = self.ops.sigmoid_gate(parts[3], y)
        return self.o(y.reshape(B, S, self.h * self.hd))


class MLP(nn.Module):
    def __init__(self, d: int, block: BlockSpec, ops):
        super().__init__()
        self.kind, self.ops, self.ffn = block.mlp, ops, block.ffn
        self.gate_up = nn.Linear(d, (2 if self.kind == "swiglu" else 1) * block.ffn, bias=False)
        self.down = nn.Linear(block.ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)
        if self.kind == "swiglu":
            gate, up = h.split(self.ffn, dim=-1)
            return self.down(self.ops.swiglu(gate, up))
        return self.down(self.ops.gelu(h))


class Block(nn.Module):
    """pre: x + f(norm(x)); post: norm(x + f(x)); sandwich: x + norm(f(norm(x)))."""

    def __init__(self, d: int, heads: int, head_dim: int, block: BlockSpec, ops):
        super().__init__()
        n = block.norm
        self.place = n.place
        self.attn = Attention(d, heads, head_dim, block, ops)
        self.mlp = MLP(d, block, ops)
        self.attn_norm = Norm(d, n.eps, n.affine, ops, n)
        self.mlp_norm = Norm(d, n.eps, n.affine, ops, n)
        if self.place == "sandwich":
            self.attn_out_norm = Norm(d, n.eps, n.affine, ops, n)
            self.mlp_out_norm = Norm(d, n.eps, n.affine, ops, n)

    def forward(self, x: torch.Tensor, ctx: Context, cache: list | None = None) -> torch.Tensor:
        if self.place == "pre":
            x = x + self.attn(self.attn_norm(x), ctx, cache)
            return x + self.mlp(self.mlp_norm(x))
        if self.place == "post":
            x = self.attn_norm(x + self.attn(x, ctx, cache))
            return self.mlp_norm(x + self.mlp(x))
        x = x + self.attn_out_norm(self.attn(self.attn_norm(x), ctx, cache))
        return x + self.mlp_out_norm(self.mlp(self.mlp_norm(x)))


class Stack(nn.Module):
    """A module of the spec: its layers, then (MagicNorm) an exit RMSNorm on every call.

    Called on the states summed into the call (`terms`; one tensor or a list). With an op table
    that fuses (`ops.FUSED`), the call runs the fusion pass's plan for its number of terms."""

    def __init__(self, m: ModuleSpec, model: ModelSpec, ops):
        super().__init__()
        d, heads, head_dim = model.d_model, model.heads, model.head_dim
        self.spec, self.model_spec, self.ops = m, model, ops
        self.layers = nn.ModuleList(Block(d, heads, head_dim, m.block, ops) for _ in range(m.layers))
        self.exit_norm = Norm(d, m.block.norm.eps, False, ops) if m.exit_norm == "rms" else None
        self.fused = bool(getattr(ops, "FUSED", False))
        self._plans: dict[int, CallPlan] = {}

    def forward(self, terms: torch.Tensor | list[torch.Tensor], ctx: Context, cache: list | None = None
                ) -> torch.Tensor:
        terms = [terms] if isinstance(terms, torch.Tensor) else list(terms)
        if self.fused:
            return self.run_plan(terms, ctx, cache)
        x = terms[0]
        for t in terms[1:]:
            x = x + t
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, None if cache is None else cache[i])
        return self.exit_norm(x) if self.exit_norm is not None else x

    def plan(self, arity: int) -> CallPlan:
        if arity not in self._plans:
            self._plans[arity] = plan_call(self.spec, self.model_spec, arity)
        return self._plans[arity]

    def weight(self, ref: str) -> torch.Tensor:
        """A norm weight by its dataflow name: "<layer>.<norm>.<input>" or "<norm>.<input>"."""
        *where, name = ref.split(".")
        owner = self.layers[int(where[0])] if len(where) == 2 else self
        return getattr(owner, where[-1]).vector(name)

    def run_plan(self, terms: list[torch.Tensor], ctx: Context, cache: list | None = None) -> torch.Tensor:
        plan = self.plan(len(terms))
        env = dict(zip(plan.inputs, terms))
        for step in plan.steps:
            if step.kind == "rows":
                args = {a: env[t] for a, t in step.reads} | {a: self.weight(w) for a, w in step.weights}
                outs = (getattr(self.ops, "row_program", None) or evaluate)(step.program, args)
                env.update((t, outs[a]) for a, t in step.writes)
            else:
                layer = self.layers[step.layer]
                x = env[step.reads[0][1]]
                slot = None if cache is None else cache[step.layer]
                env[step.writes[0][1]] = layer.attn(x, ctx, slot) if step.kind == "attn" else layer.mlp(x)
            for t in step.drop:
                del env[t]
        return env[plan.output]
