"""How kernel tests compare a result with its reference, and the shapes and values they draw.

Half-precision storage is held to an elementwise bound derived from the dtype's epsilon and the
reduction length, beside the relative RMS error: an RMS alone lets one wrong element in thousands
pass. Non-finite values are compared as a pattern: the reference says where inf and NaN belong.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from hypothesis import strategies as st

EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
RMS_TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}  # relative RMS error of half-precision storage

# the row kernels' BLOCK is the next power of two of the width; their warps change at 2048, 8192 and
# 32768: a width on each side of a block size
BLOCK_EDGES = (128, 1024, 2048, 4096)  # and the C-style kernels' threads per row change at 1024, 2048, 4096
BLOCK_WIDTHS = (1, 2, 3, *sorted({w + d for w in BLOCK_EDGES for d in (-1, 0, 1)}))


EDGES = ("none", "zero", "huge", "inf", "nan")  # what `edge_values` writes into a row


def widths(largest: int = 4097) -> st.SearchStrategy[int]:
    """A row width: one beside a block size, or any up to `largest`."""
    return st.sampled_from([w for w in BLOCK_WIDTHS if w <= largest]) | st.integers(1, largest)


def around(*sizes: int, low: int = 1) -> tuple[int, ...]:
    """Each size, one less and one more (at least `low`), sorted."""
    return tuple(sorted({max(low, s + d) for s in sizes for d in (-1, 0, 1)}))


def rel_rms(got: torch.Tensor, ref: torch.Tensor, floor: float = 1e-6) -> float:
    """RMS of the error over the RMS of the reference, or over `floor` when that is larger (a result that
    is zero in exact arithmetic is rounding noise on both sides: measure it against its terms' scale)."""
    return float((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(floor))


def elementwise_bound(ref: torch.Tensor, dtype: torch.dtype, n: int, roundings: float = 4.0,
                      floor: float = 0.0) -> torch.Tensor:
    """|kernel - reference| allowed per element for a result stored in `dtype` whose value is a
    reduction over `n` terms (computed in fp32 from `dtype` inputs):

        roundings * eps * (|ref| + sqrt(n) * rms(ref))

    Each storage rounding (the output, and intermediates a kernel keeps in `dtype`) moves a value by at
    most eps relative (eps: a truncating store, as the interpreter's; eps / 2 rounding to nearest);
    `roundings` counts them. A reduction over n terms each rounded relative to its own size adds
    about sqrt(n) * eps of the terms' scale, which for a softmax-weighted mean is up to sqrt(n) times
    the result's RMS (the second term). One wrong element off by the result's RMS exceeds this for
    reductions up to a few hundred terms (tests/test_numerics.py); an RMS check lets it pass."""
    eps = EPS[dtype]
    rms = ref.pow(2).mean().sqrt().clamp_min(floor) if ref.numel() else ref.new_zeros(())
    return roundings * eps * (ref.abs() + math.sqrt(max(1, n)) * rms)


def assert_within(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, n: int, what: str,
                  roundings: float = 4.0, floor: float = 1e-6) -> None:
    """`got` (stored in `dtype`) against the fp32 `ref`: the relative RMS error and the elementwise
    bound of `elementwise_bound`; the first offending element is named. `floor`: the scale of the terms a
    result is summed from, for a result that may be zero (see rel_rms)."""
    got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    if not ref.numel():
        return
    rms = rel_rms(got, ref, floor)
    assert rms < RMS_TOL[dtype], f"{what}: relative RMS error {rms:.2e} >= {RMS_TOL[dtype]:.0e}"
    bound = elementwise_bound(ref, dtype, n, roundings, floor)
    bad = (got - ref).abs() > bound
    if bad.any():
        i = tuple(int(j) for j in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} element(s) outside {roundings:g} eps (|ref| + sqrt({n}) "
                             f"rms) (relative RMS {rms:.2e}); first at {i}: got {float(got[i]):.6g}, "
                             f"reference {float(ref[i]):.6g}, bound {float(bound[i]):.3g}")


def assert_same_nonfinite(got: torch.Tensor, ref: torch.Tensor, what: str) -> torch.Tensor:
    """NaN, +inf and -inf exactly where the reference has them; returns the mask of finite elements."""
    got, ref = got.detach().cpu(), ref.detach().cpu()
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        g, r = test(got), test(ref)
        if not torch.equal(g, r):
            i = tuple(int(j) for j in (g != r).nonzero()[0])
            raise AssertionError(f"{what}: {name} at {int(g.sum())} element(s), the reference at {int(r.sum())}; "
                                 f"first difference at {i}: got {float(got[i])}, reference {float(ref[i])}")
    return torch.isfinite(ref)


def edge_values(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """x (rows, D) with an edge case written into it: `zero` rows, `huge` magnitudes (1e4 times),
    `inf` or `nan` at a few elements of one row. Other rows keep their values."""
    x = x.clone()
    rows = x.shape[0]
    if not rows or kind == "none":
        return x
    r = int(torch.randint(0, rows, (1,), generator=generator))
    if kind == "zero":
        x[r] = 0
    elif kind == "huge":
        x[r] = x[r] * 1e4
    elif kind in ("inf", "nan"):
        cols = torch.randint(0, x.shape[-1], (2,), generator=generator)
        x[r, cols[0]] = float("nan") if kind == "nan" else float("inf")
        x[r, cols[1]] = float("nan") if kind == "nan" else float("-inf")
    else:
        raise ValueError(kind)
    return x


def close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str, n: int = 1) -> None:
    """A kernel's result (any device) against the CPU reference: inf and NaN where the reference has
    them; fp32 within 1e-4 of the largest value; half types within `assert_within` (n: the length of
    the reduction behind each element)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, ref.shape, got.dtype, ref.dtype)
    got = got.detach().cpu()
    finite = assert_same_nonfinite(got, ref, what)
    got, ref = got[finite].float(), ref.detach()[finite].float()
    if dtype == torch.float32:
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{what}: {m}")
    else:
        assert_within(got, ref, dtype, n, what)


def after_reduction(program) -> list[bool]:
    """For each node of a RowProgram, whether it depends on a row reduction (sum, mean, max)."""
    from hrmspec.ir.opset import REDUCE

    flags: list[bool] = []
    for n in program.nodes:  # topological: operands come first
        flags.append(n.op in REDUCE or any(flags[s] for s in n.srcs))
    return flags


def reduction_lengths(program, rows: int, width: int) -> tuple[dict[str, int], dict[str, int]]:
    """The length of the reduction behind each forward output and each input's gradient, the `n` of
    `elementwise_bound`: the width for a value downstream of a row reduction, 1 for one computed
    elementwise from its row, and the rows for a vector's gradient (a sum of per-row partials). A
    gradient is read from the backward program with nothing saved, so a forward reduction it needs
    shows as one."""
    from hrmspec.ir import grad

    fwd = after_reduction(program)
    outputs = {o.name: width if fwd[o.node] else 1 for o in program.outputs}
    back = grad(program, list(program.input_names))
    bwd = after_reduction(back)
    grads = {}
    for o in back.outputs:
        name = o.name[len("d_"):]
        grads[name] = rows if program.input(name).kind == "vector" else width if bwd[o.node] else 1
    return outputs, grads


def check_row_op(op, program, rows: int, width: int, dtype: torch.dtype, seed: int, device="cpu",
                 scale: float = 1.0, edge: str = "none") -> None:
    """Forward outputs and every input gradient of a kernel backend's row op (on `device`) against the
    evaluator + autograd (on the CPU), with random cotangents for every output. `edge` writes zero, huge
    or non-finite values into one row of one row input (`edge_values`). Each result is held to the bound
    of its own reduction length (`reduction_lengths`)."""
    from hrmspec.ir import evaluate
    from hrmspec.ir.strategies import random_inputs

    inputs = random_inputs(program, rows, width, scale, seed, torch.float32)
    gen = torch.Generator().manual_seed(seed + 3)
    row_inputs = [i.name for i in program.inputs if i.kind == "row"]
    if edge != "none" and row_inputs:
        name = row_inputs[int(torch.randint(0, len(row_inputs), (1,), generator=gen))]
        inputs[name] = edge_values(inputs[name], edge, gen)
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    leaves_k = {k: v.detach().to(device).requires_grad_() for k, v in inputs.items()}
    leaves_r = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out_k = op(**leaves_k)
    out_r = evaluate(program, leaves_r)
    n_out, n_grad = reduction_lengths(program, rows, width)
    what = f"{program.name} {dtype} D={width} rows={rows} scale={scale:g} edge={edge}"
    for k in out_r:
        close(out_k[k], out_r[k], dtype, f"{what} {k}", n_out[k])
    names = [k for k in out_r if out_r[k].requires_grad]
    if not names:
        return
    gen = torch.Generator().manual_seed(seed + 7)
    cot = [torch.randn(out_r[k].shape, generator=gen).to(dtype) for k in names]
    g_k = torch.autograd.grad([out_k[k] for k in names], list(leaves_k.values()), [c.to(device) for c in cot],
                              allow_unused=True)
    g_r = torch.autograd.grad([out_r[k] for k in names], list(leaves_r.values()), cot, allow_unused=True)
    truth = None  # the gradients in float64 from the same inputs, made when a comparison needs them
    for i, (name, a, b) in enumerate(zip(leaves_k, g_k, g_r)):
        a = torch.zeros_like(inputs[name]) if a is None else a
        b = torch.zeros_like(inputs[name]) if b is None else b
        try:
            close(a, b, dtype, f"{what} d_{name}", n_grad[name])
        except AssertionError:
            if truth is None:
                truth = _float64_gradients(program, inputs, names, cot)
            if not within_reference_noise(a, b, truth[i]):
                raise


def _float64_gradients(program, inputs: dict[str, torch.Tensor], names: list[str], cot: list[torch.Tensor]
                       ) -> list[torch.Tensor]:
    """Every input's gradient computed by the evaluator in float64 from the same (rounded) inputs."""
    from hrmspec.ir import evaluate

    leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    out = evaluate(program, leaves)
    grads = torch.autograd.grad([out[k] for k in names], list(leaves.values()), [c.double() for c in cot],
                                allow_unused=True)
    return [torch.zeros_like(leaves[k]) if g is None else g.detach() for k, g in zip(leaves, grads)]


def within_reference_noise(got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, factor: float = 4.0) -> bool:
    """Whether a kernel's result is as close to the float64 truth as the reference's own is, within `factor`.
    For a result that is rounding noise (layer norm of a 2-wide row, whose gradient vanishes in exact
    arithmetic), the reference itself is noise: no tolerance relative to it can hold, but a kernel no
    further from the truth than the reference (give or take one subnormal step of the storage type) is
    computed as well as it can be. Non-finite values must be
    where the reference has them (`close` checked that before it compared values)."""
    tick = float(torch.finfo(got.dtype).smallest_normal) * float(torch.finfo(got.dtype).eps)  # one subnormal step
    got, ref, truth = got.detach().cpu().double(), ref.detach().cpu().double(), truth.double()
    finite = torch.isfinite(ref) & torch.isfinite(truth)
    if not torch.equal(torch.isfinite(got), torch.isfinite(ref)):
        return False
    e_got, e_ref = (got - truth)[finite], (ref - truth)[finite]
    if not e_got.numel():
        return True
    rms = lambda e: float(e.pow(2).mean().sqrt())  # noqa: E731
    return (rms(e_got) <= factor * rms(e_ref) + tick
            and float(e_got.abs().max()) <= factor * float(e_ref.abs().max()) + tick)


__all__ = ["BLOCK_WIDTHS", "EDGES", "EPS", "RMS_TOL", "after_reduction", "around", "assert_same_nonfinite",
           "assert_within", "check_row_op", "close", "edge_values", "elementwise_bound", "reduction_lengths", "rel_rms",
           "widths", "within_reference_noise"]


def compare_grads(ref: torch.nn.Module, other: torch.nn.Module, rtol: float,
                  atol: float | Callable[[torch.Tensor], float]) -> int:
    """After a backward through each: every parameter of `other` has a gradient exactly where the same
    parameter of `ref` has one, and within (rtol, atol) of it (`atol` may be a function of ref's gradient).
    Returns how many gradients were compared, for the caller to hold against the parameters it expects to
    receive one: a loop that skips what has no gradient passes on its own when none has."""
    compared = 0
    for (name, p), (other_name, q) in zip(ref.named_parameters(), other.named_parameters(), strict=True):
        assert name == other_name, (name, other_name)
        assert (p.grad is None) == (q.grad is None), f"{name}: a gradient on one side only"
        if p.grad is None:
            continue
        tol = atol(p.grad) if callable(atol) else atol
        torch.testing.assert_close(q.grad.to(p.grad.device), p.grad, rtol=rtol, atol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")
        compared += 1
    return compared
