"""Running the host-C dialect: the C-style kernels compiled by the system C compiler, called through ctypes.

This is the tier of the C-style printer that runs on any CPU: no OpenCL platform, no LLVM that has
to know the processor, only a C compiler (`cc`, or `$CC`). The kernel is the one the CUDA and
OpenCL dialects print — the same passes, tree reductions and bounds — with a row's work-items run
as loops between its barriers (backends/cstyle/dialects.py), so its logic executes for real.

Tensors are CPU tensors, passed as pointers to their first element: a view inside a larger tensor
is read and written in place, and a stray write lands in the tensor's storage where a test's
guard buffer sees it.

Nothing from disk runs unchecked: the compiler reads a copy of the text `write_source` has just
compared byte for byte with the cache file (`source_cache.verified_text`), written into a directory
private to this process (mode 0700, removed at exit), never the cache file itself, which could be
changed after the check; the shared library is compiled into that directory, never loaded from a cache.
Compiled libraries are kept per process, so a kernel pays the compiler once (~0.1 s).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from hrmspec.backends.common import source_cache
from hrmspec.backends.cstyle.launch import CRowKernel, CRowOp, Launch
from hrmspec.backends.cstyle.printer import HOST, parameters
from hrmspec.errors import KernelError

_lock = threading.RLock()
_libraries: dict[Path, ctypes.CDLL] = {}
_functions: dict[tuple[Path, str], object] = {}
_state: dict[str, object] = {}


def compiler() -> str | None:
    """The C compiler: `$CC`, else the first of cc, gcc, clang on the PATH; None when there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def missing() -> str:
    """Why host-C kernels cannot be compiled here ('' when they can)."""
    return "" if compiler() else f"no C compiler ({os.environ.get('CC') or 'cc, gcc or clang'}) is on the PATH"


def _cc() -> str:
    cc = compiler()
    if cc is None:
        raise KernelError(f"the host-C kernels need a C compiler, but {missing()}; apt install gcc")
    return cc


def compiler_tag() -> str:
    """The compiler's first line of `--version` (part of the cache key), asked once per process."""
    with _lock:
        if "tag" not in _state:
            cc = _cc()
            try:
                out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
            except (OSError, subprocess.SubprocessError) as e:
                raise KernelError(f"the C compiler {cc} does not run: {e}") from e
            _state["tag"] = f"{cc} | {(out.splitlines() or ['?'])[0]}"
        return _state["tag"]


def _workdir() -> Path:
    """A directory only this process writes, for the sources it compiles and their shared libraries."""
    if "dir" not in _state:
        path = Path(tempfile.mkdtemp(prefix="hrmspec-c-"))  # mode 0700
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _state["dir"] = path
    return _state["dir"]


def library(path: Path) -> ctypes.CDLL:
    """The cache file `path` compiled into a shared library and loaded (once per process)."""
    with _lock:
        if path not in _libraries:
            cc = _cc()
            source = _workdir() / path.name  # the checked text, where no one else can change it
            source.write_text(source_cache.verified_text(path))
            so = _workdir() / (path.stem + ".so")
            cmd = [cc, *HOST.compile_options, "-o", str(so), str(source), "-lm"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                raise KernelError(f"the C compiler did not run on {path}: {e}") from e
            if done.returncode != 0:
                raise KernelError(f"the C compiler could not build {path} ({' '.join(cmd)}):\n"
                                  f"{(done.stderr or done.stdout).strip()}")
            _libraries[path] = ctypes.CDLL(str(so), mode=ctypes.RTLD_LOCAL)
        return _libraries[path]


_CTYPE = {"ptr": ctypes.c_void_p, "stride": ctypes.c_int64, "istride": ctypes.c_int64, "n": ctypes.c_int32}


def function(kernel: CRowKernel, path: Path):
    """The kernel's function in the library of `path`, its argument types declared."""
    with _lock:
        key = (path, kernel.name)
        if key not in _functions:
            fn = getattr(library(path), kernel.name)
            fn.restype = None
            fn.argtypes = [_CTYPE[q.what.split("_")[0]] for q in parameters(kernel.program, HOST)]
            _functions[key] = fn
        return _functions[key]


class HostRowKernel(CRowKernel):
    """A RowProgram as a host-C function, run over the rows of CPU tensors."""

    dialect = HOST

    def tag(self) -> str:
        return compiler_tag()

    def launch(self, job: Launch) -> None:
        not_cpu = [n for n, t in job.tensors.items() if t.device.type != "cpu"]
        if not_cpu:
            raise KernelError(f"{self.program.name}: the host-C launcher takes CPU tensors; "
                              f"{', '.join(not_cpu)} {'is' if len(not_cpu) == 1 else 'are'} not")
        fn = function(self, job.path)
        args = self.arguments(job, lambda t: t.data_ptr(), lambda t: 0)  # pointers to the first element
        fn(*(int(a) for a in args))


class HostRowOp(CRowOp):
    """A forward RowProgram as a differentiable op on host-C kernels (the CPU, any CPU)."""

    kernel_class = HostRowKernel


def device_info() -> str:
    """One line naming the compiler kernels are built by (for logs and test reports)."""
    return compiler_tag()


__all__ = ["HostRowKernel", "HostRowOp", "compiler", "compiler_tag", "device_info", "library", "missing"]
