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
import time

import torch

# The interpreter must be chosen before triton is first imported (its own jit functions are built
# then); torch does not import triton, so the device can be asked first.
_WANTED = os.environ.get("HRMSPEC_TEST_DEVICE", "")
if _WANTED == "cpu" or (_WANTED != "cuda" and not torch.cuda.is_available()):
    os.environ.setdefault("TRITON_INTERPRET", "1")
KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"

import pytest  # noqa: E402
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
    """Why OpenCL kernels cannot run here (pyopencl does not import, no OpenCL platform, none of the name
    hrmspec picks with a device), or None. Only the external dependency is probed: hrmspec's own OpenCL code
    runs inside the tests, where its errors fail them instead of turning into skips."""
    try:
        import pyopencl as cl
    except ImportError as e:
        return f"pyopencl does not import ({e})"
    from hrmspec.backends.cstyle.opencl import PLATFORM

    try:
        platforms = cl.get_platforms()
    except cl.Error as e:  # the ICD loader found no platform at all
        return f"no OpenCL platform ({str(e).splitlines()[0]})"
    want = os.environ.get("HRMSPEC_OPENCL_PLATFORM") or PLATFORM
    for p in platforms:
        if want.lower() in p.name.lower():
            try:
                if p.get_devices():
                    return None
            except cl.Error:  # DEVICE_NOT_FOUND
                pass
    return f"no OpenCL platform named like {want!r} with a device (found: {[p.name for p in platforms]})"


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
         "needs_opencl": opencl_absent, "needs_nvrtc": nvrtc_absent}


def pytest_collection_modifyitems(config, items):
    absent: dict[str, str | None] = {}
    for item in items:
        for mark, probe in NEEDS.items():
            # a test that takes the opencl op table (the cl_ops fixture) needs OpenCL, marked or not
            if mark in item.keywords or (mark == "needs_opencl" and "cl_ops" in getattr(item, "fixturenames", ())):
                if mark not in absent:  # probed once, and only when a collected test needs it
                    absent[mark] = probe()
                if absent[mark]:
                    item.add_marker(pytest.mark.skip(reason=absent[mark]))


# -- fallbacks, per call ---------------------------------------------------------------------------------
@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    box = _time_box(item)
    with record_fallbacks() as fell:
        try:
            result = yield
        except TimeBoxSpent:  # the examples that ran passed
            result = None
        finally:
            if box is not None:
                box.close()
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


@pytest.fixture(scope="session")
def cl_ops():
    """The opencl backend's op table, its device found; tests that take it are marked `needs_opencl` (which
    skips them where OpenCL is absent), so any error here is hrmspec's and fails them."""
    from hrmspec.backends import get_backend
    from hrmspec.backends.cstyle.opencl import find_device

    find_device()
    return get_backend("opencl")
