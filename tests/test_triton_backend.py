"""Triton kernels printed from RowPrograms, against the reference evaluator: compiled on the CUDA
device when there is one (`pytest -m gpu`), in the interpreter on CPU tensors otherwise (the tests'
conftest chooses before triton is imported). Widths beside every block size the launcher picks,
zero rows, huge values, inf and NaN with the reference's behaviour as the oracle.
"""

import hashlib
import os
import re
import time

import pytest
import torch
from golden_file import check_golden
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import EDGES, check_row_op, close, widths

triton = pytest.importorskip("triton")

from hrmspec.backends.common.source_cache import checksum_prefix  # noqa: E402
from hrmspec.backends.triton import MAX_WIDTH, RowKernel, TritonRowOp, cache  # noqa: E402
from hrmspec.backends.triton.aot import compile_many  # noqa: E402
from hrmspec.backends.triton.printer import render_module  # noqa: E402
from hrmspec.errors import KernelError  # noqa: E402
from hrmspec.ir import ProgramBuilder, builtin_programs, evaluate, grad, mean, rms_norm  # noqa: E402
from hrmspec.ir.kernel import kernel_name  # noqa: E402
from hrmspec.ir.strategies import SMOOTH_OPS, random_inputs, row_programs  # noqa: E402

pytestmark = pytest.mark.gpu
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


def _check_program(program, rows, width, dtype, seed, device, scale=1.0, edge="none"):
    check_row_op(_op(program), program, rows, width, dtype, seed, device, scale, edge)


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


def test_golden_rms_norm_forward_source():
    # a snapshot: an unintended change of the IR, its canonical order or the printer shows up here (the
    # kernel's name carries its program's hash)
    p = rms_norm()
    check_golden("triton_rms_norm_fwd.py.golden", render_module(p, kernel_name(p, "fwd")))


# -- numerics ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_builtin_forward_and_backward(name, dtype, kernel_device):
    # a block filled exactly, one lane into the next block, one past BLOCK 4096 (16 warps); fp16 and the
    # other widths are drawn below
    for width in (1, 128, 129, 1000, 4097):
        _check_program(PROGRAMS[name], 3, width, dtype, seed=width, device=kernel_device)


