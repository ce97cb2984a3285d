"""The statement grammar: `state = Module(a + b + ...)`, parsed over `ast` with a whitelist."""

from __future__ import annotations

import keyword

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hrmspec.errors import Location, SpecError
from hrmspec.spec import INPUT, Statement, parse_statement
from hrmspec.spec.grammar import name_columns

LOC = Location("s.yaml", 7, 12)  # where the statement's text starts in the file


@pytest.mark.parametrize(
    "text, target, module, inputs",
    [
        ("z_L = L(z_L + z_H)", "z_L", "L", ("z_L", "z_H")),
        ("z_H = H(z_H + z_L)", "z_H", "H", ("z_H", "z_L")),
        ("h = T(h)", "h", "T", ("h",)),
        ("z_L = L(z_L + z_H + x)", "z_L", "L", ("z_L", "z_H", "x")),
        ("y = net(x)", "y", "net", ("x",)),
        ("z=L(z+x)", "z", "L", ("z", "x")),
        ("   z_L   =   L(  z_L+z_H  )   ", "z_L", "L", ("z_L", "z_H")),
        ("z_L\t=\tL(z_L\t+\tz_H)", "z_L", "L", ("z_L", "z_H")),
        ("z_L = L((z_L + z_H) + x)", "z_L", "L", ("z_L", "z_H", "x")),
        ("z_L = L(z_L + (z_H + x))", "z_L", "L", ("z_L", "z_H", "x")),
        ("z = L(((z)))", "z", "L", ("z",)),
        ("z_L = L(z_L + z_H,)", "z_L", "L", ("z_L", "z_H")),  # a trailing comma is still one argument
        ("state_2 = Module_1(a + b + c + d + e)", "state_2", "Module_1", ("a", "b", "c", "d", "e")),
        ("ζ = Λ(ζ + ω)", "ζ", "Λ", ("ζ", "ω")),
    ],
)
def test_valid_statements(text, target, module, inputs):
    st_ = parse_statement(text, LOC, "model.schedule[0]")
    assert (st_.target, st_.module, st_.inputs) == (target, module, inputs)
    assert st_.text == text and st_.loc == LOC and st_.path == "model.schedule[0]"
    assert str(st_) == f"{target} = {module}({' + '.join(inputs)})"


def test_x_is_the_input():
    assert INPUT == "x"
    assert parse_statement("z_L = L(z_L + x)", LOC).inputs == ("z_L", "x")


def test_equality_is_by_meaning():
    a = parse_statement("z_L = L(z_L + z_H)", LOC)
    b = parse_statement("z_L=L(z_L+z_H)", Location("other.yaml", 1, 1))
    assert a == b and hash(a) == hash(b)
    assert a != parse_statement("z_L = L(z_H + z_L)", LOC)  # the order of a sum is kept


def test_statements_are_frozen():
    s = parse_statement("z_L = L(z_L)", LOC)
    with pytest.raises(AttributeError):
        s.target = "z_H"  # type: ignore[misc]


def test_name_columns():
    s = parse_statement("z_L = L(z_L + z_H + x)", LOC)
    cols = name_columns(s)
    assert {k: v.col for k, v in cols.items()} == {"z_L": 12, "L": 18, "z_H": 26, "x": 32}
    assert [loc.col for loc in s.name_locs] == [12, 18, 20, 26, 32]
    assert all(loc.line == 7 and loc.file == "s.yaml" for loc in s.name_locs)


def test_leading_whitespace_moves_columns():
    s = parse_statement("   z_L = L(z_L)", LOC)
    assert s.name_locs[0].col == 15


def test_non_ascii_columns_count_characters():
    with pytest.raises(SpecError) as info:
        parse_statement("ζ = Λ(ω + ω)", LOC)
    assert info.value.loc.col == 12 + len("ζ = Λ(ω + ")


