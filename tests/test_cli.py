"""The command line: exit codes, one-line errors without tracebacks, and the reports."""

import subprocess
import sys

import pytest

from hrmspec.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "hrmspec", *args], capture_output=True, text=True, timeout=300)


def test_show_reports_exact_1b_parameter_count(capsys):
    assert main(["show", "specs/hrm-text-1b.yaml"]) == 0
    out = capsys.readouterr().out
    assert "1,182,793,728" in out
    assert "z_H = H(z_H + z_L)" in out


def test_validate_ok(capsys):
    assert main(["validate", "specs/hrm-text-tiny.yaml"]) == 0
    assert "ok" in capsys.readouterr().out


def test_bad_spec_exits_2_with_location_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  vocab: 10\n  d_model: 8\n  heads: 2\n  ffn: 8\n  modules: {L: {layrs: 1}}\n")
    r = run("validate", str(bad))
    assert r.returncode == 2
    assert f"{bad}:6:" in r.stderr
    assert "layers" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_file_exits_2():
    r = run("show", "no/such/spec.yaml")
    assert r.returncode == 2 and "spec file not found" in r.stderr and "Traceback" not in r.stderr


def test_set_override_applies(capsys):
    assert main(["show", "specs/hrm-text-tiny.yaml", "--set", "model.vocab=1000", "--seq-len", "64"]) == 0
    assert "128,000" in capsys.readouterr().out  # the embedding: 1000 x 128


def test_bad_override_exits_2(capsys):
    assert main(["validate", "specs/hrm-text-tiny.yaml", "--set", "model.d_model=seven"]) == 2
    err = capsys.readouterr().err
    assert "--set model.d_model" in err and "expected a positive integer" in err


def test_compile_emit_writes_graph(tmp_path, capsys):
    assert main(["compile", "specs/hrm-text-tiny.yaml", "--emit", str(tmp_path)]) == 0
    assert (tmp_path / "graph.json").stat().st_size > 100
    assert "model" in (tmp_path / "spec.yaml").read_text()


COMMANDS = ["validate", "show", "compile", "check", "import-hf", "export-hf", "import-hrm", "export-hrm", "train",
            "eval", "generate", "plot", "cost", "compare"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