@given(name=st.sampled_from(sorted(PROGRAMS)), width=widths(), rows=st.integers(0, 3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       scale=st.sampled_from((1e-3, 1.0, 4.0, 1e3)), edge=st.sampled_from(EDGES), seed=st.integers(0, 2**16))
def test_builtins_at_block_edges_and_edge_values(name, width, rows, dtype, scale, edge, seed, kernel_device):
    _check_program(PROGRAMS[name], rows, width, dtype, seed, kernel_device, scale, edge)


@given(program=row_programs(max_ops=5, ops=SMOOTH_OPS), width=widths(), rows=st.integers(0, 3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), scale=st.sampled_from((1e-3, 1.0, 4.0)),
       edge=st.sampled_from(EDGES), seed=st.integers(0, 2**16))
def test_random_programs_forward_and_backward(program, width, rows, dtype, scale, edge, seed, kernel_device):
    _check_program(program, rows, width, dtype, seed, kernel_device, scale, edge)


@pytest.mark.parametrize("width", [8191, 8192, 8193, MAX_WIDTH])
def test_the_widest_rows_run_in_the_kernel(width, kernel_device):
    # the widest rows a one-block kernel takes (16 and 32 warps); one wider is an error (below)
    _check_program(rms_norm(), 1, width, torch.float32, seed=width, device=kernel_device)


def test_reductions_ignore_the_padding_lanes(kernel_device):
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
        _check_program(p, 2, width, torch.float32, seed=width, device=kernel_device)


def test_max_and_relu_keep_nan(kernel_device):
    # tl.max and tl.maximum drop a NaN operand (maxnum) unless told otherwise; torch keeps it
    b = ProgramBuilder("nan_max")
    x = b.row("x")
    b.output("m", x.max())
    b.output("y", x.relu() * (x - 1.0).max())
    _check_program(b.build(), 3, 129, torch.float32, seed=5, device=kernel_device, edge="nan")


def test_rounding_casts_match_the_evaluator(kernel_device):
    # values computed exactly in fp32 (an input, a product) round to the same half-type value
    b = ProgramBuilder("rounding")
    x, w = b.row("x"), b.vector("w")
    b.output("y", x.cast("bf16") + (x * w).cast("f16") * 3.0)
    p = b.build()
    for width in (3, 1000):
        _check_program(p, 3, width, torch.float32, seed=width, device=kernel_device, scale=10.0)


def test_scalar_inputs_and_outputs_and_leading_dims(kernel_device):
    b = ProgramBuilder("mixed")
    x, s, w = b.row("x"), b.scalar("s"), b.vector("w")
    m = mean(x * w) * s
    b.output("y", (x - m) * w + s)
    b.output("m", m)
    p = b.build()
    x, s, w = torch.randn(2, 3, 5), torch.randn(2, 3), torch.randn(5)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # rows that are not contiguous across the leading dims
    leaves = [t.detach().to(kernel_device).requires_grad_() for t in (x, s, w)]
    out = _op(p)(*leaves)
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


def test_rows_wider_than_the_limit_are_an_error(kernel_device):
    with pytest.raises(KernelError, match=f"limit of {MAX_WIDTH}"):
        _op(rms_norm(affine=False))(torch.zeros(1, MAX_WIDTH + 1, device=kernel_device))


def test_empty_batch(kernel_device):
    x, w = torch.zeros(2, 0, 8, device=kernel_device, requires_grad=True), torch.ones(8, device=kernel_device)
    w.requires_grad_()
    out = _op(rms_norm())(x, w)
    assert out["y"].shape == (2, 0, 8)
    out["y"].sum().backward()  # no rows: zero gradients of the right shapes
    assert x.grad.shape == (2, 0, 8) and w.grad.shape == (8,) and not w.grad.any()


# -- guard buffers: nothing outside the tensors is read or written --------------------------------------
IN_SENTINEL, OUT_SENTINEL = float("nan"), -1234.0


def _embed(shape, kind, dtype, fill, device, pad=3):
    """A view of `shape` inside a larger buffer filled with `fill`: padded rows and a storage offset."""
    if kind == "row":
        rows, width = shape
        buf = torch.full((rows + 2, width + pad), fill, dtype=dtype, device=device)
        return buf, buf[1:rows + 1, 1:width + 1]
    n = shape[0]
    buf = torch.full((n + 2 * pad,), fill, dtype=dtype, device=device)
    return buf, buf[pad:pad + n]


def _run_guarded(program, rows, width, dtype, device):
    inputs = random_inputs(program, rows, width, 1.0, seed=width, dtype=torch.float32)
    views, in_bufs = {}, {}
    for i in program.inputs:
        in_bufs[i.name], v = _embed(inputs[i.name].shape, i.kind, dtype, IN_SENTINEL, device)
        v.copy_(inputs[i.name].to(dtype))
        views[i.name] = v
    bufs, outs = {}, {}
    for o in program.outputs:
        odt = torch.float32 if o.row_partial else dtype
        shape = (rows, width) if o.kind == "row" else (rows,)
        bufs[o.name], outs[o.name] = _embed(shape, o.kind, odt, OUT_SENTINEL, device)
    kernel = RowKernel(program, "fwd")
    kernel(views, out=outs)
    ref = evaluate(program, {k: v.cpu() for k, v in views.items()})
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["rms_norm", "add_rms_norm", "mixed"])
def test_guard_buffers_forward_and_backward(name, dtype, kernel_device):
    if name == "mixed":
        b = ProgramBuilder("mixed_guard")
        x, s, w = b.row("x"), b.scalar("s"), b.vector("w")
        b.output("y", x * w + s)
        b.output("m", (x * w).max() * s)
        prog = b.build()
    else:
        prog = PROGRAMS[name]
    for width in (3, 127):
        _run_guarded(prog, 2, width, dtype, kernel_device)
        _run_guarded(grad(prog), 2, width, dtype, kernel_device)


def test_bad_output_buffer_is_an_error(kernel_device):
    kernel = RowKernel(rms_norm())
    x, w = torch.randn(4, 6, device=kernel_device), torch.randn(6, device=kernel_device)
    with pytest.raises(KernelError, match="unit stride"):
        kernel({"x": x, "w": w}, out={"y": torch.empty(6, 4, device=kernel_device).t()})


# -- the cache ------------------------------------------------------------------------------------------
def test_cache_files_are_content_addressed_and_repaired(kernel_cache):
    p = rms_norm(eps=1e-5, name="cache_probe")
    k1 = RowKernel(p)
    assert k1.path.parent == kernel_cache and k1.path.name.startswith(k1.name + "_")
    text = k1.path.read_text()
    assert text.rstrip().splitlines()[-1].startswith(checksum_prefix(".py")) and cache.is_valid(k1.path)
    assert text.rstrip().splitlines()[-1].startswith("# hrmspec-checksum: ")
    # the file name of earlier releases, so existing caches still match: sha256(source, version, target)
    key = hashlib.sha256("\0".join((k1.source, triton.__version__, cache.target_tag())).encode()).hexdigest()[:16]
    assert k1.path.name == f"{k1.name}_{key}.py"
    mtime = k1.path.stat().st_mtime_ns
    assert cache.write_source(k1.name, k1.source) == k1.path and k1.path.stat().st_mtime_ns == mtime  # reused
    other = cache.target_tag() + "-other"
    assert cache.write_source(k1.name, k1.source, target=other) != k1.path  # the target is in the key
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
