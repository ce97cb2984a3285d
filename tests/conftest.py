import os

# Without a GPU, Triton kernels run in its interpreter; the variable must be set before triton is
# first imported (torch may import it), so it is set here, before anything else.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# CPU machines with 2 cores: keep property tests small and free of wall-clock deadlines.
settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
def tiny_text():
    return TINY


@pytest.fixture(scope="session")
def cl_ops():
    """The opencl backend's op table, or a skip when this machine has no OpenCL device."""
    pytest.importorskip("pyopencl")
    from hrmspec.backends import get_backend
    from hrmspec.backends.cstyle.opencl import find_device

    try:
        find_device()
    except Exception as e:  # no OpenCL platform on this machine
        pytest.skip(f"no OpenCL device: {e}")
    return get_backend("opencl")
