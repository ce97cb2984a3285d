"""What every test runs under: the kernel device, the fallback guard, the hypothesis profiles.

Kernel device. With a CUDA device, the Triton kernels compile for it and the kernel tests feed it
device tensors (the `kernel_device` fixture); without one they run in Triton's interpreter on CPU
tensors. The same tests, the same draws: `pytest -m gpu` on a GPU machine is the GPU tier, with no
edit. `HRMSPEC_TEST_DEVICE=cpu` (or `TRITON_INTERPRET=1`) keeps the interpreter on a GPU machine.

CPU tests stay on the CPU. On a machine with CUDA, a test not marked `gpu` (or `needs_gpu`) sees no
CUDA device, in this process and in those it starts: a run with `train.device: auto` trains on the
CPU in fp32 as on CI, where its tolerances and bit-for-bit checks were set. The GPU tier is the
`gpu`-marked tests.

Fallbacks. Every test runs inside `record_fallbacks()`: a kernel backend that ran the reference op
instead of its kernel fails the test, whichever test warned first, unless the test is marked
`fallback` (it is about a fallback, and checks it).

Hypothesis. Two profiles (`--hypothesis-profile NAME`):

    ci     the default (make test, CI, a plain pytest): up to 100 examples per property, each test
           time-boxed to TIME_BOX["ci"] seconds (at least MIN_EXAMPLES examples run); -v lists the counts
    deep   up to 2000 examples, 300 s per test (make test-deep)

Every run draws with one seed, new each run, printed in the header and in the closing summary;
`--hypothesis-seed N` replays that run's draws.
"""

import functools
import os
import random
import signal
import time

import torch

# The interpreter must be chosen before triton is first imported (its own jit functions are built
# then); torch does not import triton, so the device can be asked first.
_WANTED = os.environ.get("HRMSPEC_TEST_DEVICE", "")
if _WANTED == "cpu" or (_WANTED != "cuda" and not torch.cuda.is_available()):
    os.environ.setdefault("TRITON_INTERPRET", "1")
KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"

import pytest  # noqa: E402
import tiers  # noqa: E402
from hypothesis import is_hypothesis_test, settings  # noqa: E402
from hypothesis.errors import UnsatisfiedAssumption  # noqa: E402

from hrmspec.backends.common.fallback import record_fallbacks  # noqa: E402

settings.register_profile("ci", max_examples=100, deadline=None)
settings.register_profile("deep", max_examples=2000, deadline=None)
settings.load_profile("ci")  # --hypothesis-profile, read after this module, replaces it
TIME_BOX = {"ci": 3.0, "deep": 300.0}  # seconds of examples per property test
MIN_EXAMPLES = 5  # run even past the time box

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# -- the kernel device -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """Where the Triton kernels run: the CUDA device, or the CPU (the interpreter)."""
    return torch.device(KERNEL_DEVICE)


_CUDA = torch.cuda.is_available()  # asked once, before any test hides it


@pytest.fixture(autouse=True)
def _cpu_unless_gpu_marked(request, monkeypatch):
    """A test not marked gpu or needs_gpu sees no CUDA device (see the module docstring)."""
    if _CUDA and not any(request.node.get_closest_marker(m) for m in ("gpu", "needs_gpu")):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the processes it starts (torchrun, the CLI)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this one: device auto is the CPU
    yield


# -- what a test needs from outside hrmspec -------------------------------------------------------------
def opencl_absent() -> str | None:
    """Why OpenCL kernels cannot run here, or None: pyopencl does not import, no OpenCL platform, none of the
    name hrmspec picks with a device, or one whose compiler cannot build and run a trivial kernel (PoCL 3.0's
    LLVM 14 on a CPU it does not know: "unknown target CPU 'generic'"), in the platform's own words. Asked of
    pyopencl directly: hrmspec's own OpenCL code runs inside the tests, where its errors fail them instead of
    turning into skips."""
    try:
        import numpy as np
        import pyopencl as cl
    except ImportError as e:
        return f"pyopencl does not import ({e})"
    from hrmspec.backends.cstyle.opencl import PLATFORM

    try:
        platforms = cl.get_platforms()
    except cl.Error as e:  # the ICD loader found no platform at all
        return f"no OpenCL platform ({str(e).splitlines()[0]})"
    want = os.environ.get("HRMSPEC_OPENCL_PLATFORM") or PLATFORM
    device = None
    for p in platforms:
        if want.lower() in p.name.lower():
            try:
                device = next(iter(p.get_devices()), None)
            except cl.Error:  # DEVICE_NOT_FOUND
                pass
            if device is not None:
                break
    if device is None:
        return f"no OpenCL platform named like {want!r} with a device (found: {[p.name for p in platforms]})"
    try:
        ctx = cl.Context(devices=[device])
        queue = cl.CommandQueue(ctx)
        prg = cl.Program(ctx, "__kernel void k(__global float* x) { x[get_global_id(0)] += 1.0f; }").build()
        x = np.zeros(4, np.float32)
        buf = cl.Buffer(ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=x)
        prg.k(queue, (4,), None, buf)
        cl.enqueue_copy(queue, x, buf, is_blocking=True)
    except Exception as e:  # the platform's build or launch error
        said = [ln.strip() for ln in str(e).splitlines() if "error" in ln.lower() and "failed" not in ln.lower()]
        return f"{device.platform.name} cannot build and run a trivial kernel on {device.name}: " + \
            ("; ".join(said) or str(e).splitlines()[0])
    if x.tolist() != [1.0] * 4:
        return f"{device.platform.name} ran a trivial kernel on {device.name} wrongly ({x.tolist()})"
    return None


