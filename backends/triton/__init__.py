"""The Triton backend: RowPrograms printed as Triton kernels, cached as files, launched by a
differentiable op. Importing this package does not import triton; building a kernel does."""

from hrmspec.backends.triton.launch import MAX_WIDTH, RowKernel, TritonRowOp
from hrmspec.backends.triton.printer import render_kernel, render_module
from hrmspec.ir.kernel import kernel_name

__all__ = ["MAX_WIDTH", "RowKernel", "TritonRowOp", "kernel_name", "render_kernel", "render_module"]
