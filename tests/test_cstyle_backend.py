"""C-style kernels (one printer; CUDA C, OpenCL C and host C dialects) against the reference evaluator.

Tiers on a machine without a GPU: the kernels execute for real on the CPU twice — the host-C
dialect compiled by the system C compiler (any CPU) and the OpenCL dialect on PoCL's CPU device
(where its LLVM knows the CPU) — for numerics and guard buffers; the CUDA dialect compiles with
NVRTC for sm_80 and sm_90 (registers, spills), and golden files pin the generated source. CuPy
numerics are marked `gpu`.

Golden files live in tests/golden/; after an intended change of the printer, regenerate them
with HRMSPEC_UPDATE_GOLDEN=1 and review the diff.
"""

import hashlib
import re
import time

import pytest
import torch
from golden_file import check_golden
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import EDGES, check_row_op, close, widths

from hrmspec.backends.common import source_cache
from hrmspec.backends.cstyle import CUDA, HOST, OPENCL, block_size, kernel_name, render_kernel, render_source
from hrmspec.errors import KernelError
from hrmspec.ir import ProgramBuilder, builtin_programs, evaluate, grad, mean, rms_norm
from hrmspec.ir.strategies import SMOOTH_OPS, random_inputs, row_programs

WIDTHS = (1, 3, 127, 1000)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROGRAMS = builtin_programs()


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("kernels")
        mp.setenv("HRMSPEC_CACHE", str(path))
        yield path


# where the C-style kernels execute on the CPU: host C (any CPU with a C compiler), OpenCL (PoCL)
EXECUTORS = [pytest.param("c", marks=pytest.mark.needs_cc), pytest.param("opencl", marks=pytest.mark.needs_opencl)]
_ops: dict = {}


def _classes(executor):
    """(row op class, kernel class) of an executor."""
    if executor == "c":
        from hrmspec.backends.cstyle.host import HostRowKernel, HostRowOp

        return HostRowOp, HostRowKernel
    from hrmspec.backends.cstyle.opencl import OpenCLRowKernel, OpenCLRowOp

    return OpenCLRowOp, OpenCLRowKernel


def _op(program, executor):
    if (executor, program.hash) not in _ops:
        _ops[(executor, program.hash)] = _classes(executor)[0](program)
    return _ops[(executor, program.hash)]


def _check_program(op, program, rows, width, dtype, seed, scale=1.0, edge="none"):
    check_row_op(op, program, rows, width, dtype, seed, "cpu", scale, edge)


def _dtypes(program, dtype="f32"):
    d = {n: dtype for n in (*program.input_names, *program.output_names)}
    return d | {o.name: "f32" for o in program.outputs if o.row_partial}


# -- the printed source -------------------------------------------------------------------------------
def _accesses_are_bounded(kernel: str) -> None:
    """Every buffer access sits in a column loop (`col < cols`), in the `tid == 0 && in_row` store
    block, or behind `in_row ?`; nothing leaves the kernel early."""
    assert "return" not in kernel
    body = kernel.split(") {\n", 1)[1]
    enclosing: list[tuple[int, str]] = []  # the blocks around a line: (indent, opening line)
    for line in body.splitlines():
        indent, text = len(line) - len(line.lstrip()), line.strip()
        while enclosing and enclosing[-1][0] >= indent:
            enclosing.pop()
        if text.endswith("{") or re.search(r"\{\s+//", text):
            enclosing.append((indent, text))
        if re.search(r"_ptr\[|vload_half\(|vstore_half_rte\(", line) and not text.startswith("//"):
            inside = any(o.startswith("for (int col = tid; col < cols;") or o == "if (tid == 0 && in_row) {"
                         for _, o in enclosing)
            assert inside or "in_row ? " in line, line


@pytest.mark.parametrize("dialect", [CUDA, OPENCL, HOST], ids=["cuda", "opencl", "c"])
def test_source_is_deterministic_and_every_access_bounded(dialect):
    for p in PROGRAMS.values():
        for prog, direction in ((p, "fwd"), (grad(p), "bwd")):
            name = kernel_name(prog, direction, p.name)
            assert re.fullmatch(rf"hrm_{p.name}_{direction}_[0-9a-f]{{8}}", name)
            for dtype in ("f32", "f16", "bf16"):
                src = render_source(prog, name, dialect, _dtypes(prog, dtype), 64)
                assert src == render_source(prog, name, dialect, _dtypes(prog, dtype), 64)
                _accesses_are_bounded(render_kernel(prog, name, dialect, _dtypes(prog, dtype), 64))