def cc_absent() -> str | None:
    """Why host-C kernels cannot run here (no C compiler, or one that cannot build a shared library that
    ctypes loads and calls), or None; asked of the compiler directly, as OpenCL is."""
    import ctypes
    import shutil
    import subprocess
    import tempfile

    cc = next((shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if cc is None:
        return "no C compiler (cc, gcc or clang) is on the PATH"
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "k.c"), os.path.join(tmp, "k.so")
        with open(src, "w") as f:
            f.write("void k(float* x, int n) { for (int i = 0; i < n; ++i) x[i] += 1.0f; }\n")
        done = subprocess.run([cc, "-O2", "-fPIC", "-shared", "-o", lib, src], capture_output=True, text=True)
        if done.returncode:
            return f"{cc} cannot build a shared library: {(done.stderr or done.stdout).strip().splitlines()[:1]}"
        x = (ctypes.c_float * 4)()
        ctypes.CDLL(lib).k(x, 4)
        if list(x) != [1.0] * 4:
            return f"a trivial C function built by {cc} computed {list(x)}"
    return None


def nvrtc_absent() -> str | None:
    """Why NVRTC cannot compile here (cuda-bindings does not import, the NVRTC library does not load), or None;
    asked of cuda-bindings directly, so that hrmspec's NVRTC code fails its tests rather than skipping them."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        return f"cuda-bindings does not import ({e})"
    try:
        nvrtc.nvrtcVersion()
    except RuntimeError as e:  # cuda-bindings loads the library on the first call
        return f"the NVRTC library does not load ({str(e).splitlines()[0]})"
    return None


NEEDS = {"needs_gpu": lambda: None if torch.cuda.is_available() else "needs a CUDA device",
         "needs_opencl": opencl_absent, "needs_cc": cc_absent, "needs_nvrtc": nvrtc_absent}


_SKIPPED_FOR: dict[str, tuple[str, str]] = {}  # test id -> (the needs_ mark it lacks, why)


def pytest_collection_modifyitems(config, items):
    absent: dict[str, str | None] = {}
    for item in items:
        for mark, probe in NEEDS.items():
            if mark in item.keywords:
                if mark not in absent:  # probed once, and only when a collected test needs it
                    absent[mark] = probe()
                if absent[mark]:
                    item.add_marker(pytest.mark.skip(reason=absent[mark]))
                    _SKIPPED_FOR[item.nodeid] = (mark, absent[mark])


def pytest_runtest_logreport(report):
    if report.skipped and report.when == "setup" and report.nodeid in _SKIPPED_FOR:
        mark, why = _SKIPPED_FOR[report.nodeid]
        tiers.record_skip(report.nodeid, {mark}, why)


# -- fallbacks, per call ---------------------------------------------------------------------------------
@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    box = _time_box(item)
    before = tiers.Counter(tiers.launched)
    with record_fallbacks() as fell:
        try:
            result = yield
        except TimeBoxSpent:  # the examples that ran passed
            result = None
        finally:
            if box is not None:
                box.close()
            tiers.record(item.nodeid, before)
    if fell and item.get_closest_marker("fallback") is None:
        seen = sorted({f"{f.backend}: {f.op}: {f.reason}" for f in fell})
        raise AssertionError(f"{len(fell)} op(s) ran the reference instead of a kernel (mark the test "
                             f"`fallback` if that is what it tests): " + "; ".join(seen))
    return result


@pytest.fixture
def fresh_fallback_warnings(monkeypatch):
    """Fallback warnings as in a new process (each is warned once per process): for `pytest.warns`."""
    from hrmspec.backends.common import fallback

    monkeypatch.setattr(fallback, "_warned", set())


# -- hypothesis: the seed and the time box ---------------------------------------------------------------
class TimeBoxSpent(KeyboardInterrupt):
    """Raised instead of running an example once the box is spent, and caught around the test (pytest
    never sees it). Hypothesis ends a run at an interrupt without recording the example it was on;
    any other way (skipping the body, or another exception) records the example as ended before the
    draws its body makes with `st.data()`, which hypothesis then reports as flaky data generation
    when a later example starts the same way."""


class TimeBox:
    """Wraps a property test's body (`test.hypothesis.inner_test`): once its examples have run for
    `seconds` (and at least MIN_EXAMPLES ran), the run ends before the next example, so a test stops
    within its box whatever an example costs. After a failure every example runs (shrinking)."""

    stats: list[tuple[str, int, int]] = []  # (test id, examples run, 1 if the box ended the run)

    def __init__(self, item, seconds: float):
        self.item, self.handle = item, item.obj.hypothesis
        self.inner, self.seconds = self.handle.inner_test, seconds
        self.start, self.ran, self.cut, self.failed = time.monotonic(), 0, 0, False

        @functools.wraps(self.inner)  # hypothesis reads the body's name and signature
        def body(*args, **kwargs):
            return self.run(*args, **kwargs)

        self.handle.inner_test = body

    def run(self, *args, **kwargs):
        if not self.failed and self.ran >= MIN_EXAMPLES and time.monotonic() - self.start > self.seconds:
            self.cut += 1
            raise TimeBoxSpent
        self.ran += 1
        try:
            return self.inner(*args, **kwargs)
        except UnsatisfiedAssumption:  # assume(): a rejected draw, not a failure
            raise
        except BaseException:
            self.failed = True
            raise

    def close(self) -> None:
        self.handle.inner_test = self.inner
        TimeBox.stats.append((self.item.nodeid, self.ran, self.cut))


def _time_box(item) -> TimeBox | None:
    fn = getattr(item, "obj", None)
    if fn is None or not is_hypothesis_test(fn):
        return None
    return TimeBox(item, TIME_BOX.get(settings.get_current_profile_name(), TIME_BOX["ci"]))


def pytest_sessionstart(session):
    tiers.install()  # count which tier each test runs kernels on (tests/tiers.py)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # one seed for the run, before hypothesis's plugin reads the option
    if config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(random.SystemRandom().randrange(2**32))


def _seed_line(config) -> str:
    profile = settings.get_current_profile_name()
    seed = config.getoption("hypothesis_seed", None)
    return (f"hypothesis: profile {profile}, seed {seed} (replay: --hypothesis-seed={seed}), "
            f"{TIME_BOX.get(profile, TIME_BOX['ci']):g} s per property test; kernels on {KERNEL_DEVICE}")


def pytest_report_header(config):
    return _seed_line(config)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    stats = TimeBox.stats
    if stats:
        cut = [s for s in stats if s[2]]
        terminalreporter.write_line(f"hypothesis: {sum(s[1] for s in stats)} examples in {len(stats)} property "
                                    f"test runs; {len(cut)} stopped at the time box")
        if config.option.verbose > 0:  # -v: each test's count
            for nodeid, ran, skipped in stats:
                terminalreporter.write_line(f"  {ran:5d} examples{' (time box)' if skipped else ''}  {nodeid}")
    for line in tiers.table():
        terminalreporter.write_line(line)
    terminalreporter.write_line(_seed_line(config))  # also under -q, which prints no header


# -- shared fixtures -------------------------------------------------------------------------------------
TINY = """
name: t
model:
  vocab: 61
  d_model: 32
  heads: 4
  ffn: 48
  modules:
    L: {layers: 1}
    H: {layers: 1}
  states:
    z_H: {init: embed}
    z_L: {init: buffer}
  schedule:
    - repeat: 2
      do:
        - repeat: 3
          do: ["z_L = L(z_L + z_H)"]
        - "z_H = H(z_H + z_L)"
  output: z_H
  credit:
    depth: {from: 2, to: 5, warmup: 0.2}
    priority: [H, L]
"""


@pytest.fixture
def one_thread():
    """torch on one thread for the test: a micro model's ops are too small to share, and on a loaded machine
    a second thread only waits at every op (tens of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_text():
    return TINY


# the backends that run the generated C-style kernels on the CPU: host C (any CPU with a C compiler) and
# OpenCL (PoCL, where its LLVM knows the CPU); a test that takes a parameter of these runs once on each
C_BACKENDS = [pytest.param("c", marks=pytest.mark.needs_cc), pytest.param("opencl", marks=pytest.mark.needs_opencl)]


@pytest.fixture(scope="session", params=C_BACKENDS)
def c_ops(request):
    """The op table of a backend that executes the C-style kernels on the CPU (c, then opencl). Its mark skips
    it where the toolchain is absent (the probe above), so any error here is hrmspec's and fails the test."""
    from hrmspec.backends import get_backend

    return get_backend(request.param)


@pytest.fixture
def deadline():
    """A hostile input that got past its limit would run for minutes: fail the test instead."""
    def expire(*_):
        raise TimeoutError("a hostile input was not stopped by its limit")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
