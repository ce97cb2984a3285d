"""Triton kernels printed from RowPrograms, run in the interpreter against the reference evaluator.

TRITON_INTERPRET=1 must be set before triton is imported: triton's own jit functions (tl.sum,
tl.sigmoid, ...) are built for the interpreter at import time.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import hashlib  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

triton = pytest.importorskip("triton")

from hrmspec.backends.common.source_cache import checksum_prefix  # noqa: E402
from hrmspec.backends.triton import MAX_WIDTH, RowKernel, TritonRowOp, cache  # noqa: E402
from hrmspec.backends.triton.aot import compile_many, interpreting  # noqa: E402
from hrmspec.backends.triton.printer import render_module  # noqa: E402
from hrmspec.errors import KernelError  # noqa: E402
from hrmspec.ir import ProgramBuilder, builtin_programs, evaluate, grad, mean, rms_norm  # noqa: E402
from hrmspec.ir.kernel import kernel_name  # noqa: E402
from hrmspec.ir.strategies import SMOOTH_OPS, random_inputs, row_programs  # noqa: E402

if not interpreting():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

WIDTHS = (1, 3, 127, 1000)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
PROGRAMS = builtin_programs()


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("kernels")
        mp.setenv("HRMSPEC_CACHE", str(path))
        yield path


_ops: dict[str, TritonRowOp] = {}


def _op(program) -> TritonRowOp:
    if program.hash not in _ops:
        _ops[program.hash] = TritonRowOp(program)
    return _ops[program.hash]


def _close(got, ref, dtype, what):
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, ref.shape, got.dtype, ref.dtype)
    tol = TOL[dtype]
    scale = max(1.0, float(ref.detach().float().abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _check_program(program, rows, width, dtype, seed, scale=1.0):
    """Forward outputs and every input gradient of the Triton op against the evaluator + autograd."""
    inputs = random_inputs(program, rows, width, scale, seed, torch.float32)
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    leaves_t = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    leaves_r = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out_t = _op(program)(**leaves_t)
    out_r = evaluate(program, leaves_r)
    for k in out_r:
        _close(out_t[k], out_r[k], dtype, f"{program.name} {k} D={width}")
    gen = torch.Generator().manual_seed(seed + 7)
    cot = [torch.randn(out_r[k].shape, generator=gen).to(dtype) for k in out_r]
    names = [k for k in out_r if out_r[k].requires_grad]
    if not names:
        return
    cot = [c for k, c in zip(out_r, cot) if k in names]
    g_t = torch.autograd.grad([out_t[k] for k in names], list(leaves_t.values()), cot, allow_unused=True)
    g_r = torch.autograd.grad([out_r[k] for k in names], list(leaves_r.values()), cot, allow_unused=True)
    for name, a, b in zip(leaves_t, g_t, g_r):
        a = torch.zeros_like(inputs[name]) if a is None else a
        b = torch.zeros_like(inputs[name]) if b is None else b
        _close(a, b, dtype, f"{program.name} d_{name} D={width}")


# -- the printed source -------------------------------------------------------------------------------
def test_source_is_deterministic_masked_and_tl_only():
    for p in PROGRAMS.values():
        for prog, direction in ((p, "fwd"), (grad(p), "bwd")):
            name = kernel_name(prog, direction, p.name)
            assert re.fullmatch(rf"hrm_{p.name}_{direction}_[0-9a-f]{{8}}", name)
            src = render_module(prog, name)
            assert src == render_module(prog, name)
            assert "libdevice" not in src and "inline_asm" not in src and "extra" not in src
            for line in src.splitlines():
                if "tl.load(" in line or "tl.store(" in line:
                    assert "mask=" in line, line
            calls = set(re.findall(r"\b(tl(?:\.\w+)+)\(", src))
            assert calls <= {"tl.program_id", "tl.arange", "tl.load", "tl.store", "tl.sum", "tl.max", "tl.where",
                             "tl.exp", "tl.log", "tl.sqrt", "tl.rsqrt", "tl.sigmoid", "tl.maximum", "tl.zeros",
                             "tl.cast", "tl.exp2", "tl.log2", "tl.abs"}, calls
            compile(src, name, "exec")  # valid Python


GOLDEN_RMS_NORM_FWD = """\
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    outer, inner = (row // n_inner).to(tl.int64), (row % n_inner).to(tl.int64)
    width = tl.cast(n_cols, tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + outer * x_stride + inner * x_istride + cols, mask=mask, other=0.0).to(tl.float32)
    t2 = x * x
    t3 = tl.sum(tl.where(mask, t2, 0.0), axis=0) / width
    t5 = t3 + 1e-06
    t6 = tl.rsqrt(t5)
    t7 = x * t6
    t8 = w * t7
    tl.store(y_ptr + outer * y_stride + inner * y_istride + cols, t8.to(y_ptr.dtype.element_ty), mask=mask)
"""


def test_golden_rms_norm_forward_source():
    # a snapshot: an unintended change of the IR, its canonical order or the printer shows up here
    p = rms_norm()
    name = kernel_name(p, "fwd")
    assert name == "hrm_rms_norm_fwd_8bd3f7fb"
    src = render_module(p, name)
    head = ("def hrm_rms_norm_fwd_8bd3f7fb(\n    x_ptr, x_stride, x_istride, w_ptr,  # inputs\n"
            "    y_ptr, y_stride, y_istride,  # outputs\n    n_rows, n_inner, n_cols, BLOCK: tl.constexpr,\n")
    assert head in src
    assert src.endswith(GOLDEN_RMS_NORM_FWD), src


# -- numerics in the interpreter ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_builtin_forward_and_backward(name, dtype):
    for width in WIDTHS:
        _check_program(PROGRAMS[name], 3, width, dtype, seed=width)


@settings(max_examples=40, deadline=None)
@given(program=row_programs(max_ops=5, ops=SMOOTH_OPS), width=st.sampled_from(WIDTHS), rows=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_random_programs_forward_and_backward(program, width, rows, dtype, seed):
    _check_program(program, rows, width, dtype, seed)


def test_reductions_ignore_the_padding_lanes():
    # lanes past D are loaded as 0, and exp(0) = 1, sigmoid(0) = 1/2, 0 > any negative row: each
    # reduction must see only the D real lanes (BLOCK = 4, 128, 1024 here)
    b = ProgramBuilder("padding")
    x = b.row("x")
    b.output("s", x.exp().sum())
    b.output("m", x.sigmoid().mean())
    b.output("n", (x.relu() - 1.0).max())
    b.output("y", x * (x - 2.0).max())
    p = b.build()
    for width in (3, 127, 1000):
        _check_program(p, 2, width, torch.float32, seed=width)


def test_rounding_casts_match_the_evaluator():
    # values computed exactly in fp32 (an input, a product) round to the same half-type value
    b = ProgramBuilder("rounding")
    x, w = b.row("x"), b.vector("w")
    b.output("y", x.cast("bf16") + (x * w).cast("f16") * 3.0)
    p = b.build()
    for width in (3, 1000):
        _check_program(p, 3, width, torch.float32, seed=width, scale=10.0)


def test_scalar_inputs_and_outputs_and_leading_dims():
    b = ProgramBuilder("mixed")
    x, s, w = b.row("x"), b.scalar("s"), b.vector("w")
    m = mean(x * w) * s
    b.output("y", (x - m) * w + s)
    b.output("m", m)
    p = b.build()
    x, s, w = torch.randn(2, 3, 5), torch.randn(2, 3), torch.randn(5)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # rows that are not contiguous across the leading dims
    leaves = [t.clone().requires_grad_() for t in (x, s, w)]
    out = _op(p)(*leaves)
    ref = evaluate(p, {"x": x, "s": s, "w": w})
    assert out["m"].shape == (2, 3) and out["y"].shape == (2, 3, 5)
    for k in ref:
        _close(out[k], ref[k], torch.float32, k)
    (out["y"].sum() + out["m"].square().sum()).backward()  # expanded (stride 0) cotangents
    leaves_r = [t.clone().requires_grad_() for t in (x, s, w)]
    r = evaluate(p, dict(zip("xsw", leaves_r)))
    (r["y"].sum() + r["m"].square().sum()).backward()
    for a, c, n in zip(leaves, leaves_r, "xsw"):
        _close(a.grad, c.grad, torch.float32, f"d_{n}")


def test_rows_wider_than_the_limit_are_an_error():
    with pytest.raises(KernelError, match=f"limit of {MAX_WIDTH}"):
        _op(rms_norm(affine=False))(torch.zeros(1, MAX_WIDTH + 1))


def test_empty_batch():
    out = _op(rms_norm())(torch.zeros(0, 8), torch.ones(8))
    assert out["y"].shape == (0, 8)


# -- guard buffers: nothing outside the tensors is read or written --------------------------------------
IN_SENTINEL, OUT_SENTINEL = float("nan"), -1234.0


def _embed(shape, kind, dtype, fill, pad=3):
    """A view of `shape` inside a larger buffer filled with `fill`: padded rows and a storage offset."""
    if kind == "row":
        rows, width = shape
        buf = torch.full((rows + 2, width + pad), fill, dtype=dtype)
        return buf, buf[1:rows + 1, 1:width + 1]
    n = shape[0]
    buf = torch.full((n + 2 * pad,), fill, dtype=dtype)
    return buf, buf[pad:pad + n]


def _run_guarded(program, rows, width, dtype):
    inputs = random_inputs(program, rows, width, 1.0, seed=width, dtype=torch.float32)
    views, in_bufs = {}, {}
    for i in program.inputs:
        in_bufs[i.name], v = _embed(inputs[i.name].shape, i.kind, dtype, IN_SENTINEL)
        v.copy_(inputs[i.name].to(dtype))
        views[i.name] = v
    bufs, outs = {}, {}
    for o in program.outputs:
        odt = torch.float32 if o.row_partial else dtype
        bufs[o.name], outs[o.name] = _embed((rows, width) if o.kind == "row" else (rows,), o.kind, odt, OUT_SENTINEL)
    kernel = RowKernel(program, "fwd")
    kernel(views, out=outs)
    ref = evaluate(program, {k: v.clone() for k, v in views.items()})
    for o in program.outputs:
        buf, view = bufs[o.name], outs[o.name]
        inside = torch.zeros_like(buf, dtype=torch.bool)
        if o.kind == "row":
            inside[1:rows + 1, 1:width + 1] = True
        else:
            inside[3:3 + rows] = True
        assert (buf[~inside] == OUT_SENTINEL).all(), f"{program.name}: {o.name} wrote outside its tensor"
        _close(view.to(ref[o.name].dtype) if o.row_partial else view, ref[o.name], dtype, o.name)
    for i in program.inputs:  # inputs are never written, not even their padding
        assert views[i.name].isfinite().all() and int(in_bufs[i.name].isnan().sum()) == \
            in_bufs[i.name].numel() - views[i.name].numel(), f"{program.name}: input {i.name} was written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["rms_norm", "add_rms_norm", "mixed"])
def test_guard_buffers_forward_and_backward(name, dtype):
    if name == "mixed":
        b = ProgramBuilder("mixed_guard")
        x, s, w = b.row("x"), b.scalar("s"), b.vector("w")
        b.output("y", x * w + s)
        b.output("m", (x * w).max() * s)
        prog = b.build()
    else:
        prog = PROGRAMS[name]
    for width in (3, 127):
        _run_guarded(prog, 2, width, dtype)
        _run_guarded(grad(prog), 2, width, dtype)


def test_bad_output_buffer_is_an_error():
    kernel = RowKernel(rms_norm())
    x, w = torch.randn(4, 6), torch.randn(6)
    with pytest.raises(KernelError, match="unit stride"):
        kernel({"x": x, "w": w}, out={"y": torch.empty(6, 4).t()})


# -- the cache ------------------------------------------------------------------------------------------
def test_cache_files_are_content_addressed_and_repaired(kernel_cache):
    p = rms_norm(eps=1e-5, name="cache_probe")
    k1 = RowKernel(p)
    assert k1.path.parent == kernel_cache and k1.path.name.startswith(k1.name + "_")
    text = k1.path.read_text()
    assert text.rstrip().splitlines()[-1].startswith(checksum_prefix(".py")) and cache.is_valid(k1.path)
    assert text.rstrip().splitlines()[-1].startswith("# hrmspec-checksum: ")
    # the file name of earlier releases, so existing caches still match: sha256(source, version, target)
    key = hashlib.sha256("\0".join((k1.source, triton.__version__, "interpret")).encode()).hexdigest()[:16]
    assert k1.path.name == f"{k1.name}_{key}.py"
    mtime = k1.path.stat().st_mtime_ns
    assert cache.write_source(k1.name, k1.source) == k1.path and k1.path.stat().st_mtime_ns == mtime  # reused
    assert cache.write_source(k1.name, k1.source, target="cuda-80-32") != k1.path  # the target is in the key
    k1.path.write_text(text[: len(text) // 2])  # a half-written file
    assert not cache.is_valid(k1.path)
    time.sleep(0.01)
    assert cache.write_source(k1.name, k1.source) == k1.path and cache.is_valid(k1.path)
    assert k1.path.read_text() == text
    k1.path.write_text(text.replace("1e-05", "1e-04"))  # an edited file fails the checksum too
    assert not cache.is_valid(k1.path)
    # an edit that also rewrites the checksum line passes the file's own check, but not the comparison
    # with what was generated: the file is written again before anything imports it
    body = text.rstrip("\n").rpartition("\n")[0] + "\nraise SystemExit('injected')\n"
    k1.path.write_text(body + checksum_prefix(".py") + hashlib.sha256(body.encode()).hexdigest() + "\n")
    assert cache.is_valid(k1.path)
    assert RowKernel(rms_norm(eps=1e-5, name="cache_probe")).path == k1.path and k1.path.read_text() == text


# -- compile-only: the real compiler, sm_80 and sm_90, no GPU --------------------------------------------
def _nvidia_tools() -> bool:
    try:
        from triton import knobs

        return os.path.exists(knobs.nvidia.ptxas.path)
    except Exception:
        return False


needs_ptxas = pytest.mark.skipif(not _nvidia_tools(), reason="the triton wheel's NVIDIA backend is not available")


def _compile_jobs(programs, width, archs=(80, 90)):
    jobs = []
    for p in programs:
        for arch in archs:
            jobs.append({"program": p, "arch": arch, "width": width})
            jobs.append({"program": grad(p), "arch": arch, "width": width, "direction": "bwd", "base": p.name})
    return jobs


def _assert_no_spills(infos):
    for info in infos:
        assert 0 < info.registers <= 255 and info.spill_stores == 0 and info.spill_loads == 0, str(info)


@needs_ptxas
def test_builtins_compile_for_sm80_and_sm90_without_spills():
    # d_model 1536 and ffn 4096 of HRM-Text 1B fit in BLOCK = 4096
    infos = compile_many(_compile_jobs(PROGRAMS.values(), 4096))
    assert {i.arch for i in infos} == {80, 90} and len(infos) == 4 * len(PROGRAMS)
    _assert_no_spills(infos)


@pytest.mark.slow
@needs_ptxas
def test_builtins_compile_without_spills_up_to_width_8192():
    _assert_no_spills(compile_many(_compile_jobs(PROGRAMS.values(), 8192)))


@pytest.mark.slow
@needs_ptxas
@settings(max_examples=5, deadline=None)
@given(program=row_programs(max_ops=6), width=st.sampled_from((1, 127, 1000, 4096)))
def test_random_programs_compile_for_sm80_and_sm90(program, width):
    _assert_no_spills(compile_many(_compile_jobs([program], width)))
