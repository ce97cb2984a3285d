"""Running the OpenCL dialect with pyopencl, by default on PoCL's CPU device (`pip install pyopencl
pocl-binary-distribution`; the PoCL wheel registers itself with pyopencl's ICD loader).

This is where the C-style kernel logic runs for real on a machine without a GPU: the same
passes, tree reductions, barriers and bounds as on a device, executed by PoCL's work-group
compiler. Tensors are CPU tensors. Each tensor's whole storage becomes one buffer and the kernel
gets (buffer, element offset): a view inside a larger tensor is read and written in place, and a
stray write anywhere in the storage is copied back where a test can see it.

Building is cached three times: built programs per process (by cache file), binaries by pyopencl
(~/.cache/pyopencl) and by PoCL (its kernel cache), so only a new source pays LLVM's compile.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from hrmspec.backends.common import source_cache
from hrmspec.backends.cstyle.launch import CRowKernel, CRowOp, Launch
from hrmspec.backends.cstyle.printer import OPENCL
from hrmspec.errors import KernelError

PLATFORM = "Portable Computing Language"  # PoCL's platform name; HRMSPEC_OPENCL_PLATFORM picks another

_lock = threading.RLock()
_device: dict[str, object] = {}
_programs: dict[Path, object] = {}
_kernels: dict[tuple[Path, str], object] = {}


def _cl():
    try:
        import pyopencl
    except ImportError as e:
        raise KernelError("the OpenCL backend needs pyopencl and an OpenCL platform: "
                          "pip install pyopencl pocl-binary-distribution") from e
    return pyopencl


def find_device(platform: str | None = None):
    """The first device (CPU first) of the OpenCL platform whose name contains `platform`."""
    cl = _cl()
    want = platform or os.environ.get("HRMSPEC_OPENCL_PLATFORM") or PLATFORM
    try:
        platforms = cl.get_platforms()
    except cl.Error as e:  # the ICD loader found no platform at all
        raise KernelError(f"no OpenCL platform is installed ({e}); pip install pocl-binary-distribution") from e
    seen = []
    for p in platforms:
        try:
            devices = sorted(p.get_devices(), key=lambda d: d.type != cl.device_type.CPU)
        except cl.Error:  # DEVICE_NOT_FOUND: an installed driver whose hardware is not there
            devices = []
        seen.append(f"{p.name} ({len(devices)} device{'s' if len(devices) != 1 else ''})")
        if want.lower() in p.name.lower() and devices:
            return devices[0]
    raise KernelError(f"no OpenCL platform named like '{want}' with a device; found: {', '.join(seen) or 'none'}. "
                      "pip install pocl-binary-distribution, or set HRMSPEC_OPENCL_PLATFORM")


_PROBE = "__kernel void hrm_probe(__global float* x) { x[get_global_id(0)] += 1.0f; }"


def build_failure(e: Exception) -> str:
    """The lines of an OpenCL build error that say why (PoCL's `error: ...`), without pyopencl's preamble."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = [ln for ln in lines if "error" in ln.lower() and "clBuildProgram failed" not in ln]
    return "; ".join(why or lines[-1:]) or type(e).__name__


def probe() -> str:
    """'' when the chosen device builds and runs a trivial kernel, else why not, in the platform's own
    words: a platform can list a device whose compiler rejects every kernel (PoCL 3.0's LLVM 14 on a
    CPU it does not know: "unknown target CPU 'generic'"). Asked once per process."""
    with _lock:
        if "probe" not in _device:
            dev = None
            try:
                ctx, queue, dev = context()
                cl = _cl()
                program = cl.Program(ctx, _PROBE).build()
                x = np.zeros(4, np.float32)
                buf = cl.Buffer(ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=x)
                program.hrm_probe(queue, (4,), None, buf)
                cl.enqueue_copy(queue, x, buf, is_blocking=True)
                why = "" if x.tolist() == [1.0] * 4 else f"a trivial kernel ran on {dev.name} and computed {x.tolist()}"
            except KernelError as e:
                why = str(e)
            except Exception as e:  # a build failure (BUILD_PROGRAM_FAILURE, ...): the platform's message
                where = f"{dev.platform.name} cannot build a kernel for {dev.name}" if dev is not None else \
                    "OpenCL cannot build a kernel for its device"
                why = f"{where} ({build_failure(e)})"
            _device["probe"] = why
        return _device["probe"]


def context():
    """(context, queue, device) of the chosen device, made once per process."""
    with _lock:
        if not _device:
            cl = _cl()
            dev = find_device()
            ctx = cl.Context(devices=[dev])
            _device.update(context=ctx, queue=cl.CommandQueue(ctx), device=dev)
        return _device["context"], _device["queue"], _device["device"]


def device_tag() -> str:
    _, _, dev = context()
    return f"{dev.platform.version} | {dev.name}"


def build(path: Path):
    """The built program of a cache file (once per process), from the text `write_source` checked."""
    cl = _cl()
    with _lock:
        if path not in _programs:
            ctx, _, _ = context()
            try:
                with warnings.catch_warnings():  # a non-empty build log is a warning in pyopencl: say it if it fails
                    warnings.simplefilter("ignore", cl.CompilerWarning)
                    _programs[path] = cl.Program(ctx, source_cache.verified_text(path)).build()
            except cl.Error as e:
                raise KernelError(f"OpenCL could not build {path}:\n{e}") from e
        return _programs[path]


def _kernel(path: Path, name: str):
    with _lock:
        if (path, name) not in _kernels:
            _kernels[(path, name)] = getattr(build(path), name)
        return _kernels[(path, name)]


def _storage_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's whole storage as a numpy byte array (no copy)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).numpy()


class OpenCLRowKernel(CRowKernel):
    """A RowProgram as an OpenCL kernel, run over the rows of CPU tensors."""

    dialect = OPENCL

    def tag(self) -> str:
        return device_tag()

    def launch(self, job: Launch) -> None:
        cl = _cl()
        ctx, queue, _ = context()
        not_cpu = [n for n, t in job.tensors.items() if t.device.type != "cpu"]
        if not_cpu:
            raise KernelError(f"{self.program.name}: the OpenCL launcher takes CPU tensors; "
                              f"{', '.join(not_cpu)} {'is' if len(not_cpu) == 1 else 'are'} not")
        outputs = set(self.program.output_names)
        buffers: dict[int, tuple[np.ndarray, object, bool]] = {}  # storage address -> (host bytes, cl buffer, written)
        mf = cl.mem_flags
        with _lock:
            for name, t in job.tensors.items():
                key = t.untyped_storage().data_ptr()
                host, _, written = buffers.get(key, (None, None, False))
                buffers[key] = (_storage_bytes(t) if host is None else host, None, written or name in outputs)
            for key, (host, _, written) in buffers.items():
                flags = mf.READ_WRITE if written else mf.READ_ONLY
                buf = (cl.Buffer(ctx, flags | mf.COPY_HOST_PTR, hostbuf=host) if host.nbytes
                       else cl.Buffer(ctx, flags, 4))  # OpenCL has no empty buffers
                buffers[key] = (host, buf, written)
            args = self.arguments(job, lambda t: buffers[t.untyped_storage().data_ptr()][1],
                                  lambda t: t.storage_offset())
            kernel = _kernel(job.path, self.name)
            kernel(queue, (job.n_rows * job.block,), (job.block,), *args)
            for host, buf, written in buffers.values():
                if written and host.nbytes:
                    cl.enqueue_copy(queue, host, buf, is_blocking=True)


class OpenCLRowOp(CRowOp):
    """A forward RowProgram as a differentiable op on OpenCL (PoCL on the CPU by default)."""

    kernel_class = OpenCLRowKernel


def device_info() -> str:
    """One line naming the platform and device kernels run on (for logs and test reports)."""
    _, _, dev = context()
    return f"{dev.platform.name} {dev.platform.version}: {dev.name} ({dev.max_compute_units} compute units)"
