"""Row ops as generated kernels: what every RowProgram backend (Triton, OpenCL, CUDA C) shares.

`RowOp` wraps a forward RowProgram as a differentiable op, given a launcher's kernel class;
`RowFunction` is its autograd node:

    forward    outs = fwd(inputs)                     one program instance per row
    keeps      what `save_plan` picked: the inputs the backward reads, and the forward outputs it
               reads instead of recomputing (for h = x + r, y = norm(h): h and w, not x and r)
    backward   d = bwd(kept, d_outs)                  the kernel of grad(program, saved=...)
               d_w = sum over rows of d_w's fp32 per-row partials (a second stage, in torch)

A backend that can run RowPrograms (Triton, OpenCL, CUDA C) gets rms_norm, sigmoid_gate, swiglu,
gelu and `row_program` (the expression norms a spec declares) from one `RowOpTable`, given its
differentiable op class and a check of which tensors its kernels can take. Whatever a kernel
cannot run falls back to the reference op with a warning (once per op and reason): a fallback is
reported, never silent, and never a wrong result.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from hrmspec.backends.reference import ops as reference
from hrmspec.errors import KernelError
from hrmspec.ir import RowProgram, evaluate, grad, kept_tensors, library, reduce_vector_grads, save_plan
from hrmspec.ir.interpret import row_shapes
from hrmspec.ir.kernel import trainable

WIDE_ROW = 8192  # the widest row the built-in kernels hold without register spills (sm_80 / sm_90)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def beyond_limits(tensors: list[torch.Tensor], width: int, max_width: int) -> str | None:
    """Why a one-block row kernel cannot take these tensors whatever the device, or None."""
    if width > max_width:
        return f"rows of width {width} exceed the {max_width} a one-block row kernel holds"
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            return f"{t.dtype} is computed in fp32 by the kernels; the reference keeps its precision"
    return None


class RowOp:
    """A forward RowProgram as a differentiable op on generated kernels of `kernel_class` (a class
    taking (program, direction, base) whose instances run over rows: `kernel(inputs, out_dtypes=)`).

        op = TritonRowOp(rms_norm())
        y = op(x=x, w=w)["y"]          # or op(x, w), inputs in program order

    The backward kernel differentiates every input but rotary tables, whichever of them need a
    gradient in a given call (the unneeded ones are dropped): one backward kernel per op, the one
    `hrmspec check` verifies."""

    kernel_class: type

    def __init__(self, program: RowProgram):
        self.program = program
        self.wrt = trainable(program)
        self.saved = save_plan(program, self.wrt)
        self.keep_inputs, self.keep_outputs = kept_tensors(program, self.saved, self.wrt)
        self.forward_kernel = self.kernel_class(program, "fwd")
        self._backward = None

    @property
    def backward_kernel(self):
        """The kernel of grad(program, wrt, saved), built on first use."""
        if self._backward is None:
            bwd = grad(self.program, list(self.wrt), saved=self.saved)
            self._backward = self.kernel_class(bwd, "bwd", base=self.program.name)
        return self._backward

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
        names = self.program.input_names
        if len(args) > len(names):
            raise KernelError(f"{self.program.name}: takes {len(names)} inputs ({', '.join(names)}), got {len(args)}")
        inputs = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names or k in inputs:
                raise KernelError(f"{self.program.name}: unexpected or repeated input '{k}'; "
                                  f"inputs are {', '.join(names)}")
            inputs[k] = v
        missing = [n for n in names if n not in inputs]
        if missing:
            raise KernelError(f"{self.program.name}: missing input(s) {', '.join(missing)}")
        outs = RowFunction.apply(self, *(inputs[n] for n in names))
        return dict(zip(self.program.output_names, outs))


class RowFunction(torch.autograd.Function):
    """A RowOp as an autograd node: keeps only what its backward program reads."""

    @staticmethod
    def forward(ctx, op: RowOp, *tensors: torch.Tensor):
        inputs = dict(zip(op.program.input_names, tensors))
        outs = op.forward_kernel(inputs)
        ctx.op, ctx.rows = op, row_shapes(op.program, inputs)
        ctx.dtypes, ctx.device = {n: t.dtype for n, t in inputs.items()}, tensors[0].device
        ctx.save_for_backward(*(inputs[n] for n in op.keep_inputs), *(outs[n] for n in op.keep_outputs))
        return tuple(outs[n] for n in op.program.output_names)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *cotangents: torch.Tensor):
        op, needs = ctx.op, ctx.needs_input_grad[1:]
        names = op.program.input_names
        if not any(needs):
            return (None,) * (1 + len(names))
        kept = dict(zip(op.keep_inputs + op.keep_outputs, ctx.saved_tensors))
        lead, width = ctx.rows
        for o, g in zip(op.program.outputs, cotangents):
            if g is None:  # an output that did not reach the loss
                g = torch.zeros((*lead, width) if o.kind == "row" else lead, device=ctx.device)
            kept[f"d_{o.name}"] = g
        kernel = op.backward_kernel
        dtypes = {f"d_{n}": ctx.dtypes[n] for n in op.wrt}
        partial = {f"d_{n}": torch.float32 for n in op.wrt if op.program.input(n).kind == "vector"}
        d = reduce_vector_grads(kernel.program, kernel(kept, out_dtypes={**dtypes, **partial}), dtypes)
        return (None, *(d.get(f"d_{n}") if need else None for n, need in zip(names, needs)))


def _halves(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two halves of the last dimension of t, as the rope program names them (views)."""
    half = t.shape[-1] // 2
    return {f"{name}_lo": t[..., :half], f"{name}_hi": t[..., half:]}


