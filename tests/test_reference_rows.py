"""The reference backend's fast torch forms of built-in row programs equal the IR's evaluator, so the
two definitions of one function cannot drift apart (backends/reference/table.py: FAST_FORMS)."""

import inspect

import torch
from hypothesis import given
from hypothesis import strategies as st

from hrmspec.backends.reference.table import FAST_FORMS, ReferenceTable
from hrmspec.ir import RowProgram, evaluate, library

REFERENCE = ReferenceTable()


def _tagged_defaults() -> set[str]:
    """The built-in function of every library program that is tagged when built with its defaults."""
    tags = set()
    for _, fn in inspect.getmembers(library, inspect.isfunction):
        params = inspect.signature(fn).parameters.values()
        if fn.__module__ == library.__name__ and all(p.default is not p.empty for p in params):
            program = fn()
            if isinstance(program, RowProgram) and program.builtin:
                tags.add(program.builtin[0])
    return tags


def test_every_fast_form_has_a_tagged_library_program_and_back():
    assert _tagged_defaults() == set(FAST_FORMS)


TAGGED = st.one_of(
    st.builds(lambda eps, affine: library.rms_norm(eps, affine=affine), st.sampled_from((1e-6, 1e-5, 0.1)),
              st.booleans()),
    st.builds(lambda eps, affine: library.layer_norm(eps, affine=affine), st.sampled_from((1e-6, 1e-5, 0.1)),
              st.booleans()),
    st.builds(library.add, st.integers(2, 4)),
    st.just(library.sigmoid_gate()),
    st.just(library.swiglu()),
    st.just(library.geglu()),
    st.just(library.gelu()),
)


@given(program=TAGGED, lead=st.sampled_from(((1,), (3,), (2, 5), (2, 3, 2))), width=st.sampled_from((1, 3, 16, 33)),
       scale=st.sampled_from((1e-3, 1.0, 5.0)), seed=st.integers(0, 2**16))
def test_fast_forms_equal_the_evaluator_in_values_and_gradients(program, lead, width, scale, seed):
    assert program.builtin[0] in FAST_FORMS
    gen = torch.Generator().manual_seed(seed)
    shapes = {"row": (*lead, width), "vector": (width,), "scalar": lead}
    inputs = {i.name: torch.randn(shapes[i.kind], generator=gen, dtype=torch.float64) * scale for i in program.inputs}
    fast_in = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    ref_in = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    fast, ref = REFERENCE.row_program(program, fast_in), evaluate(program, ref_in)
    assert fast.keys() == ref.keys()
    cot = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in ref.items()}
    for n in ref:
        assert fast[n].dtype == ref[n].dtype == torch.float64
        torch.testing.assert_close(fast[n], ref[n], rtol=1e-12, atol=1e-12 * scale)
    torch.autograd.backward([fast[n] for n in cot], [cot[n] for n in cot])
    torch.autograd.backward([ref[n] for n in cot], [cot[n] for n in cot])
    for n in inputs:
        torch.testing.assert_close(fast_in[n].grad, ref_in[n].grad, rtol=1e-10, atol=1e-10,
                                   msg=lambda m, n=n: f"{program.name}: d_{n}: {m}")


def test_half_types_are_normed_in_fp32():
    x = torch.randn(4, 64).to(torch.bfloat16) * 100
    y = REFERENCE.rms_norm(x, 1e-6)
    want = torch.nn.functional.rms_norm(x.float(), (64,), eps=1e-6).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)


def test_a_program_without_a_fast_form_is_evaluated():
    program = library.rms_norm(offset=True)  # Gemma's (1 + w): not tagged
    assert program.builtin is None
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    out = REFERENCE.row_program(program, {"x": x, "w": w})
    assert torch.equal(out["y"], evaluate(program, {"x": x, "w": w})["y"])
