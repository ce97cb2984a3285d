"""Running the CUDA dialect through CuPy on torch CUDA tensors, without copies.

The text `write_source` checked for the cache file (`source_cache.verified_text`, never the file
read again) is compiled by `cupy.RawModule` (NVRTC underneath, with the dialect's compile options)
once per process, and launched on torch's current stream. Tensors cross over through
DLPack: CuPy sees the same device memory, so outputs are written in place and views keep their
strides (the kernel gets each row stride). CuPy has no bfloat16, and the kernels take half types
as 16-bit integers anyway, so fp16 and bf16 tensors are handed over as an int16 view of the same
bits. CuPy is imported when a kernel is first launched, never when this module is.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from hrmspec.backends.common import source_cache
from hrmspec.backends.cstyle.launch import CRowKernel, CRowOp, Launch
from hrmspec.backends.cstyle.printer import CUDA
from hrmspec.errors import KernelError

_lock = threading.Lock()
_functions: dict[tuple[Path, str], object] = {}


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise KernelError("the CUDA backend launches through CuPy: pip install cupy-cuda12x (or cupy-cuda13x "
                          "for CUDA 13)") from e
    return cupy


def function(path: Path, name: str):
    """The kernel `name` of the cache file `path`, compiled once per process."""
    with _lock:
        if (path, name) not in _functions:
            cp = _cupy()
            module = cp.RawModule(code=source_cache.verified_text(path), options=CUDA.compile_options)
            _functions[(path, name)] = module.get_function(name)
        return _functions[(path, name)]


def as_cupy(t: torch.Tensor):
    """The same device memory as a CuPy array (DLPack; half types as their int16 bits)."""
    cp = _cupy()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return cp.from_dlpack(t)


class CudaRowKernel(CRowKernel):
    """A RowProgram as a CUDA kernel, run over the rows of torch CUDA tensors."""

    dialect = CUDA

    def tag(self) -> str:
        return f"cupy-{_cupy().__version__}"

    def launch(self, job: Launch) -> None:
        cp = _cupy()
        devices = {t.device for t in job.tensors.values()}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise KernelError(f"{self.program.name}: the CUDA launcher takes tensors on one CUDA device, "
                              f"got {sorted(map(str, devices))}")
        device = devices.pop()
        fn = function(job.path, self.name)
        args = self.arguments(job, as_cupy, lambda t: 0)  # the CUDA dialect has no offset parameters
        with cp.cuda.Device(device.index):
            stream = cp.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, device.index)
            fn((job.n_rows,), (job.block,), tuple(args), stream=stream)


class CudaRowOp(CRowOp):
    """A forward RowProgram as a differentiable op on CUDA tensors, through CuPy."""

    kernel_class = CudaRowKernel
