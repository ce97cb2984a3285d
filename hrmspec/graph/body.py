"""The body of a module call, described once: its ops as dataflow, with their parameters.

This is the one description of a layer. Everything that needs to know what a module computes
reads it: parameter counts, FLOPs and the activation estimate (`analysis.py`), the graph `show`
prints and draws, the fusion pass (`fusion.py`, which merges its row ops into regions), and the
runtime, which creates the parameters an op declares and runs the ops (or the fused regions)
in order. A pre-norm layer of a gated-attention SwiGLU module called on z_L + z_H:

    op               kind       reads                      writes                      parameters
    inject           row        in0, in1                   inject:h                    -
                     (a module called with cat(...): inject is a concat writing inject:cat, then
                     the linear `adapter` maps it back to d_model)
    0.attn_norm      row        inject:h                   0.attn_norm:y               [weight]
    0.attn.qkvg      linear     0.attn_norm:y              0.q, 0.k, 0.v, 0.g          weight [bias]
    0.rope           rope       0.q, 0.k                   0.rope:q, 0.rope:k          -
    0.attention      attention  0.rope:q, 0.rope:k, 0.v    0.attention:y               -
    0.attn.gate      row        0.g, 0.attention:y         0.attn.gate:y               -
    0.attn.o         linear     0.attn.gate:y              0.attn.o:y                  weight [bias]
    0.attn_residual  row        inject:h, 0.attn.o:y       0.attn_residual:h           -
    0.mlp_norm       row        0.attn_residual:h          0.mlp_norm:y                [weight]
    0.mlp.gate_up    linear     0.mlp_norm:y               0.mlp.gate, 0.mlp.up        weight
    0.mlp.act        row        0.mlp.gate, 0.mlp.up       0.mlp.act:y                 -
    0.mlp.down       linear     0.mlp.act:y                0.mlp.down:y                weight
    0.mlp_residual   row        0.attn_residual:h, ...     0.mlp_residual:h            -
    ...
    exit_norm        row        <last residual>            exit_norm:y                 [weight]

A row op is a RowProgram (norms and activations from `hrmspec/kinds.py`, adds, the gate) bound
to tensors: `rows` maps its program's row inputs to tensors (`q[lo]` is the first half of each
head of q), `weights` its vector inputs to parameters, `results` its outputs to tensors. A linear
op writes several tensors when one matmul computes several projections (q, k, v and the gate in
one; the gate and up halves of a gated MLP in one). Tensors are per token: `Tensor.size` elements,
shaped (heads, head_dim) when `heads` is set; `rope.cos` and `rope.sin` are the batch's rotary
tables (head_dim per token), which the runtime takes from the call's context. Parameters are
named by their place in the module (`layers.0.attn.qkvg.weight`): the state-dict name under
`stacks.<module>.`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx

from hrmspec.ir import RowProgram, library
from hrmspec.kinds import MLPS, norm_program, norm_weights
from hrmspec.spec.schema import ModelSpec, ModuleSpec, NormSpec


@dataclass(frozen=True)
class Tensor:
    name: str
    size: int  # elements per token
    heads: int = 0  # laid out as (heads, size / heads) per token; 0: a flat row


@dataclass(frozen=True)
class Param:
    path: str  # under the module: "layers.0.attn.qkvg.weight", "exit_norm.weight"
    shape: tuple[int, ...]
    init: str  # fan_in (the model's init rule at this fan-in) | zeros | ones | normal (std 0.02)
    fan_in: int = 0

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Op:
    name: str  # "0.attn_norm", "0.attn.qkvg", "exit_norm", "inject"
    kind: str  # row | linear | rope | attention | transpose | concat
    role: str  # what it is: norm, add, gate, activation, linear, rope, attention
    reads: tuple[str, ...]  # tensors, in argument order (a linear's input; attention's q, k, v)
    writes: tuple[str, ...]
    params: tuple[Param, ...] = ()
    program: RowProgram | None = None  # row and rope ops
    rows: dict[str, str] = field(default_factory=dict)  # program row input -> tensor ref
    weights: dict[str, str] = field(default_factory=dict)  # program vector input -> parameter path
    results: dict[str, str] = field(default_factory=dict)  # program output -> tensor ref
    domain: tuple[int, int] | None = None  # a row op's rows per token and row width
    attrs: dict[str, Any] = field(default_factory=dict)  # rope: theta; attention: mask; linear: bias
    flops: int = 0  # matmul FLOPs per token, forward (attention's own depend on the sequence: analysis)
    saved: int = 0  # activation elements per token kept for backward when the call carries gradient
    members: tuple[str, ...] = ()  # a fused region: the ops it computes, in order

    @property
    def param_count(self) -> int:
        return sum(p.size for p in self.params)


@dataclass(frozen=True)
class Body:
    module: str
    arity: int  # how many states the call sums (1: a single input, no injection op)
    inputs: tuple[str, ...]  # ("input",) or ("in0", "in1", ...)
    output: str
    ops: tuple[Op, ...]
    tensors: dict[str, Tensor]

    def op(self, name: str) -> Op:
        return next(o for o in self.ops if o.name == name)

    @property
    def params(self) -> tuple[Param, ...]:
        return tuple(p for o in self.ops for p in o.params)

    def graph(self) -> nx.DiGraph:
        """The ops as a networkx DiGraph: an edge from the op that writes a tensor to each op that reads it;
        node attributes are the Op's fields. `graph["order"]` is the execution order."""
        g = nx.DiGraph(module=self.module, arity=self.arity, inputs=self.inputs, output=self.output,
                       tensors=self.tensors, order=[o.name for o in self.ops])
        producer: dict[str, str] = {}
        for o in self.ops:
            g.add_node(o.name, **{k: getattr(o, k) for k in Op.__dataclass_fields__})
            for t in o.reads:
                if t in producer:
                    g.add_edge(producer[t], o.name, tensor=t)
            for t in o.writes:
                producer[t] = o.name
        return g


