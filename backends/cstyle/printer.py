"""RowProgram -> C-style kernel source, in two dialects: CUDA C (CuPy, NVRTC) and OpenCL C (PoCL).

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
sum / D, and max starts from -inf.

The dialects are tables (`Dialect`: `smem_prefix`, `barrier`, `type_map`, `load`, `store`, `math`,
`helpers`, ...), the ops are tables shared by both (`CODE_FOR_OP`, `CAST`, `REDUCE_FOR_OP`, `POW`):
there is no `if` on the dialect in the printer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from hrmspec.backends.rowops import KernelError
from hrmspec.ir.kernel import kernel_name
from hrmspec.ir.program import RowProgram

__all__ = ["BLOCK", "CUDA", "DIALECTS", "OPENCL", "Dialect", "block_size", "kernel_name", "parameters",
           "render_kernel", "render_source"]

BLOCK = 256  # threads per row at most: __launch_bounds__(256) leaves ptxas up to 255 registers a thread

# bf16 = the top 16 bits of an fp32; rounding adds 0x7FFF plus the lowest kept bit (ties to even), and
# a NaN keeps its top bits with the quiet bit set (the carry could otherwise turn it into an infinity)
_BF16 = {
    "hrm_bf16_to_f32": """\
{fn} float hrm_bf16_to_f32(const {u16} b) {{
  return {as_float}(({u32})b << 16);
}}
""",
    "hrm_f32_to_bf16": """\
{fn} {u16} hrm_f32_to_bf16(const float f) {{
  const {u32} u = {as_uint}(f);
  return (u & 0x7fffffffu) > 0x7f800000u ? ({u16})((u >> 16) | 0x40u)
                                         : ({u16})((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}}
""",
    "hrm_round_bf16": """\
{fn} float hrm_round_bf16(const float f) {{
  return hrm_bf16_to_f32(hrm_f32_to_bf16(f));
}}
""",
}


def _bf16_helpers(**names: str) -> dict[str, str]:
    return {k: v.format(**names) for k, v in _BF16.items()}


@dataclass(frozen=True)
class Dialect:
    name: str  # cuda | opencl
    suffix: str  # of the source file
    prelude: str  # the first lines of every source
    kernel_prefix: str  # what precedes the kernel's name; {block} is the number of threads per row
    helper_prefix: str  # what precedes a helper function's return type
    global_prefix: str  # address space of buffer pointers
    smem_prefix: str  # address space of the reduction scratch, shared by the threads of one row
    restrict: str  # inputs never alias outputs (the launchers check)
    barrier: str
    group_id: str  # the row: one block (work-group) per row
    local_id: str  # the thread within the row's block
    pointer_params: tuple[str, ...]  # parameters per buffer: a pointer, and in OpenCL an element offset
    index: str  # the element of buffer {name} at {i}
    type_map: dict[str, str]  # f32 f16 bf16 (storage types as the kernel sees them), bool, i32, i64
    load: dict[str, str]  # storage type -> expression of ({ptr}, {i}) giving an fp32
    store: dict[str, str]  # storage type -> statement storing fp32 {v} at ({ptr}, {i})
    math: dict[str, str]  # the fp32 math functions by role
    inf: str  # +infinity as an fp32 expression
    nan: str
    helpers: dict[str, str]  # name -> definition, printed (in this order) when the kernel calls it
    compile_options: tuple[str, ...] = field(default=())  # what every compiler of this dialect must be given


CUDA = Dialect(
    name="cuda",
    suffix=".cu",
    prelude="// compile with --fmad=false: a product and a sum are never contracted into an fma, so a value\n"
            "// recomputed in a later pass over the row is bit-identical (max's backward compares them);\n"
            "// and --prec-div=false: division within 2 ulp, as Triton's (IEEE division's slow path is a\n"
            "// call that needs a stack frame on sm_90)\n",
    kernel_prefix='extern "C" __global__ void __launch_bounds__({block})',
    helper_prefix="static __device__ __forceinline__",
    global_prefix="",
    smem_prefix="__shared__ ",
    restrict=" __restrict__",
    barrier="__syncthreads();",
    group_id="blockIdx.x",
    local_id="threadIdx.x",
    pointer_params=("ptr",),
    index="{i}",
    type_map={"f32": "float", "f16": "unsigned short", "bf16": "unsigned short", "bool": "bool", "i32": "int",
              "i64": "long long"},
    load={"f32": "{ptr}[{i}]", "f16": "hrm_f16_to_f32({ptr}[{i}])", "bf16": "hrm_bf16_to_f32({ptr}[{i}])"},
    store={"f32": "{ptr}[{i}] = {v};", "f16": "{ptr}[{i}] = hrm_f32_to_f16({v});",
           "bf16": "{ptr}[{i}] = hrm_f32_to_bf16({v});"},
    math={"exp": "expf", "log": "logf", "sqrt": "sqrtf", "rsqrt": "rsqrtf", "tanh": "tanhf", "fmax": "fmaxf",
          "pow": "powf"},
    inf="__int_as_float(0x7f800000)",
    nan="__int_as_float(0x7fc00000)",
    helpers={
        "hrm_f16_to_f32": """\
static __device__ __forceinline__ float hrm_f16_to_f32(const unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
""",
        "hrm_f32_to_f16": """\
static __device__ __forceinline__ unsigned short hrm_f32_to_f16(const float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
""",
        "hrm_round_f16": """\
static __device__ __forceinline__ float hrm_round_f16(const float f) {
  return hrm_f16_to_f32(hrm_f32_to_f16(f));
}
""",
        **_bf16_helpers(fn="static __device__ __forceinline__", u16="unsigned short", u32="unsigned int",
                        as_float="__uint_as_float", as_uint="__float_as_uint"),
    },
    compile_options=("--fmad=false", "--prec-div=false"),
)

OPENCL = Dialect(
    name="opencl",
    suffix=".cl",
    prelude="// a product and a sum are never contracted into an fma, so a value recomputed in a later pass\n"
            "// over the row is bit-identical (max's backward compares them)\n"
            "#pragma OPENCL FP_CONTRACT OFF\n",
    kernel_prefix="__kernel __attribute__((reqd_work_group_size({block}, 1, 1))) void",
    helper_prefix="static inline",
    global_prefix="__global ",
    smem_prefix="__local ",
    restrict=" restrict",
    barrier="barrier(CLK_LOCAL_MEM_FENCE);",
    group_id="get_group_id(0)",
    local_id="get_local_id(0)",
    # a cl_mem cannot be offset on the host, so a view into a larger buffer is (buffer, element offset)
    pointer_params=("ptr", "offset"),
    index="{name}_offset + {i}",
    type_map={"f32": "float", "f16": "half", "bf16": "ushort", "bool": "bool", "i32": "int", "i64": "long"},
    load={"f32": "{ptr}[{i}]", "f16": "vload_half({i}, {ptr})", "bf16": "hrm_bf16_to_f32({ptr}[{i}])"},
    store={"f32": "{ptr}[{i}] = {v};", "f16": "vstore_half_rte({v}, {i}, {ptr});",
           "bf16": "{ptr}[{i}] = hrm_f32_to_bf16({v});"},
    math={"exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "tanh": "tanh", "fmax": "fmax", "pow": "pow"},
    inf="INFINITY",
    nan="NAN",
    helpers={
        # `half` is a storage-only type without cl_khr_fp16: round through a private 16-bit slot
        "hrm_round_f16": """\
static inline float hrm_round_f16(const float f) {
  ushort h;
  vstore_half_rte(f, 0, (__private half*)&h);
  return vload_half(0, (__private const half*)&h);
}
""",
        **_bf16_helpers(fn="static inline", u16="ushort", u32="uint", as_float="as_float", as_uint="as_uint"),
    },
)

DIALECTS = {d.name: d for d in (CUDA, OPENCL)}

# -- the ops, shared by both dialects: formats of the operands ({0}, {1}, {2}) and the math names -----------
CODE_FOR_OP = {
    "neg": "-{0}",
    "exp": "{exp}({0})",
    "log": "{log}({0})",
    "sqrt": "{sqrt}({0})",
    "rsqrt": "{rsqrt}({0})",
    "sigmoid": "1.0f / (1.0f + {exp}(-{0}))",
    "silu": "{0} / (1.0f + {exp}(-{0}))",  # a sigmoid(a) = a / (1 + e^-a)
    "tanh": "{tanh}({0})",
    "relu": "{fmax}({0}, 0.0f)",
    "square": "{0} * {0}",
    "add": "{0} + {1}",
    "sub": "{0} - {1}",
    "mul": "{0} * {1}",
    "div": "{0} / {1}",
    "lt": "{0} < {1}",
    "gt": "{0} > {1}",
    "le": "{0} <= {1}",
    "ge": "{0} >= {1}",
    "eq": "{0} == {1}",
    "where": "{0} ? {1} : {2}",
}
CAST = {
    "f32": "(float){0}",  # from a boolean: 0.0 or 1.0
    "bool": "{0} != 0.0f",
    "f16": "hrm_round_f16({0})",  # round to the half type, keep computing in fp32
    "bf16": "hrm_round_bf16({0})",
}
# reduction -> (identity, how two partials combine)
REDUCE_FOR_OP = {"sum": ("0.0f", "{0} + {1}"), "mean": ("0.0f", "{0} + {1}"), "max": ("-{inf}", "{fmax}({0}, {1})")}

# names the kernel uses itself; an input value of such a name gets a suffix
RESERVED = {"row", "outer", "inner", "tid", "col", "cols", "in_row", "red", "width", "step", "n_rows", "n_inner",
            "n_cols", "half", "bool",
            "float", "int", "long", "char", "short", "double", "uint", "ushort", "uchar", "ulong", "void", "const",
            "restrict", "inline", "static", "extern", "if", "else", "for", "while", "do", "return", "break",
            "continue", "switch", "case", "default", "goto", "sizeof", "struct", "union", "enum", "typedef",
            "signed", "unsigned", "volatile", "register", "auto", "true", "false", "kernel", "global", "local",
            "constant", "private", "asm", "new", "delete", "this", "class", "template", "namespace", "operator",
            "typename", "using", "virtual", "INFINITY", "NAN", "min", "max", "exp", "log", "sqrt", "rsqrt", "tanh",
            "pow", "fmax"}


def identifier(name: str) -> str:
    """A C name for an input's loaded value that clashes with no keyword, builtin, parameter
    (*_ptr, *_offset, *_stride, *_istride) or temporary (t<i>, a<i>) of the kernel."""
    if (name in RESERVED or name.startswith("_") or re.fullmatch(r"[ta]\d+", name)
            or name.endswith(("_ptr", "_offset", "_stride", "_istride"))):
        return f"{name}_v"
    return name


def literal(v: float, d: Dialect) -> str:
    """The fp32 nearest to v, printed as the shortest decimal that reads back as that fp32."""
    if math.isnan(v):
        return d.nan
    with np.errstate(over="ignore"):
        f = np.float32(v)
    if math.isinf(f):
        return d.inf if f > 0 else f"(-{d.inf})"
    text = str(f)
    text = text if ("." in text or "e" in text) else text + ".0"
    return f"({text}f)" if text.startswith("-") else f"{text}f"


def _product(a: str, n: int) -> str:
    """a**n for a positive integer n by repeated squaring."""
    if n == 1:
        return a
    half = _product(a, n // 2)
    sq = f"({half} * {half})"
    return f"({sq} * {a})" if n % 2 else sq


def POW(a: str, c: float, d: Dialect) -> str:
    """a ** c for a constant c: exact products for small integers, else the library pow."""
    if c == 0.5:
        return f"{d.math['sqrt']}({a})"
    if c == -0.5:
        return f"{d.math['rsqrt']}({a})"
    if c == int(c) and 0 < abs(c) <= 8:
        p = _product(a, int(abs(c)))
        return p if c > 0 else f"1.0f / {p}"
    return f"{d.math['pow']}({a}, {literal(c, d)})"


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
    + (row % n_inner) * istride, see backends/rowlayout.py); then n_rows, n_inner and n_cols."""
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


class _Printer:
    def __init__(self, p: RowProgram, d: Dialect, dtypes: Mapping[str, str], block: int):
        self.p, self.d, self.dtypes, self.block = p, d, dtypes, block
        self.refs = [self._ref(i) for i in range(len(p.nodes))]
        self.lines: list[str] = []

    def _ref(self, i: int) -> str:
        n = self.p.nodes[i]
        if n.op == "input":
            return identifier(n.arg)
        if n.op == "const":
            return literal(n.arg, self.d)
        return "width" if n.op == "width" else f"t{i}"

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("  " * depth + line)

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
        else:
            ops = [self.refs[s] for s in n.srcs]
            if n.op == "pow":
                expr = POW(ops[0], n.arg, d)
            elif n.op == "cast":
                expr = CAST[n.arg].format(*ops)
            else:
                expr = CODE_FOR_OP[n.op].format(*ops, **d.math)
        self.emit(depth, f"const {d.type_map['bool' if n.dtype == 'bool' else 'f32']} {self.refs[i]} = {expr};")

    def loop(self, roots: list[int]) -> None:
        self.emit(1, f"for (int col = tid; col < cols; col += {self.block}) {{")
        for i in _row_closure(self.p, roots):
            self.define(2, i)

    def reduce_pass(self, k: int, reductions: list[int]) -> None:
        p, d, B = self.p, self.d, self.block
        ops = ", ".join(f"{p.nodes[r].op} %{p.nodes[r].srcs[0]}" for r in reductions)
        self.emit(1, f"// pass {k + 1}: {ops}")
        for r in reductions:
            self.emit(1, f"float a{r} = {REDUCE_FOR_OP[p.nodes[r].op][0].format(inf=d.inf)};")
        self.loop([p.nodes[r].srcs[0] for r in reductions])
        for r in reductions:
            combine = REDUCE_FOR_OP[p.nodes[r].op][1]
            self.emit(2, f"a{r} = {combine.format(f'a{r}', self.refs[p.nodes[r].srcs[0]], **d.math)};")
        self.emit(1, "}")
        for slot, r in enumerate(reductions):
            self.emit(1, f"{_slot(slot, B, 'tid')} = a{r};")
        self.emit(1, d.barrier)
        self.emit(1, f"for (int step = {B // 2}; step > 0; step >>= 1) {{  // tree: halve the partials each step")
        self.emit(2, "if (tid < step) {")
        for slot, r in enumerate(reductions):
            mine, other = _slot(slot, B, "tid"), _slot(slot, B, "tid + step")
            self.emit(3, f"{mine} = {REDUCE_FOR_OP[p.nodes[r].op][1].format(mine, other, **d.math)};")
        self.emit(2, "}")
        self.emit(2, d.barrier)
        self.emit(1, "}")
        for slot, r in enumerate(reductions):
            self.emit(1, f"const float t{r} = {_slot(slot, B, '0')}{' / width' if p.nodes[r].op == 'mean' else ''};")

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
        self.emit(1, f"const {d.type_map['i64']} row = {d.group_id};")
        self.emit(1, f"const int tid = {d.local_id};")
        # a block past the last row touches no memory but still meets every barrier: no early return, which
        # a barrier-unaware compiler (PoCL's work-group loops) must not see either
        self.emit(1, "const bool in_row = row < n_rows;")
        if p.kinds_of("row") or any(o.kind == "row" for o in p.outputs):
            # 32-bit division (rows are ints; a 64-bit one is a slow library call), 64-bit products below
            self.emit(1, f"const {d.type_map['i64']} outer = (int)row / n_inner, inner = (int)row % n_inner;")
        self.emit(1, "const int cols = in_row ? n_cols : 0;")
        if p.uses_width or any(n.op == "mean" for n in p.nodes):
            self.emit(1, "const float width = (float)n_cols;")
        self.scalars(s, 0)
        for k, reductions in enumerate(s.passes):
            if k:
                self.emit(1, f"{d.barrier}  // every thread has read the previous results before red is reused")
            self.reduce_pass(k, reductions)
            self.scalars(s, k + 1)
        rows = [o for o in p.outputs if o.kind == "row"]
        if rows:
            self.emit(1, f"// pass {len(s.passes) + 1}: the row outputs")
            self.loop([o.node for o in rows])
            for o in rows:
                self.store(2, o.name, "row", self.refs[o.node])
            self.emit(1, "}")
        scalars = [o for o in p.outputs if o.kind == "scalar"]
        if scalars:
            self.emit(1, "if (tid == 0 && in_row) {")
            for o in scalars:
                self.store(2, o.name, "scalar", self.refs[o.node])
            self.emit(1, "}")
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
