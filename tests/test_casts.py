"""Half-precision conversions, bit for bit, in every printer that can run here.

What random draws never reach: fp32 values exactly halfway between two bf16 (fp16) values, with an even
and an odd lower neighbour, of both signs, one fp32 ulp below and above each tie, the largest finite
values and what must round to +-inf (fp16: 65520 and above; bf16: above its largest finite value), the
subnormals of both formats, and NaN. The oracle is torch's conversion (`.to(torch.bfloat16)`,
`.to(torch.float16)`), which rounds to nearest, ties to even; a NaN may come back as any NaN.

Three paths per printer:

    the rounding cast   y = cast(x, bf16 | f16), computed and stored in fp32
    the store           an fp32 value written to a bf16 / fp16 output tensor
    the load            every one of the 65536 bit patterns of a bf16 / fp16 input, read as fp32

Printers: Triton (in its interpreter without a GPU), the C-style printer's host dialect (the system C
compiler), its OpenCL dialect where an OpenCL platform can build kernels, and the CUDA dialect, which
cannot run here: its bf16 helpers are the host dialect's text (checked below), so running host C runs
them; its fp16 conversions are single PTX instructions (cvt.rn), rounding in hardware. Also the
reference evaluator and the builder's constant folding, which are the same cast.
"""

from __future__ import annotations

import re

import pytest
import torch

from hrmspec.ir import ProgramBuilder, evaluate
from hrmspec.ir.opset import round_to

# the interpreter computes with numpy, which warns at the overflows and NaNs these tests make on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
HALF = {"bf16": torch.bfloat16, "f16": torch.float16}
WIDTH = 4096  # values per row: a full block for Triton, 128 threads per row for the C-style kernels


