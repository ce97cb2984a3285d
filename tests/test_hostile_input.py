"""Hostile and clumsy input beyond specs: data lines, shard paths, command-line values, a damaged
metrics file, rows longer than the model. Each is one clear error (or a counted skip), no traceback."""

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hrmspec.cli import main
from hrmspec.errors import CheckpointError
from hrmspec.runtime.artifacts.data import MAX_LINE_BYTES, DataError, read_jsonl
from hrmspec.runtime.artifacts.plot import metric_records

GOOD = json.dumps({"instruction": "say hi", "response": "hi"}) + "\n"
BAD_LINES = {
    "long": (json.dumps({"instruction": "x" * (MAX_LINE_BYTES + 10), "response": "y"}) + "\n").encode(),
    "not-utf8": b'{"instruction": "caf\xe9", "response": "y"}\n',
    "deep": ("[" * 100_000 + "]" * 100_000 + "\n").encode(),
}
MESSAGES = {"long": "bytes; a sample is at most", "not-utf8": "not UTF-8 text (byte 0xe9", "deep": "nested too deeply"}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_a_bad_jsonl_line_names_its_line_or_is_skipped_and_counted(kind, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD.encode() + BAD_LINES[kind] + GOOD.encode())
    with pytest.raises(DataError, match=rf"data.jsonl:2: .*{re.escape(MESSAGES[kind])}"):
        read_jsonl(path)
    samples, stats = read_jsonl(path, skip_bad=True)
    assert len(samples) == 2 and stats.bad == 1


def test_a_shard_index_cannot_point_outside_its_folder(tmp_path):
    from hrmspec.runtime.interop.convert import _read_hf_weights

    (tmp_path / "hf").mkdir()
    for shard in ("../elsewhere.safetensors", "/etc/passwd"):
        (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
        with pytest.raises(CheckpointError, match="is not a file of .*never other folders"):
            _read_hf_weights(tmp_path / "hf")


@pytest.mark.parametrize("flag, value", [("--top-k", "0"), ("--temperature", "nan"), ("--temperature", "-1"),
                                         ("--max-new-tokens", "0")])
def test_bad_generation_values_are_refused_before_anything_runs(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tmp_path), "a prompt", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: expected" in err and "Traceback" not in err


def test_a_metrics_file_cut_mid_line_reads_up_to_it_and_a_broken_middle_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in metric_records(path)] == [1, 2]
    path.write_text('{"step": 1, "loss": 2.0}\n{"ste\n{"step": 3, "loss": 1.0}\n')
    from hrmspec.errors import HrmspecError

    with pytest.raises(HrmspecError, match="metrics.jsonl:2: not a JSON record"):
        metric_records(path)


MODEL = """model:
  vocab: 320
  d_model: 32
  heads: 2
  ffn: 64
  max_seq_len: MAX
  modules: {L: {layers: 1}}
  states: {z: {init: embed}}
  schedule: ["z = L(z)"]
"""


