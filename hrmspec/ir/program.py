"""The Kernel IR: a `RowProgram` is an immutable DAG of ops over rows of width D.

Every value has a *kind*, the shape it has over a batch of R rows:

    row     [R, D]   a row input, or anything computed from one
    vector  [D]      a weight, shared by every row
    scalar  [R]      one number per row: a per-row input, or a last-dimension reduction
    const   []       a literal (or D, the row width)

Binary ops broadcast: the kind of `a op b` is the join of the kinds in the lattice
const < scalar < row, const < vector < row (so scalar op vector is a row). Reductions (sum, mean,
max) run over the last dimension of a row and give a scalar that broadcasts back when combined
with a row. A reduction of a per-row scalar has nothing to reduce and is an error.

Values are built through a `ProgramBuilder`, which hash-conses nodes (one node per distinct
op/operands/argument, so common subexpressions are shared), folds constants and applies a few
algebraic identities. `build()` returns the program in canonical form: nodes in depth-first
order from the outputs, dead nodes dropped. Two programs that compute the same DAG therefore
have the same nodes and the same `hash`, whatever order they were built in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

from hrmspec.ir.opset import (
    BINARY,
    CAST_TYPES,
    COMMUTATIVE,
    COMPARE,
    INPUT_KINDS,
    LEAF,
    OTHER,
    OUTPUT_KINDS,
    UNARY,
    IRError,
    join,
)
from hrmspec.ir.rewrite import simplify_node


@dataclass(frozen=True)
class Node:
    """One op. `srcs` index earlier nodes of the same program; `arg` is the op's attribute
    (input name, constant value, exponent or cast type)."""

    op: str
    srcs: tuple[int, ...] = ()
    arg: str | float | None = None
    kind: str = "row"
    dtype: str = "f32"  # f32 or bool

    def key(self) -> tuple:
        # floats by their bits: -0.0 and 0.0 are different constants, and NaN equals NaN
        return (self.op, self.srcs, float(self.arg).hex() if isinstance(self.arg, float) else self.arg)


@dataclass(frozen=True)
class Input:
    name: str
    kind: str  # row | vector | scalar
    init: str | None = field(default=None, compare=False)  # initialiser hint for weights, not part of the math


@dataclass(frozen=True)
class Output:
    name: str
    node: int
    kind: str  # row | scalar; a node of a lower kind is broadcast when stored
    row_partial: bool = False  # a per-row partial of a vector gradient: sum it over rows (second stage)


def _fmt_const(v: float) -> str:
    return repr(float(v))


@dataclass(frozen=True, eq=False)
class RowProgram:
    """A fused region of elementwise ops and last-dimension reductions, in canonical form."""

    name: str
    inputs: tuple[Input, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[Output, ...]
    # which built-in function this program is, with its static arguments, e.g. ("rms_norm", (("eps", 1e-6),)):
    # a backend may run a faster form of the same math (the reference backend's torch functions); not part
    # of the identity, so a fused region or a parsed expression with the same math has the same hash
    builtin: tuple[str, tuple[tuple[str, float], ...]] | None = field(default=None, compare=False)

    def __post_init__(self):
        for i, n in enumerate(self.nodes):
            if any(s >= i for s in n.srcs):
                raise IRError(f"{self.name}: node %{i} ({n.op}) uses a later node; nodes must be topological")

    # -- identity -------------------------------------------------------------------------------
    def key(self) -> str:
        """The canonical text the hash is taken of (the name and weight init hints excluded)."""
        parts = ["in " + ",".join(f"{i.name}:{i.kind}" for i in self.inputs)]
        for n in self.nodes:
            arg = float(n.arg).hex() if isinstance(n.arg, float) else n.arg
            parts.append(f"{n.op} {','.join(map(str, n.srcs))} {arg}")
        parts.append("out " + ",".join(f"{o.name}:{o.node}:{o.kind}:{int(o.row_partial)}" for o in self.outputs))
        return "\n".join(parts)

    @cached_property
    def hash(self) -> str:
        return hashlib.sha256(self.key().encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RowProgram) and self.key() == other.key()

    def known_as(self, function: str, **args: float) -> RowProgram:
        """This program tagged as the built-in `function` with static `args` (see `builtin`)."""
        return RowProgram(self.name, self.inputs, self.nodes, self.outputs,
                          builtin=(function, tuple(sorted((k, float(v)) for k, v in args.items()))))

    def __hash__(self) -> int:
        return hash(self.hash)

    # -- serialisation (plain data: JSON, subprocesses) -------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": [[i.name, i.kind, i.init] for i in self.inputs],
            "nodes": [[n.op, list(n.srcs), n.arg, n.kind, n.dtype] for n in self.nodes],
            "outputs": [[o.name, o.node, o.kind, o.row_partial] for o in self.outputs],
        }

    @classmethod
    def from_dict(cls, d: dict) -> RowProgram:
        return cls(d["name"], tuple(Input(*i) for i in d["inputs"]),
                   tuple(Node(op, tuple(srcs), arg, kind, dtype) for op, srcs, arg, kind, dtype in d["nodes"]),
                   tuple(Output(*o) for o in d["outputs"]))

    # -- lookup ---------------------------------------------------------------------------------
    def input(self, name: str) -> Input:
        for i in self.inputs:
            if i.name == name:
                return i
        raise IRError(f"{self.name}: no input named '{name}'; inputs are {', '.join(self.input_names)}")

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    def kinds_of(self, kind: str) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs if i.kind == kind)

    @property
    def uses_width(self) -> bool:
        return any(n.op == "width" for n in self.nodes)

    # -- printing -------------------------------------------------------------------------------
    def ref(self, i: int) -> str:
        """How node i is shown as an operand: inputs by name, literals inline, D for the width."""
        n = self.nodes[i]
        if n.op == "input":
            return n.arg
        if n.op == "const":
            return _fmt_const(n.arg)
        return "D" if n.op == "width" else f"%{i}"

    def __str__(self) -> str:
        sig = ", ".join(f"{i.name}: {i.kind}" for i in self.inputs)
        outs = ", ".join(f"{o.name}: {o.kind}" + (" (row partial)" if o.row_partial else "") for o in self.outputs)
        lines = [f"{self.name}({sig}) -> ({outs})  [hash {self.hash[:8]}]"]
        for i, n in enumerate(self.nodes):
            if n.op in LEAF:
                continue
            args = " ".join(self.ref(s) for s in n.srcs)
            if n.op in ("pow", "cast"):
                args += f" {n.arg}"
            lines.append(f"  %{i:<3} = {n.op} {args}".ljust(44) + f"{n.kind}{' bool' if n.dtype == 'bool' else ''}")
        for o in self.outputs:
            lines.append(f"  {o.name} <- {self.ref(o.node)}")
        return "\n".join(lines)

    __repr__ = __str__


class Value:
    """A node of a program under construction; arithmetic on values adds nodes to the builder."""

    __slots__ = ("b", "i")

    def __init__(self, builder: ProgramBuilder, index: int):
        self.b, self.i = builder, index

    @property
    def node(self) -> Node:
        return self.b.nodes[self.i]

    @property
    def kind(self) -> str:
        return self.node.kind

    def const_value(self) -> float | None:
        n = self.node
        return float(n.arg) if n.op == "const" else None

    def _v(self, other) -> Value:
        return self.b.lift(other)

    def __add__(self, o): return self.b.emit("add", self, self._v(o))
    def __radd__(self, o): return self.b.emit("add", self._v(o), self)
    def __sub__(self, o): return self.b.emit("sub", self, self._v(o))
    def __rsub__(self, o): return self.b.emit("sub", self._v(o), self)
    def __mul__(self, o): return self.b.emit("mul", self, self._v(o))
    def __rmul__(self, o): return self.b.emit("mul", self._v(o), self)
    def __truediv__(self, o): return self.b.emit("div", self, self._v(o))
    def __rtruediv__(self, o): return self.b.emit("div", self._v(o), self)
    def __neg__(self): return self.b.emit("neg", self)
    def __lt__(self, o): return self.b.emit("lt", self, self._v(o))
    def __gt__(self, o): return self.b.emit("gt", self, self._v(o))
    def __le__(self, o): return self.b.emit("le", self, self._v(o))
    def __ge__(self, o): return self.b.emit("ge", self, self._v(o))

    def __pow__(self, c):
        if isinstance(c, Value):
            c = c.const_value()
        if not isinstance(c, (int, float)) or isinstance(c, bool):
            raise IRError("the exponent of ** must be a constant number")
        return self.b.emit("pow", self, arg=float(c))

    def eq(self, o) -> Value: return self.b.emit("eq", self, self._v(o))
    def exp(self) -> Value: return self.b.emit("exp", self)
    def log(self) -> Value: return self.b.emit("log", self)
    def sqrt(self) -> Value: return self.b.emit("sqrt", self)
    def rsqrt(self) -> Value: return self.b.emit("rsqrt", self)
    def sigmoid(self) -> Value: return self.b.emit("sigmoid", self)
    def silu(self) -> Value: return self.b.emit("silu", self)
    def tanh(self) -> Value: return self.b.emit("tanh", self)
    def relu(self) -> Value: return self.b.emit("relu", self)
    def square(self) -> Value: return self.b.emit("square", self)
    def cast(self, dtype: str) -> Value: return self.b.emit("cast", self, arg=dtype)
    def sum(self) -> Value: return self.b.reduce("sum", self, strict=True)
    def mean(self) -> Value: return self.b.reduce("mean", self, strict=True)
    def max(self) -> Value: return self.b.reduce("max", self, strict=True)

    def where(self, a, b) -> Value:
        """`a` where this boolean is true, else `b`."""
        return self.b.emit("where", self, self._v(a), self._v(b))

    def __bool__(self):
        raise IRError("a program value has no truth value; use where(cond, a, b) instead of if/and/or")

    def __repr__(self) -> str:
        n = self.node
        return f"Value(%{self.i} = {n.op} {n.srcs} {n.arg!r}: {n.kind})"


class ProgramBuilder:
    """Builds a RowProgram: declare inputs, compute with `Value` arithmetic, name outputs, `build()`."""

    def __init__(self, name: str):
        if not name.isidentifier():
            raise IRError(f"program name '{name}' must be an identifier (letters, digits, _)")
        self.name = name
        self.nodes: list[Node] = []
        self.inputs: list[Input] = []
        self.outputs: list[Output] = []
        self._memo: dict[tuple, int] = {}
        self._digests: list[bytes] = []  # structural (Merkle) digest of each node, independent of build order

    # -- leaves ---------------------------------------------------------------------------------
    def input(self, name: str, kind: str, init: str | None = None) -> Value:
        """An input of kind row, vector or scalar."""
        if kind not in INPUT_KINDS:
            raise IRError(f"{self.name}: input '{name}' has kind '{kind}'; inputs are {', '.join(INPUT_KINDS)}")
        if not name.isidentifier():
            raise IRError(f"{self.name}: input name '{name}' must be an identifier")
        if name in self._names():
            raise IRError(f"{self.name}: the name '{name}' is declared twice")
        self.inputs.append(Input(name, kind, init))
        return self._add(Node("input", (), name, kind, "f32"))

    def row(self, name: str) -> Value:
        """A row input [R, D]."""
        return self.input(name, "row")

    def vector(self, name: str, init: str | None = None) -> Value:
        """A vector input [D], shared by all rows (a weight; `init` is a hint such as 'ones' or 'zeros')."""
        return self.input(name, "vector", init)

    def scalar(self, name: str) -> Value:
        """A per-row scalar input [R]."""
        return self.input(name, "scalar")

    def const(self, value: float) -> Value:
        return self._add(Node("const", (), float(value), "const", "f32"))

    def value(self, index: int) -> Value:
        """The value of node `index` of this builder."""
        return Value(self, index)

    def width(self) -> Value:
        """D, the row width, as a number (known only when the program runs)."""
        return self._add(Node("width", (), None, "const", "f32"))

    def lift(self, v) -> Value:
        if isinstance(v, Value):
            if v.b is not self:
                raise IRError(f"{self.name}: a value from another program ('{v.b.name}') was used here")
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return self.const(v)
        raise IRError(f"{self.name}: cannot use {type(v).__name__} {v!r} as a program value")

    def _names(self) -> set[str]:
        return {i.name for i in self.inputs} | {o.name for o in self.outputs}

    def _add(self, node: Node) -> Value:
        k = node.key()
        if k not in self._memo:
            self._memo[k] = len(self.nodes)
            self.nodes.append(node)
            arg = float(node.arg).hex() if isinstance(node.arg, float) else str(node.arg)
            h = hashlib.blake2b(f"{node.op}|{arg}".encode(), digest_size=16)
            for src in node.srcs:
                h.update(self._digests[src])
            self._digests.append(h.digest())
        return Value(self, self._memo[k])

    # -- ops ------------------------------------------------------------------------------------
    def emit(self, op: str, *srcs: Value, arg=None) -> Value:
        """Add an elementwise op (after constant folding and algebraic simplification)."""
        if op not in UNARY + BINARY + COMPARE + OTHER:
            raise IRError(f"{self.name}: unknown op '{op}'")
        arity = 3 if op == "where" else 2 if op in BINARY + COMPARE else 1
        if len(srcs) != arity:
            raise IRError(f"{self.name}: '{op}' takes {arity} operand{'s' if arity > 1 else ''}, got {len(srcs)}")
        srcs = tuple(self.lift(s) for s in srcs)
        dtypes = [s.node.dtype for s in srcs]
        if op == "where":
            if dtypes[0] != "bool":
                raise IRError(f"{self.name}: where(cond, a, b) needs a boolean condition (a comparison)")
            if dtypes[1] != "f32" or dtypes[2] != "f32":
                raise IRError(f"{self.name}: where(cond, a, b) selects between numbers, not booleans")
        elif op == "cast":
            if arg not in CAST_TYPES:
                raise IRError(f"{self.name}: cannot cast to '{arg}'; types are {', '.join(CAST_TYPES)}")
        elif "bool" in dtypes:
            raise IRError(f"{self.name}: '{op}' needs numbers, found a boolean; cast(cond, 'f32') gives 0 or 1")
        out = simplify_node(self, op, srcs, arg)
        if out is not None:
            return out
        kind = "const"
        for s in srcs:
            kind = join(kind, s.kind)
        dtype = "bool" if op in COMPARE or (op == "cast" and arg == "bool") else "f32"
        if op in COMMUTATIVE and self._digests[srcs[1].i] < self._digests[srcs[0].i]:
            # operands ordered by structure: a+b and b+a share one node, whatever the build order
            srcs = (srcs[1], srcs[0])
        return self._add(Node(op, tuple(s.i for s in srcs), arg, kind, dtype))

    def reduce(self, op: str, v: Value, strict: bool = False) -> Value:
        """A last-dimension reduction. With strict=False (autodiff, simplification) the reduction
        of a value that is constant along the row is folded: sum(c) = c*D, mean(c) = max(c) = c."""
        v = self.lift(v)
        if v.node.dtype == "bool":
            raise IRError(f"{self.name}: cannot {op} booleans; cast(cond, 'f32') first")
        if v.kind in ("scalar", "const"):
            if strict:
                what = "a per-row scalar" if v.kind == "scalar" else "a constant"
                raise IRError(f"{self.name}: {op}() of {what}: reductions run over the D entries of a row or vector")
            return v * self.width() if op == "sum" else v
        return self._add(Node(op, (v.i,), None, "scalar", "f32"))

    # -- outputs --------------------------------------------------------------------------------
    def output(self, name: str, v: Value, kind: str | None = None, row_partial: bool = False) -> None:
        """Name a result. Its kind defaults to that of the value (a vector is stored as a row)."""
        v = self.lift(v)
        if not name.isidentifier():
            raise IRError(f"{self.name}: output name '{name}' must be an identifier")
        if name in self._names():
            raise IRError(f"{self.name}: the name '{name}' is declared twice")
        if v.node.dtype == "bool":
            v = v.cast("f32")
        if kind is None:
            if v.kind == "const":
                raise IRError(f"{self.name}: output '{name}' is a constant; give its kind ('row' or 'scalar')")
            kind = "row" if v.kind in ("row", "vector") else "scalar"
        if kind not in OUTPUT_KINDS:
            raise IRError(f"{self.name}: output '{name}' has kind '{kind}'; outputs are rows or per-row scalars")
        if kind == "scalar" and v.kind in ("row", "vector"):
            raise IRError(f"{self.name}: output '{name}' is a {v.kind} but was declared a per-row scalar; reduce it")
        self.outputs.append(Output(name, v.i, kind, row_partial))

    def build(self) -> RowProgram:
        if not self.outputs:
            raise IRError(f"{self.name}: a program needs at least one output")
        return canonical(self.name, tuple(self.inputs), tuple(self.nodes), tuple(self.outputs))


def canonical(name: str, inputs: tuple[Input, ...], nodes: tuple[Node, ...], outputs: tuple[Output, ...]) -> RowProgram:
    """Renumber nodes in depth-first post-order from the outputs; nodes no output needs are dropped."""
    order: dict[int, int] = {}
    new: list[Node] = []
    for o in outputs:
        stack = [(o.node, False)]
        while stack:  # iterative: deep programs must not hit the recursion limit
            i, expanded = stack.pop()
            if i in order:
                continue
            if expanded:
                n = nodes[i]
                order[i] = len(new)
                new.append(Node(n.op, tuple(order[s] for s in n.srcs), n.arg, n.kind, n.dtype))
            else:
                stack.append((i, True))
                stack.extend((s, False) for s in reversed(nodes[i].srcs) if s not in order)
    outs = tuple(Output(o.name, order[o.node], o.kind, o.row_partial) for o in outputs)
    return RowProgram(name, inputs, tuple(new), outs)