def _f32(bits: torch.Tensor) -> torch.Tensor:
    """fp32 values of 32-bit patterns given as int64 in [0, 2^32)."""
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).view(torch.float32)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a tensor, as int64 (unsigned)."""
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype]
    b = t.contiguous().view(view).long()
    return torch.where(b < 0, b + (1 << (8 * t.element_size())), b)


SPECIAL = _f32(torch.tensor([
    0x00000000, 0x80000000,  # +-0
    0x00000001, 0x80000001, 0x007FFFFF, 0x00800000,  # fp32 subnormals, the smallest normal
    0x7F7FFFFF, 0xFF7FFFFF,  # fp32's largest finite: rounds to +-inf in bf16 and fp16
    0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001,  # below, at and above the tie past bf16's largest finite
    0x7F800000, 0xFF800000,  # +-inf
    0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0x7FFFFFFF,  # quiet, negative, signalling NaNs, payloads
]))


def bf16_ties() -> torch.Tensor:
    """For every finite bf16 b of either sign: b itself, the tie b + ulp/2 (the low 16 bits 0x8000; the
    lower neighbour b is even or odd as b's last bit), one fp32 ulp below and above it, and the last fp32
    below the next bf16. The bf16 subnormals are the fp32 patterns 0x0001xxxx-0x007Fxxxx, included."""
    high = torch.arange(0, 0x7F80, dtype=torch.int64) << 16
    low = torch.tensor([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF])
    bits = (high[:, None] | low).flatten()
    return torch.cat([_f32(bits), _f32(bits | 0x80000000), SPECIAL])


def f16_ties() -> torch.Tensor:
    """For every finite fp16 h of either sign, subnormals included: the fp32 value halfway to the next
    fp16 (exact in fp32: fp16 has 11 significant bits, fp32 24) and one fp32 ulp on each side of it; for
    the largest finite fp16, 65504, the tie is 65520, where rounding goes to inf. Then values past it."""
    h = torch.arange(0, 0x7C00, dtype=torch.int64)  # 0 .. 65504
    lo = h.to(torch.int16).view(torch.float16).double()
    mid = (lo + (h + 1).to(torch.int16).view(torch.float16).double()) / 2
    mid[-1] = 65504.0 + 32.0 / 2  # past the largest finite: half of its binade's ulp, 32
    mid = mid.float()
    near = torch.cat([mid, torch.nextafter(mid, torch.tensor(-1.0)), torch.nextafter(mid, torch.tensor(1e38)),
                      lo.float()])
    past = torch.tensor([65519.0, 65520.0, 65535.0, 65536.0, 1e5, 3e38, 2.0**-24, 2.0**-25, 2.0**-26, 3 * 2.0**-25,
                         2.0**-14 - 2.0**-25, 2.0**-14 - 2.0**-26])
    return torch.cat([near, -near, past, -past, SPECIAL])


def random_bits(n: int = 1 << 18, seed: int = 0) -> torch.Tensor:
    """n fp32 values of uniformly random bit patterns: every exponent, NaN and inf among them."""
    g = torch.Generator().manual_seed(seed)
    return _f32(torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64))


def all_patterns(dtype: torch.dtype) -> torch.Tensor:
    """All 65536 values of a 16-bit type."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int64).to(torch.int16).view(dtype)


def _rows(values: torch.Tensor) -> torch.Tensor:
    """values as rows of WIDTH (the tail padded with zeros)."""
    n = -(-values.numel() // WIDTH) * WIDTH
    out = torch.zeros(n, dtype=values.dtype)
    out[: values.numel()] = values
    return out.reshape(-1, WIDTH)


def subnormal(t: torch.Tensor) -> torch.Tensor:
    """Where t (fp32, fp16 or bf16) holds a subnormal: exponent bits 0, a nonzero significand."""
    mantissa = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[t.dtype]
    magnitude = _bits(t) & ((1 << (8 * t.element_size() - 1)) - 1)
    return ((magnitude >> mantissa) == 0) & (magnitude != 0)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, source: torch.Tensor, what: str,
                     skip: torch.Tensor | None = None) -> None:
    """got and want bit for bit, any NaN for a NaN, except where `skip`; the first differences named
    with their input."""
    got, want, source = got.cpu().flatten(), want.flatten(), source.flatten()
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    both_nan = torch.isnan(got.float()) & torch.isnan(want.float())
    bad = (_bits(got) != _bits(want)) & ~both_nan
    if skip is not None:
        bad &= ~skip.flatten()
    if bad.any():
        idx = bad.nonzero()[:5, 0].tolist()
        width = 2 * got.element_size()  # hex digits
        shown = "; ".join(f"input 0x{int(_bits(source[i:i + 1])):08x} ({float(source[i]):.9g}): got "
                          f"0x{int(_bits(got[i:i + 1])):0{width}x}, want 0x{int(_bits(want[i:i + 1])):0{width}x}"
                          for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())} of {got.numel()} values differ; {shown}")


# -- the kernels: Triton, host C, OpenCL (skipped, with the reason, where it cannot run: tests/conftest.py) --------
LAUNCHERS = [pytest.param("triton", id="triton"), pytest.param("c", id="c", marks=pytest.mark.needs_cc),
             pytest.param("opencl", id="opencl", marks=pytest.mark.needs_opencl)]


def _launcher(name: str):
    """The kernel class of a printer's launcher (a RowProgram in, a callable over rows out)."""
    if name == "triton":
        pytest.importorskip("triton")
        from hrmspec.backends.triton import RowKernel

        return RowKernel
    if name == "c":
        from hrmspec.backends.cstyle.host import HostRowKernel

        return HostRowKernel
    from hrmspec.backends.cstyle.opencl import OpenCLRowKernel

    return OpenCLRowKernel


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HRMSPEC_CACHE", str(tmp_path_factory.mktemp("kernels")))
        yield


def _device(launcher: str, kernel_device) -> torch.device:
    return kernel_device if launcher == "triton" else torch.device("cpu")


def _interpreted(launcher: str, device: torch.device) -> bool:
    return launcher == "triton" and device.type == "cpu"


