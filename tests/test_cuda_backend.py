"""The cuda backend: generated CUDA C row kernels launched through CuPy (backends/cstyle/cuda_table.py).

Without a GPU three things are checked here: `get_backend("cuda")` and the CLI refuse with one
actionable line; the op table has every op and falls back, with a warning, on CPU tensors; and
`CudaRowKernel.launch` hands CuPy the arguments the generated kernel declares, in its order and
with its C types (run against a fake CuPy that records the launch, on CPU tensors that report a
CUDA device). The kernel source itself is compiled by NVRTC in tests/test_cstyle_backend.py. The
`gpu`-marked tests run a whole model on a CUDA device against the reference.
"""

import contextlib
import dataclasses
import functools
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from numerics import compare_grads

import hrmspec
from hrmspec.backends import get_backend
from hrmspec.backends.common import fallback
from hrmspec.backends.common.contract import OpTable
from hrmspec.backends.cstyle import CUDA, cuda
from hrmspec.backends.cstyle.cuda import CudaRowKernel
from hrmspec.backends.cstyle.cuda_table import CudaTable
from hrmspec.errors import HrmspecError
from hrmspec.ir import ProgramBuilder, builtin_programs, grad
from hrmspec.ir.strategies import random_inputs
from hrmspec.spec import load_spec_text

PROGRAMS = builtin_programs()
reference = get_backend("reference")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _has_cuda_backend() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


without_cuda = pytest.mark.skipif(_has_cuda_backend(), reason="this machine has a CUDA device and CuPy")


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HRMSPEC_CACHE", str(tmp_path / "kernels"))


# -- refusing without a device -----------------------------------------------------------------------
@without_cuda
def test_get_backend_without_a_device_is_one_actionable_line():
    with pytest.raises(HrmspecError) as info:
        get_backend("cuda")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("the cuda backend needs a CUDA device and CuPy")
    assert "pip install cupy-cuda12x" in message and "--backend c" in message


def test_get_backend_names_what_is_missing(monkeypatch):
    # a device but no CuPy: only CuPy is named
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    with pytest.raises(HrmspecError, match=r"but CuPy does not import \(.*\); --backend c ") as info:
        get_backend("cuda")
    assert "no CUDA device" not in str(info.value)
    # both there: the op table
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    assert isinstance(get_backend("cuda"), CudaTable)


@without_cuda
def test_cli_compile_for_cuda_without_a_device_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "-m", "hrmspec", "compile", "hrm-text-tiny", "--backend", "cuda"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("hrmspec: error: the cuda backend needs a CUDA device")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