def test_dialects_differ_only_by_their_tables():
    # the same statements in the same order: only qualifiers, builtins and types differ
    for p in PROGRAMS.values():
        for prog in (p, grad(p)):
            name = kernel_name(prog, "fwd")
            cu = render_kernel(prog, name, CUDA, _dtypes(prog, "bf16"), 128).split(") {\n", 1)[1]
            cl = render_kernel(prog, name, OPENCL, _dtypes(prog, "bf16"), 128).split(") {\n", 1)[1]
            assert len(cu.splitlines()) == len(cl.splitlines())
            assert re.findall(r"\b[ta]\d+\b", cu) == re.findall(r"\b[ta]\d+\b", cl)
            if "red[" in cu:
                assert cu.count("__syncthreads();") == cl.count("barrier(CLK_LOCAL_MEM_FENCE);") > 0
            for token in ("__global", "__local", "barrier(", "get_group_id", "vload_half"):
                assert token not in cu
            for token in ("__shared__", "__syncthreads", "blockIdx", "threadIdx", "__restrict__"):
                assert token not in cl


def test_bad_block_size_and_missing_storage_type_are_errors():
    with pytest.raises(KernelError, match="power of two"):
        render_kernel(rms_norm(), "k", CUDA, _dtypes(rms_norm()), 48)
    with pytest.raises(KernelError, match="no storage type .* for w"):
        render_kernel(rms_norm(), "k", OPENCL, {"x": "f32", "y": "f32"}, 32)


@pytest.mark.parametrize("dialect,dtype,direction", [(CUDA, "bf16", "fwd"), (OPENCL, "f16", "bwd")],
                         ids=["cuda-bf16-fwd", "opencl-f16-bwd"])
def test_golden_rms_norm_source(dialect, dtype, direction):
    # a snapshot: an unintended change of the IR, its canonical order, the printer or a dialect table shows here
    p = rms_norm()
    prog = p if direction == "fwd" else grad(p)
    name = kernel_name(prog, direction, p.name)
    src = render_source(prog, name, dialect, _dtypes(prog, dtype), block_size(4096))
    check_golden(f"cstyle_rms_norm_{direction}_{dtype}{dialect.suffix}", src)


# -- numerics, executed on the CPU: host C and PoCL -------------------------------------------------------
@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_builtin_forward_and_backward_on_the_cpu(name, dtype, executor):
    for width in WIDTHS:
        _check_program(_op(PROGRAMS[name], executor), PROGRAMS[name], 3, width, dtype, seed=width)


@pytest.mark.parametrize("executor", EXECUTORS)
@given(name=st.sampled_from(sorted(PROGRAMS)), width=widths(), rows=st.integers(0, 4),
       dtype=st.sampled_from(list(DTYPES.values())), scale=st.sampled_from((1e-3, 0.1, 1.0, 4.0, 1e3)),
       edge=st.sampled_from(EDGES), seed=st.integers(0, 2**16))
def test_builtins_at_drawn_scales_and_row_counts(name, width, rows, dtype, scale, edge, seed, executor):
    # tiny inputs put eps in charge of the norms; large ones saturate the gates; widths beside the
    # thread counts (32 per 1024 columns up to 256); zero rows, huge values, inf and NaN
    _check_program(_op(PROGRAMS[name], executor), PROGRAMS[name], rows, width, dtype, seed, scale, edge)


@pytest.mark.parametrize("executor", EXECUTORS)
@given(program=row_programs(max_ops=5, ops=SMOOTH_OPS), width=widths(), rows=st.integers(0, 3),
       dtype=st.sampled_from(list(DTYPES.values())), edge=st.sampled_from(EDGES), seed=st.integers(0, 2**16))
