"""The C-style backends: RowPrograms printed as CUDA C (launched through CuPy, compiled ahead of
time with NVRTC), OpenCL C (run with pyopencl, on PoCL's CPU device without a GPU) or host C
(compiled by the system C compiler, called through ctypes: any CPU) by one printer with three
dialect tables. Importing this package imports neither pyopencl, CuPy nor NVRTC."""

from hrmspec.backends.cstyle.launch import STORAGE, CRowKernel, CRowOp
from hrmspec.backends.cstyle.printer import (
    BLOCK,
    CUDA,
    DIALECTS,
    HOST,
    OPENCL,
    Dialect,
    block_size,
    kernel_name,
    render_kernel,
    render_source,
)

__all__ = ["BLOCK", "CUDA", "DIALECTS", "HOST", "OPENCL", "STORAGE", "CRowKernel", "CRowOp", "Dialect", "block_size",
           "kernel_name", "render_kernel", "render_source"]