def _interpreter_skips(launcher: str, device, dtype: str, source: torch.Tensor) -> torch.Tensor | None:
    """What Triton's interpreter cannot convert to or from bf16 as a GPU does. It converts bit field by bit
    field (triton/runtime/interpreter.py, _convert_float): subnormals are mangled either way, and a store
    drops the low 16 bits, so a NaN whose payload is only there becomes an infinity. Only the tensor
    conversions at a load or store are affected; the IR's rounding cast is integer arithmetic (_round_bf16)
    and is held to torch's rounding everywhere."""
    if dtype == "bf16" and _interpreted(launcher, device):
        low_payload_nan = source.float().isnan() & ((_bits(source.float()) & 0x7FFF0000) == 0x7F800000)
        return subnormal(source) | low_payload_nan
    return None


_kernels: dict = {}


def _run(launcher: str, program, x: torch.Tensor, out_dtype: torch.dtype, device) -> torch.Tensor:
    key = (launcher, program.hash)
    if key not in _kernels:
        _kernels[key] = _launcher(launcher)(program)
    return _kernels[key]({"x": x.to(device)}, out_dtypes={"y": out_dtype})["y"].cpu()


def _cast_program(dtype: str):
    b = ProgramBuilder(f"round_{dtype}")
    b.output("y", b.row("x").cast(dtype))
    return b.build()


def _copy_program():
    b = ProgramBuilder("copy")
    b.output("y", b.row("x"))
    return b.build()


def _inputs(dtype: str) -> torch.Tensor:
    return torch.cat([bf16_ties() if dtype == "bf16" else f16_ties(), random_bits(seed=len(dtype))])


# the printers' rounding: one fp32 value rounded (to nearest even) to the half type, kept in fp32
@pytest.mark.gpu
@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("dtype", sorted(HALF))
def test_rounding_cast_is_torchs_bit_for_bit(launcher, dtype, kernel_device):
    x = _rows(_inputs(dtype))
    got = _run(launcher, _cast_program(dtype), x, torch.float32, _device(launcher, kernel_device))
    assert_same_bits(got, x.to(HALF[dtype]).float(), x, f"{launcher} cast(x, {dtype})")


@pytest.mark.gpu
@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("dtype", sorted(HALF))
def test_store_to_half_storage_is_torchs_bit_for_bit(launcher, dtype, kernel_device):
    x = _rows(_inputs(dtype))
    device = _device(launcher, kernel_device)
    got = _run(launcher, _copy_program(), x, HALF[dtype], device)
    want = x.to(HALF[dtype])
    skip = _interpreter_skips(launcher, device, dtype, x)
    if dtype == "bf16" and _interpreted(launcher, device):
        # Triton's interpreter converts fp32 -> bf16 by dropping the low 16 bits (docs/kernels.md: its bf16
        # stores may be one bf16 ulp toward zero from a GPU's); what it stores must be exactly that
        want = _f32(_bits(x) & 0xFFFF0000).to(torch.bfloat16)
    assert_same_bits(got, want, x, f"{launcher} store of fp32 into {dtype}", skip)
    # a value rounded by the cast first is a half value: the store is exact on every device
    got = _run(launcher, _cast_program(dtype), x, HALF[dtype], device)
    rounded = x.to(HALF[dtype])
    if skip is not None:  # what the interpreter cannot convert: the input's subnormals, the rounded ones
        # (not the input's NaNs: the cast gives a NaN its quiet bit, which a truncating store keeps)
        skip = subnormal(x) | _interpreter_skips(launcher, device, dtype, rounded)
    assert_same_bits(got, rounded, x, f"{launcher} store of cast(x, {dtype}) into {dtype}", skip)


@pytest.mark.gpu
@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("dtype", sorted(HALF))
def test_every_half_bit_pattern_loads_and_round_trips(launcher, dtype, kernel_device):
    x = _rows(all_patterns(HALF[dtype]))
    device = _device(launcher, kernel_device)
    skip = _interpreter_skips(launcher, device, dtype, x)
    got = _run(launcher, _copy_program(), x, torch.float32, device)
    assert_same_bits(got, x.float(), x.float(), f"{launcher} load of {dtype}", skip)
    # loaded, rounded by the cast and stored again: every half value is its own rounding
    got = _run(launcher, _cast_program(dtype), x, HALF[dtype], device)
    assert_same_bits(got, x, x.float(), f"{launcher} {dtype} -> cast -> {dtype}", skip)


