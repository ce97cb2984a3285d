"""The mistakes of a researcher's first hour, and the variants they write.

A corpus of mistaken specs (each row: the text, the message fragment it must give, and where), then
`extends:` and `--set` as a variant is written: a one-of form replaced rather than merged, `null`
removing a key, list indices in `--set`. Last, grid tasks written as a list.
"""

from __future__ import annotations

import pytest

from hrmspec.errors import SpecError, close_match
from hrmspec.runtime.artifacts.data import DataError
from hrmspec.runtime.artifacts.grids import GridConfig
from hrmspec.spec import load_spec, load_spec_text, parse_override
from hrmspec.spec.schema import CreditSpec

FILE = "mine.yaml"

BASE = """\
name: t
model:
  vocab: 512
  d_model: 32
  heads: 4
  ffn: 64
  modules:
    L: {layers: 1}
    H: {layers: 1}
  states:
    z_H: {init: embed}
    z_L: {init: buffer}
  schedule:
    - repeat: 2
      do:
        - "z_L = L(z_L + z_H)"
        - "z_H = H(z_H + z_L)"
  output: z_H
"""

SCHEDULE = """\
  schedule:
    - repeat: 2
      do:
        - "z_L = L(z_L + z_H)"
        - "z_H = H(z_H + z_L)"
"""


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, f"{old!r} must occur once"
    return text.replace(old, new)


def do_at(column: int) -> str:
    """BASE with the repeat block's `do:` (line 15) starting at `column`."""
    return edit("      do:\n", " " * (column - 1) + "do:\n")


def top_level_schedule() -> str:
    """BASE with the schedule written at column 1, after model's last key (it starts on line 14)."""
    return edit(SCHEDULE, "") + "".join(line[2:] + "\n" for line in SCHEDULE.splitlines())


def states_under_modules() -> str:
    return edit("  states:\n    z_H: {init: embed}\n    z_L: {init: buffer}\n",
                "    states:\n      z_H: {init: embed}\n      z_L: {init: buffer}\n")


def mistake(id, text, fragment, line, col, hint=None):
    return pytest.param(text, fragment, line, col, hint, id=id)


# fmt: off
MISTAKES = [
    mistake("case-of-a-state", edit('"z_H = H(z_H + z_L)"', '"z_H = H(z_h + z_L)"'), "unknown state 'z_h'",
            17, 20, "did you mean 'z_H'?"),
    mistake("case-of-a-module", edit('"z_H = H(z_H + z_L)"', '"z_H = h(z_H + z_L)"'), "unknown module 'h'",
            17, 18, "did you mean 'H'?"),
    mistake("zero-layers", edit("L: {layers: 1}", "L: {layers: 0}"), "expected a positive integer, found 0",
            8, 17, "write its exit_norm"),
    mistake("do-at-the-dash", do_at(5), "`do:` at column 5 is outside the list item at line 14", 15, 5,
            "indent it to column 7, beside `repeat:`"),
    mistake("do-between-dash-and-key", do_at(6), "`do:` at column 6 is outside the list item at line 14", 15, 6,
            "indent it to column 7"),
    mistake("do-left-of-the-list", do_at(4), "`do:` at column 4 is outside the list item", 15, 4,
            "indent it to column 7"),
    mistake("do-beside-schedule", do_at(3), "`do:` was found under `model:` (line 15); it belongs under the list "
            "item `model.schedule[0]`", 15, 3, "indent it (and what it holds) to column 7, beside `repeat:`"),
    mistake("do-under-the-count", do_at(8), "mapping values are not allowed here", 15, 10,
            "`do:` at column 8 is indented under `repeat: 2` (line 14), a value that cannot hold keys"),
    mistake("do-at-column-1", do_at(1), "`do:` at column 1 closes the mapping it follows", 15, 1,
            "indent `do:`"),
    mistake("schedule-at-the-top-level", top_level_schedule(), "`schedule:` was found at the top level (line 14); "
            "it belongs under `model:`", 14, 1, "to column 3"),
    mistake("vocab-at-the-top-level", edit("  vocab: 512\n", "") + "vocab: 512\n",
            "`vocab:` was found at the top level (line 18); it belongs under `model:`", 18, 1, None),
    mistake("states-under-modules", states_under_modules(), "`states:` is indented under `modules:`; it belongs "
            "beside it under `model:`", 10, 5, "to the column of `modules:` (3)"),
]
# fmt: on


