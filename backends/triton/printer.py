"""RowProgram -> Triton source: one program instance per row, the whole row in one block.

    row   = program_id(0)                  the row this instance computes
    cols  = arange(0, BLOCK)               BLOCK = next power of two >= D
    mask  = cols < D                       every load and store of a row or vector is masked

Values are computed in fp32 whatever the storage type (bf16/fp16/fp32 are upcast after load and
cast to the pointer's element type at the store). Lanes past D hold garbage (other=0 then any
op), so a reduction first replaces them by its identity: sum(where(mask, v, 0)), max(where(mask,
v, -inf)). Only `tl.*` math is printed (no libdevice, no inline asm), so the same source runs in
the interpreter (TRITON_INTERPRET=1) and compiles for any GPU target.

The printer is tables: `TRITON` spells the expressions (the table of the printer base,
backends/common/expr_printer.py), `REDUCE_FOR_OP` maps a reduction to its Triton function and
identity, `HELPERS` are the jit functions a kernel may call.
"""

from __future__ import annotations

import keyword

from hrmspec.backends.common.expr_printer import INFIX, ExprPrinter, ExprTable
from hrmspec.ir.program import RowProgram

TRITON = ExprTable(
    code_for_op={
        **INFIX,
        "exp": "tl.exp({0})",
        "log": "tl.log({0})",
        "sqrt": "tl.sqrt({0})",
        "rsqrt": "tl.rsqrt({0})",
        "sigmoid": "tl.sigmoid({0})",
        "silu": "{0} * tl.sigmoid({0})",
        "tanh": "_tanh({0})",  # there is no tl.tanh: a helper below
        "relu": "tl.maximum({0}, 0.0, propagate_nan=tl.PropagateNan.ALL)",  # relu(NaN) = NaN, as torch
        "where": "tl.where({0}, {1}, {2})",
    },
    cast={
        "f32": "{0}.to(tl.float32)",  # from a boolean: 0.0 or 1.0
        "bool": "({0} != 0.0)",
        "bf16": "_round_bf16({0})",  # round to the half type, keep computing in fp32 (helper below)
        "f16": "{0}.to(tl.float16).to(tl.float32)",
    },
    reciprocal="(1.0 / {0})",
    power="tl.exp2({1} * tl.log2({0}))",  # a > 0: a^c = 2^(c log2 a), with tl math only
    rounding=float,  # Python floats are the fp64 constants the kernel folds
    literal=lambda v: repr(float(v)),
    reserved=frozenset({"row", "outer", "inner", "cols", "mask", "in_row", "width", "n_rows", "n_inner", "n_cols",
                        "BLOCK", "tl", "triton", "float", *keyword.kwlist}),
    own_names=r"t\d+|.*_(ptr|stride|istride)",  # temporaries t<i>, pointers and row strides
)
NAMES = {"nan": 'float("nan")', "inf": 'float("inf")', "-inf": 'float("-inf")'}
EXPR = ExprPrinter(TRITON, NAMES)

# helpers are printed into the module (once) when the kernel calls them
HELPERS = {
    "_tanh": '''@triton.jit
def _tanh(a):
    # tanh(a) = sign(a) (1 - e) / (1 + e) with e = exp(-2|a|); below |a| = 1/4, where 1 - e cancels,
    # the odd Taylor series to a^9 instead (its truncation error there is < 1e-8 relative)
    m = tl.abs(a)
    e = tl.exp(-2.0 * m)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * (-0.05396825396825397
                                                                                    + a2 * 0.021869488536155203))))
    return tl.where(m < 0.25, small, tl.where(a < 0.0, -big, big))
''',
    "_round_bf16": '''@triton.jit
def _round_bf16(a):
    # round to nearest even at bfloat16 precision (keep the top 16 bits of the fp32), with integer
    # ops: the interpreter's fp32 -> bf16 conversion truncates, so .to(tl.bfloat16) would differ
    bits = a.to(tl.uint32, bitcast=True)
    # a NaN keeps its top bits with the quiet bit set: a bf16 value, still NaN under a truncating store
    nan = ((bits >> 16) | 0x40) << 16
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = (bits >> 16) << 16
    return tl.where(a != a, nan.to(tl.float32, bitcast=True), bits.to(tl.float32, bitcast=True))
''',
    "_max_nan": '''@triton.jit
def _max_nan(a, axis: tl.constexpr):
    # the max, NaN if any lane is NaN (as torch's max): tl.max combines with maxnum, which drops NaN
    m = tl.max(a, axis=axis)
    return tl.where(tl.max((a != a).to(tl.int32), axis=axis) > 0, float("nan"), m)
''',
}
REDUCE_FOR_OP = {"sum": ("tl.sum", "0.0"), "mean": ("tl.sum", "0.0"), "max": ("_max_nan", 'float("-inf")')}
TORCH_TO_TL = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float64": "fp64"}