@without_cuda
def test_cli_emits_cuda_source_without_a_device(tmp_path, capsys):
    """Writing the source needs no device: --emit works for cuda here, and writes the golden files."""
    from hrmspec.cli import main
    from hrmspec.emit import kernel_files, spec_kernels
    from hrmspec.spec import load_spec

    assert main(["compile", "hrm-text-tiny", "--backend", "cuda", "--emit", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cannot run here" in out and "writing its source only" in out
    expected = kernel_files(spec_kernels(load_spec("hrm-text-tiny")), "cuda")
    assert expected and all((tmp_path / name).read_text() == text for name, text in expected.items())
    assert any(name.endswith(".cu") for name in expected)


# -- the op table -------------------------------------------------------------------------------------
def test_op_table_has_every_op_of_the_reference():
    table = CudaTable(reference)  # as the registry builds it, without the device check
    assert isinstance(table, OpTable) and table.name == "cuda" and table.fuses
    names = {n for n in dir(reference) if not n.startswith("_") and callable(getattr(reference, n))}
    assert names <= set(dir(table))
    assert table.op_class is cuda.CudaRowOp and table.reference is reference  # kernels, and what they fall back to
    args = (torch.arange(5)[None], 8, 100.0, torch.float32)
    for a, b in zip(table.rope_tables(*args), reference.rope_tables(*args)):
        assert torch.equal(a, b)


@pytest.mark.fallback
def test_cpu_tensors_fall_back_with_a_warning(monkeypatch):
    table = CudaTable(reference)
    monkeypatch.setattr(fallback, "_warned", set())
    x, w = torch.randn(3, 8), torch.randn(8)
    with fallback.record_fallbacks() as fell:
        with pytest.warns(UserWarning, match="cuda backend: rms_norm: a tensor on cpu; the CUDA launcher takes CUDA"):
            y = table.rms_norm(x, 1e-6, w)
        torch.testing.assert_close(y, reference.rms_norm(x, 1e-6, w))
        with pytest.warns(UserWarning, match="cuda backend: swiglu: a tensor on cpu"):
            torch.testing.assert_close(table.swiglu(x, x.flip(0)), reference.swiglu(x, x.flip(0)))
    assert [(f.backend, f.op) for f in fell] == [("cuda", "rms_norm"), ("cuda", "swiglu")]


# -- what the launcher hands CuPy, on a fake CuPy ---------------------------------------------------------
class OnCuda:
    """A CPU tensor that reports cuda:0: the parts of a CUDA tensor the launcher reads."""

    device = torch.device("cuda", 0)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def view(self, dtype: torch.dtype) -> "OnCuda":
        return OnCuda(self.tensor.view(dtype))

    def stride(self, *dim: int):
        return self.tensor.stride(*dim)


@dataclasses.dataclass
class Recorded:
    kernel: str
    grid: tuple
    block: tuple
    args: tuple
    stream: object


class FakeCupy:
    """Just enough of CuPy for CudaRowKernel: RawModule compiles nothing, a kernel call is recorded,
    from_dlpack returns the tensor it was given (an OnCuda) and Device / ExternalStream record too."""

    __version__ = "0.0-fake"

    def __init__(self):
        self.modules: list[tuple[str, tuple]] = []  # (code, options) per RawModule
        self.devices: list[int] = []  # entered cuda.Device(index)
        self.launches: list[Recorded] = []
        self.cuda = types.SimpleNamespace(Device=self._device, ExternalStream=self._stream)

    def RawModule(self, code: str, options: tuple):  # noqa: N802 - CuPy's name
        self.modules.append((code, options))
        return types.SimpleNamespace(get_function=lambda name: functools.partial(self._launch, name))

    def _launch(self, name, grid, block, args, stream=None):
        self.launches.append(Recorded(name, grid, block, args, stream))

    @contextlib.contextmanager
    def _device(self, index):
        self.devices.append(index)
        yield

    @staticmethod
    def _stream(ptr, device_id):
        return types.SimpleNamespace(ptr=ptr, device_id=device_id)

    @staticmethod
    def from_dlpack(t: OnCuda) -> OnCuda:
        assert isinstance(t, OnCuda), f"from_dlpack got {type(t)}"
        return t


STREAM = 0x5EED


@pytest.fixture
def fake_cupy(monkeypatch):
    fake = FakeCupy()
    monkeypatch.setattr(cuda, "_cupy", lambda: fake)
    monkeypatch.setattr(cuda, "_functions", {})  # no compiled function of another test
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=STREAM))
    return fake


