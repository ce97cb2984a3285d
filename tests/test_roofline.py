"""The roofline view (`hrmspec show --roofline GPU`): kernel costs against hand arithmetic, the bound, the
step's FLOPs against the analysis, the GPU table against its documentation, and the command line."""

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hrmspec.gpus import GPUS, GPUError, get_gpu
from hrmspec.graph import build_graph
from hrmspec.graph.analysis import analyse
from hrmspec.graph.loss_chunks import default_chunk_rows
from hrmspec.graph.roofline import OPTIMIZER_BYTES_PER_PARAM, kernel_costs, roofline, row_cost
from hrmspec.ir import library
from hrmspec.ir.kernel import backward_program
from hrmspec.spec import load_spec_text
from hrmspec.spec.load import load_spec

DOCS = Path(__file__).resolve().parents[1] / "docs" / "kernels.md"


def graph(tiny_text, **over):
    return build_graph(load_spec_text(tiny_text, overrides=over or None))


def kernel(r, name, direction="fwd"):
    return next(k for k in r.kernels if k.cost.name == name and k.cost.direction == direction)


def test_a_matmul_against_hand_arithmetic(tiny_text):
    """L's gate/up projection of the tiny spec (d 32, ffn 48: 32 -> 96) over 64 x 128 tokens on an H100."""
    r = roofline(graph(tiny_text), get_gpu("h100"), batch=64, seq_len=128)
    k = kernel(r, "L: mlp.gate_up")
    T = 64 * 128
    flops, moved = 2 * T * 32 * 96, 2 * (T * 32 + T * 96 + 32 * 96)  # bf16: activations in and out, the weight
    assert (k.cost.kind, k.cost.flops, k.cost.bytes) == ("matmul", flops, moved)
    assert k.cost.intensity == pytest.approx(23.93, abs=0.01)  # < the H100's ridge of 989 / 3.35 = 295 FLOP/B
    assert k.bound == "memory" and k.time == pytest.approx(moved / 3.35e12)
    # L runs 6 times per forward (H 2 x L 3); 3 of them carry gradient at the end of the ramp (depth 5)
    assert k.cost.launches == 6 and kernel(r, "L: mlp.gate_up", "bwd").cost.launches == 3
    bwd = kernel(r, "L: mlp.gate_up", "bwd").cost
    assert (bwd.flops, bwd.bytes) == (2 * flops, 2 * moved)  # dX and dW


def test_a_wide_matmul_is_compute_bound(tiny_text):
    G = graph(tiny_text, **{"model.d_model": 2048, "model.heads": 16, "model.ffn": 8192})
    T = 8 * 1024
    flops, moved = 2 * T * 2048 * 16384, 2 * (T * 2048 + T * 16384 + 2048 * 16384)
    for name, peak in [("a100", 312e12), ("b200", 2250e12)]:
        k = kernel(roofline(G, get_gpu(name), batch=8, seq_len=1024), "L: mlp.gate_up")
        assert k.cost.intensity == pytest.approx(flops / moved) and flops / moved > 1400
        assert k.bound == "compute" and k.time == pytest.approx(flops / peak)


def test_a_row_kernel_against_hand_arithmetic():
    """rms_norm with a weight, rows of width W: x*x, mean, x*r and w*y are W FLOPs each, + eps and rsqrt one
    per row; it reads x and writes y (2 bytes each), the weight once. Its backward reads x and dy, writes dx
    and the weight gradient's per-row partials in fp32, which their sum reads back."""
    W = 1536
    prog = library.rms_norm(1e-6, affine=True)
    assert row_cost(prog, W) == (4 * W + 2, 2 * W * 2, W * 2)
    flops, per_row, once = row_cost(backward_program(prog), W)
    assert (per_row, once) == (3 * W * 2 + 2 * W * 4, W * 2)
    assert flops > 4 * W + 2  # the backward does more per element than the forward


