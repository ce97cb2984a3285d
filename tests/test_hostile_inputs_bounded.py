"""Small hostile inputs, bounded memory: every YAML and JSON document is read under the limits of a
spec (size, values counting what aliases repeat, nesting), a JSONL line over its limit is never held
whole, budgets and cost figures are computed per phase and range-checked, and every refusal is one
line (and at most its hint) naming the limit or the place — never a traceback, gigabytes or NaN."""

import json
import math
import re
import tracemalloc

import pytest

from hrmspec.cli import main
from hrmspec.cost import RunFlops
from hrmspec.errors import CheckpointError, HrmspecError, SpecError
from hrmspec.runtime.artifacts.data import MAX_LINE_BYTES, DataError, read_jsonl
from hrmspec.runtime.interop.hf_config import spec_from_hf_config
from hrmspec.runtime.interop.hf_weights import shard_names
from hrmspec.runtime.interop.hrm_config import read_arch_file
from hrmspec.runtime.interop.huginn import huginn_config_from_spec, spec_from_huginn_config
from hrmspec.runtime.training.compare import MAX_STEPS, Budget, CompareError, read_data
from hrmspec.spec.load import load_spec
from hrmspec.spec.source import (
    MAX_BYTES,
    MAX_DEPTH,
    MAX_VALUES,
    load_json_text,
    load_yaml_text,
    parse_override,
    quoted,
    read_json,
)

VALUES = f"more than {MAX_VALUES:,} values"
DEEP = f"nested more than {MAX_DEPTH} levels"

pytestmark = pytest.mark.usefixtures("deadline")  # every case fails in 120 s rather than run away


def alias_bomb_flow() -> str:
    """280 bytes of flow YAML whose aliases expand to 9**9 (387 million) scalars."""
    parts = ["&a [x, x, x, x, x, x, x, x, x]"]
    parts += [f"&{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    return "[" + ", ".join(parts) + "]"


def merge_bomb() -> str:
    """Merge keys (`<<`) copying mappings into mappings: 10**9 pairs from 600 bytes."""
    lines = ["a0: &a0 {" + ", ".join(f"k{i}: 1" for i in range(10)) + "}"]
    lines += [f"a{i}: &a{i} {{<<: [" + ", ".join([f"*a{i - 1}"] * 10) + "]}" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


def run_cli(capsys, *argv: str) -> str:
    """Run the CLI, expect exit 2 with one error line (and at most a hint) and nothing on stdout."""
    assert main(list(argv)) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and lines and lines[0].startswith("hrmspec: error: "), err
    assert len(lines) <= 2 and "Traceback" not in err, err
    assert len(lines) == 1 or lines[1].startswith("  hint: "), err
    return lines[0]


# --------------------------------------------------------------------------- one YAML reader


def test_an_alias_bomb_in_a_set_value_stops_at_the_value_limit(capsys):
    line = run_cli(capsys, "validate", "hrm-text-tiny", "--set", f"model.vocab={alias_bomb_flow()}")
    assert "--set model.vocab" in line and VALUES in line and len(line) < 400


def test_a_self_referencing_alias_in_a_set_value_is_too_deep_not_a_recursion_error(capsys):
    line = run_cli(capsys, "validate", "hrm-text-tiny", "--set", "model.vocab=&a [*a]")
    assert "--set model.vocab" in line and DEEP in line


def test_a_set_value_keeps_its_ordinary_yaml():
    assert parse_override("data.tasks=[gcd, lcm]") == ("data.tasks", ["gcd", "lcm"])
    assert parse_override("train.lr=3e-4") == ("train.lr", "3e-4")  # YAML 1.1: a string, read as a number later
    with pytest.raises(SpecError, match="duplicate key 'a'"):
        parse_override("x={a: 1, a: 2}")


def test_a_merge_key_bomb_in_a_spec_stops_before_it_is_built(tmp_path, capsys):
    path = tmp_path / "merge.yaml"
    path.write_text(merge_bomb())
    line = run_cli(capsys, "validate", str(path))
    assert f"{path}:" in line and VALUES in line


def test_yaml_integers_python_cannot_convert_and_impossible_dates_are_spec_errors():
    with pytest.raises(SpecError, match="invalid YAML"):
        load_yaml_text("vocab: " + "9" * 5000, "x.yaml")
    with pytest.raises(SpecError, match="invalid YAML: month must be in 1..12"):
        load_yaml_text("when: 2024-13-45", "x.yaml")


def test_an_all_config_yaml_bomb_is_refused_at_the_limit(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "step_1").write_bytes(b"")  # the config is read first: the weights are never reached
    config = ckpt / "all_config.yaml"
    config.write_text(merge_bomb().replace("a0:", "arch: {name: x}\na0:", 1))
    line = run_cli(capsys, "import-hrm", str(ckpt / "step_1"), "--config", str(config), "--out", str(tmp_path / "o"))
    assert str(config) in line and VALUES in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text", ["arch: " + "[" * 60_000 + "]" * 60_000, "arch:\n" + "".join(
    " " * i + "- \n" for i in range(1, 80))])