def test_rows_longer_than_the_model_are_refused_before_training(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(MODEL.replace("MAX", "64") + """\
data: {source: reasoning_gym, tasks: [basic_arithmetic], size: 20, eval_size: 4}
train: {steps: 1, batch_size: 2, seq_len: 96}
""")
    assert main(["train", str(spec), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train.seq_len: 96 is longer than model.max_seq_len 64" in err and "Traceback" not in err


def test_a_held_out_set_the_config_cannot_give_fails_before_the_first_step(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(MODEL.replace("MAX", "96") + """\
data:
  source: reasoning_gym
  tasks: {basic_arithmetic: {config: {min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1,
                                      operators: ["+"], allow_parentheses: false, allow_negation: false,
                                      whitespace: single, format_style: simple}}}
  size: 1500
  eval_size: 50
train: {steps: 50, batch_size: 2, seq_len: 96, eval_every: 25}
""")
    run = tmp_path / "run"
    assert main(["train", str(spec), "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the held-out set: reasoning-gym task 'basic_arithmetic': found only" in err and "Traceback" not in err
    assert not (run / "checkpoints").exists()  # refused before training, not after it


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(
    st.binary(max_size=64),
    st.just(GOOD.encode()),
    st.builds(lambda k, v: json.dumps({k: v}).encode(), st.text(max_size=12), st.text(max_size=12)),
    st.builds(lambda d: ("[" * d + "]" * d).encode(), st.integers(1, 5000)),
    st.dictionaries(st.sampled_from(["instruction", "response", "condition", "other"]),
                    st.one_of(st.text(max_size=8), st.integers(), st.none(), st.lists(st.integers(), max_size=2)),
                    max_size=4).map(lambda d: json.dumps(d).encode()),
), min_size=1, max_size=8))
def test_any_jsonl_reads_or_names_one_line_and_skip_bad_always_reads(lines, tmp_path):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    try:
        samples, stats = read_jsonl(path)
    except DataError as e:
        assert re.match(r".*fuzz\.jsonl:\d+: ", str(e)) and "\n" not in str(e)
    else:
        assert stats.bad == 0 and len(samples) + stats.empty == stats.read
    samples, stats = read_jsonl(path, skip_bad=True)
    assert len(samples) + stats.empty + stats.bad == stats.read


def test_a_model_larger_than_the_machine_is_refused_before_allocating(monkeypatch, tmp_path, capsys):
    import importlib

    import hrmspec

    compile_module = importlib.import_module("hrmspec.compile")  # the module: hrmspec.compile is the function

    monkeypatch.setattr(compile_module, "available_bytes", lambda: 64 * 2**20)  # a 64 MiB machine
    with pytest.raises(compile_module.MemoryLimitError, match=r"fp32 weights of hrm-text-1b need 4\.4 GiB but "
                                                              r"this machine has 0\.1 GiB available"):
        hrmspec.compile("hrm-text-1b")
    assert main(["train", "hrm-text-tiny", "--out", str(tmp_path / "run"), "--set", "model.d_model=1024"]) == 2
    err = capsys.readouterr().err
    assert "the fp32 weights, gradients, optimizer moments, EMA of hrm-text-tiny need" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_relative_data_paths_are_the_spec_folders_and_recorded_absolute(tmp_path, monkeypatch, capsys):
    """data.path and data.eval_path resolve against the spec's folder, never the working directory or the run
    folder: the run records them absolute, so evaluating it later, from anywhere, reads the same file."""
    import yaml

    from hrmspec.runtime.artifacts.checkpoint import latest_checkpoint

    spec_dir, elsewhere = tmp_path / "spec", tmp_path / "elsewhere"
    spec_dir.mkdir()
    elsewhere.mkdir()
    samples = "".join(json.dumps({"instruction": f"add {i} and 1", "response": str(i + 1)}) + "\n" for i in range(30))
    (spec_dir / "train.jsonl").write_text(samples)
    (spec_dir / "s.yaml").write_text(MODEL.replace("MAX", "64") + "data: {source: jsonl, path: train.jsonl, "
                                     "eval_path: train.jsonl}\ntrain: {steps: 1, batch_size: 2, seq_len: 64}\n")
    monkeypatch.chdir(elsewhere)  # no train.jsonl here
    run = tmp_path / "run"
    assert main(["train", str(spec_dir / "s.yaml"), "--out", str(run), "--no-progress"]) == 0
    recorded = yaml.safe_load((latest_checkpoint(run) / "spec.yaml").read_text())["data"]
    assert recorded["path"] == recorded["eval_path"] == str((spec_dir / "train.jsonl").resolve())
    (run / "train.jsonl").write_text("not json\n")  # a file of that name in the run folder is never read
    capsys.readouterr()
    assert main(["eval", str(run), "--n", "2"]) == 0, capsys.readouterr().err
