"""Hostile and clumsy specs: each is one line on stderr and exit 2 — never a traceback, a hang or
a whole file echoed back. A few hundred bytes must not eat the machine."""


import pytest

from hrmspec.cli import main

MODEL = """model:
  vocab: 64
  d_model: 32
  heads: 4
  ffn: 64
  modules: {L: {layers: LAYERS}}
  states: {z: {init: embed}}
  schedule: [SCHEDULE]
"""


def spec_text(layers="1", schedule='"z = L(z)"'):
    return MODEL.replace("LAYERS", layers).replace("SCHEDULE", schedule)


def alias_bomb() -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n" + spec_text()


def nested_repeats(depth: int) -> str:
    sched = '"z = L(z)"'
    for _ in range(depth):
        sched = f"{{repeat: 1, do: [{sched}]}}"
    return spec_text(schedule=sched)


CASES = {
    "alias-bomb": (alias_bomb(), "more than 20,000 values"),
    "repeat-1e9": (spec_text(schedule='{repeat: 1000000000, do: ["z = L(z)"]}'), "expected at most 4,096"),
    "unrolled-calls": (spec_text(schedule='{repeat: 4000, do: [{repeat: 4000, do: ["z = L(z)"]}]}'),
                       "unrolls to 16,000,000 module calls"),
    "layers-1e6": (spec_text(layers="1000000"), "expected at most 1,024, found 1,000,000"),
    "nested-repeats": (nested_repeats(300), "nested more than 40 levels"),
    "nul": (spec_text() + "name: a\x00b\n", "invalid YAML"),
    "bell": ("name: \x07\n" + spec_text(), "invalid YAML"),
    "escape": ("name: \x1b[31mred\n" + spec_text(), "invalid YAML"),
    "huge-int": (spec_text().replace("vocab: 64", "vocab: " + "9" * 4000),
                 "expected at most 16,777,216, found an integer of 4000 digits"),
    "surrogate-name": ('name: "\\ud800"\n' + spec_text(), "expected a printable name"),
    "escape-name": ('name: "\\e[31mred"\n' + spec_text(), "expected a printable name"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["validate", "show"])
def test_a_hostile_spec_is_one_line_and_exit_2(case, command, tmp_path, capsys, deadline):
    text, expected = CASES[case]
    path = tmp_path / "hostile.yaml"
    path.write_text(text, encoding="utf-8")
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("hrmspec: error: ") and expected in lines[0], err
    assert len(lines) <= 2 and "Traceback" not in err  # the error, and at most its hint
    assert "\x1b" not in err and "\x07" not in err and "\x00" not in err


def test_extends_of_a_foreign_file_quotes_at_most_a_short_excerpt(tmp_path, capsys, deadline):
    secret = tmp_path / "secrets.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n" + "line of the file\n" * 200)
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {secret}\n")
    assert main(["validate", str(child)]) == 2
    err = capsys.readouterr().err
    assert "line of the file" not in err and len(err) < 600 and "Traceback" not in err
