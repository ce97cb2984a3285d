"""A module of the spec at run time: the parameters its body declares, and its calls run op by op.

A call runs the plan's `Body` for the number of states it sums (`hrmspec.graph.body`): the ops
in order, each reading and writing named tensors of an environment that starts with the summed
states. On the reference backend the body is the ops one by one; on a kernel backend it is the
fusion pass's body, whose row ops are fused regions, so the kernels that run are exactly the
ones `hrmspec check` verifies and the golden snapshots pin.

    row        outs = ops.row_program(program, {input: tensor or weight})   norms, adds, gate, activation
    linear     y = ops.linear(x, weight, bias), split into the tensors it writes (q, k, v, g in one matmul)
    rope       q, k = ops.rope_qk(q, k, cos, sin)                               (B, S, h, hd)
    attention  y = ops.attention(q, k, v, mask)                                 (B, h, S, hd), with a KV cache
    transpose  (B, S, d) <-> (B, d, S): a token MLP's rows are one per channel, across the positions
    concat     [in0; in1; ...] (B, S, k d): cat(...) injection, before the module's adapter (a linear)

Tensors are (B, S, size), or (B, S, heads, head_dim) for the ones the body lays out by head. A
tensor is dropped once no later op reads it, so a call holds no more activations than the layers
written out by hand would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hrmspec.errors import HrmspecError
from hrmspec.runtime.execution.context import Context


class LengthError(HrmspecError):
    """Rows whose length a fixed-length layer (a token MLP) cannot take."""


class ModuleStack(nn.Module):
    """The parameters of one module (at the paths its body names them: `layers.0.attn.qkvg.weight`)
    and its calls. `bodies` maps the number of states a call sums to the body it runs."""

    def __init__(self, name: str, params, bodies: dict, ops):
        super().__init__()
        self.name, self.ops, self.bodies = name, ops, bodies
        self.param_specs = tuple(params)
        self._where: dict[str, tuple[nn.Module, str]] = {}
        for p in self.param_specs:
            self._where[p.path] = register_at(self, p.path, nn.Parameter(torch.empty(p.shape)))
        self._segments = {arity: segments(body, self.ops) for arity, body in bodies.items()}
        self._compiled: dict[Segment, object] = {}  # a segment -> what runs it (compiled once, on first use)
        self.attention_ops = max(sum(o.kind == "attention" for o in b.ops) for b in bodies.values())

    def weight(self, path: str) -> torch.Tensor:
        # looked up at call time: data-parallel wrappers may swap a module's parameters
        owner, leaf = self._where[path]
        return getattr(owner, leaf)

    def forward(self, terms: torch.Tensor | list[torch.Tensor], ctx: Context, cache: list[KVSlot] | None = None
                ) -> torch.Tensor:
        """The call on the states it sums (`terms`: one tensor (B, S, d) or a list of them)."""
        terms = [terms] if isinstance(terms, torch.Tensor) else list(terms)

        def attention(op, layer: int, q, k, v):
            return self.attend(q, k, v, ctx, op.attrs["mask"], None if cache is None else cache[layer])

        # compiled (on a backend that compiles) in training; evaluation's shapes vary call by call
        return self._call(terms, ctx.rope, attention, compiled=self.training)

    def decode(self, terms: list[torch.Tensor], rope: dict, kv: list, slot: torch.Tensor, mask: torch.Tensor
               ) -> torch.Tensor:
        """The call on one token per row (runtime/execution/decode.py): the same segments, attention on the
        static cache `kv` (one (K, V) per attention op), written at `slot`, reading the slots `mask` allows."""
        return self._call(terms, rope, lambda op, layer, q, k, v: attend_cached(q, k, v, kv[layer], slot, mask),
                          compiled=False)  # the decode step is compiled whole, if at all

    def _call(self, terms: list[torch.Tensor], rope: dict, attention, compiled: bool) -> torch.Tensor:
        """The body's segments in order; `attention(op, layer, q, k, v)` runs each attention op."""
        body = self.bodies[len(terms)]
        env = dict(zip(body.inputs, terms))
        layer = 0  # the KV slot of the next attention op
        for seg in self._segments[len(terms)]:
            if seg.attention is None:
                self._run_segment(seg, env, rope, compiled)
                continue
            env[seg.attention.writes[0]] = attention(seg.attention, layer, *(env[t] for t in seg.attention.reads))
            layer += 1
            for t in seg.drops[0]:
                del env[t]
        return env[body.output]

    def _run_segment(self, seg: Segment, env: dict[str, torch.Tensor], rope: dict, compiled: bool) -> None:
        """The segment's ops on `env`, in place: on a backend that compiles segments
        (`ops.compile_segment`, backends/inductor), as one compiled function of explicit tensors."""
        weights = [self.weight(p) for p in seg.weights]
        tables = [t for theta in seg.thetas for t in rope[theta]]
        inputs = [env.pop(t) if t in seg.consumed else env[t] for t in seg.reads]
        run = self._runner(seg) if compiled else seg.run
        env.update(zip(seg.writes, run(inputs, weights, tables)))

    def _runner(self, seg: Segment):
        """What runs `seg`: compiled once on first use by a backend that compiles, else its ops."""
        if seg not in self._compiled:
            compile_segment = getattr(self.ops, "compile_segment", None)
            self._compiled[seg] = compile_segment(seg.run, seg.label) if compile_segment else seg.run
        return self._compiled[seg]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context, mask: str,
               cache: KVSlot | None) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd) + mask) v on (B, S, h, hd) tensors; `cache` holds the keys and values
        of earlier positions (B, h, T - S, hd) and is extended with these."""
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, h, S, hd)
        # a copy, so what attention keeps for backward does not pin the whole fused projection
        v = v.transpose(1, 2).contiguous()
        if cache is not None:
            k, v = cache.extend(k, v)
        return self.ops.attention(q, k, v, ctx.mask[mask]).transpose(1, 2)  # (B, S, h, hd)


class KVSlot:
    """The keys and values one attention op of one module call has seen, (B, h, T, hd) each: a KV cache's
    slot. `extend` appends a call's new ones and returns all of them, the keys attention reads."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """One KVSlot per (module call, attention op): each call of a module attends to its own past."""

    def __init__(self, slots_per_call: list[int]):
        self.slots = [[KVSlot() for _ in range(n)] for n in slots_per_call]

    @property
    def length(self) -> int:
        return next(slot.length for call in self.slots for slot in call)  # any call with attention


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                  slot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row (B, 1, h, hd): its key and value written at `slot`, attention over the valid slots."""
    K, V = kv
    K.index_copy_(2, slot, k.transpose(1, 2))
    V.index_copy_(2, slot, v.transpose(1, 2))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), K, V, attn_mask=mask)
    return out.transpose(1, 2)


def register_at(root: nn.Module, path: str, param: nn.Parameter) -> tuple[nn.Module, str]:
    """Register `param` at a dotted path under `root`, making plain container modules on the way."""
    *parts, leaf = path.split(".")
    owner = root
    for part in parts:
        if part not in owner._modules:
            owner.add_module(part, nn.Module())
        owner = owner._modules[part]
    owner.register_parameter(leaf, param)
    return owner, leaf


@dataclass(eq=False)
class Segment:
    """A run of a body's ops between two attention ops, or one attention op: the unit a module call
    runs, and the unit a compiling backend compiles (everything but attention, which keeps its own
    kernel and KV cache). `run` is a function of explicit tensors only, so a compiler sees plain
    tensor code: `reads` in, `writes` (what later ops or the caller read) out."""

    label: str
    ops: tuple  # the body's ops (none of them attention), or () for an attention segment
    attention: object | None  # the attention op of an attention segment
    reads: tuple[str, ...]  # tensors of the call's environment the segment reads
    consumed: frozenset  # of those, the ones nothing after the segment reads (taken out of the environment)
    writes: tuple[str, ...]  # tensors it leaves for later ops (or the call's output)
    weights: tuple[str, ...]  # parameter paths, in the order `run` takes them
    thetas: tuple[float, ...]  # the rotary tables it reads (cos, sin per theta)
    drops: tuple[tuple[str, ...], ...]  # per op, the tensors no later op reads
    body: object = None
    table: object = None  # the op table its ops run on

    def run(self, inputs: list[torch.Tensor], weights: list[torch.Tensor], rope: list[torch.Tensor]
            ) -> list[torch.Tensor]:
        env = dict(zip(self.reads, inputs))
        weight = dict(zip(self.weights, weights))
        tables = {theta: (rope[2 * i], rope[2 * i + 1]) for i, theta in enumerate(self.thetas)}
        for op, drop in zip(self.ops, self.drops):
            apply_op(op, self.body, env, weight, tables, self.table)
            for t in drop:
                del env[t]
        return [env[t] for t in self.writes]


def apply_op(op, body, env: dict[str, torch.Tensor], weight: dict[str, torch.Tensor], rope: dict, ops) -> None:
    """One body op that is not attention, reading and writing `env` (see the module docstring)."""
    if op.kind == "row":
        args = {i: env[t] for i, t in op.rows.items()} | {i: weight[w] for i, w in op.weights.items()}
        outs = ops.row_program(op.program, args)
        env.update((t, outs[o]) for o, t in op.results.items())
    elif op.kind == "linear":
        x = env[op.reads[0]]
        x = x.flatten(-2) if body.tensors[op.reads[0]].heads else x
        W = weight[op.params[0].path]
        bias = weight[op.params[1].path] if op.attrs["bias"] else None
        if bias is not None and bias.shape[0] < W.shape[0]:  # a bias on the first rows only (q and k)
            bias = torch.nn.functional.pad(bias, (0, W.shape[0] - bias.shape[0]))
        y = ops.linear(x, W, bias)
        parts = y.split([body.tensors[t].size for t in op.writes], dim=-1) if len(op.writes) > 1 else (y,)
        for t, part in zip(op.writes, parts):
            heads = body.tensors[t].heads
            env[t] = part.unflatten(-1, (heads, -1)) if heads else part
    elif op.kind == "rope":
        cos, sin = rope[op.attrs["theta"]]
        env[op.writes[0]], env[op.writes[1]] = ops.rope_qk(env[op.reads[0]], env[op.reads[1]], cos, sin)
    elif op.kind == "concat":  # cat(...) injection: the states side by side, for the adapter
        env[op.writes[0]] = torch.cat([env[t] for t in op.reads], dim=-1)
    elif op.kind == "transpose":
        x, want = env[op.reads[0]], body.tensors[op.writes[0]].size
        if x.shape[-2] != want:
            raise LengthError(f"module {body.module} mixes the positions of fixed-length rows (a token_mlp): "
                              f"rows of {x.shape[-2]} positions where the spec says {want}; "
                              "feed rows of model.max_seq_len tokens")
        env[op.writes[0]] = x.transpose(-1, -2).contiguous()
    else:
        raise RuntimeError(f"module {body.module}: op {op.name} has an unknown kind '{op.kind}'")


def segments(body, ops) -> list[Segment]:
    """`body` cut at its attention ops: the segments a call runs, in order."""
    held = set(body.inputs) | {t for op in body.ops for t in op.writes}  # not the rotary tables (context)
    drops = _last_reads(body, held)
    later: list[set[str]] = []  # later[i]: what ops after i read, plus the output
    seen = {body.output}
    for op in reversed(body.ops):
        later.append(set(seen))
        seen |= set(op.reads)
    later.reverse()
    out, run = [], []

    def close() -> None:  # the run of ops collected so far becomes a segment
        if not run:
            return
        idx = [i for i, _ in run]
        reads, written = [], set()
        for _, op in run:
            reads += [t for t in op.reads if t in held and t not in written and t not in reads]
            written |= set(op.writes)
        after = later[idx[-1]]
        out.append(Segment(
            label=f"{body.module}.{body.arity}.ops{len(out)}", ops=tuple(op for _, op in run), attention=None,
            reads=tuple(reads),
            consumed=frozenset(t for t in reads if t not in after),
            writes=tuple(t for t in dict.fromkeys(t for _, op in run for t in op.writes) if t in after),
            weights=tuple(dict.fromkeys(p.path for _, op in run for p in op.params)),
            thetas=tuple(dict.fromkeys(op.attrs["theta"] for _, op in run if op.kind == "rope")),
            drops=tuple(drops[i] for i in idx), body=body, table=ops))
        run.clear()

    for i, op in enumerate(body.ops):
        if op.kind == "attention":
            close()
            out.append(Segment(label=f"{body.module}.{body.arity}.attention{len(out)}", ops=(), attention=op,
                               reads=op.reads, consumed=frozenset(),
                               writes=op.writes, weights=(), thetas=(), drops=(drops[i],), body=body, table=ops))
        else:
            run.append((i, op))
    close()
    return out


def _last_reads(body, held: set[str]) -> list[tuple[str, ...]]:
    """For each op of `body`, the tensors of `held` (the call's own) no later op reads; the output is kept."""
    last: dict[str, int] = {}
    for i, op in enumerate(body.ops):
        for t in op.reads:
            last[t] = i
    return [tuple(t for t in dict.fromkeys(op.reads) if last[t] == i and t in held and t != body.output)
            for i, op in enumerate(body.ops)]


__all__ = ["KVCache", "KVSlot", "LengthError", "ModuleStack", "Segment", "apply_op", "register_at", "segments"]