def test_an_all_config_yaml_nested_deep_is_one_error(tmp_path, text):
    config = tmp_path / "all_config.yaml"
    config.write_text(text)
    with pytest.raises(CheckpointError, match=DEEP) as e:
        read_arch_file(config)
    assert str(config) in str(e.value) and "\n" not in str(e.value)


def test_a_yaml_file_is_read_no_further_than_its_limit(tmp_path):
    config = tmp_path / "all_config.yaml"
    config.write_text("arch: {name: x}\n" + "#" * (MAX_BYTES + 10) + "\n")
    with pytest.raises(CheckpointError, match=f"over the limit of {MAX_BYTES:,} bytes"):
        read_arch_file(config)


def test_compare_data_is_read_under_the_same_limits(tmp_path):
    with pytest.raises(CompareError, match=VALUES):
        read_data(f"{{source: jsonl, path: {alias_bomb_flow()}}}")
    path = tmp_path / "data.yaml"
    path.write_text(merge_bomb())
    with pytest.raises(CompareError, match=VALUES):
        read_data(str(path))


def test_extends_of_a_file_that_is_no_spec_names_it_and_quotes_nothing(tmp_path, capsys):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {secret}\n")
    line = run_cli(capsys, "validate", str(child))
    assert str(secret) in line and "root" not in line.replace(str(tmp_path), "") and "daemon" not in line


# --------------------------------------------------------------------------- one JSON reader


@pytest.mark.parametrize("depth", [50_000, 200_000])
def test_json_nested_deep_is_refused_without_recursion(depth, tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a":' * depth + "1" + "}" * depth)
    with pytest.raises(SpecError) as e:
        read_json(path, max_bytes=2 * MAX_BYTES)
    assert str(path) in str(e.value) and DEEP in str(e.value)
    with pytest.raises(SpecError, match=DEEP):
        load_json_text("[" * (MAX_DEPTH + 2) + "]" * (MAX_DEPTH + 2), "config.json")
    assert load_json_text('{"a": [1, {"b": 2}]}', "config.json") == {"a": [1, {"b": 2}]}


