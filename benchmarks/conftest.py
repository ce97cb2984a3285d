"""Fixtures of the benchmark suites (not run in CI: pytest's testpaths is tests/).

    python -m pytest benchmarks                         # measure (pytest-benchmark tables)
    python -m pytest benchmarks -q --benchmark-disable  # smoke run: every benchmark once

HRMSPEC_BENCH_THREADS sets torch's thread count (default 2, the CI machines' core count; 1 when
torch was imported before this file could set OMP_WAIT_POLICY).
OMP_WAIT_POLICY defaults to PASSIVE: with OpenMP's spinning waits, two threads on a machine
whose cores are shared with other processes run several times slower than one thread, and the
timings measure the contention instead of the code. It must be set before torch is imported.
"""

from __future__ import annotations

import os
import sys

# torch reads OMP_WAIT_POLICY when it is first imported: if a conftest of another directory
# imported it first (`pytest tests benchmarks`), the spinning default is in force and one thread
# is the safe default
_SPINNING = "torch" in sys.modules and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from workloads import Batch, Workload, hf_model, hrmspec_model, make_batch  # noqa: E402

torch.set_num_threads(int(os.environ.get("HRMSPEC_BENCH_THREADS", "1" if _SPINNING else "2")))


@pytest.fixture(scope="session")
def workload() -> Workload:
    """HRM-Text tiny, 2 H cycles x 3 L cycles, L_bp_cycles [1, 2], batch 8 x 256."""
    return Workload()


@pytest.fixture(scope="session")
def models(workload: Workload) -> dict[str, torch.nn.Module]:
    """Both implementations, with the same weights."""
    ours = hrmspec_model(workload)
    return {"hrmspec": ours, "transformers": hf_model(ours)}


@pytest.fixture(scope="session")
def batch(workload: Workload, models) -> Batch:
    return make_batch(workload, models["hrmspec"].spec.model.vocab)