_SIGNATURE = re.compile(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\((.*?)\) \{', re.S)


def signature(source: str) -> tuple[int, str, list[tuple[str, str]]]:
    """(threads per block, kernel name, [(parameter name, C type)]) of the generated kernel."""
    block, name, params = _SIGNATURE.search(source).groups()
    params = re.sub(r"//[^\n]*", "", params)  # each buffer's line ends with a comment
    decls = [p.split() for p in params.split(",")]
    return int(block), name, [(d[-1], " ".join(d[:-1])) for d in decls]


def _strided(t: torch.Tensor, pad: int) -> torch.Tensor:
    """The rows of t as a view into a wider buffer: a row stride that is neither D nor another tensor's."""
    buf = torch.zeros(t.shape[0], t.shape[1] + pad, dtype=t.dtype)
    buf[:, : t.shape[1]] = t
    return buf[:, : t.shape[1]]


def _launch_on_fake_gpu(kernel: CudaRowKernel, inputs: dict[str, torch.Tensor], fake: FakeCupy):
    """Run the kernel's real __call__ (flattening, outputs, the source) up to the launch, then its
    real launch on the same tensors reporting cuda:0; returns the Launch and the call CuPy recorded."""
    jobs = []
    kernel.launch = jobs.append  # an instance attribute: __call__ hands its Launch over
    kernel(inputs)
    del kernel.launch
    (job,) = jobs
    CudaRowKernel.launch(kernel, dataclasses.replace(job, tensors={n: OnCuda(t) for n, t in job.tensors.items()}))
    (call,) = fake.launches
    return job, call


def _programs():
    b = ProgramBuilder("mixed")  # a per-row scalar input and output: pointers without a stride
    x, s, w = b.row("x"), b.scalar("s"), b.vector("w")
    b.output("y", x * w + s)
    b.output("m", (x * w).max() * s)
    mixed = b.build()
    cases = {}
    for p in (PROGRAMS["rms_norm"], PROGRAMS["add_rms_norm"], mixed):
        cases[f"{p.name}-fwd"] = (p, "fwd", None)
        cases[f"{p.name}-bwd"] = (grad(p), "bwd", p.name)
    return cases


CASES = _programs()
C_INTS = {"int": np.int32, "long long": np.int64}


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_launch_arguments_follow_the_kernel_signature(case, dtype, fake_cupy):
    program, direction, base = CASES[case]
    kernel = CudaRowKernel(program, direction, base)
    rows, width = 3, 5
    inputs = random_inputs(program, rows, width, 1.0, seed=0, dtype=dtype)
    for pad, (name, t) in enumerate(sorted(inputs.items()), start=2):
        if t.dim() == 2:
            inputs[name] = _strided(t, pad)  # x_stride 5 + pad: a swapped stride argument shows
    job, call = _launch_on_fake_gpu(kernel, inputs, fake_cupy)

    source = job.path.read_text()
    assert fake_cupy.modules == [(source, CUDA.compile_options)]  # the cache file, as NVRTC must compile it
    block, name, params = signature(source)
    assert call.kernel == name == kernel.name and block == job.block
    assert call.grid == (job.n_rows,) and call.block == (job.block,) and job.n_rows == rows
    assert fake_cupy.devices == [0] and (call.stream.ptr, call.stream.device_id) == (STREAM, 0)

    tensors = job.tensors
    assert len({t.data_ptr() for t in tensors.values()}) == len(tensors)  # a pointer names one tensor
    assert len(call.args) == len(params), (params, call.args)
    for (param, ctype), arg in zip(params, call.args):
        if "*" in ctype:  # a buffer: the tensor of that name, half types as their int16 bits
            assert param.endswith("_ptr"), param
            tensor_name = param.removesuffix("_ptr")
            t = tensors[tensor_name]
            assert isinstance(arg, OnCuda), (param, arg)
            assert arg.tensor.data_ptr() == t.data_ptr() and arg.tensor.shape == t.shape, param
            assert arg.tensor.stride() == t.stride(), param
            half = t.dtype in (torch.float16, torch.bfloat16)
            assert arg.tensor.dtype == (torch.int16 if half else t.dtype), (param, arg.tensor.dtype)
            c_type = "unsigned short" if half else "float"
            assert ctype.split("*")[0] == (f"const {c_type}" if tensor_name in program.input_names else c_type), \
                (param, ctype)
        else:  # an integer of the declared C type
            base = ctype.removeprefix("const ")
            assert type(arg) is C_INTS[base], (param, ctype, type(arg))
            if param in ("n_rows", "n_inner", "n_cols"):
                want = {"n_rows": job.n_rows, "n_inner": job.n_inner, "n_cols": job.width}[param]
            elif param.endswith("_istride"):  # rows as [n_outer, n_inner, D]: the inner row stride
                want = tensors[param.removesuffix("_istride")].stride(1)
            else:
                assert param.endswith("_stride"), param
                want = tensors[param.removesuffix("_stride")].stride(0)
            assert int(arg) == want, (param, int(arg), want)


def test_rms_norm_launch_arguments_written_out(fake_cupy):
    # the same check by hand for one kernel: x's rows are 9 apart, y's 5; 3 rows of 5 columns
    x, w = _strided(torch.randn(3, 5), 4), torch.randn(5)
    job, call = _launch_on_fake_gpu(CudaRowKernel(PROGRAMS["rms_norm"]), {"x": x, "w": w}, fake_cupy)
    _, _, params = signature(job.path.read_text())
    assert [q for q, _ in params] == ["x_ptr", "x_stride", "x_istride", "w_ptr", "y_ptr", "y_stride", "y_istride",
                                      "n_rows", "n_inner", "n_cols"]
    x_ptr, x_stride, x_istride, w_ptr, y_ptr, y_stride, y_istride, n_rows, n_inner, n_cols = call.args
    assert (x_ptr.tensor.data_ptr(), w_ptr.tensor.data_ptr()) == (x.data_ptr(), w.data_ptr())
    assert y_ptr.tensor.data_ptr() == job.tensors["y"].data_ptr()
    assert (x_stride, x_istride, y_stride, y_istride, n_rows, n_inner, n_cols) == (9, 0, 5, 0, 3, 1, 5)


def test_two_level_rows_are_passed_without_a_copy(fake_cupy):
    # x (2, 3, 5) is every other (3, 5) block of a (2, 4, 3, 5) buffer: no one row stride walks it, two do
    x = torch.randn(2, 4, 3, 5)[:, 1]
    job, call = _launch_on_fake_gpu(CudaRowKernel(PROGRAMS["gelu"]), {"x": x}, fake_cupy)
    x_ptr, x_stride, x_istride, y_ptr, y_stride, y_istride, n_rows, n_inner, n_cols = call.args
    assert x_ptr.tensor.data_ptr() == x.data_ptr()  # the caller's memory, not a copy
    assert (x_stride, x_istride, n_rows, n_inner, n_cols) == (60, 5, 6, 3, 5)
    assert (y_stride, y_istride) == (15, 5)


def test_launch_refuses_cpu_tensors(fake_cupy):
    kernel = CudaRowKernel(PROGRAMS["gelu"])
    jobs = []
    kernel.launch = jobs.append
    kernel({"x": torch.randn(2, 4)})
    with pytest.raises(HrmspecError, match="takes tensors on one CUDA device, got \\['cpu'\\]"):
        CudaRowKernel.launch(kernel, jobs[0])
    assert fake_cupy.launches == []


# -- a real GPU ---------------------------------------------------------------------------------------------
def _tiny_models(tiny_text):
    pytest.importorskip("cupy")
    spec = load_spec_text(tiny_text, overrides={"model.modules.L.layers": 1, "model.modules.H.layers": 1})
    torch.manual_seed(0)
    ref = hrmspec.compile(spec, backend="reference").to("cuda")
    cu = hrmspec.compile(spec, backend="cuda").to("cuda")
    cu.load_state_dict(ref.state_dict())
    return ref, cu


@pytest.mark.gpu
@pytest.mark.needs_gpu
def test_cuda_backend_runs_a_whole_model_like_the_reference(tiny_text):
    # both on the same device: the difference is the generated row kernels, not CPU against GPU matmuls
    ref, cu = _tiny_models(tiny_text)
    gen = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 61, (2, 7), generator=gen), torch.randint(0, 61, (2, 7), generator=gen)
    prefix = torch.zeros(2, 7, dtype=torch.bool)
    prefix[:, :3] = True
    ids, labels, prefix = ids.cuda(), labels.cuda(), prefix.cuda()
    out_r = ref(ids, prefix_mask=prefix, labels=labels)
    with fallback.record_fallbacks() as fell:
        out_c = cu(ids, prefix_mask=prefix, labels=labels)
        out_c.loss.backward()
    assert not fell, fell  # every row op runs as a generated kernel: nothing falls back
    out_r.loss.backward()
    torch.testing.assert_close(out_c.logits, out_r.logits, rtol=1e-4, atol=1e-5)
    compared = compare_grads(ref, cu, rtol=1e-4, atol=lambda g: 1e-5 * float(g.abs().max()))
    assert compared == len(list(ref.parameters()))  # at full credit depth every parameter gets a gradient


@pytest.mark.fallback
@pytest.mark.gpu
@pytest.mark.needs_gpu
def test_cuda_fallback_on_the_device_is_reported(fresh_fallback_warnings):
    pytest.importorskip("cupy")
    ops = get_backend("cuda")
    x = torch.randn(3, 8, dtype=torch.float64, device="cuda")
    with pytest.warns(UserWarning, match="cuda backend: rms_norm: torch.float64"):
        y = ops.rms_norm(x, 1e-6)
    torch.testing.assert_close(y, reference.rms_norm(x, 1e-6))