@pytest.mark.parametrize("text, fragment, line, col, hint", MISTAKES)
def test_a_first_hour_mistake_is_named_where_it_was_made(text, fragment, line, col, hint):
    with pytest.raises(SpecError) as info:
        load_spec_text(text, FILE)
    e = info.value
    assert fragment in e.message
    assert (e.loc.file, e.loc.line, e.loc.col) == (FILE, line, col)
    if hint is not None:
        assert hint in e.hint
    assert "\n" not in e.message and "Traceback" not in str(e)


HALTING = BASE + "  halting: {type: exit_gate, threshold: 0.5, weight: 0.1}\n"


@pytest.mark.parametrize("key, fragment, hint", [
    ("prior", "'prior' is a parameter of ponder, not of exit_gate", "exit_gate takes threshold, weight"),
    ("prio", "unknown key 'prio'", "did you mean 'prior'? (a parameter of ponder)"),
    ("priorr", "unknown key 'priorr'", "did you mean 'prior'? (a parameter of ponder)"),
    ("weigth", "unknown key 'weigth'", "did you mean 'weight'?"),
])
def test_a_halting_hint_comes_from_the_halting_rules(key, fragment, hint):
    with pytest.raises(SpecError) as info:
        load_spec_text(HALTING, FILE, {f"model.halting.{key}": 0.2})
    e = info.value
    assert fragment in e.message and hint in e.hint and "priority" not in e.hint
    assert e.loc.file == f"--set model.halting.{key}"


def test_suggestions_prefer_a_name_that_differs_only_in_case():
    assert close_match("z_h", ["z_L", "z_H"]) == "did you mean 'z_H'?"
    assert close_match("D_MODEL", ["d_model", "heads"]) == "did you mean 'd_model'?"
    assert close_match("z_Q", ["z_L", "z_H"]) == "did you mean 'z_L'?"  # no case match: difflib decides
    assert close_match("x", ["z_L"]) == ""


def test_a_module_of_no_layers_is_a_norm_written_beside_it():
    text = edit("L: {layers: 1}", "L: {layers: 0, exit_norm: {type: rms, affine: true}}")
    (L,) = [m for m in load_spec_text(text, FILE).model.modules if m.name == "L"]
    assert L.layers == 0 and L.exit_norm.affine


# ---------------------------------------------------------------------- extends: one-of forms and null


def write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


def test_an_extending_file_switches_the_credit_rule(tmp_path):
    child = write(tmp_path, "c.yaml", "name: c\nextends: hrm-text-tiny\nmodel:\n  credit: {per_cycle: {L: [0, 1]}}\n")
    spec = load_spec(child)
    assert spec.model.credit.mode == "per_cycle" and spec.model.credit.per_cycle == (("L", (0, 1)),)
    assert spec.raw["model"]["credit"] == {"per_cycle": {"L": [0, 1]}}  # the base's depth and priority went


def test_depth_over_depth_still_merges_key_by_key(tmp_path):
    base = load_spec("hrm-text-tiny").model.credit
    child = write(tmp_path, "c.yaml", "extends: hrm-text-tiny\nmodel:\n  credit: {depth: {to: 6}}\n")
    credit = load_spec(child).model.credit
    assert credit.mode == "depth" and credit.depth_to == 6
    assert (credit.depth_from, credit.priority) == (base.depth_from, base.priority)


def test_null_removes_a_key_of_the_base(tmp_path):
    child = write(tmp_path, "c.yaml", "extends: hrm-text-tiny\nmodel:\n  credit:\n    depth: null\n    last: 2\n")
    assert load_spec(child).model.credit == CreditSpec(mode="last", last=2)
    child.write_text("extends: hrm-text-tiny\nmodel:\n  credit: null\n")
    assert load_spec(child).model.credit.mode == "none" and "credit" not in load_spec(child).raw["model"]


def test_null_keeps_its_meaning_where_it_is_a_value(tmp_path):
    child = write(tmp_path, "c.yaml", "extends: hrm-text-tiny\nmodel:\n  block: {attention: {rope_theta: null}}\n"
                  "train: {ema: null}\n")
    spec = load_spec(child)
    assert spec.model.block.attention.rope_theta is None and spec.train["ema"] is None
    assert load_spec("hrm-text-tiny").model.block.attention.rope_theta is not None


def test_a_new_halting_type_replaces_the_rule(tmp_path):
    ouro = load_spec("ouro")
    assert ouro.model.halting.type == "exit_gate"
    child = write(tmp_path, "c.yaml", "extends: ouro\nmodel:\n  halting: {type: ponder}\n")
    spec = load_spec(child)
    assert spec.model.halting.type == "ponder" and spec.raw["model"]["halting"] == {"type": "ponder"}
    child.write_text("extends: ouro\nmodel:\n  halting: {threshold: 0.7}\n")  # the same rule: merged
    halting = load_spec(child).model.halting
    assert (halting.type, halting.threshold) == ("exit_gate", 0.7)