# (text, message fragment, 0-based column in the text, hint fragment)
REJECTED = [
    ("z_L = L(z_L * z_H)", "expected '+' between states, found '*'", 12, "addition only"),
    ("z_L = L(z_L - z_H)", "found '-'", 12, None),
    ("z_L = L(z_L + z_H @ x)", "found '@'", 18, None),
    ("z_L = L(z_L ** 2)", "found '**'", 12, None),
    ("z_L = L((z_L + z_H) * x)", "found '*'", 20, None),
    ("z_L = L(z_L, z_H)", "expected one input expression in L(...), found 2 arguments", 13, "sum the inputs"),
    ("z_L = L()", "found 0 arguments", 6, None),
    ("z_L = L(z_L, gate=z_H)", "found the keyword argument 'gate='", 13, None),
    ("z_L = L(**kw)", "found the keyword argument '**'", 8, None),
    ("z_L = L(cat(z_L))", "expected at least two states in cat(...), found 1", 8, "a single input needs no injection"),
    ("z_L = L(cat(z_L, z_H + x))", "expected a state name in cat(...), found 'z_H + x'", 17, None),
    ("z_L = L(cat(z_L, z_H, z_L))", "expected each name once in a sum, found 'z_L' twice", 22, None),
    ("z_L = L(z_L + cat(z_H, x))", "expected cat(...) as the whole input of a call", 14, "L(cat(z_L, z_H, x))"),
    ("z_L = L(z_L + z_H + z_L)", "expected each name once in a sum, found 'z_L' twice", 20, None),
    ("z_L = L(x + x)", "found 'x' twice", 12, None),
    ("z_L = L(z_L + 1)", "expected a state name or a sum of states, found '1'", 14, None),
    ("z_L = L(z_L.detach())", "found 'z_L.detach()'", 8, None),
    ("z_L = L(z_L[0])", "found 'z_L[0]'", 8, None),
    ("z_L = L(f(z_L))", "found 'f(z_L)'", 8, None),
    ("z_L = L(*zs)", "found '*zs'", 8, None),
    ("x = L(z_L)", "cannot assign to 'x': it is the input embedding", 0, "assign to a state"),
    ("z_L = z_L + z_H", "expected a module call on the right of '=', found 'z_L + z_H'", 6, None),
    ("z_L = L.f(z_L)", "expected a module call on the right of '='", 6, None),
    ("z_L = 3", "expected a module call", 6, None),
    ("z_L, z_H = L(z_L)", "expected one state name on the left of '=', found '(z_L, z_H)'", 0, None),
    ("z_L = z_H = L(z_L)", "expected one state name on the left of '=', found 'z_H'", 6, None),
    ("s.a = L(z_L)", "expected one state name on the left of '='", 0, None),
    ("L(z_L + z_H)", "expected an assignment 'state = Module(inputs)', found 'L(z_L + z_H)'", 0, None),
    ("z_L += L(z_L)", "expected an assignment", 0, None),
    ("z_L: int = L(z_L)", "expected an assignment", 0, None),
    ("import os", "expected an assignment", 0, None),
    ("z_L = L(z_L); z_H = H(z_H)", "expected one statement, found 2", 14, "one statement per list item"),
    ("z_L = L(z_L + )", "cannot parse the statement 'z_L = L(z_L + )'", 14, None),
    ("z_L = L(z_L", "cannot parse the statement", None, None),
    ("z_L == L(z_L)", "expected an assignment", 0, None),
    ("z L = L(z_L)", "cannot parse the statement", None, None),
]


@pytest.mark.parametrize("text, message, col, hint", REJECTED)
def test_rejected_statements(text, message, col, hint):
    with pytest.raises(SpecError) as info:
        parse_statement(text, LOC, "model.schedule[3]")
    e = info.value
    assert message in e.message, str(e)
    assert e.path == "model.schedule[3]" and e.loc.file == "s.yaml" and e.loc.line == 7
    if col is not None:
        assert e.loc.col == LOC.col + col, str(e)
    if hint is not None:
        assert hint in e.hint


@pytest.mark.parametrize(
    "value, shown", [(42, "42"), (None, "None"), ([1], "a list"), ({"a": 1}, "a mapping")]
)
def test_a_statement_must_be_a_string(value, shown):
    with pytest.raises(SpecError, match=f"expected a statement string .*, found {shown}"):
        parse_statement(value, LOC)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_statement(text):
    with pytest.raises(SpecError, match="found an empty string"):
        parse_statement(text, LOC)


def test_a_location_without_a_line_is_kept():
    where = Location("--set model.schedule")
    with pytest.raises(SpecError) as info:
        parse_statement("z_L = L(z_L * z_H)", where)
    assert info.value.loc == where


def test_very_long_sums():
    names = [f"s{i}" for i in range(500)]
    assert parse_statement(f"z = L({' + '.join(names)})", LOC).inputs == tuple(names)
    with pytest.raises(SpecError, match="nested too deeply or too long"):
        parse_statement("z = L(" + " + ".join(f"s{i}" for i in range(20000)) + ")", LOC)


# ---------------------------------------------------------------------- properties

identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True).filter(
    lambda s: not keyword.iskeyword(s) and s not in ("cat",)
)
spaces = st.sampled_from(["", " ", "  ", "\t"])


@settings(max_examples=80, deadline=None)
@given(
    target=identifiers.filter(lambda s: s != INPUT),
    module=identifiers,
    names=st.lists(identifiers, min_size=1, max_size=8, unique=True),
    gaps=st.lists(spaces, min_size=20, max_size=20),
)
def test_random_sums_parse_to_the_same_names_in_order(target, module, names, gaps):
    text, cols = f"{target}{gaps[0]}={gaps[1]}{module}({gaps[2]}", []
    for i, name in enumerate(names):
        if i:
            text += f"{gaps[3 + i]}+{gaps[12 + i]}"
        cols.append(len(text))
        text += name
    text += f"{gaps[19]})"
    s = parse_statement(text, LOC)
    assert (s.target, s.module, s.inputs) == (target, module, tuple(names))
    assert [loc.col - LOC.col for loc in s.name_locs[2:]] == cols
    assert parse_statement(str(s), LOC) == s


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_text_parses_or_raises_a_spec_error(text):
    try:
        s = parse_statement(text, LOC)
    except SpecError as e:
        assert e.loc.line == LOC.line and e.loc.col >= LOC.col
        return
    assert isinstance(s, Statement) and s.inputs and len(set(s.inputs)) == len(s.inputs)
