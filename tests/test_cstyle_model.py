"""A whole model on the backends that execute the generated C-style row kernels on the CPU (c: host C, opencl:
PoCL) equals the reference."""

import pytest
import torch
from numerics import compare_grads

import hrmspec
from hrmspec.backends import get_backend
from hrmspec.backends.common.fallback import record_fallbacks
from hrmspec.spec import load_spec_text


def test_c_style_backend_runs_a_whole_model_like_the_reference(tiny_text, c_ops):
    spec = load_spec_text(tiny_text, overrides={"model.modules.L.layers": 1, "model.modules.H.layers": 1})
    torch.manual_seed(0)
    ref = hrmspec.compile(spec, backend="reference")
    cs = hrmspec.compile(spec, backend=c_ops.name)
    cs.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 61, (2, 7), generator=gen), torch.randint(0, 61, (2, 7), generator=gen)
    prefix = torch.zeros(2, 7, dtype=torch.bool)
    prefix[:, :3] = True
    out_r = ref(ids, prefix_mask=prefix, labels=labels)
    with record_fallbacks() as fell:
        out_o = cs(ids, prefix_mask=prefix, labels=labels)
        out_o.loss.backward()
    assert not fell, fell  # every row op runs as a generated kernel: nothing falls back
    out_r.loss.backward()
    torch.testing.assert_close(out_o.logits, out_r.logits, rtol=1e-4, atol=1e-5)
    compared = compare_grads(ref, cs, rtol=1e-4, atol=lambda g: 1e-5 * float(g.abs().max()))
    assert compared == len(list(ref.parameters()))  # at full credit depth every parameter gets a gradient


@pytest.mark.fallback
def test_c_style_fallback_is_reported(c_ops, fresh_fallback_warnings):
    x = torch.randn(3, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match=f"{c_ops.name} backend: rms_norm: torch.float64"), record_fallbacks() as fell:
        y = c_ops.rms_norm(x, 1e-6)
    assert [(f.backend, f.op) for f in fell] == [(c_ops.name, "rms_norm")]
    torch.testing.assert_close(y, get_backend("reference").rms_norm(x, 1e-6))


def test_unknown_backend_is_a_clear_error():
    from hrmspec.errors import HrmspecError

    with pytest.raises(HrmspecError, match="unknown backend 'opencll'.*did you mean 'opencl'"):
        get_backend("opencll")


# -- an OpenCL platform that lists a device but cannot build for it ---------------------------------------
POCL_ON_AN_UNKNOWN_CPU = """clBuildProgram failed: BUILD_PROGRAM_FAILURE - clBuildProgram failed: BUILD_PROGRAM_FAILURE

Build on <pyopencl.Device 'pthread-AMD EPYC' on 'Portable Computing Language' at 0x55afb83904e0>:

error: unknown target CPU 'generic'
Device pthread-AMD EPYC failed to build the program

(options: -I /site-packages/pyopencl/cl)"""


class _FakeOpenCL:
    """pyopencl as PoCL 3.0 behaves on a CPU its LLVM does not know: a platform, a device, no kernel builds."""

    class Error(Exception):
        pass

    class mem_flags:  # noqa: N801 - pyopencl's name
        READ_WRITE = COPY_HOST_PTR = READ_ONLY = 1

    def __init__(self):
        from types import SimpleNamespace

        platform = SimpleNamespace(name="Portable Computing Language", version="OpenCL 3.0 PoCL 3.0")
        self.device = SimpleNamespace(name="pthread-AMD EPYC", platform=platform, type="cpu")
        platform.get_devices = lambda: [self.device]
        self.device_type = SimpleNamespace(CPU="cpu")
        self.platforms = [platform]

    def get_platforms(self):
        return self.platforms

    def Context(self, devices):  # noqa: N802
        return object()

    def CommandQueue(self, ctx):  # noqa: N802
        return object()

    def Program(self, ctx, source):  # noqa: N802
        fake = self

        class Program:
            def build(self):
                raise fake.Error(POCL_ON_AN_UNKNOWN_CPU)

        return Program()


@pytest.fixture
def pocl_that_cannot_build(monkeypatch):
    from hrmspec import backends
    from hrmspec.backends.cstyle import opencl

    fake = _FakeOpenCL()
    monkeypatch.setattr(opencl, "_cl", lambda: fake)
    monkeypatch.setattr(opencl, "_device", {})
    monkeypatch.setattr(backends, "_tables", {k: v for k, v in backends._tables.items() if k != "opencl"})
    monkeypatch.delenv("HRMSPEC_OPENCL_PLATFORM", raising=False)
    return fake


def test_a_device_that_builds_nothing_is_named_with_the_platforms_own_words(pocl_that_cannot_build):
    from hrmspec.backends import REGISTRY
    from hrmspec.errors import HrmspecError

    why = REGISTRY["opencl"].missing()
    assert why == ("Portable Computing Language cannot build a kernel for pthread-AMD EPYC "
                   "(error: unknown target CPU 'generic')")
    with pytest.raises(HrmspecError) as info:
        get_backend("opencl")
    assert "\n" not in str(info.value) and str(info.value).endswith(
        "--backend c runs the same generated kernels, compiled by the system C compiler")


@pytest.mark.parametrize("argv", [["compile", "specs/hrm-text-tiny.yaml", "--backend", "opencl"],
                                  ["train", "specs/hrm-text-tiny.yaml", "--set", "train.backend=opencl"]])
def test_opencl_on_such_a_cpu_is_one_line_and_exit_2(pocl_that_cannot_build, argv, tmp_path, capsys):
    from hrmspec.cli import main

    out = tmp_path / "run"
    assert main([*argv, *(["--out", str(out)] if argv[0] == "train" else [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown target CPU 'generic'" in err and "--backend c " in err, err
    assert not out.exists()  # refused before a run folder is made


def test_hrmspec_probe_agrees_with_the_platform():
    """The backend's own probe says OpenCL works exactly where a trivial kernel builds and runs (the test
    suite's probe, written against pyopencl directly)."""
    pytest.importorskip("pyopencl")
    from conftest import opencl_absent

    from hrmspec.backends import REGISTRY

    assert (REGISTRY["opencl"].missing() == "") == (opencl_absent() is None), (REGISTRY["opencl"].missing(),
                                                                                opencl_absent())