# ---------------------------------------------------------------------- --set: indices, one-of forms, null


def sets(*texts: str) -> dict:
    return dict(parse_override(t) for t in texts)


def test_set_indexes_the_schedule():
    tiny = load_spec("hrm-text-tiny")
    spec = load_spec("hrm-text-tiny", sets("model.schedule[0].repeat=3", "model.schedule[0].do[0].repeat=2"))
    outer = spec.model.schedule[0]
    assert outer.count == 3 and outer.body[0].count == 2
    assert outer.body[1:] == tiny.model.schedule[0].body[1:]
    assert load_spec("hrm-text-tiny", sets("model.schedule[-1].repeat=5")).model.schedule[0].count == 5


def test_set_switches_the_credit_rule_and_null_removes():
    spec = load_spec("hrm-text-tiny", sets("model.credit.per_cycle={L: [0], H: [1]}", "model.credit.depth=null"))
    assert spec.model.credit.mode == "per_cycle" and spec.raw["model"]["credit"] == {"per_cycle": {"L": [0], "H": [1]}}
    assert load_spec("hrm-text-tiny", sets("model.credit=null")).model.credit.mode == "none"


def test_set_switches_a_sampled_count_and_back():
    spec = load_spec("huginn-tiny")
    (i, loop), = [(i, x) for i, x in enumerate(spec.model.schedule) if getattr(x, "sample", None) is not None]
    uniform = load_spec("huginn-tiny", sets(f"model.schedule[{i}].repeat.sample=uniform",
                                            f"model.schedule[{i}].repeat.high=6"))
    assert uniform.model.schedule[i].sample.kind == "uniform" and uniform.model.schedule[i].sample.high == 6
    fixed = load_spec("huginn-tiny", sets(f"model.schedule[{i}].repeat=4"))
    assert fixed.model.schedule[i].sample is None and fixed.model.schedule[i].count == 4


@pytest.mark.parametrize("text, fragment", [
    ("model.schedule[3].repeat=3", "index 3 is out of range: 'model.schedule' has 1 item"),
    ("model.credit[0]=1", "cannot index 'model.credit': it is not a list (found a mapping)"),
    ("model.nothing[0]=1", "cannot index 'model.nothing': there is no such list"),
    ("model.vocab.size=1", "'model.vocab' is not a mapping"),
    ("model.schedule[0].do[0].repeat=many", "expected a positive integer, found 'many'"),
])
def test_a_bad_set_is_one_line_naming_the_option(text, fragment):
    with pytest.raises(SpecError) as info:
        load_spec("hrm-text-tiny", sets(text))
    e = info.value
    assert fragment in e.message and "\n" not in e.message
    assert e.loc.file == "--set " + text.partition("=")[0]


@pytest.mark.parametrize("key", ["model.schedule[x].repeat", "model.schedule[0", "[0].model", "model..vocab"])
def test_a_malformed_set_key_is_refused(key):
    with pytest.raises(SpecError, match="bad override key"):
        load_spec("hrm-text-tiny", {key: 1})


# ---------------------------------------------------------------------- grid tasks as a list


def test_grid_tasks_in_list_form_read_like_the_mapping_form():
    listed = GridConfig.from_dict({"grids": [{"maze": {"config": {"max_grid_size": 6}}}]})
    mapped = GridConfig.from_dict({"grids": {"maze": {"config": {"max_grid_size": 6}}}})
    assert listed.tasks() == mapped.tasks() == {"maze": {"max_grid_size": 6}} and listed.side == 6
    assert GridConfig.from_dict({"grids": ["mini_sudoku"]}).tasks() == {"mini_sudoku": {}}
    assert GridConfig.from_dict({"grids": "mini_sudoku"}).tasks() == {"mini_sudoku": {}}


@pytest.mark.parametrize("grids, fragment", [
    ([{"maze": {}, "sudoku": {}}], "data.grids[0]: expected a task name or a one-key mapping"),
    ([3], "data.grids[0]: expected a task name or a one-key mapping"),
    ([{"maze": 6}], "data.grids.maze: expected a mapping {config: {...}}"),
    ([{"maze": {"config": [6]}}], "data.grids.maze.config: expected a mapping"),
    (["maze", {"maze": {}}], "grid task 'maze' is listed twice"),
    (5, "data.grids: expected a list of grid tasks or a mapping"),
])
def test_a_grid_list_of_the_wrong_shape_is_one_line(grids, fragment):
    with pytest.raises(DataError) as info:
        GridConfig.from_dict({"grids": grids})
    assert fragment in str(info.value) and "\n" not in str(info.value)
