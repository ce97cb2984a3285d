"""docs/first-variant.md stays true: its spec is written out, and every `hrmspec` command of its bash blocks
runs (at a tiny size: narrower, a couple of steps, a small data set) and succeeds; the validation error it
quotes is the one the loader gives."""

import shlex
from pathlib import Path

import pytest

from hrmspec.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "first-variant.md"
TINY = ["--set", "model.d_model=32", "--set", "model.heads=2", "--set", "model.ffn=64", "--set", "train.steps=2",
        "--set", "train.batch_size=4", "--set", "train.eval_n=4", "--set", "data.size=64", "--set",
        "data.eval_size=8", "--set", "train.log_every=1", "--set", "train.save_every=2", "--set",
        "train.max_new_tokens=4", "--set", "train.threads=1"]


def blocks(kind: str) -> list[str]:
    """The text of each fenced block of the doc whose info string is `kind` ('' for a bare fence)."""
    found, current, info = [], None, None
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == kind:
                    found.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return found


def spec_text() -> tuple[str, str]:
    (text,) = [b for b in blocks("yaml") if b.startswith("# ")]
    name = text.splitlines()[0][2:].strip()
    return name, text


def commands() -> list[list[str]]:
    return [shlex.split(line) for block in blocks("bash") for line in block.splitlines() if line.startswith("hrmspec ")]


def tiny(args: list[str]) -> list[str]:
    """The command at test size: train and compare shrunk, a budget of one step, eval on a few samples."""
    args = list(args)
    if args[0] in ("train", "compare"):
        args += TINY
    if "--budget" in args:
        args[args.index("--budget") + 1] = "steps=1"
        args += ["--n", "2", "--evals", "0", "--no-progress"]
    if args[0] == "eval":
        args += ["--n", "4"]
    return args


def test_the_walkthrough_spec_and_commands_are_there():
    name, text = spec_text()
    assert name == "three-level.yaml" and "extends: hrm-text-tiny" in text
    verbs = [c[1] for c in commands()]
    for verb in ("validate", "show", "train", "eval", "plot", "compare"):
        assert verb in verbs, verb


def test_the_quoted_validation_error_is_what_the_loader_says(tmp_path, monkeypatch, capsys):
    name, text = spec_text()
    monkeypatch.chdir(tmp_path)
    Path(name).write_text(text.replace("from: 3, to: 6", "from: 2, to: 6"))
    assert main(["validate", name]) == 2
    err = capsys.readouterr().err.removeprefix("hrmspec: error: ").strip()
    quoted = next(b for b in blocks("") if "model.credit.depth.from" in b).strip()
    assert err == quoted


def test_every_command_of_the_walkthrough_runs(tmp_path, monkeypatch, capsys):
    name, text = spec_text()
    monkeypatch.chdir(tmp_path)
    Path(name).write_text(text)
    for args in commands():
        assert args[0] == "hrmspec"
        code = main(tiny(args[1:]))
        out, err = capsys.readouterr()
        assert code == 0, (args, err)
        if args[1] == "validate":
            assert out.strip() == f"{name}: ok (three-level)"
    assert (tmp_path / "three-level.png").stat().st_size > 0
    assert (tmp_path / "runs/three-level/eval-full.json").is_file()
    assert (tmp_path / "runs/three-level/readout.json").is_file()
    assert (tmp_path / "runs/three-level/readout.png").is_file()
    assert (tmp_path / "runs/h-cycles/compare.json").is_file()


@pytest.mark.parametrize("line", [c for c in commands() if c[1] in ("train", "compare")])
def test_the_full_size_commands_validate(line, tmp_path, monkeypatch):
    """Not trained at full size here, but the values the doc gives are accepted as written."""
    from hrmspec.runtime.artifacts.preflight import check
    from hrmspec.spec import load_spec, parse_override

    name, text = spec_text()
    monkeypatch.chdir(tmp_path)
    Path(name).write_text(text)
    args = line[2:]
    overrides = dict(parse_override(args[i + 1]) for i, a in enumerate(args) if a == "--set")
    for spec in [a for a in args if not a.startswith("-") and (a.endswith(".yaml") or a == "hrm-text-tiny")]:
        check(load_spec(spec, overrides or None), run=True)