def base(ref: str) -> str:
    """The tensor a binding refers to: 'q[lo]' (the first half of each head of q) -> 'q'."""
    return ref.split("[", 1)[0]


def module_body(m: ModuleSpec, model: ModelSpec, arity: int = 1) -> Body:
    """The ops of one call of module `m` on the sum (or concatenation) of `arity` states (1: a single input)."""
    return _Builder(m, model, arity).build()


def norm_op(name: str, x: str, n: NormSpec, d: int, out: str, prefix: str = "") -> Op:
    """A norm as a row op reading `x` and writing `out`; its weights are parameters `<prefix><name>.<w>`."""
    prog = norm_program(n)
    ws = norm_weights(n)
    return Op(name, "row", "norm", (x,), (out,), tuple(Param(f"{prefix}{name}.{w.name}", (d,), w.init) for w in ws),
              prog, rows={"x": x}, weights={w.input: f"{prefix}{name}.{w.name}" for w in ws}, results={"y": out},
              domain=(1, d), saved=d)


def _prefix(op: str) -> str:
    """Where an op's parameters live: the ops of layer i ("i.attn_norm") under "layers.", the rest at the top."""
    return "layers." if op[0].isdigit() else ""


class _Builder:
    def __init__(self, m: ModuleSpec, model: ModelSpec, arity: int):
        self.m, self.model, self.arity = m, model, arity
        self.ops: list[Op] = []
        self.tensors: dict[str, Tensor] = {}

    def tensor(self, name: str, size: int, heads: int = 0) -> str:
        self.tensors[name] = Tensor(name, size, heads)
        return name

    def add(self, op: Op) -> str:
        self.ops.append(op)
        return op.writes[0]

    def row(self, name: str, role: str, program: RowProgram, rows: dict[str, str], width: int,
            heads: int = 0, saved: int = 0) -> str:
        out = self.tensor(f"{name}:{program.outputs[0].name}", width, heads)
        return self.add(Op(name, "row", role, tuple(dict.fromkeys(base(r) for r in rows.values())), (out,),
                           program=program, rows=rows, results={program.outputs[0].name: out}, domain=(1, width),
                           saved=saved))

    def norm(self, name: str, x: str, n: NormSpec, width: int = 0, scale: float = 1.0) -> str:
        """A norm over rows of `width` (d_model by default); `scale`: rows per token, for the counts."""
        d = width or self.model.d_model
        op = norm_op(name, x, n, d, self.tensor(f"{name}:y", d), prefix=_prefix(name))
        return self.add(replace(op, saved=round(op.saved * scale)))

    def linear(self, name: str, x: str, fan_in: int, outs: dict[str, tuple[int, int]], bias: bool | int = False,
               saved: int = -1, per_token: float = 1.0) -> list[str]:
        """One matmul of `x` (fan_in) to the tensors `outs` (name -> (size, heads)), concatenated.
        `bias`: True for a bias on every output, an integer n for one on the first n outputs only (the
        rest unbiased). `per_token`: rows of `x` per token (d / positions for the rows of a token MLP)."""
        fan_out = sum(size for size, _ in outs.values())
        path = _prefix(name) + name
        params = (Param(f"{path}.weight", (fan_out, fan_in), "fan_in", fan_in),)
        if bias:
            params += (Param(f"{path}.bias", (fan_out if bias is True else bias,), "zeros"),)
        writes = tuple(self.tensor(t, size, heads) for t, (size, heads) in outs.items())
        self.add(Op(name, "linear", "linear", (x,), writes, params, attrs={"bias": bool(bias)},
                    flops=round(2 * fan_in * fan_out * per_token),
                    saved=round(fan_in * per_token) if saved < 0 else saved))
        return list(writes)

    def build(self) -> Body:
        m, model = self.m, self.model
        d, hd, b = model.d_model, model.head_dim, m.block
        if self.arity > 1 and m.inject == "cat":  # [in0; in1; ...] (arity x d) mapped back to d: the adapter
            inputs = tuple(self.tensor(f"in{i}", d) for i in range(self.arity))
            cat = self.tensor("inject:cat", self.arity * d)
            self.add(Op("inject", "concat", "concat", inputs, (cat,)))
            (x,) = self.linear("adapter", cat, self.arity * d, {"adapter:y": (d, 0)})
        elif self.arity > 1:  # the states summed into the call: in0 + in1 + ...
            inputs = tuple(self.tensor(f"in{i}", d) for i in range(self.arity))
            prog = library.add(self.arity)
            x = self.row("inject", "add", prog, dict(zip(prog.input_names, inputs)), d)
        else:
            inputs = (self.tensor("input", d),)
            x = inputs[0]
        tables = (self.tensor("rope.cos", hd), self.tensor("rope.sin", hd))
        for layer in range(m.layers):
            p = f"{layer}."
            if b.attention.type == "token_mlp":
                x = self.token_mlp(p, x)
            else:
                x = self.attention(p, x, tables)
            x = self.mlp(p, x, d, b.ffn)
        if m.exit_norm is not None:
            x = self.norm("exit_norm", x, m.exit_norm)
        return Body(m.name, self.arity, inputs, x, tuple(self.ops), self.tensors)

    def attention(self, p: str, x: str, tables: tuple[str, str]) -> str:
        """Layer `p`'s attention sublayer on `x`, in its residual and norms; returns the new residual."""
        model, b = self.model, self.m.block
        d, h, hd = model.d_model, model.heads, model.head_dim
        inner, place, gated = h * hd, b.norm.place, b.attention.type == "gated"
        a_in = self.norm(p + "attn_norm", x, b.norm) if place in ("pre", "sandwich", "pre_post") else x
        projs = {p + t: (inner, h) for t in ("q", "k", "v") + (("g",) if gated else ())}
        # qk_bias: a bias on the q and k rows of the projection only (Huginn), stored as one vector (q; k)
        bias = b.attention.bias or (2 * inner if b.attention.qk_bias else False)
        q, k, v, *g = self.linear(p + "attn.qkvg", a_in, d, projs, bias=bias)
        if b.attention.rope_theta is not None:
            # one program over half rows (one token of one head): the halves of q and k are views
            rows = {"cos": tables[0] + "[lo]", "sin": tables[1] + "[lo]"}
            for t, ref in (("q", q), ("k", k)):
                rows.update({f"{t}_lo": ref + "[lo]", f"{t}_hi": ref + "[hi]"})
            qr, kr = self.tensor(p + "rope:q", inner, h), self.tensor(p + "rope:k", inner, h)
            results = {"qr_lo": qr + "[lo]", "qr_hi": qr + "[hi]", "kr_lo": kr + "[lo]", "kr_hi": kr + "[hi]"}
            self.add(Op(p + "rope", "rope", "rope", (q, k) + tables, (qr, kr), program=library.rope(), rows=rows,
                        results=results, domain=(h, hd // 2), attrs={"theta": b.attention.rope_theta}))
            q, k = qr, kr
        # saved: q, k, v, the output and the softmax statistics (flash-style)
        att = self.tensor(p + "attention:y", inner, h)
        self.add(Op(p + "attention", "attention", "attention", (q, k, v), (att,),
                    attrs={"mask": b.attention.mask, "heads": h, "head_dim": hd}, saved=4 * inner + h))
        if gated:
            att = self.row(p + "attn.gate", "gate", library.sigmoid_gate(), {"g": g[0], "a": att}, inner,
                           heads=h, saved=inner)
        # without a gate, o reads the attention output, which attention keeps already
        (o,) = self.linear(p + "attn.o", att, inner, {p + "attn.o:y": (d, 0)}, bias=b.attention.bias,
                           saved=inner if gated else 0)
        if place == "sandwich":
            o = self.norm(p + "attn_out_norm", o, b.norm)
        x = self.row(p + "attn_residual", "add", library.add(), {"x": x, "r": o}, d)
        if place == "post":
            x = self.norm(p + "attn_norm", x, b.norm)
        elif place == "pre_post":
            x = self.norm(p + "attn_post_norm", x, b.norm)
        return x

    def mlp(self, p: str, x: str, width: int, ffn: int, name: str = "mlp", scale: float = 1.0) -> str:
        """An MLP sublayer on rows of `width` (hidden `ffn`) in its residual and norms: layer `p`'s MLP,
        or with name "token" the same across positions. `scale`: rows per token, for the counts."""
        b = self.m.block
        place, kind = b.norm.place, MLPS[b.mlp]
        m_in = self.norm(p + f"{name}_norm", x, b.norm, width, scale) if place in ("pre", "sandwich", "pre_post") else x
        if kind.gated:
            gate, up = self.linear(p + f"{name}.gate_up", m_in, width,
                                   {p + f"{name}.gate": (ffn, 0), p + f"{name}.up": (ffn, 0)}, per_token=scale)
            # act(gate) * up keeps gate and up (one fused projection) and act(gate)
            act = self.row(p + f"{name}.act", "activation", kind.activation(), {"a": gate, "b": up}, ffn,
                           saved=round(3 * ffn * scale))
        else:
            (up,) = self.linear(p + f"{name}.gate_up", m_in, width, {p + f"{name}.up": (ffn, 0)}, per_token=scale)
            act = self.row(p + f"{name}.act", "activation", kind.activation(), {"x": up}, ffn,
                           saved=round(ffn * scale))
        (down,) = self.linear(p + f"{name}.down", act, ffn, {p + f"{name}.down:y": (width, 0)}, per_token=scale)
        if place == "sandwich":
            down = self.norm(p + f"{name}_out_norm", down, b.norm, width, scale)
        x = self.row(p + f"{name}_residual", "add", library.add(), {"x": x, "r": down}, width)
        if place == "post":
            x = self.norm(p + f"{name}_norm", x, b.norm, width, scale)
        elif place == "pre_post":
            x = self.norm(p + f"{name}_post_norm", x, b.norm, width, scale)
        return x

    def token_mlp(self, p: str, x: str) -> str:
        """TRM's mlp_t: the rows turned to one per channel (the positions of a row of the batch), an MLP
        across them with its residual and norms (norms over the positions, as TRM's), turned back."""
        d, length = self.model.d_model, self._length()
        xt = self.tensor(p + "to_channels:y", length)
        self.add(Op(p + "to_channels", "transpose", "transpose", (x,), (xt,)))
        yt = self.mlp(p, xt, length, self.m.block.attention.ffn, name="token", scale=d / length)
        y = self.tensor(p + "to_tokens:y", d)
        self.add(Op(p + "to_tokens", "transpose", "transpose", (yt,), (y,)))
        return y

    def _length(self) -> int:
        """The positions of a row: the tokens and the puzzle prefix."""
        puzzle = self.model.puzzle
        return self.model.max_seq_len + (puzzle.positions if puzzle else 0)


__all__ = ["Body", "Op", "Param", "Tensor", "base", "module_body", "norm_op"]