def test_json_limits_on_size_values_and_syntax(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(" " * (MAX_BYTES + 1) + "{}")
    with pytest.raises(SpecError, match=f"over the limit of {MAX_BYTES:,} bytes"):
        read_json(path)
    with pytest.raises(SpecError, match=f"more than {MAX_VALUES:,} values"):
        load_json_text("[" + ", ".join(["0"] * (MAX_VALUES + 1)) + "]", "config.json")
    with pytest.raises(SpecError, match=r"config.json:1:7: invalid JSON"):
        load_json_text('{"a": }', "config.json")
    with pytest.raises(SpecError, match="invalid JSON"):
        load_json_text("9" * 5000, "config.json")


@pytest.mark.parametrize("value", ["abc", math.inf, math.nan, [64], 0])
def test_huginn_padded_vocab_size_of_the_wrong_type_is_one_line(value):
    config = dict(huginn_config_from_spec(load_spec("huginn-tiny")), padded_vocab_size=value)
    with pytest.raises(CheckpointError, match="padded_vocab_size: expected an integer >= 1") as e:
        spec_from_huginn_config(config)
    assert "\n" not in str(e.value)


def test_a_weight_map_of_mixed_types_names_the_entry():
    assert shard_names({"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}, "index.json") == \
        ["m-1.safetensors", "m-2.safetensors"]
    for weight_map, what in [({"a": "m-1.safetensors", "b": 3}, "weight_map['b']"),
                             ({"a": ["x"] * 10**5}, "weight_map['a']"), ([1, "a"], "expected a 'weight_map'"),
                             ({}, "expected a 'weight_map'")]:
        with pytest.raises(CheckpointError) as e:
            shard_names(weight_map, "index.json")
        assert what in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 300


def test_a_huge_config_value_is_quoted_short():
    with pytest.raises(CheckpointError) as e:
        spec_from_hf_config({"model_type": "x" * 5_000_000}, source="config.json")
    assert "config.json: model_type" in str(e.value) and len(str(e.value)) < 300
    with pytest.raises(CheckpointError, match="rope_theta: expected a number >= 1, found an integer of about") as e:
        spec_from_hf_config({"model_type": "hrm_text", "rope_theta": 10**400}, source="config.json")
    assert len(quoted(list(range(10**6)))) <= 80 and len(quoted(10**100_000)) < 80


# --------------------------------------------------------------------------- JSONL, streamed


def test_a_jsonl_line_over_the_limit_is_never_held_whole(tmp_path):
    good = json.dumps({"instruction": "a", "response": "b"}) + "\n"
    path = tmp_path / "data.jsonl"
    with path.open("w") as f:
        f.write(good)
        f.write('{"instruction": "' + "x" * (32 * MAX_LINE_BYTES) + '", "response": "b"}\n')
        f.write(good)
    with pytest.raises(DataError, match=rf"data.jsonl:2: the line is longer than {MAX_LINE_BYTES:,} bytes"):
        read_jsonl(path)
    tracemalloc.start()
    try:
        samples, stats = read_jsonl(path, skip_bad=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(samples) == 2 and stats.bad == 1 and stats.read == 3
    assert peak < 8 * MAX_LINE_BYTES  # the 32 MiB line was read in chunks of at most 1 MiB, never kept


def test_a_jsonl_line_holding_a_lone_surrogate_names_its_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "x\\ud800", "response": "b"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: 'instruction' holds an unpaired surrogate") as e:
        read_jsonl(path)
    assert "\n" not in str(e.value)
    samples, stats = read_jsonl(path, skip_bad=True)
    assert len(samples) == 1 and stats.bad == 1


# --------------------------------------------------------------------------- budgets and cost


def test_run_flops_by_phase_match_the_steps_and_never_list_them():
    run = RunFlops(load_spec("hrm-text-tiny"), 64)
    for steps in (1, 7, 10, 333):
        per_step = run.per_step(steps)
        assert [f for count, f in run.phases(steps) for _ in range(count)] == per_step
        for upto in (0, 1, steps // 2, steps):
            assert run.summed(steps, upto) == pytest.approx(sum(per_step[:upto]), rel=1e-12)
    phases = run.phases(10**20)  # a list of 10**20 floats would never fit: the phases are a handful
    assert len(phases) <= 4 and sum(count for count, _ in phases) == 10**20


def test_absurd_step_budgets_are_refused():
    with pytest.raises(CompareError, match=f"at most {MAX_STEPS:,} steps"):
        Budget.parse("steps=1e20")
    assert Budget.parse("steps=1000").value == 1000


@pytest.fixture
def jsonl_data(tmp_path):
    lines = [json.dumps({"instruction": f"q{i}", "response": f"a{i}"}) for i in range(8)]
    for name in ("train", "eval"):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return f"{{source: jsonl, path: {tmp_path / 'train.jsonl'}, eval_path: {tmp_path / 'eval.jsonl'}}}"


@pytest.mark.parametrize("budget, message", [("flops=1e30", f"over the limit of {MAX_STEPS:,}"),
                                             ("tokens=1e30", f"over the limit of {MAX_STEPS:,}"),
                                             ("flops=1e-5", "less than one optimizer step"),
                                             ("tokens=1", "less than one optimizer step")])
def test_compare_refuses_budgets_beyond_sense_before_anything_trains(capsys, tmp_path, jsonl_data, budget, message):
    out = tmp_path / "cmp"
    line = run_cli(capsys, "compare", "hrm-text-tiny", "--budget", budget, "--data", jsonl_data, "--out", str(out))
    assert message in line and "hrm-text-tiny" in line
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--mfu", "1e-320", "--json"], "--mfu: expected a number in (0, 1], at least 0.0001"),
    (["--tokens", "1e30"], "--tokens: expected at most 1e+18"),
    (["--seq-len", "99999999999"], "--seq-len: expected at most 16,777,216"),
    (["--gpus", "10" + "0" * 30], "--gpus: expected at most 10,000,000"),
    (["--price", "1e300"], "--price: expected at most"),
])
def test_cost_refuses_figures_beyond_sense(capsys, args, message):
    line = run_cli(capsys, "cost", "hrm-text-tiny", "--tokens", "1e9", *args)
    assert message in line


def test_cost_json_is_standard_and_finite_at_the_limits(capsys):
    assert main(["cost", "hrm-text-tiny", "--tokens", "1e18", "--mfu", "1e-4", "--gpus", "1", "--json"]) == 0

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    doc = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert all(math.isfinite(v) for v in doc.values() if isinstance(v, float)) and doc["mfu"] == 1e-4


# --------------------------------------------------------------------------- show, expressions, credit


@pytest.mark.parametrize("args, message", [
    (["--progress", "nan"], "--progress: expected a training progress in [0, 1]"),
    (["--progress", "5"], "--progress: expected a training progress in [0, 1]"),
    (["--seq-len", "-5"], "--seq-len: expected a positive integer"),
    (["--seq-len", "0"], "--seq-len: expected a positive integer"),
    (["--batch", "0"], "--batch: expected a positive integer"),
    (["--dtype-bytes", "0"], "--dtype-bytes: expected a positive integer"),
    (["--dtype-bytes", "3"], "--dtype-bytes: expected one of 1, 2, 4, 8"),
])
def test_show_range_checks_its_numbers(capsys, args, message):
    line = run_cli(capsys, "show", "hrm-text-tiny", *args)
    assert message in line


@pytest.mark.parametrize("count, message", [("0", "expected a positive integer"), ("100000000", "expected at most 16")])
def test_show_recurrence_stays_within_the_sampled_loop(capsys, count, message):
    line = run_cli(capsys, "show", "huginn-tiny", "--recurrence", count)
    assert f"--recurrence: {message}" in line


def test_show_accepts_sane_numbers(capsys):
    assert main(["show", "hrm-text-tiny", "--seq-len", "64", "--progress", "0.5", "--dtype-bytes", "4"]) == 0
    out = capsys.readouterr().out
    assert "progress 0.5" in out and "4 B/elem" in out
    assert re.search(r"activation memory for one 64-token row\s+│\s+\d[\d.]*\s?[kMG]?B", out)


@pytest.mark.parametrize("expr, piece, written", [("x * 10**10**10", "10 ** 10 ** 10", "10**"),
                                                  ("x * (1/0)", "1 / 0", "1/0"),
                                                  ("x * exp(1000)", "exp(1000)", "exp")])
def test_an_expression_whose_constants_overflow_is_a_spec_error_at_its_column(tmp_path, capsys, expr, piece, written):
    path = tmp_path / "norm.yaml"
    head = "    norm: {type: expr, expr: \""
    path.write_text(f"extends: hrm-text-tiny\nmodel:\n  block:\n{head}{expr}\", place: pre}}\n")
    line = run_cli(capsys, "validate", str(path))
    col = len(head) + 1 + expr.index(written)  # the column of the offending piece in the file
    assert f"{path}:4:{col}: model.block.norm.expr: '{piece}' is not a finite number" in line


def test_a_credit_warmup_outside_zero_to_one_is_a_spec_error_at_its_place(tmp_path, capsys):
    path = tmp_path / "warm.yaml"
    path.write_text("extends: hrm-text-tiny\nmodel:\n  credit:\n    depth: {from: 2, to: 4, warmup: 7.5}\n")
    line = run_cli(capsys, "validate", str(path))
    assert f"{path}:4:37: model.credit.depth.warmup: expected a number in [0, 1], found 7.5" in line
    with pytest.raises(HrmspecError, match=r"--set model.credit.depth.warmup: .*\[0, 1\]"):
        load_spec("hrm-text-tiny", {"model.credit.depth.warmup": -0.5})
