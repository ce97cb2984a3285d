"""Which execution tier each test exercised, and the table `make test` ends with.

A green run on a machine that skipped a tier is not the same as one that ran it: the closing table
says, per tier, how many tests ran a kernel there and, where none did, why. A test counts for a
tier when, while it ran in this process, a kernel was launched (or compiled, for the compile-only
tiers) through that tier's entry point, found by wrapping the entry points once per session:

    Triton interpreter     triton's InterpretedFunction.run (TRITON_INTERPRET=1)
    host C                 HostRowKernel.launch (the C-style kernels, compiled by cc)
    OpenCL                 OpenCLRowKernel.launch (PoCL)
    NVRTC compile          nvrtc.compile_source (CUDA C to sm_80 / sm_90 cubin)
    Triton AOT compile     aot.compile_in_fresh_process / compile_kernel (Triton to cubin)
    CUDA device            CudaRowKernel.launch, triton's JITFunction.run on a GPU

and for `reference` when it launched none of them. Work done in a subprocess the test starts
(the CLI, torchrun) is not seen, so those tests count as reference.
"""

from __future__ import annotations

import importlib
from collections import Counter

TIERS = ("reference", "Triton interpreter", "host C", "OpenCL", "NVRTC compile", "Triton AOT compile", "CUDA device")
# the mark whose skip reason says why a tier did not run
MARK_OF = {"host C": "needs_cc", "OpenCL": "needs_opencl", "NVRTC compile": "needs_nvrtc", "CUDA device": "needs_gpu"}

launched: Counter[str] = Counter()  # tier -> launches so far in this process
ran: dict[str, set[str]] = {t: set() for t in TIERS}  # tier -> test ids
skipped: dict[str, set[str]] = {t: set() for t in TIERS}
reasons: dict[str, str] = {}


def _wrap(owner, attr: str, tier: str) -> None:
    original = getattr(owner, attr)
    if getattr(original, "_hrmspec_tier", None):
        return

    def counted(*args, **kwargs):
        launched[tier] += 1
        return original(*args, **kwargs)

    counted._hrmspec_tier = tier
    setattr(owner, attr, counted)


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def install() -> None:
    """Wrap every tier's entry point (once; a module that does not import leaves its tier unseen)."""
    import torch

    host = _module("hrmspec.backends.cstyle.host")
    opencl = _module("hrmspec.backends.cstyle.opencl")
    cuda = _module("hrmspec.backends.cstyle.cuda")
    nvrtc = _module("hrmspec.backends.cstyle.nvrtc")
    if host:
        _wrap(host.HostRowKernel, "launch", "host C")
    if opencl:
        _wrap(opencl.OpenCLRowKernel, "launch", "OpenCL")
    if cuda and torch.cuda.is_available():  # without a device the launcher's tests run on a stand-in CuPy
        _wrap(cuda.CudaRowKernel, "launch", "CUDA device")
    if nvrtc:
        _wrap(nvrtc, "compile_source", "NVRTC compile")
    if _module("triton") is None:
        reasons["Triton interpreter"] = reasons["Triton AOT compile"] = "triton is not installed"
        return
    interpreter = _module("triton.runtime.interpreter")
    if interpreter is not None:
        _wrap(interpreter.InterpretedFunction, "run", "Triton interpreter")
    if torch.cuda.is_available():
        from triton.runtime.jit import JITFunction

        _wrap(JITFunction, "run", "CUDA device")
    aot = _module("hrmspec.backends.triton.aot")
    if aot:
        _wrap(aot, "compile_in_fresh_process", "Triton AOT compile")
        for name in ("hrmspec.backends.triton.aot", "hrmspec.backends.triton.linear_ce",
                     "hrmspec.backends.triton.attention"):
            module = _module(name)
            if module is not None and hasattr(module, "compile_kernel"):
                _wrap(module, "compile_kernel", "Triton AOT compile")


def record(nodeid: str, before: Counter[str]) -> None:
    """Count a test that ran (pass or fail) for each tier it launched something on, or for reference."""
    tiers = [t for t in TIERS[1:] if launched[t] > before[t]]
    for t in tiers or ["reference"]:
        ran[t].add(nodeid)


def record_skip(nodeid: str, marks: set[str], reason: str) -> None:
    for tier, mark in MARK_OF.items():
        if mark in marks:
            skipped[tier].add(nodeid)
            reasons.setdefault(tier, reason)


def table() -> list[str]:
    """The lines of the closing table."""
    lines = ["execution tiers: tests that ran a kernel there (launched or compiled), and skips for want of it"]
    for t in TIERS:
        n, s = len(ran[t]), len(skipped[t])
        line = f"  {t:<20} {n:5d} ran"
        if s:
            line += f", {s} skipped"
        if not n:
            line += f"  -- NOT RUN: {reasons.get(t, 'no collected test needs it')}"
        lines.append(line)
    return lines