# -- the CUDA and OpenCL dialects' bf16 helpers are the host dialect's text ----------------------------------
def test_cuda_and_opencl_bf16_helpers_are_the_host_text_that_runs_here():
    from hrmspec.backends.cstyle.dialects import CUDA, HOST, OPENCL

    # each dialect's spelling of the same things: qualifiers, 16- and 32-bit unsigned types, bit casts
    spelling = {
        "cuda": ("static __device__ __forceinline__", "unsigned short", "unsigned int", "__uint_as_float",
                 "__float_as_uint"),
        "opencl": ("static inline", "ushort", "uint", "as_float", "as_uint"),
        "c": ("static inline", "unsigned short", "unsigned int", "hrm_as_float", "hrm_as_uint"),
    }

    def neutral(text: str, dialect: str) -> str:
        prefix, u16, u32, as_float, as_uint = spelling[dialect]
        text = text.replace(prefix, "PREFIX")
        for word, name in ((as_float, "AS_FLOAT"), (as_uint, "AS_UINT"), (u16, "U16"), (u32, "U32")):
            text = re.sub(rf"\b{re.escape(word)}\b", name, text)
        return text

    names = ("hrm_bf16_to_f32", "hrm_f32_to_bf16", "hrm_round_bf16")
    for d in (CUDA, OPENCL):
        for name in names:
            assert neutral(d.helpers[name], d.name) == neutral(HOST.helpers[name], HOST.name), (d.name, name)
        # and the kernels use them for bf16 storage as host C does
        assert d.load["bf16"] == HOST.load["bf16"] and d.store["bf16"] == HOST.store["bf16"]


# -- the reference evaluator and constant folding: the same cast --------------------------------------------
@pytest.mark.parametrize("dtype", sorted(HALF))
def test_the_evaluator_rounds_as_torch_and_keeps_infinities(dtype):
    x = _rows(_inputs(dtype))
    got = evaluate(_cast_program(dtype), {"x": x})["y"]
    assert_same_bits(got, x.to(HALF[dtype]).float(), x, f"evaluate cast(x, {dtype})")
    # the gradient passes straight through, at +-inf and at the values that round to inf too
    leaf = torch.tensor([[float("inf"), -float("inf"), 65520.0, 3e38, 1.0]], requires_grad=True)
    y = evaluate(_cast_program(dtype), {"x": leaf})["y"]
    g = torch.tensor([[2.0, 3.0, 4.0, 5.0, 6.0]])
    (d,) = torch.autograd.grad(y, leaf, g)
    assert torch.equal(d, g)


@pytest.mark.parametrize("dtype", sorted(HALF))
def test_constant_folding_rounds_as_torch(dtype):
    # a cast of a constant is folded on the host (hrmspec.ir.opset.round_to): a strided sample of the ties
    values = torch.cat([bf16_ties() if dtype == "bf16" else f16_ties(), random_bits(4096, seed=7)])
    values = values[:: max(1, values.numel() // 6000)]
    want = values.to(HALF[dtype]).float()
    got = torch.tensor([round_to(float(v), dtype) for v in values], dtype=torch.float32)
    assert_same_bits(got, want, values, f"round_to({dtype})")
    # and the builder folds a cast of a constant to that value: one that rounds, to neither 0 nor +-1
    i = next(i for i in range(len(values)) if values[i] != want[i] and want[i].isfinite() and abs(want[i]) > 1)
    b = ProgramBuilder("folded")
    x = b.row("x")
    b.output("y", x * b.const(float(values[i])).cast(dtype))
    folded = [n for n in b.build().nodes if n.op == "const"]
    assert [float(n.arg) for n in folded] == [float(want[i])]
