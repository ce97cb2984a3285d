"""The C-style backend: RowPrograms printed as CUDA C (launched through CuPy, compiled ahead of
time with NVRTC) or OpenCL C (run with pyopencl, on PoCL's CPU device without a GPU) by one
printer with two dialect tables. Importing this package imports neither pyopencl, CuPy nor NVRTC."""

from hrmspec.backends.cstyle.launch import STORAGE, CRowKernel, CRowOp
from hrmspec.backends.cstyle.printer import (
    BLOCK,
    CUDA,
    DIALECTS,
    OPENCL,
    Dialect,
    block_size,
    kernel_name,
    render_kernel,
    render_source,
)

__all__ = ["BLOCK", "CUDA", "DIALECTS", "OPENCL", "STORAGE", "CRowKernel", "CRowOp", "Dialect", "block_size",
           "kernel_name", "render_kernel", "render_source"]