def _tables(cos: torch.Tensor, sin: torch.Tensor, shape: torch.Size) -> dict[str, torch.Tensor]:
    """The first halves of the tables (B, 1, S, hd) as rows (B, S, h, hd/2): views, one per head."""
    B, S, h, hd = shape
    return {n: t.transpose(1, 2)[..., : hd // 2].expand(B, S, h, hd // 2) for n, t in (("cos", cos), ("sin", sin))}


class RopeFunction(torch.autograd.Function):
    """The rope region (`hrmspec.ir.library.rope`) on whole q and k (B, S, h, hd): the
    program's half-row inputs are views of q and k, its outputs are written into the halves of the
    rotated tensors, and the tables (B, 1, S, hd) are read once per head. The backward is linear in
    the cotangents: it keeps only the tables."""

    @staticmethod
    def forward(ctx, op: RowOp, q, k, cos, sin):
        qr, kr = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k))
        inputs = {**_tables(cos, sin, q.shape), **_halves("q", q), **_halves("k", k)}
        op.forward_kernel(inputs, out={**_halves("qr", qr), **_halves("kr", kr)})
        ctx.op = op
        ctx.save_for_backward(cos, sin)
        return qr, kr

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_qr, d_kr):
        cos, sin = ctx.saved_tensors
        like = d_qr if d_qr is not None else d_kr
        d_qr, d_kr = (torch.zeros_like(like) if g is None else g for g in (d_qr, d_kr))
        dq, dk = (torch.empty(g.shape, dtype=g.dtype, device=g.device) for g in (d_qr, d_kr))
        kernel = ctx.op.backward_kernel
        args = {**_tables(cos, sin, d_qr.shape), **_halves("d_qr", d_qr), **_halves("d_kr", d_kr)}
        kernel({n: args[n] for n in kernel.program.input_names}, out={**_halves("d_q", dq), **_halves("d_k", dk)})
        return None, dq, dk, None, None


@functools.cache
def rms_norm_program(eps: float, affine: bool) -> RowProgram:
    return library.rms_norm(eps, affine=affine, name="rms_norm")  # the fusion pass's op program (same kernel)


_SIGMOID_GATE, _SWIGLU, _GELU, _ROPE = library.sigmoid_gate(), library.swiglu(), library.gelu(), library.rope()

# what a RowOpTable runs as kernels
ROW_OPS = ("rms_norm", "sigmoid_gate", "swiglu", "gelu", "rope_qk", "row_program")
REFERENCE_OPS = ("upcast", "rotate_half", "rope_tables", "rope", "attention", "cross_entropy", "linear_cross_entropy")


