"""The differentiable row op: what every RowProgram backend (Triton, OpenCL, CUDA C) launches.

`RowOp` wraps a forward RowProgram as a differentiable op, given a launcher's kernel class;
`RowFunction` is its autograd node:

    forward    outs = fwd(inputs)                     one program instance per row
    keeps      what `save_plan` picked: the inputs the backward reads, and the forward outputs it
               reads instead of recomputing (for h = x + r, y = norm(h): h and w, not x and r)
    backward   d = bwd(kept, d_outs)                  the kernel of grad(program, saved=...)
               d_w = sum over rows of d_w's fp32 per-row partials (a second stage, in torch)

`RopeFunction` is the rope region on whole q and k. A backend's op table builds these ops on its
launcher's kernels (backends/common/kernel_table.py).
"""

from __future__ import annotations

import torch

from hrmspec.errors import KernelError
from hrmspec.ir import RowProgram, kept_tensors, reduce_vector_grads, save_plan
from hrmspec.ir.interpret import row_shapes
from hrmspec.ir.kernel import backward_program, trainable


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
        """The kernel of the backward program (`hrmspec.ir.kernel.backward_program`), built on first use."""
        if self._backward is None:
            self._backward = self.kernel_class(backward_program(self.program), "bwd", base=self.program.name)
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


__all__ = ["RopeFunction", "RowFunction", "RowOp"]
