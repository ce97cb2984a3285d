"""Launching generated kernels, and the autograd Function that pairs a forward with its backward.

`RowKernel` is one program printed, cached, imported and launched over rows. `TritonRowOp`
wraps a forward program: calling it runs the forward kernel; its backward runs the kernel of
`grad(program, wrt)` for the inputs that need a gradient, then sums the per-row partials of
vector (weight) gradients over rows:

    d_x[r, :] = bwd(x[r], w, d_y[r])              one program instance per row, like the forward
    d_w[:]    = sum_r  p[r, :],  p = bwd(...)[d_w] fp32 partials, reduced by torch (second stage)
"""

from __future__ import annotations

import math

import torch

from hrmspec.backends.triton import cache
from hrmspec.backends.triton.printer import kernel_name, parameters, render_module
from hrmspec.errors import HrmspecError
from hrmspec.ir import RowProgram, grad, reduce_vector_grads
from hrmspec.ir.evaluate import row_shapes

MAX_WIDTH = 65536  # one row lives in one block of registers; wider rows need a split-row kernel


class KernelError(HrmspecError):
    """A kernel that cannot run on the given tensors (too wide, wrong device, bad output buffer)."""


def num_warps(block: int) -> int:
    """More warps for wider rows, so each thread holds at most ~16 fp32 values of the row."""
    return 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4


class RowKernel:
    """A RowProgram compiled to a Triton kernel (cached source file, imported function)."""

    def __init__(self, program: RowProgram, direction: str = "fwd", base: str | None = None):
        self.program = program
        self.name = kernel_name(program, direction, base)
        self.source = render_module(program, self.name)
        self.path = cache.write_source(self.name, self.source)
        self.fn = getattr(cache.load_module(self.path), self.name)

    def __call__(self, inputs: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None = None,
                 out_dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
        """Run over all rows. `out` may hold preallocated outputs (rows [..., D] with unit stride
        along D, scalars [...] contiguous); the others are allocated, in `out_dtypes[name]` or the
        dtype of the first row input."""
        p = self.program
        lead, width = row_shapes(p, inputs)
        if width > MAX_WIDTH:
            raise KernelError(f"{p.name}: rows of width {width} exceed the limit of {MAX_WIDTH} for a one-block "
                              "row kernel; split the row or use the reference backend")
        devices = {t.device for t in inputs.values()}
        if len(devices) > 1:
            raise KernelError(f"{p.name}: inputs are on several devices: {sorted(map(str, devices))}")
        device = devices.pop()
        n_rows = math.prod(lead)
        rows = p.kinds_of("row")
        store = inputs[rows[0]].dtype if rows else inputs[p.input_names[0]].dtype
        out = dict(out or {})
        flat_out = {}
        for o in p.outputs:
            shape = (*lead, width) if o.kind == "row" else lead
            if o.name not in out:
                dtype = (out_dtypes or {}).get(o.name, torch.float32 if o.row_partial else store)
                out[o.name] = torch.empty(shape, dtype=dtype, device=device)
            t = out[o.name]
            if tuple(t.shape) != tuple(shape):
                raise KernelError(f"{p.name}: output '{o.name}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
            try:  # outputs are written in place: they must be views of [rows, D] with unit stride along D
                flat = t.view(n_rows, width) if o.kind == "row" else t.view(n_rows)
            except RuntimeError:
                flat = None
            if flat is None or (flat.numel() and flat.stride(-1) != 1):
                raise KernelError(f"{p.name}: output '{o.name}' must be writable in place as rows with unit stride "
                                  f"along D, got strides {t.stride()}")
            flat_out[o.name] = flat
        if n_rows == 0:
            return out
        flat_in = {}
        for i in p.inputs:
            t = inputs[i.name]
            t = t.reshape(n_rows, width) if i.kind == "row" else t.reshape(-1)
            if t.numel() and t.stride(-1) != 1:
                t = t.contiguous()
            flat_in[i.name] = t
        args = []
        for _, what, ref in parameters(p):
            if what == "ptr_in":
                args.append(flat_in[ref])
            elif what == "stride_in":
                args.append(flat_in[ref].stride(0))
            elif what == "ptr_out":
                args.append(flat_out[ref])
            elif what == "stride_out":
                args.append(flat_out[ref].stride(0))
            elif what == "n_rows":
                args.append(n_rows)
            else:
                args.append(width)
        block = triton_next_power_of_2(width)
        self.fn[(n_rows,)](*args, BLOCK=block, num_warps=num_warps(block))
        return out


def triton_next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


class RowFunction(torch.autograd.Function):
    """A RowProgram op as an autograd node, for any launcher whose op has `program`,
    `forward_kernel` and `backward_kernel(wrt)` (the Triton and the C-style backends)."""

    @staticmethod
    def forward(ctx, op, *tensors: torch.Tensor):
        ctx.op = op
        ctx.save_for_backward(*tensors)
        outs = op.forward_kernel(dict(zip(op.program.input_names, tensors)))
        return tuple(outs[n] for n in op.program.output_names)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *cotangents: torch.Tensor):
        op = ctx.op
        names = op.program.input_names
        wrt = tuple(n for n, need in zip(names, ctx.needs_input_grad[1:]) if need)
        if not wrt:
            return (None,) * (1 + len(names))
        inputs = dict(zip(names, ctx.saved_tensors))
        outs = op.program.outputs
        lead, width = row_shapes(op.program, inputs)
        cot = {}
        for o, g in zip(outs, cotangents):
            if g is None:  # an output that did not reach the loss
                g = torch.zeros((*lead, width) if o.kind == "row" else lead, device=inputs[names[0]].device)
            cot[f"d_{o.name}"] = g
        kernel = op.backward_kernel(wrt)
        dtypes = {f"d_{n}": inputs[n].dtype for n in wrt}
        partial = {f"d_{n}": torch.float32 for n in wrt if op.program.input(n).kind == "vector"}
        d = kernel({**inputs, **cot}, out_dtypes={**dtypes, **partial})
        d = reduce_vector_grads(kernel.program, d, dtypes)
        return (None, *(d.get(f"d_{n}") for n in names))


class TritonRowOp:
    """A forward RowProgram as a differentiable op backed by generated Triton kernels.

        op = TritonRowOp(rms_norm())
        y = op(x=x, w=w)["y"]          # or op(x, w), inputs in program order
    """

    def __init__(self, program: RowProgram):
        self.program = program
        self.forward_kernel = RowKernel(program, "fwd")
        self._backward: dict[tuple[str, ...], RowKernel] = {}

    def backward_kernel(self, wrt: tuple[str, ...]) -> RowKernel:
        """The kernel of grad(program, wrt), built once per set of inputs that need a gradient."""
        if wrt not in self._backward:
            self._backward[wrt] = RowKernel(grad(self.program, list(wrt)), "bwd", base=self.program.name)
        return self._backward[wrt]

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
        outs = RowFunction.apply(self, *(inputs[n] for n in names))
        return dict(zip(self.program.output_names, outs))
