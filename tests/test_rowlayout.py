"""Row layout (backends/rowlayout.py): every row tensor addressed by two row strides, views taken as
they are where those describe them, and generated kernels computing the same on such views."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hrmspec.backends.common.rowlayout import collapse, overlaps_itself, row_views, split
from hrmspec.errors import KernelError
from hrmspec.ir import builtin_programs, evaluate


@st.composite
def row_tensors(draw, lead, width):
    """A tensor [*lead, D] that is a view of a larger buffer: lead dims stored in another order,
    every other element taken along some of them, a padded last dim, maybe a dim read again and
    again (stride 0)."""
    n = len(lead)
    perm = draw(st.permutations(range(n)))  # buffer dim j holds lead dim perm[j]
    steps = [draw(st.integers(1, 2)) for _ in range(n)]
    pad = draw(st.integers(0, 3))
    base = torch.randn(*(lead[perm[j]] * steps[perm[j]] for j in range(n)), width + pad)
    t = base[(*(slice(None, None, steps[perm[j]]) for j in range(n)), slice(0, width))]
    t = t.permute(*(perm.index(i) for i in range(n)), n)
    if draw(st.booleans()):
        i = draw(st.integers(0, n - 1))
        t = t.narrow(i, 0, 1).expand(*t.shape[:i], lead[i], *t.shape[i + 1:])
    assert tuple(t.shape) == (*lead, width)
    return t


def twin(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh leaf buffer and a view of it with exactly t's layout (gradients reach the buffer)."""
    base = (t._base if t._base is not None else t).detach().clone().requires_grad_()
    return base, base.as_strided(t.shape, t.stride(), t.storage_offset())


leads = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


def test_collapse_and_split():
    assert collapse((2, 3), (3, 1)) == 1 and collapse((2, 3), (6, 2)) == 2
    assert collapse((2, 3), (5, 1)) is None and collapse((), ()) == 0 and collapse((1, 4, 1), (9, 2, 7)) == 2
    q = torch.empty(2, 5, 4, 3, 8)[:, :, 0]  # q inside a fused projection (B, S, P, h, hd)
    assert split(q, 3, 3) is None and split(q, 3, 2) == (96, 8)
    tables = torch.empty(2, 1, 5, 8).transpose(1, 2)[..., :4].expand(2, 5, 3, 4)  # read once per head
    assert split(tables, 3, 2) == (8, 0)


@settings(max_examples=200, deadline=None)
@given(lead=leads, data=st.data())
def test_views_address_the_same_rows_in_the_same_order(lead, data):
    program = builtin_programs()["add_rms_norm"]  # rows x, r; vector w; rows h, y
    x, r = data.draw(row_tensors(lead, 5)), data.draw(row_tensors(lead, 5))
    views = row_views(program, {"x": x, "r": r, "w": torch.randn(5)}, lead, 5, {}, lambda o, shape: torch.empty(shape))
    n_rows = views.n_rows
    assert n_rows == torch.Size(lead).numel() and n_rows % views.n_inner == 0
    for name, t in (("x", x), ("r", r)):
        v = views.tensors[name]
        assert v.shape == (n_rows // views.n_inner, views.n_inner, 5)
        assert torch.equal(v.reshape(n_rows, 5), t.reshape(n_rows, 5))  # the same rows, in the same order
    assert views.n_inner == torch.Size(lead[views.split_at:]).numel()
    for name, t in (("x", x), ("r", r)):
        if split(t, len(lead), views.split_at) is not None:
            assert views.tensors[name].data_ptr() == t.data_ptr()  # taken as it is, not copied
    for o in ("h", "y"):  # outputs: views of what the caller gets back
        v = views.tensors[o]
        assert v.data_ptr() == views.results[o].data_ptr() and not overlaps_itself(v)


def test_an_output_that_cannot_be_written_in_place_is_refused():
    program = builtin_programs()["rms_norm"]
    x = torch.randn(3, 4)
    y = torch.empty(8).as_strided((3, 4), (2, 1))  # rows 2 apart, 4 wide: they overlap
    with pytest.raises(KernelError, match="output 'y' overlaps itself"):
        row_views(program, {"x": x, "w": torch.randn(4)}, (3,), 4, {"y": y}, None)
    y = torch.empty(4, 3).t()  # unit stride along rows, not along D
    with pytest.raises(KernelError, match="output 'y' must be writable in place"):
        row_views(program, {"x": x, "w": torch.randn(4)}, (3,), 4, {"y": y}, None)


@settings(max_examples=30, deadline=None)
@given(lead=leads, width=st.integers(1, 40), data=st.data())
def test_c_style_kernels_on_views_match_the_evaluator(c_ops, lead, width, data):
    program = builtin_programs()["add_rms_norm"]
    x, r = data.draw(row_tensors(lead, width)), data.draw(row_tensors(lead, width))
    w = torch.randn(width)
    runs = []
    for run in (c_ops.row_program, evaluate):
        (bx, vx), (br, vr) = twin(x), twin(r)
        vw = w.clone().requires_grad_()
        out = run(program, {"x": vx, "r": vr, "w": vw})
        cot = torch.randn(out["y"].shape, generator=torch.Generator().manual_seed(0))
        ((out["y"] * cot).sum() + out["h"].sum()).backward()
        runs.append((out, bx.grad, br.grad, vw.grad))
    (got, *g_got), (want, *g_want) = runs
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
