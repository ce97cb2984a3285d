"""The parts a block is built from, one entry per kind: norms and MLPs.

    norm kinds   rms    RMSNorm: x / sqrt(mean(x^2) + eps) [* w]
                 layer  LayerNorm: (x - mean(x)) / sqrt(var(x) + eps) [* w + b]
                 expr   a norm the spec writes as a row expression of x (`expr:` with its `params:`)
    MLP kinds    swiglu down(silu(gate(x)) * up(x))     gated: one projection to 2 x ffn
                 geglu  down(gelu(gate(x)) * up(x))     gated, gelu in its tanh form
                 gelu   down(gelu(up(x)))

A norm kind gives a norm's RowProgram and the per-channel weights it declares; an MLP kind says
whether its up projection is gated (the gate and up halves of one `gate_up` matmul) and gives
its activation's RowProgram. Everything else follows from these entries: the spec loader reads
the names (what `norm.type`, `exit_norm`, `final_norm` and `mlp` accept) and the width rule, the
body description (`hrmspec/graph/body.py`) builds its ops and parameters from the programs, the
fusion pass fuses them, every kernel backend prints them (backwards by the IR's autodiff), and
the reference backend runs a program tagged as a built-in (`RowProgram.builtin`) by its torch
form. A new kind is an entry here and its program in `hrmspec/ir/library.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hrmspec.ir import RowProgram, library, parse_norm_expr

if TYPE_CHECKING:  # the spec loader reads this table: importing its package here would be a cycle
    from hrmspec.spec.schema import NormSpec


@dataclass(frozen=True)
class Weight:
    """A per-channel weight a norm declares: the program input it binds, its parameter name, its init."""

    input: str
    name: str  # under the norm's module: "weight", "bias", "params.<name>"
    init: str  # ones | zeros | normal (std 0.02, truncated at 2 std)


@dataclass(frozen=True)
class NormKind:
    program: Callable[[NormSpec], RowProgram]
    weights: Callable[[NormSpec], tuple[Weight, ...]]
    by_name: bool = True  # may be written by its name alone (exit_norm: rms); an expr norm needs its text


@dataclass(frozen=True)
class MLPKind:
    gated: bool  # the up projection gives a gate and an up half, multiplied by the activation
    activation: Callable[[], RowProgram]  # gated: inputs a (gate), b (up); else x


def _rms(n: NormSpec) -> RowProgram:
    return library.rms_norm(n.eps, affine=n.affine, name="rms_norm")


def _expr(n: NormSpec) -> RowProgram:
    return parse_norm_expr(n.expr, dict(n.params or ()), n.eps, name="expr_norm")


NORMS: dict[str, NormKind] = {
    "rms": NormKind(_rms, lambda n: (Weight("w", "weight", "ones"),) if n.affine else ()),
    "layer": NormKind(lambda n: library.layer_norm(n.eps, affine=n.affine, name="layer_norm"),
                      lambda n: (Weight("w", "weight", "ones"), Weight("b", "bias", "zeros")) if n.affine else ()),
    "expr": NormKind(_expr, lambda n: tuple(Weight(p, f"params.{p}", init) for p, init in n.params or ()),
                     by_name=False),
}

MLPS: dict[str, MLPKind] = {
    "swiglu": MLPKind(True, library.swiglu),
    "geglu": MLPKind(True, library.geglu),
    "gelu": MLPKind(False, library.gelu),
}


def norm_program(n: NormSpec) -> RowProgram:
    """The RowProgram of norm `n` (its vector inputs are the weights `norm_weights(n)` binds)."""
    return NORMS[n.type].program(n)


def norm_weights(n: NormSpec) -> tuple[Weight, ...]:
    return NORMS[n.type].weights(n)


__all__ = ["MLPS", "NORMS", "MLPKind", "NormKind", "Weight", "norm_program", "norm_weights"]