def parameters(program: RowProgram) -> list[tuple[str, str, str]]:
    """The kernel parameters in order: (parameter name, what it is, the input/output name).
    What it is: ptr_in, stride_in, istride_in, ptr_out, stride_out, istride_out, n_rows, n_inner,
    n_cols. A row's address is (row // n_inner) * stride + (row % n_inner) * istride (backends/common/rowlayout.py)."""
    params = []
    for group, items in (("in", program.inputs), ("out", program.outputs)):
        for item in items:
            params.append((f"{item.name}_ptr", f"ptr_{group}", item.name))
            if item.kind == "row":
                params.append((f"{item.name}_stride", f"stride_{group}", item.name))
                params.append((f"{item.name}_istride", f"istride_{group}", item.name))
    return params + [("n_rows", "n_rows", ""), ("n_inner", "n_inner", ""), ("n_cols", "n_cols", "")]


def render_kernel(program: RowProgram, name: str) -> str:
    """The @triton.jit function computing `program` (one row per program instance)."""
    p = program
    params = parameters(p)
    ins = ", ".join(n for n, what, _ in params if what.endswith("_in"))
    outs = ", ".join(n for n, what, _ in params if what.endswith("_out"))
    body = [
        "row = tl.program_id(0)",
        "cols = tl.arange(0, BLOCK)",
        "mask = cols < n_cols",
    ]
    if p.kinds_of("row") or any(o.kind == "row" for o in p.outputs):
        # a row at outer * stride + inner * istride: a 32-bit division, 64-bit offsets
        body.append("outer, inner = (row // n_inner).to(tl.int64), (row % n_inner).to(tl.int64)")
    if any(i.kind == "scalar" for i in p.inputs) or any(o.kind == "scalar" for o in p.outputs):
        body.append("in_row = row < n_rows  # true for grid = (n_rows,); it bounds the per-row scalar accesses")
    if p.uses_width or any(n.op == "mean" for n in p.nodes):
        body.append("width = tl.cast(n_cols, tl.float32)")
    refs: list[str] = []
    for i, n in enumerate(p.nodes):
        if n.op == "input":
            v, kind = EXPR.identifier(n.arg), n.kind
            addr = {"row": f"{n.arg}_ptr + outer * {n.arg}_stride + inner * {n.arg}_istride + cols",
                    "vector": f"{n.arg}_ptr + cols", "scalar": f"{n.arg}_ptr + row"}[kind]
            m = "in_row" if kind == "scalar" else "mask"
            body.append(f"{v} = tl.load({addr}, mask={m}, other=0.0).to(tl.float32)")
            refs.append(v)
            continue
        if n.op == "const":
            refs.append(EXPR.literal(n.arg))
            continue
        if n.op == "width":
            refs.append("width")
            continue
        ops = [refs[s] for s in n.srcs]
        if n.op in REDUCE_FOR_OP:
            fn, ident = REDUCE_FOR_OP[n.op]
            expr = f"{fn}(tl.where(mask, {ops[0]}, {ident}), axis=0)"
            if n.op == "mean":
                expr += " / width"
        else:
            expr = EXPR.expression(n, ops)
        body.append(f"t{i} = {expr}")
        refs.append(f"t{i}")
    for o in p.outputs:
        n, v = p.nodes[o.node], refs[o.node]
        if o.kind == "row":
            if n.kind not in ("row", "vector"):  # a per-row scalar or a constant stored over the whole row
                v = f"({v} + tl.zeros([BLOCK], dtype=tl.float32))"
            body.append(f"tl.store({o.name}_ptr + outer * {o.name}_stride + inner * {o.name}_istride + cols, "
                        f"{v}.to({o.name}_ptr.dtype.element_ty), mask=mask)")
        else:
            if n.kind == "const":
                v = f"({v} + tl.zeros([], dtype=tl.float32))"
            body.append(f"tl.store({o.name}_ptr + row, {v}.to({o.name}_ptr.dtype.element_ty), mask=in_row)")
    doc = "\n".join("    # " + line for line in str(p).splitlines())
    lines = ["@triton.jit", f"def {name}(", f"    {ins},  # inputs", f"    {outs},  # outputs",
             "    n_rows, n_inner, n_cols, BLOCK: tl.constexpr,", "):", doc]
    return "\n".join(lines + ["    " + line for line in body]) + "\n"


def render_module(program: RowProgram, name: str) -> str:
    """A complete, importable Python module holding the kernel `name`."""
    header = (f'"""Generated by hrmspec from RowProgram \'{program.name}\' ({program.hash}); do not edit."""\n\n'
              "import triton\nimport triton.language as tl\n\n\n")
    kernel = render_kernel(program, name)
    helpers = "".join(src + "\n\n" for fn, src in HELPERS.items() if f"{fn}(" in kernel)
    return header + helpers + kernel


def signature(program: RowProgram, dtypes: dict[str, str]) -> dict[str, str]:
    """Argument types for ahead-of-time compilation: `dtypes` maps input/output names to fp32,
    bf16 or fp16 (the storage type of the pointer)."""
    sig = {}
    for pname, what, ref in parameters(program):
        sig[pname] = f"*{dtypes[ref]}" if what.startswith("ptr") else "i64" if "stride" in what else "i32"
    sig["BLOCK"] = "constexpr"
    return sig


class TritonSource:
    """What `hrmspec compile --emit` writes for the triton backend: an importable module per kernel,
    whose storage types come with the pointers at launch (backends/common/expr_printer.py: KernelSource)."""

    def source(self, program: RowProgram, name: str, width: int) -> str:
        return render_module(program, name)

    def specialisation(self, width: int) -> dict[str, str | int]:
        return {}
