"""RowProgram -> C-style kernel source, in three dialects: CUDA C (CuPy, NVRTC), OpenCL C (PoCL) and
host C (the system C compiler; work-items run as loops between barriers, see dialects.py).

One block (work-group) per row; its threads stride over the row, so a thread holds a handful of
fp32 scalars whatever D is (no register arrays, nothing to spill as D grows):

    row = <group id>; tid = <local id>
    pass k (one per reduction depth):  for (col = tid; col < cols; col += BLOCK)  acc = acc (+|max) v[col]
                                       then a tree reduction of the BLOCK partials in shared memory
    last pass:                         for (col = tid; ...)  store every row output

Row values are recomputed from the inputs in each pass rather than kept: a reduction's operand is
computed in the pass of its depth, a value after a reduction in a later one. Values are fp32
whatever the storage type (fp32, fp16, bf16), every access is bounded (the column loop runs to
n_cols, or not at all in a block past the last row, which still meets every barrier), mean is
sum * (1 / D) and x / D is x * (1 / D), with 1 / D computed once by the dialect's reciprocal (a
division is a subroutine call, and ptxas spills around it in kernels that hold many values:
LayerNorm's backward on sm_80 / sm_90),
and max starts from -inf.

The dialects are tables (`Dialect`: `smem_prefix`, `barrier`, `type_map`, `load`, `store`, `math`,
`helpers`, ...), the expressions are one table shared by both (`C`, the table of the printer base in
backends/common/expr_printer.py) and `REDUCE_FOR_OP`: there is no `if` on the dialect in the printer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from hrmspec.backends.common.expr_printer import INFIX, ExprPrinter, ExprTable
from hrmspec.backends.cstyle.dialects import CUDA, DIALECTS, HOST, OPENCL, Dialect
from hrmspec.errors import KernelError
from hrmspec.ir.kernel import kernel_name
from hrmspec.ir.program import RowProgram

__all__ = ["BLOCK", "C", "CUDA", "DIALECTS", "HOST", "OPENCL", "CSource", "Dialect", "block_size", "kernel_name",
           "parameters", "render_kernel", "render_source"]


def _fp32(v: float) -> float:
    """The fp32 nearest to v (an infinity beyond fp32's range)."""
    with np.errstate(over="ignore"):
        return float(np.float32(v))


def _fp32_text(v: float) -> str:
    """A finite fp32 as the shortest decimal that reads back as it."""
    text = str(np.float32(v))
    text = text if ("." in text or "e" in text) else text + ".0"
    return f"({text}f)" if text.startswith("-") else f"{text}f"


BLOCK = 256  # threads per row at most: __launch_bounds__(256) leaves ptxas up to 255 registers a thread


# -- the expressions, shared by both dialects: formats of the operands ({0}, {1}, {2}) and the math names -----
C = ExprTable(
    code_for_op={
        **INFIX,
        "exp": "{exp}({0})",
        "log": "{log}({0})",
        "sqrt": "{sqrt}({0})",
        "rsqrt": "{rsqrt}({0})",
        "sigmoid": "1.0f / (1.0f + {exp}(-{0}))",
        "silu": "{0} / (1.0f + {exp}(-{0}))",  # a sigmoid(a) = a / (1 + e^-a)
        "tanh": "{tanh}({0})",
        "relu": "hrm_max({0}, 0.0f)",  # relu(NaN) = NaN, as torch's
        "where": "{0} ? {1} : {2}",
    },
    cast={
        "f32": "(float){0}",  # from a boolean: 0.0 or 1.0
        "bool": "{0} != 0.0f",
        "f16": "hrm_round_f16({0})",  # round to the half type, keep computing in fp32
        "bf16": "hrm_round_bf16({0})",
    },
    reciprocal="1.0f / {0}",
    power="{pow}({0}, {1})",  # the library pow
    rounding=_fp32,
    literal=_fp32_text,
    # names the kernel uses itself, and the words of C, CUDA C and OpenCL C
    reserved=frozenset({
        "row", "outer", "inner", "tid", "col", "cols", "in_row", "red", "width", "inv_width", "step", "n_rows",
        "n_inner", "n_cols", "half", "bool",
        "float", "int", "long", "char", "short", "double", "uint", "ushort", "uchar", "ulong", "void", "const",
        "restrict", "inline", "static", "extern", "if", "else", "for", "while", "do", "return", "break",
        "continue", "switch", "case", "default", "goto", "sizeof", "struct", "union", "enum", "typedef",
        "signed", "unsigned", "volatile", "register", "auto", "true", "false", "kernel", "global", "local",
        "constant", "private", "asm", "new", "delete", "this", "class", "template", "namespace", "operator",
        "typename", "using", "virtual", "INFINITY", "NAN", "min", "max", "exp", "log", "sqrt", "rsqrt", "tanh",
        "pow", "fmax", "group", "expf", "logf", "sqrtf", "tanhf", "fmaxf", "powf", "rintf", "fabs", "copysign",
        "memcpy"}),
    # temporaries t<i>, accumulators a<i>, parameters, and names the implementation reserves (_x)
    own_names=r"_.*|[ta]\d+|.*_(ptr|offset|stride|istride)|hrm_.*",
)
# reduction -> (identity, how two partials combine)
REDUCE_FOR_OP = {"sum": ("0.0f", "{0} + {1}"), "mean": ("0.0f", "{0} + {1}"), "max": ("-{inf}", "hrm_max({0}, {1})")}


def names(d: Dialect) -> dict[str, str]:
    """What the C table's formats name: the dialect's math functions and special values."""
    return {**d.math, "inf": d.inf, "nan": d.nan, "-inf": f"(-{d.inf})"}


def block_size(width: int) -> int:
    """Threads per row: a power of two from one warp (32) to BLOCK, with up to ~32 columns per thread
    (a warp per row up to D = 1024, 128 threads at D = 4096), so a GPU keeps several rows per SM."""
    want = max(1, -(-width // 32))
    return min(BLOCK, max(32, 1 << (want - 1).bit_length()))


@dataclass(frozen=True)
class Param:
    name: str
    what: str  # ptr_/offset_/stride_/istride_ + in/out, n_rows, n_inner, n_cols
    ref: str = ""  # the input or output it belongs to


def parameters(program: RowProgram, d: Dialect) -> list[Param]:
    """The kernel parameters in order: per input, then per output, the dialect's pointer
    parameters (and, for rows, the outer and inner row strides: a row is at (row / n_inner) * stride
    + (row % n_inner) * istride, see backends/common/rowlayout.py); then n_rows, n_inner and n_cols."""
    params = []
    for group, items in (("in", program.inputs), ("out", program.outputs)):
        for item in items:
            params += [Param(f"{item.name}_{part}", f"{part}_{group}", item.name) for part in d.pointer_params]
            if item.kind == "row":
                params.append(Param(f"{item.name}_stride", f"stride_{group}", item.name))
                params.append(Param(f"{item.name}_istride", f"istride_{group}", item.name))
    params += [Param("n_rows", "n_rows"), Param("n_inner", "n_inner"), Param("n_cols", "n_cols")]
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise KernelError(f"{program.name}: kernel parameters clash ({', '.join(names)}); rename an input or output")
    return params


def _declare(p: Param, d: Dialect, dtypes: Mapping[str, str]) -> str:
    if p.what == "ptr_in":
        return f"{d.global_prefix}const {d.type_map[dtypes[p.ref]]}*{d.restrict} {p.name}"
    if p.what == "ptr_out":
        return f"{d.global_prefix}{d.type_map[dtypes[p.ref]]}* {p.name}"
    return f"const {d.type_map['i32' if p.what in ('n_rows', 'n_inner', 'n_cols') else 'i64']} {p.name}"


@dataclass
class _Schedule:
    """When each node is available: after how many passes over the row (0 = before the first)."""

    avail: list[int]
    passes: list[list[int]] = field(default_factory=list)  # the reductions computed in each pass

    @classmethod
    def of(cls, p: RowProgram) -> _Schedule:
        avail: list[int] = []
        for n in p.nodes:
            a = max((avail[s] for s in n.srcs), default=0)
            avail.append(a + 1 if n.op in REDUCE_FOR_OP else a)
        s = cls(avail)
        for i, n in enumerate(p.nodes):
            if n.op in REDUCE_FOR_OP:
                k = avail[i] - 1
                s.passes += [[] for _ in range(k + 1 - len(s.passes))]
                s.passes[k].append(i)
        return s


def _row_closure(p: RowProgram, roots: list[int]) -> list[int]:
    """The row and vector nodes the roots need, in program order (scalars are computed outside the loop)."""
    seen: set[int] = set()
    stack = [r for r in roots if p.nodes[r].kind in ("row", "vector")]
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            stack += [s for s in p.nodes[i].srcs if p.nodes[s].kind in ("row", "vector")]
    return sorted(seen)


def _slot(slot: int, block: int, i: str) -> str:
    """Entry i of a reduction's slot in the scratch array."""
    return f"red[{i}]" if slot == 0 else f"red[{slot * block}]" if i == "0" else f"red[{slot * block} + {i}]"


class _Printer(ExprPrinter):
    def __init__(self, p: RowProgram, d: Dialect, dtypes: Mapping[str, str], block: int):
        super().__init__(C, names(d))
        self.p, self.d, self.dtypes, self.block = p, d, dtypes, block
        self.refs = [self._ref(i) for i in range(len(p.nodes))]
        self.lines: list[str] = []
        self.nesting = 0  # dialect loops open around the current line (host C: rows, work-items)

    def _ref(self, i: int) -> str:
        n = self.p.nodes[i]
        if n.op == "input":
            return self.identifier(n.arg)
        if n.op == "const":
            return self.literal(n.arg)
        return "width" if n.op == "width" else f"t{i}"

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("  " * (depth + self.nesting) + line)

    def open(self, depth: int, pair: tuple[str, str]) -> None:
        """Open a dialect's loop (`Dialect.groups` or `.threads`): what follows is indented inside it. A
        device dialect has none: nothing is printed."""
        if pair[0]:
            self.emit(depth, pair[0].format(block=self.block))
            self.nesting += 1

    def close(self, depth: int, pair: tuple[str, str]) -> None:
        if pair[0]:
            self.nesting -= 1
            self.emit(depth, pair[1])

    def barrier(self, depth: int, why: str = "") -> None:
        if self.d.barrier:
            self.emit(depth, self.d.barrier + (f"  // {why}" if why else ""))

    def index(self, name: str, kind: str) -> str:
        i = {"row": f"outer * {name}_stride + inner * {name}_istride + col", "vector": "col", "scalar": "row"}[kind]
        return self.d.index.format(name=name, i=i)

    def define(self, depth: int, i: int) -> None:
        """The statement computing node i (literals and the width are inlined, not defined)."""
        n, d = self.p.nodes[i], self.d
        if n.op in ("const", "width"):
            return
        if n.op == "input":
            expr = d.load[self.dtypes[n.arg]].format(ptr=f"{n.arg}_ptr", i=self.index(n.arg, n.kind))
            expr = f"in_row ? {expr} : 0.0f" if n.kind == "scalar" else expr
        elif n.op == "div" and self.p.nodes[n.srcs[1]].op == "width":
            expr = f"{self.refs[n.srcs[0]]} * inv_width"
        else:
            expr = self.expression(n, [self.refs[s] for s in n.srcs])
        self.emit(depth, f"const {d.type_map['bool' if n.dtype == 'bool' else 'f32']} {self.refs[i]} = {expr};")

    def loop(self, roots: list[int]) -> None:
        self.emit(1, f"for (int col = tid; col < cols; col += {self.block}) {{")
        for i in _row_closure(self.p, roots):
            self.define(2, i)

    def reduce_pass(self, k: int, reductions: list[int]) -> None:
        p, d, B = self.p, self.d, self.block
        ops = ", ".join(f"{p.nodes[r].op} %{p.nodes[r].srcs[0]}" for r in reductions)
        self.emit(1, f"// pass {k + 1}: {ops}")
        self.open(1, d.threads)
        for r in reductions:
            self.emit(1, f"float a{r} = {REDUCE_FOR_OP[p.nodes[r].op][0].format(inf=d.inf)};")
        self.loop([p.nodes[r].srcs[0] for r in reductions])
        for r in reductions:
            combine = REDUCE_FOR_OP[p.nodes[r].op][1]
            self.emit(2, f"a{r} = {combine.format(f'a{r}', self.refs[p.nodes[r].srcs[0]], **d.math)};")
        self.emit(1, "}")
        for slot, r in enumerate(reductions):
            self.emit(1, f"{_slot(slot, B, 'tid')} = a{r};")
        self.close(1, d.threads)
        self.barrier(1)
        self.emit(1, f"for (int step = {B // 2}; step > 0; step >>= 1) {{  // tree: halve the partials each step")
        self.open(2, d.threads)
        self.emit(2, "if (tid < step) {")
        for slot, r in enumerate(reductions):
            mine, other = _slot(slot, B, "tid"), _slot(slot, B, "tid + step")
            self.emit(3, f"{mine} = {REDUCE_FOR_OP[p.nodes[r].op][1].format(mine, other, **d.math)};")
        self.emit(2, "}")
        self.close(2, d.threads)
        self.barrier(2)
        self.emit(1, "}")
        for slot, r in enumerate(reductions):
            scale = " * inv_width" if p.nodes[r].op == "mean" else ""
            self.emit(1, f"const float t{r} = {_slot(slot, B, '0')}{scale};")

    def scalars(self, s: _Schedule, avail: int) -> None:
        """Define the per-row scalars (and computed constants) that become available after `avail` passes."""
        for i, n in enumerate(self.p.nodes):
            if n.kind in ("scalar", "const") and n.op not in REDUCE_FOR_OP and s.avail[i] == avail:
                self.define(1, i)

    def body(self) -> list[str]:
        p, d = self.p, self.d
        s = _Schedule.of(p)
        if s.passes:
            slots = max(len(r) for r in s.passes)
            self.emit(1, f"{d.smem_prefix}float red[{slots * self.block}];  // one slot of {self.block} partials "
                         "per reduction of a pass")
        self.open(1, d.groups)
        self.emit(1, f"const {d.type_map['i64']} row = {d.group_id};")
        self.emit(1, f"const int tid = {d.local_id};")
        # a block past the last row touches no memory but still meets every barrier: no early return, which
        # a barrier-unaware compiler (PoCL's work-group loops) must not see either
        self.emit(1, "const bool in_row = row < n_rows;")
        if p.kinds_of("row") or any(o.kind == "row" for o in p.outputs):
            # 32-bit unsigned division, 64-bit products below: rows are non-negative ints, a 64-bit division
            # is a slow library call and a signed 32-bit one a subroutine whose call frame ptxas spills to
            # the stack in kernels that hold many values (LayerNorm's backward on sm_80 / sm_90)
            self.emit(1, f"const {d.type_map['i64']} outer = (unsigned)row / (unsigned)n_inner, "
                         "inner = (unsigned)row % (unsigned)n_inner;")
        self.emit(1, "const int cols = in_row ? n_cols : 0;")
        if p.uses_width or any(n.op == "mean" for n in p.nodes):
            self.emit(1, "const float width = (float)n_cols;")
        if any(n.op == "mean" or (n.op == "div" and p.nodes[n.srcs[1]].op == "width") for n in p.nodes):
            recip = d.reciprocal.format("width")
            self.emit(1, f"const float inv_width = {recip};  // once per row: mean and x / D multiply by it")
        self.scalars(s, 0)
        for k, reductions in enumerate(s.passes):
            if k:
                self.barrier(1, "every thread has read the previous results before red is reused")
            self.reduce_pass(k, reductions)
            self.scalars(s, k + 1)
        rows = [o for o in p.outputs if o.kind == "row"]
        if rows:
            self.emit(1, f"// pass {len(s.passes) + 1}: the row outputs")
            self.open(1, d.threads)
            self.loop([o.node for o in rows])
            for o in rows:
                self.store(2, o.name, "row", self.refs[o.node])
            self.emit(1, "}")
            self.close(1, d.threads)
        scalars = [o for o in p.outputs if o.kind == "scalar"]
        if scalars:
            self.open(1, d.threads)
            self.emit(1, "if (tid == 0 && in_row) {")
            for o in scalars:
                self.store(2, o.name, "scalar", self.refs[o.node])
            self.emit(1, "}")
            self.close(1, d.threads)
        self.close(1, d.groups)
        return self.lines

    def store(self, depth: int, name: str, kind: str, value: str) -> None:
        self.emit(depth, self.d.store[self.dtypes[name]].format(ptr=f"{name}_ptr", i=self.index(name, kind), v=value))


def render_kernel(program: RowProgram, name: str, dialect: Dialect, dtypes: Mapping[str, str],
                  block: int = BLOCK) -> str:
    """The kernel `name` computing `program`, one block of `block` threads per row. `dtypes` maps
    every input and output name to its storage type: f32, f16 or bf16."""
    if block < 1 or block & (block - 1) or block > 1024:
        raise KernelError(f"{program.name}: {block} threads per row; the tree reduction needs a power of two <= 1024")
    missing = [n for n in (*program.input_names, *program.output_names) if dtypes.get(n) not in dialect.load]
    if missing:
        raise KernelError(f"{program.name}: no storage type (f32, f16 or bf16) for {', '.join(missing)}")
    d = dialect
    params = parameters(program, d)
    head = [f"{d.kernel_prefix.format(block=block)} {name}("]
    for group, items in (("in", program.inputs), ("out", program.outputs)):
        for item in items:  # one line per buffer: its pointer, offset and strides
            decl = ", ".join(_declare(q, d, dtypes) for q in params if q.ref == item.name and q.what.endswith(group))
            head.append(f"    {decl},  // {'input' if group == 'in' else 'output'} {item.name}: {item.kind}")
    head.append("    const int n_rows, const int n_inner, const int n_cols) {")
    doc = ["  // " + line for line in str(program).splitlines()]
    return "\n".join(head + doc + _Printer(program, d, dtypes, block).body() + ["}"]) + "\n"


def render_source(program: RowProgram, name: str, dialect: Dialect, dtypes: Mapping[str, str],
                  block: int = BLOCK) -> str:
    """A complete translation unit: a header, the dialect's prelude, the helpers the kernel calls, the kernel."""
    kernel = render_kernel(program, name, dialect, dtypes, block)
    used: list[str] = []
    text = kernel
    for fn in reversed(dialect.helpers):  # a helper may call the ones defined before it
        if f"{fn}(" in text:
            used.append(fn)
            text += dialect.helpers[fn]
    storage = ", ".join(f"{k}: {dtypes[k]}" for k in (*program.input_names, *program.output_names))
    header = (f"// Generated by hrmspec from RowProgram '{program.name}' ({program.hash}); do not edit.\n"
              f"// dialect {dialect.name}, {block} threads per row, storage {storage}\n")
    helpers = "".join(dialect.helpers[fn] + "\n" for fn in dialect.helpers if fn in used)
    return header + dialect.prelude + "\n" + helpers + kernel


def storage_types(program: RowProgram, storage: str) -> dict[str, str]:
    """Every input and output of `program` stored as `storage`, except row partials (the per-row
    terms of a vector's gradient, summed over rows afterwards), which are always f32."""
    dtypes = {name: storage for name in program.input_names}
    dtypes.update({o.name: "f32" if o.row_partial else storage for o in program.outputs})
    return dtypes


@dataclass(frozen=True)
class CSource:
    """What `hrmspec compile --emit` writes for a C dialect: each kernel specialised for one storage
    type (row partials in f32, as the launchers store them) and `block_size(width)` threads per row
    (backends/common/expr_printer.py: KernelSource)."""

    dialect: Dialect
    storage: str

    def source(self, program: RowProgram, name: str, width: int) -> str:
        return render_source(program, name, self.dialect, storage_types(program, self.storage), block_size(width))

    def specialisation(self, width: int) -> dict[str, str | int]:
        return {"storage": self.storage, "block": block_size(width)}