def test_the_head_is_one_gemm_per_loss_chunk():
    """HRM-Text 1B's head at 8 x 2048 tokens: chunks of C rows, each a GEMM that reads the whole (V, d) weight."""
    G = build_graph(load_spec("hrm-text-1b"))
    r = roofline(G, get_gpu("h100"), batch=8, seq_len=2048)
    T, V, d = 8 * 2048, 65536, 1536
    C = default_chunk_rows(T, V, d)
    assert T % C == 0  # whole chunks: each launch is one of them
    k = kernel(r, "head + loss: logits")
    assert k.cost.launches == T // C and k.cost.flops == 2 * C * d * V
    assert k.cost.bytes == 2 * (C * d + V * d + C * V)
    assert kernel(r, "head + loss: logits (recomputed), dh, dW", "bwd").cost.launches == 3 * T // C
    opt = kernel(r, "optimizer, gradient clip, EMA (fp32)", "update")
    assert opt.cost.bytes == OPTIMIZER_BYTES_PER_PARAM * 1_182_793_728 and opt.bound == "memory"


@given(batch=st.integers(1, 64), seq_len=st.integers(1, 4096), progress=st.sampled_from([0.0, 0.1, 1.0]),
       name=st.sampled_from(["hrm-text-tiny", "transformer", "trm"]))
def test_the_step_does_the_analysed_model_flops(batch, seq_len, progress, name):
    """The tensor-core kernels of a step do what analysis.py counts: its forward FLOPs per token over every
    call, and its training-step FLOPs (grad calls 3x) but for the logits the loss's backward recomputes."""
    G = build_graph(load_spec(name), progress)
    st_ = analyse(G, seq_len=seq_len)
    T = batch * seq_len
    costs = kernel_costs(G, batch, seq_len)
    done = {d: sum(c.flops * c.launches for c in costs if c.tensor_cores and c.direction == d) for d in ("fwd", "bwd")}
    recomputed = sum(c.flops * c.launches for c in costs if c.name == "head + loss: logits")
    assert done["fwd"] == pytest.approx(st_.forward_flops_per_token * T, rel=1e-9)
    assert done["fwd"] + done["bwd"] - recomputed == pytest.approx(st_.train_flops_per_token * T, rel=1e-9)
    gpu = get_gpu("h200")
    for k in roofline(G, gpu, batch, seq_len).kernels:  # the bound is the side of the ridge the kernel is on
        c = k.cost
        ridge = gpu.peak_flops(c.tensor_cores) / gpu.bandwidth
        assert k.time == pytest.approx(max(c.flops / gpu.peak_flops(c.tensor_cores), c.bytes / gpu.bandwidth))
        assert (k.bound == "compute") == (c.intensity > ridge)


def test_every_gpu_is_documented_with_its_numbers():
    """docs/kernels.md's table holds the same peaks as hrmspec/gpus.py, and says where they come from."""
    text = DOCS.read_text()
    for key, g in GPUS.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert [float(c.replace(",", "")) for c in cells[2:5]] == [g.bf16_tflops, g.fp32_tflops, g.hbm_tbps], key
        assert "datasheet" in cells[5] and "datasheet" in g.source
    with pytest.raises(GPUError, match="unknown GPU 'h10'; known: a100, h100, h200, b200 .did you mean 'h100'"):
        get_gpu("h10")
    assert get_gpu(" H100 ") is GPUS["h100"]


def test_cli_roofline_table_json_and_errors(capsys):
    from hrmspec.cli import main

    assert main(["show", "hrm-text-tiny", "--seq-len", "64", "--batch", "4", "--roofline", "a100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    r = roofline(build_graph(load_spec("hrm-text-tiny")), get_gpu("a100"), batch=4, seq_len=64)
    assert out["tokens"] == 256 and out["step_time"] == pytest.approx(r.step_time)
    assert [k["name"] for k in out["kernels"]] == [k.cost.name for k in r.kernels]
    assert out["forward_time"] + out["backward_time"] + out["optimizer_time"] == pytest.approx(out["step_time"])

    assert main(["show", "hrm-text-tiny", "--seq-len", "64", "--roofline", "b200"]) == 0
    text = capsys.readouterr().out
    assert "Roofline on NVIDIA B200" in text and re.search(r"training step\s+│\s+[\d.]+ us", text)

    for argv, want in [(["--roofline", "h1000"], "unknown GPU 'h1000'"), (["--json"], "--json prints the roofline")]:
        assert main(["show", "hrm-text-tiny", *argv]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and want in captured.err and captured.err.count("\n") == 1