def test_random_programs_forward_and_backward_on_the_cpu(program, width, rows, dtype, edge, seed, executor):
    _check_program(_op(program, executor), program, rows, width, dtype, seed, edge=edge)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_max_and_relu_keep_nan_and_gelu_saturates(executor):
    # fmax drops a NaN operand, torch keeps it; OpenCL's tanh may miss 1 by an ulp where gelu's backward
    # multiplies 1 - tanh^2 by ~a^3 (the gradient was ~24x at a = 1541)
    b = ProgramBuilder("nan_max")
    x = b.row("x")
    b.output("m", x.max())
    b.output("y", x.relu() * (x - 1.0).max())
    p = b.build()
    _check_program(_op(p, executor), p, 3, 129, torch.float32, seed=5, edge="nan")
    for name in ("gelu", "geglu"):
        _check_program(_op(PROGRAMS[name], executor), PROGRAMS[name], 4, 33, torch.float32, seed=0, scale=1000.0)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_autograd_keeps_only_what_the_backward_reads(executor):
    """add + norm keeps the stored sum h (and the weight), not the two terms it was summed from."""
    program = builtin_programs()["add_rms_norm"]
    x, r = (torch.randn(3, 8, requires_grad=True) for _ in range(2))
    w = torch.randn(8, requires_grad=True)
    out = _op(program, executor)(x=x, r=r, w=w)
    saved = out["y"].grad_fn.saved_tensors
    assert [t.data_ptr() for t in saved] == [w.data_ptr(), out["h"].data_ptr()]
    ref = evaluate(program, {"x": x, "r": r, "w": w})
    (out["y"].sum() + 2 * out["h"].sum()).backward()
    g_kernel = [t.grad.clone() for t in (x, r, w)]
    for t in (x, r, w):
        t.grad = None
    (ref["y"].sum() + 2 * ref["h"].sum()).backward()
    for a, b in zip(g_kernel, (x.grad, r.grad, w.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_wider_rows_use_more_threads(executor):
    # D > 1024 gives 128 and 256 threads per row: longer trees, partials from every thread
    p = rms_norm()
    for width in (2500, 9000):
        assert block_size(width) in (128, 256)
        _check_program(_op(p, executor), p, 2, width, torch.float32, seed=width)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_reductions_see_only_the_row(executor):
    # threads past D hold the identity, not data: exp(0) = 1 and 0 > any negative row would show up
    b = ProgramBuilder("padding")
    x = b.row("x")
    b.output("s", x.exp().sum())
    b.output("m", x.sigmoid().mean())
    b.output("n", (x.relu() - 1.0).max())
    b.output("y", x * (x - 2.0).max())
    p = b.build()
    for width in (1, 3, 127, 1000):
        _check_program(_op(p, executor), p, 2, width, torch.float32, seed=width)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_rounding_casts_match_the_evaluator(executor):
    b = ProgramBuilder("rounding")
    x, w = b.row("x"), b.vector("w")
    b.output("y", x.cast("bf16") + (x * w).cast("f16") * 3.0)
    p = b.build()
    for width in (3, 1000):
        _check_program(_op(p, executor), p, 3, width, torch.float32, seed=width, scale=10.0)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_scalar_inputs_and_outputs_and_leading_dims(executor):
    b = ProgramBuilder("mixed")
    x, s, w = b.row("x"), b.scalar("s"), b.vector("w")
    m = mean(x * w) * s
    b.output("y", (x - m) * w + s)
    b.output("m", m)
    p = b.build()
    x, s, w = torch.randn(2, 3, 5), torch.randn(2, 3), torch.randn(5)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # rows that are not contiguous across the leading dims
    leaves = [t.clone().requires_grad_() for t in (x, s, w)]
    out = _op(p, executor)(*leaves)
    ref = evaluate(p, {"x": x, "s": s, "w": w})
    assert out["m"].shape == (2, 3) and out["y"].shape == (2, 3, 5)
    for k in ref:
        close(out[k], ref[k], torch.float32, k)
    (out["y"].sum() + out["m"].square().sum()).backward()  # expanded (stride 0) cotangents
    leaves_r = [t.clone().requires_grad_() for t in (x, s, w)]
    r = evaluate(p, dict(zip("xsw", leaves_r)))
    (r["y"].sum() + r["m"].square().sum()).backward()
    for a, c, n in zip(leaves, leaves_r, "xsw"):
        close(a.grad, c.grad, torch.float32, f"d_{n}")


@pytest.mark.parametrize("executor", EXECUTORS)
def test_input_names_that_are_c_words_or_kernel_names(executor):
    b = ProgramBuilder("names")
    h, t1, e, w = b.row("half"), b.row("t1"), b.scalar("exp"), b.vector("red")
    b.output("row", (h * t1 + e) * w)
    b.output("tid", (h * w).sum())
    p = b.build()
    for dialect in (CUDA, OPENCL, HOST):
        assert "const float half_v = " in render_kernel(p, "k", dialect, _dtypes(p), 32)
    _check_program(_op(p, executor), p, 2, 5, torch.float32, seed=0)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_bad_inputs_and_outputs_are_errors(executor):
    kernel = _classes(executor)[1](rms_norm())
    x, w = torch.randn(4, 6), torch.randn(6)
    with pytest.raises(KernelError, match="unit stride"):
        kernel({"x": x, "w": w}, out={"y": torch.empty(6, 4).t()})
    with pytest.raises(KernelError, match="fp32, fp16 or bf16"):
        kernel({"x": x.double(), "w": w.double()})
    with pytest.raises(KernelError, match="overlaps input 'x'"):
        kernel({"x": x, "w": w}, out={"y": x})
    assert kernel({"x": torch.zeros(0, 6), "w": w})["y"].shape == (0, 6)


@pytest.mark.needs_opencl
def test_missing_platform_is_a_clear_error(monkeypatch):
    from hrmspec.backends.cstyle.opencl import find_device

    monkeypatch.setenv("HRMSPEC_OPENCL_PLATFORM", "No Such Platform")
    with pytest.raises(KernelError, match="No Such Platform.*found: .*Portable Computing Language"):
        find_device()


def test_a_platform_without_devices_is_passed_over(monkeypatch):
    # an installed driver whose hardware is absent answers clGetDeviceIDs with DEVICE_NOT_FOUND, an error:
    # the platform counts as one without devices, and the one asked for is still found
    from types import SimpleNamespace

    from hrmspec.backends.cstyle import opencl

    class Error(Exception):
        pass

    class Platform:
        def __init__(self, name, devices):
            self.name, self.devices = name, devices

        def get_devices(self):
            if self.devices is None:
                raise Error("clGetDeviceIDs failed: DEVICE_NOT_FOUND")
            return self.devices

    cpu = SimpleNamespace(type="cpu")
    fake = SimpleNamespace(Error=Error, device_type=SimpleNamespace(CPU="cpu"),
                           get_platforms=lambda: [Platform("NVIDIA CUDA", None), Platform(opencl.PLATFORM, [cpu])])
    monkeypatch.setattr(opencl, "_cl", lambda: fake)
    monkeypatch.delenv("HRMSPEC_OPENCL_PLATFORM", raising=False)
    assert opencl.find_device() is cpu
    with pytest.raises(KernelError, match=r"'NVIDIA'.*found: NVIDIA CUDA \(0 devices\), Portable Computing Language "
                                          r"\(1 device\)"):
        opencl.find_device("NVIDIA")


# -- guard buffers: nothing outside the tensors is read or written --------------------------------------
IN_SENTINEL, OUT_SENTINEL = float("nan"), -1536.0  # -1536 is exact in fp32, fp16 and bf16


def _embed(shape, kind, dtype, fill, pad=3):
    """A view of `shape` inside a larger buffer filled with `fill`: padded rows and a storage offset."""
    if kind == "row":
        rows, width = shape
        buf = torch.full((rows + 2, width + pad), fill, dtype=dtype)
        return buf, buf[1:rows + 1, 1:width + 1]
    n = shape[0]
    buf = torch.full((n + 2 * pad,), fill, dtype=dtype)
    return buf, buf[pad:pad + n]


def _run_guarded(program, rows, width, dtype, executor):
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
    _classes(executor)[1](program, "fwd")(views, out=outs)
    ref = evaluate(program, {k: v.clone() for k, v in views.items()})
    for o in program.outputs:
        buf, view = bufs[o.name], outs[o.name]
        inside = torch.zeros_like(buf, dtype=torch.bool)
        if o.kind == "row":
            inside[1:rows + 1, 1:width + 1] = True
        else:
            inside[3:3 + rows] = True
        assert (buf[~inside] == OUT_SENTINEL).all(), f"{program.name}: {o.name} wrote outside its tensor"
        close(view.to(ref[o.name].dtype) if o.row_partial else view, ref[o.name], dtype, o.name)
    for i in program.inputs:  # inputs are never written, not even their padding
        assert views[i.name].isfinite().all() and int(in_bufs[i.name].isnan().sum()) == \
            in_bufs[i.name].numel() - views[i.name].numel(), f"{program.name}: input {i.name} was written"


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("name", ["rms_norm", "add_rms_norm", "mixed"])
def test_guard_buffers_forward_and_backward(name, dtype, executor):
    if name == "mixed":
        b = ProgramBuilder("mixed_guard")
        x, s, w = b.row("x"), b.scalar("s"), b.vector("w")
        b.output("y", x * w + s)
        b.output("m", (x * w).max() * s)
        prog = b.build()
    else:
        prog = PROGRAMS[name]
    for width in (3, 127):
        _run_guarded(prog, 2, width, dtype, executor)
        _run_guarded(grad(prog), 2, width, dtype, executor)


# -- the cache ------------------------------------------------------------------------------------------
def test_cache_files_are_content_addressed_and_repaired(kernel_cache):
    p = rms_norm(eps=1e-5, name="cache_probe")
    name = kernel_name(p, "fwd")
    src = render_source(p, name, OPENCL, _dtypes(p), 32)
    path = source_cache.write_source(name, src, ".cl", ("opencl", "tag"))
    assert path.parent == kernel_cache and path.name.startswith(name + "_") and path.suffix == ".cl"
    # the file name of earlier releases, so existing caches still match: sha256(source, dialect, tag)
    key = hashlib.sha256("\0".join((src, "opencl", "tag")).encode()).hexdigest()[:16]
    assert path.name == f"{name}_{key}.cl"
    text = path.read_text()
    assert text.startswith(src) and text.rstrip().splitlines()[-1].startswith("// hrmspec-checksum: ")
    mtime = path.stat().st_mtime_ns
    assert source_cache.write_source(name, src, ".cl", ("opencl", "tag")) == path and path.stat().st_mtime_ns == mtime
    assert source_cache.write_source(name, src, ".cl", ("opencl", "other")) != path  # the toolchain is in the key
    path.write_text(text[: len(text) // 2])  # a half-written file
    assert not source_cache.is_valid(path)
    time.sleep(0.01)
    assert source_cache.write_source(name, src, ".cl", ("opencl", "tag")) == path and path.read_text() == text
    path.write_text(text.replace("1e-05f", "1e-04f"))  # an edited file fails the checksum too
    assert not source_cache.is_valid(path)


# -- compile-only: NVRTC for sm_80 and sm_90, no GPU ------------------------------------------------------
def _compile(programs, width, dtype="bf16", archs=(80, 90)):
    from hrmspec.backends.cstyle.nvrtc import compile_for

    infos = []
    for p in programs:
        for arch in archs:
            infos.append(compile_for(p, arch, width, dtype))
            infos.append(compile_for(grad(p), arch, width, dtype, direction="bwd", base=p.name))
    return infos


def _assert_no_spills(infos):
    for info in infos:
        assert 0 < info.registers <= 255 and info.spill_stores == info.spill_loads == info.stack == 0, str(info)


@pytest.mark.needs_nvrtc
def test_builtins_compile_for_sm80_and_sm90_without_spills():
    from hrmspec.backends.cstyle.nvrtc import cuobjdump_usage

    infos = _compile(PROGRAMS.values(), 4096)  # d_model 1536 and ffn 4096 of HRM-Text 1B
    assert {i.arch for i in infos} == {80, 90} and len(infos) == 4 * len(PROGRAMS)
    _assert_no_spills(infos)
    for info in infos[:4]:  # the cubin says what the log said
        usage = cuobjdump_usage(info.cubin)
        if usage is not None:
            assert usage[info.name]["REG"] == info.registers and usage[info.name]["LOCAL"] == 0


@pytest.mark.needs_nvrtc
def test_row_index_division_compiles_without_a_call_frame():
    # a division is a subroutine call: in this three-reduction backward (LayerNorm's: centre, variance,
    # then the mean of the gradient) ptxas spilled around it on sm_80 and sm_90. The printer divides
    # the row index unsigned and multiplies by 1 / D, taken by the reciprocal instruction
    b = ProgramBuilder("centred_norm")
    x = b.row("x")
    c = x - x.mean()
    b.output("y", c * ((c * c).mean() + 1e-5).rsqrt())
    _assert_no_spills(_compile([b.build()], 4096))  # forward and backward, 128 threads, bf16
    _assert_no_spills(_compile([b.build()], 8192, "f32"))  # 256 threads, fp32: 1 / D without a division


@pytest.mark.needs_nvrtc
def test_division_compiles_without_a_call_frame():
    # IEEE division's slow path is a subroutine call; on sm_90 it took a 16-byte stack frame (spills)
    # in this backward at 128 threads: the dialect divides within 2 ulp, as Triton does
    b = ProgramBuilder("divide")
    x, w = b.row("x"), b.vector("w")
    b.output("y", w.sigmoid() / (x.sigmoid() + 1.0))
    _assert_no_spills(_compile([b.build()], 4096))


@pytest.mark.needs_nvrtc
def test_half_type_conversions_compile():
    # fp16 goes through PTX cvt, bf16 and the rounding casts through integer helpers
    b = ProgramBuilder("rounding_cuda")
    x, w = b.row("x"), b.vector("w")
    b.output("y", x.cast("bf16") + (x * w).cast("f16") * 3.0)
    for dtype in ("f16", "f32"):
        _assert_no_spills(_compile([rms_norm(), b.build()], 4096, dtype, archs=(80,)))


@pytest.mark.slow
@pytest.mark.needs_nvrtc
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_builtins_compile_without_spills_with_256_threads(dtype):
    _assert_no_spills(_compile(PROGRAMS.values(), 8192, dtype))


@pytest.mark.slow
@pytest.mark.needs_nvrtc
@settings(max_examples=10, deadline=None)
@given(program=row_programs(max_ops=6), width=st.sampled_from((1, 1000, 4096, 8192)))
def test_random_programs_compile_for_sm80_and_sm90(program, width):
    _assert_no_spills(_compile([program], width))


# -- real GPU: CuPy ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.needs_gpu
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_builtin_forward_and_backward_on_cupy(name, dtype):
    pytest.importorskip("cupy")
    from hrmspec.backends.cstyle.cuda import CudaRowOp

    op = CudaRowOp(PROGRAMS[name])
    for width in (*WIDTHS, 4096):
        inputs = random_inputs(PROGRAMS[name], 3, width, 1.0, seed=width, dtype=torch.float32)
        leaves_k = {k: v.to("cuda", dtype).requires_grad_() for k, v in inputs.items()}
        leaves_r = {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}
        out_k, out_r = op(**leaves_k), evaluate(PROGRAMS[name], leaves_r)
        for k in out_r:
            close(out_k[k].cpu(), out_r[k], dtype, f"{name} {k} D={width}")
        sum(v.float().square().sum() for v in out_k.values()).backward()
        sum(v.float().square().sum() for v in out_r.values()).backward()
        for k in inputs:
            close(leaves_k[k].grad.cpu(), leaves_r[k].grad, dtype, f"{name} d_{k} D={width}")


@pytest.mark.gpu
@pytest.mark.needs_gpu
def test_cupy_writes_views_in_place_without_copies():
    pytest.importorskip("cupy")
    from hrmspec.backends.cstyle.cuda import CudaRowKernel

    p = rms_norm()
    x, w = torch.randn(4, 100, device="cuda", dtype=torch.bfloat16), torch.randn(100, device="cuda")
    buf = torch.full((6, 103), OUT_SENTINEL, device="cuda", dtype=torch.bfloat16)
    view = buf[1:5, 1:101]
    out = CudaRowKernel(p)({"x": x, "w": w.to(torch.bfloat16)}, out={"y": view})
    assert out["y"].data_ptr() == view.data_ptr()
    inside = torch.zeros_like(buf, dtype=torch.bool)
    inside[1:5, 1:101] = True
    assert (buf[~inside] == OUT_SENTINEL).all()
    close(view.cpu(), evaluate(p, {"x": x.cpu(), "w": w.to(torch.bfloat16).cpu()})["y"], torch.bfloat16, "y")
