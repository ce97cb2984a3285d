"""Backends: one folder per target. `get_backend(name)` returns the op table a CompiledModel runs on."""

from __future__ import annotations

import importlib.util
import os
import sys

from hrmspec.errors import HrmspecError, close_match

BACKENDS = ("reference", "triton", "opencl", "cuda")


def get_backend(name: str):
    """The ops of backend `name`: `reference` (torch ops, the definition of every op) or `triton`
    (generated kernels where there are some, see backends/triton/ops.py; the reference elsewhere) or
    `opencl` (generated C-style row kernels on an OpenCL device, PoCL on the CPU; backends/cstyle/ops.py) or
    `cuda` (the same kernels as CUDA C through CuPy on a CUDA device; backends/cstyle/cuda_ops.py)."""
    if name == "reference":
        from hrmspec.backends.reference import ops

        return ops
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            raise HrmspecError("the triton backend needs the triton package (pip install triton); "
                               "or use --backend reference")
        if "triton" not in sys.modules:
            import torch

            # without a GPU the kernels run in Triton's interpreter, which must be chosen before
            # triton is first imported (its own jit functions are built then)
            if not torch.cuda.is_available():
                os.environ.setdefault("TRITON_INTERPRET", "1")
        from hrmspec.backends.triton import ops

        return ops
    if name == "opencl":
        if importlib.util.find_spec("pyopencl") is None:
            raise HrmspecError("the opencl backend needs pyopencl and an OpenCL platform "
                               "(pip install pyopencl pocl-binary-distribution); or use --backend reference")
        from hrmspec.backends.cstyle import ops

        return ops
    if name == "cuda":
        missing = _cuda_missing()
        if missing:
            raise HrmspecError(f"the cuda backend needs a CUDA device and CuPy (pip install cupy-cuda12x, or "
                               f"cupy-cuda13x for CUDA 13), but {missing}; --backend opencl runs the same "
                               "generated C-style kernels on the CPU through PoCL")
        from hrmspec.backends.cstyle import cuda_ops

        return cuda_ops
    hint = close_match(name, BACKENDS)
    raise HrmspecError(f"unknown backend '{name}'; available: {', '.join(BACKENDS)}" + (f" ({hint})" if hint else ""))


def _cuda_missing() -> str:
    """What the cuda backend lacks on this machine ('' when nothing)."""
    import torch

    missing = [] if torch.cuda.is_available() else ["torch sees no CUDA device"]
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        first_line = (str(e) or type(e).__name__).splitlines()[0]
        missing.append(f"CuPy does not import ({first_line})")
    return " and ".join(missing)
