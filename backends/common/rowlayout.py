"""How a row kernel finds its rows: every row tensor seen through two row strides.

A kernel instance computes row r of n_rows = prod(lead) rows, the lead dims of its row tensors
[*lead, D]. It finds row r of a tensor at

    (r // n_inner) * stride + (r % n_inner) * inner_stride          (elements; unit stride along D)

so a tensor is taken as it is when its lead dims split, at one point k shared by the launch, into
an outer group and an inner group that each walk memory with one stride. Plain contiguous rows
split anywhere (n_inner = 1 is the usual case); so do views that no single row stride describes:

    q inside the fused projection (B, S, P, h, hd)[:, :, 0]   lead (B, S, h) = outer (B, S), inner (h)
    the rope tables (B, 1, S, hd) read once per head            inner stride 0

A row input that does not split where the others do is copied (`contiguous`), which always
splits; a preallocated output must split, or the launch is refused (`KernelError`: it could not
be written in place). Vectors [D] and per-row scalars [*lead] are contiguous. The views handed to
a launcher are 3-d [n_outer, n_inner, D] for rows, so `stride(0)` and `stride(1)` are the two
strides and a byte span covers exactly what the kernel may touch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hrmspec.errors import KernelError
from hrmspec.ir import RowProgram


def collapse(shape: Sequence[int], strides: Sequence[int]) -> int | None:
    """The one stride that walks dims `shape` in row-major order as a flat index, or None.
    Dims of size 1 do not count; no dims (or only size-1 dims) walk with any stride: 0."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    for (_, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            return None
    return dims[-1][1] if dims else 0


def split(t: torch.Tensor, lead: int, k: int) -> tuple[int, int] | None:
    """(outer, inner) strides of a row tensor whose first `lead` dims split at k, or None."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return None
    shape, strides = t.shape[:lead], t.stride()[:lead]
    outer, inner = collapse(shape[:k], strides[:k]), collapse(shape[k:], strides[k:])
    return None if outer is None or inner is None else (outer, inner)


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of `t` share memory (a view whose rows overlap, an expanded dim)."""
    reach = 0  # the largest offset the dims taken so far reach
    for n, s in sorted(((n, abs(s)) for n, s in zip(t.shape, t.stride()) if n > 1), key=lambda d: d[1]):
        if s <= reach:
            return True
        reach += (n - 1) * s
    return False


@dataclass
class RowViews:
    """The tensors of one launch as the kernel sees them."""

    n_rows: int
    n_inner: int
    width: int
    split_at: int  # the lead dims before it are the outer group, the rest the inner
    tensors: dict[str, torch.Tensor]  # by name: rows [n_outer, n_inner, D], vectors [D], scalars [n_rows]
    results: dict[str, torch.Tensor]  # the outputs as the caller gets them: rows [*lead, D], scalars [*lead]


def output_allocator(program: RowProgram, inputs: dict[str, torch.Tensor],
                     out_dtypes: dict[str, torch.dtype] | None = None) -> tuple[torch.device, Callable]:
    """The one device of the program's inputs, and `allocate(output, shape)` for `row_views`: an
    output there in `out_dtypes[name]`, else fp32 for a row partial of a weight's gradient, else the
    storage type of the first row input."""
    p = program
    devices = {inputs[n].device for n in p.input_names}
    if len(devices) > 1:
        raise KernelError(f"{p.name}: inputs are on several devices: {sorted(map(str, devices))}")
    device = devices.pop()
    rows = p.kinds_of("row")
    store = inputs[rows[0]].dtype if rows else inputs[p.input_names[0]].dtype

    def allocate(o, shape):
        dtype = (out_dtypes or {}).get(o.name, torch.float32 if o.row_partial else store)
        return torch.empty(shape, dtype=dtype, device=device)

    return device, allocate


def row_views(program: RowProgram, inputs: dict[str, torch.Tensor], lead: tuple[int, ...], width: int,
              out: dict[str, torch.Tensor], allocate) -> RowViews:
    """Lay out one launch. `out` holds the preallocated outputs; `allocate(output, shape)` makes
    the others (contiguous)."""
    p, n_lead = program, len(lead)
    n_rows = math.prod(lead)
    results = dict(out)
    for o in p.outputs:
        if o.name not in results:
            results[o.name] = allocate(o, (*lead, width) if o.kind == "row" else lead)
        t, shape = results[o.name], (*lead, width) if o.kind == "row" else lead
        if tuple(t.shape) != tuple(shape):
            raise KernelError(f"{p.name}: output '{o.name}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if n_rows == 0:  # nothing to launch; a zero-size dim has no strides that split (B, 0, D) into rows
        return RowViews(0, 1, width, n_lead, {}, results)
    rows_in = [n for n in p.kinds_of("row")]
    rows_out = [o.name for o in p.outputs if o.kind == "row"]

    def fits(k: int) -> tuple[bool, int]:
        outs_ok = all(split(results[n], n_lead, k) is not None for n in rows_out)
        return outs_ok, sum(split(inputs[n], n_lead, k) is not None for n in rows_in)

    # the split point: every output fits, then as many inputs as possible; n_inner = 1 when that ties
    best = max(range(n_lead, -1, -1), key=lambda k: (*fits(k), k))
    if not fits(best)[0]:
        bad = next(n for n in rows_out if split(results[n], n_lead, best) is None)
        raise KernelError(f"{p.name}: output '{bad}' must be writable in place as rows with unit stride along D, "
                          f"got strides {results[bad].stride()}")
    n_inner = math.prod(lead[best:])
    tensors: dict[str, torch.Tensor] = {}
    n_outer = n_rows // n_inner if n_inner else 0
    for name, kind, t in [(i.name, i.kind, inputs[i.name]) for i in p.inputs]:
        if kind == "row":
            if split(t, n_lead, best) is None:
                t = t.contiguous()  # splits anywhere
            t = t.as_strided((n_outer, n_inner, width), (*split(t, n_lead, best), 1))
        else:
            t = t.reshape(-1)
            if t.numel() > 1 and t.stride(0) != 1:
                t = t.contiguous()
        tensors[name] = t
    for o in p.outputs:  # written in place: views, never copies
        t = results[o.name]
        if o.kind == "row":
            t = t.as_strided((n_outer, n_inner, width), (*split(t, n_lead, best), 1))
        elif t.numel() > 1 and not t.is_contiguous():
            raise KernelError(f"{p.name}: output '{o.name}' must be contiguous, got strides {t.stride()}")
        else:
            t = t.reshape(-1)
        if overlaps_itself(t):
            raise KernelError(f"{p.name}: output '{o.name}' overlaps itself (strides {results[o.name].stride()}); "
                              "each element must have its own memory")
        tensors[o.name] = t
    return RowViews(n_rows, n_inner, width, best, tensors, results)


__all__ = ["RowViews", "collapse", "output_allocator", "overlaps_itself", "row_views", "split"]
