"""`validate` checks what a run would refuse (train:, data:, across sections), every problem at once and
located; `train` runs the same checks before it makes or locks a folder (runtime/artifacts/preflight.py)."""

import pytest

from hrmspec.cli import main
from hrmspec.spec.shipped import shipped_specs_dir

BAD = """extends: hrm-text-tiny
train:
  step: 20
  lr: fast
data:
  tasks: [basic_arithmetic, no_such_task]
"""


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_every_problem_is_reported_at_its_place(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    code, err = run(capsys, "validate", str(path), "--set", "train.keep=0")
    assert code == 2 and "4 problems:" in err
    assert f"{path}:3:3: train.step: unknown key (did you mean 'steps'?)" in err
    assert f"{path}:4:3: train.lr: expected a finite number > 0, found 'fast'" in err
    assert f"{path}:6:3: data.tasks: unknown reasoning-gym task 'no_such_task'" in err
    assert "--set train.keep: train.keep: expected an integer of at least 1" in err


@pytest.mark.parametrize("sets, where, text", [
    (["train.seq_len=4096"], "--set train.seq_len", "4096 is longer than model.max_seq_len"),
    (["model.vocab=100"], "--set model.vocab", "100 is below the"),
    (["data={source: jsonl, path: nowhere.jsonl}"], "--set data", "no such file"),
])
def test_checks_across_sections(sets, where, text, capsys):
    args = ["validate", "hrm-text-tiny"] + [a for s in sets for a in ("--set", s)]
    code, err = run(capsys, *args)
    assert code == 2 and where in err and text in err, err


@pytest.mark.parametrize("name", sorted(p.stem for p in shipped_specs_dir().glob("*.yaml")))
def test_every_shipped_spec_validates(name, capsys):
    code, err = run(capsys, "validate", name)
    assert code == 0, err


def test_a_refused_train_leaves_no_folder(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    out = tmp_path / "run"
    code, err = run(capsys, "train", str(path), "--out", str(out), "--no-progress")
    assert code == 2 and "train.step: unknown key" in err and "data.tasks" in err
    assert not out.exists()


@pytest.mark.parametrize("config", [".inf", "[1, 2]", "seven"])
def test_a_task_config_that_is_not_a_mapping_is_one_located_line(tmp_path, capsys, config):
    path = tmp_path / "s.yaml"
    path.write_text("extends: transformer\ndata:\n  source: reasoning_gym\n  tasks:\n    spell_backward:\n"
                    f"      config: {config}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "s.yaml:6:7: data.tasks.spell_backward.config: expected a mapping" in err and "Traceback" not in err
