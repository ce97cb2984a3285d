"""Algebraic simplification, applied by the builder as each node is made.

Constant operands are folded (in float64 on the host), identities remove work (x + 0, x * 1,
-(-x), x - x, where(c, a, a), ...), constants are gathered through products, and a negation is
absorbed into the add or sub that uses it. Together with hash-consing this keeps the programs
that autodiff produces small. Identities such as x * 0 = 0 assume finite values (they drop the
NaN an infinite x would give); kinds may shrink (x * 0 is a constant), which outputs and
reductions accept since they broadcast by kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hrmspec.ir.opset import COMPARE, FOLD, round_to

if TYPE_CHECKING:
    from hrmspec.ir.program import ProgramBuilder, Value


def _bool_const(v: Value) -> bool | None:
    """True/False for a boolean constant (held as cast(const, bool)), else None."""
    n = v.node
    if n.op == "cast" and n.arg == "bool" and v.b.nodes[n.srcs[0]].op == "const":
        return v.b.nodes[n.srcs[0]].arg != 0.0
    return None


def simplify_node(b: ProgramBuilder, op: str, srcs: tuple[Value, ...], arg) -> Value | None:
    """An existing or simpler value equal to op(srcs), or None to make the node as asked."""
    cs = [s.const_value() for s in srcs]
    if all(c is not None for c in cs) and op in FOLD:
        r = FOLD[op](*cs, *(() if arg is None else (arg,)))
        # a folded comparison stays boolean: boolean constants are cast(const, bool)
        return b.emit("cast", b.const(float(r)), arg="bool") if op in COMPARE else b.const(float(r))
    if op == "cast":
        n = srcs[0].node
        if arg == n.dtype or (n.op == "cast" and n.arg == arg):
            return srcs[0]
        bc = _bool_const(srcs[0])
        if bc is not None and arg == "f32":
            return b.const(float(bc))
        if cs[0] is not None and arg in ("f16", "bf16"):
            return b.const(round_to(cs[0], arg))
        return None
    if len(srcs) == 1 and op == "neg" and srcs[0].node.op == "neg":
        return b.value(srcs[0].node.srcs[0])
    if op == "pow":
        if arg == 1.0:
            return srcs[0]
        if arg == 0.0:
            return b.const(1.0)
        return None
    if op == "where":
        if srcs[1].i == srcs[2].i:
            return srcs[1]
        bc = _bool_const(srcs[0])
        if bc is not None:
            return srcs[1] if bc else srcs[2]
        return None
    if len(srcs) != 2:
        return None
    (a, c), (ca, cc) = srcs, cs
    if op == "add":
        if ca == 0.0:
            return c
        if cc == 0.0:
            return a
        if c.node.op == "neg":
            return a - b.value(c.node.srcs[0])
        if a.node.op == "neg":
            return c - b.value(a.node.srcs[0])
    elif op == "sub":
        if cc == 0.0:
            return a
        if ca == 0.0:
            return -c
        if a.i == c.i:
            return b.const(0.0)
        if c.node.op == "neg":
            return a + b.value(c.node.srcs[0])
    elif op == "mul":
        if ca == 0.0 or cc == 0.0:
            return b.const(0.0)
        if ca == 1.0:
            return c
        if cc == 1.0:
            return a
        if ca == -1.0:
            return -c
        if cc == -1.0:
            return -a
        if a.node.op == "neg" and c.node.op == "neg":
            return b.value(a.node.srcs[0]) * b.value(c.node.srcs[0])
        # fold constants through a product: k1 * (k2 * x) = (k1 k2) * x
        for k, other in ((ca, c), (cc, a)):
            if k is not None and other.node.op == "mul":
                inner = [b.value(s) for s in other.node.srcs]
                kin = [v.const_value() for v in inner]
                for j in (0, 1):
                    if kin[j] is not None:
                        return b.const(k * kin[j]) * inner[1 - j]
    elif op == "div":
        if cc == 1.0:
            return a
        if ca == 0.0:
            return b.const(0.0)
    return None