class RowOpTable:
    """rms_norm, sigmoid_gate, swiglu, gelu and row_program on `op_class` kernels.

    `unsupported(tensors, width)` says why the kernels cannot take these tensors, or None."""

    def __init__(self, backend: str, op_class, unsupported: Callable[[list[torch.Tensor], int], str | None]):
        self.backend, self.op_class, self.unsupported = backend, op_class, unsupported
        self._ops: dict[str, object] = {}
        self._warned: set[tuple[str, str]] = set()

    def fallback(self, op: str, reason: str) -> None:
        if (op, reason) not in self._warned:
            self._warned.add((op, reason))
            warnings.warn(f"{self.backend} backend: {op}: {reason}; running the reference op instead", stacklevel=4)

    def row_program(self, program: RowProgram, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run a forward RowProgram as a generated, differentiable kernel: rows [..., D], vectors [D]."""
        rows = [inputs[n] for n in program.kinds_of("row")]
        reason = self.unsupported(list(inputs.values()), rows[0].shape[-1] if rows else 0)
        if reason is not None:
            self.fallback(program.name, reason)
            return evaluate(program, inputs)
        if program.hash not in self._ops:
            self._ops[program.hash] = self.op_class(program)
        return self._ops[program.hash](**inputs)

    def rms_norm(self, x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) * weight."""
        inputs = {"x": x} if weight is None else {"x": x, "w": weight}
        reason = self.unsupported(list(inputs.values()), x.shape[-1])
        if reason is not None:
            self.fallback("rms_norm", reason)
            return reference.rms_norm(x, eps, weight)
        return self.row_program(rms_norm_program(float(eps), weight is not None), inputs)["y"]

    def elementwise(self, name: str, program: RowProgram, ref, **inputs: torch.Tensor) -> torch.Tensor:
        first = next(iter(inputs.values()))
        reason = self.unsupported(list(inputs.values()), first.shape[-1])
        if reason is not None:
            self.fallback(name, reason)
            return ref(*inputs.values())
        shape = first.shape
        if first.dim() > 2 and all(t.shape == shape for t in inputs.values()) and shape[-1] * shape[-2] <= WIDE_ROW:
            # elementwise: (B, S, h, hd) as B*S rows of h*hd, fewer and fuller program instances
            inputs = {k: t.flatten(-2) for k, t in inputs.items()}
        return self.row_program(program, inputs)["y"].view(shape)

    def sigmoid_gate(self, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.elementwise("sigmoid_gate", _SIGMOID_GATE, reference.sigmoid_gate, g=g, a=a)

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.elementwise("swiglu", _SWIGLU, reference.swiglu, a=gate, b=up)

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        return self.elementwise("gelu", _GELU, reference.gelu, x=x)

    def rope_qk(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        """Rotary embedding of q and k (B, S, h, hd) by tables (B, 1, S, hd): the fusion plan's rope
        region, one kernel over rows of half a head (RopeFunction)."""
        reason = self.unsupported([q, k, cos, sin], q.shape[-1] // 2)
        if reason is None and (q.shape != k.shape or q.shape[-1] % 2):
            reason = f"q {tuple(q.shape)} and k {tuple(k.shape)} are not one shape with an even head dim"
        if reason is not None:
            self.fallback("rope", reason)
            return reference.rope_qk(q, k, cos, sin)
        if _ROPE.hash not in self._ops:
            self._ops[_ROPE.hash] = self.op_class(_ROPE)
        return RopeFunction.apply(self._ops[_ROPE.hash], q, k, cos, sin)

    def module_functions(self, reference_ops: tuple[str, ...] = REFERENCE_OPS) -> dict[str, Callable]:
        """The functions of an op-table module built on this table, by name: the ROW_OPS as this
        table's kernels, and `reference_ops` as the reference's functions. A backend's ops module
        defines them all with `globals().update(table.module_functions())`."""
        functions = {name: getattr(self, name) for name in ROW_OPS}
        return functions | {name: getattr(reference, name) for name in reference_ops}
