import json

import pytest

from hrmspec.runtime.artifacts.data import (
    DataConfig,
    DataError,
    Sample,
    format_sample,
    load_split,
    read_jsonl,
    reasoning_gym_samples,
    score_answer,
    write_jsonl,
)

SMALL_ARITH = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "allow_parentheses": False,
               "allow_negation": False, "operators": ["+", "-"]}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- JSONL ------------------------------------------------------------------------------------


def test_read_jsonl_ok_and_empty_responses(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"instruction": "2+2?", "response": "4"}),
        "",
        json.dumps({"instruction": "say nothing", "response": ""}),
        json.dumps({"instruction": "3+3?", "response": "6", "condition": "cot"}),
    ])
    samples, stats = read_jsonl(path, condition="direct")
    assert [s.response for s in samples] == ["4", "6"]
    assert [s.condition for s in samples] == ["direct", "cot"]  # a line's own condition wins
    assert (stats.read, stats.kept, stats.empty, stats.bad) == (3, 2, 1, 0)


@pytest.mark.parametrize("line, words", [
    ("{not json", "invalid JSON"),
    ('["a", "b"]', "JSON object"),
    ('{"instruction": "x"}', "missing key 'response'"),
    ('{"instruction": "x", "response": 5}', "'response' must be a string"),
    ('{"instruction": "x", "respons": "y"}', "did you mean 'response'"),
    ('{"instruction": "x", "response": "y", "condition": "no spaces"}', "condition"),
])
def test_bad_line_names_file_and_line(tmp_path, line, words):
    good = json.dumps({"instruction": "a", "response": "b"})
    path = write_lines(tmp_path / "bad.jsonl", [good, good, line, good])
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    msg = str(err.value)
    assert f"{path}:3:" in msg and words in msg and "skip_bad" in msg
    samples, stats = read_jsonl(path, skip_bad=True)
    assert len(samples) == 3 and stats.bad == 1


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_write_read_round_trip(tmp_path):
    samples = [Sample("q1 ünïcode", "a1", "direct"), Sample("q2\nline", "a2")]
    write_jsonl(tmp_path / "x.jsonl", samples)
    back, _ = read_jsonl(tmp_path / "x.jsonl")
    assert [(s.instruction, s.response, s.condition) for s in back] == [
        (s.instruction, s.response, s.condition) for s in samples]


# --- chat format ------------------------------------------------------------------------------


def test_format_sample():
    assert format_sample(Sample("Calculate 2 + 3.", "5", condition="direct")) == (
        "<|im_start|><|direct|>Calculate 2 + 3.<|im_end|>", "5<|box_end|>")
    assert format_sample(Sample("hi", "yo")) == ("<|im_start|>hi<|im_end|>", "yo<|box_end|>")
    with pytest.raises(DataError):
        format_sample(Sample("hi", "yo", condition="bad token"))


# --- reasoning-gym ----------------------------------------------------------------------------


def test_gym_train_eval_disjoint_and_scorable():
    wide = dict(SMALL_ARITH, min_digits=3, max_digits=3)  # distinct seeds: distinct questions
    tasks = {"basic_arithmetic": {"weight": 3, "config": wide}, "gcd": {"config": {"max_value": 999}}}
    train, datasets, stats = reasoning_gym_samples(tasks, size=200, seed=1, split="train", condition="direct")
    evals, eval_datasets, _ = reasoning_gym_samples(tasks, size=40, seed=1, split="eval")
    assert stats.kept == len(train) == 200 and len(evals) == 40
    assert sum(s.task == "basic_arithmetic" for s in train) == 150  # weights 3 : 1
    assert all(s.condition == "direct" for s in train)
    assert {s.task for s in train} == set(datasets) == {"basic_arithmetic", "gcd"}
    # disjoint seeds: the evaluation questions are not the training questions
    assert not {s.instruction for s in train} & {s.instruction for s in evals}
    s = train[0]
    assert s.instruction == s.meta["entry"]["question"] and s.response == s.meta["entry"]["answer"]
    assert score_answer(s, s.response, datasets) == 1.0
    assert score_answer(s, s.response + "0", datasets) < 1.0
    # same seed, same samples
    again, _, _ = reasoning_gym_samples(tasks, size=200, seed=1, split="train", condition="direct")
    assert [x.instruction for x in again] == [x.instruction for x in train]


def test_load_split_eval_has_no_training_question():
    # one-digit sums: a tiny question space, so only the de-duplication keeps eval held out
    tiny = dict(SMALL_ARITH, max_digits=1)
    cfg = DataConfig.from_dict({"source": "reasoning_gym", "tasks": {"basic_arithmetic": {"config": tiny}},
                                "size": 60, "eval_size": 20, "seed": 3, "condition": "direct"})
    train, held = load_split(cfg, "train"), load_split(cfg, "eval")
    assert len(train.samples) == 60 and len(held.samples) == 20
    assert not {s.instruction for s in train.samples} & {s.instruction for s in held.samples}
    assert held.stats.excluded > 0
    assert held.score(held.samples[0], held.samples[0].response) == 1.0


def test_unknown_task_suggests_close_match():
    with pytest.raises(DataError, match="did you mean 'basic_arithmetic'"):
        reasoning_gym_samples(["basic_arithmetc"], size=4, seed=0)
    with pytest.raises(DataError, match="max_value"):
        reasoning_gym_samples({"gcd": {"config": {"max_valeu": 9}}}, size=4, seed=0)
    with pytest.raises(DataError, match="gcd"):
        reasoning_gym_samples({"gcd": {"config": {"max_value": -5}}}, size=4, seed=0)


# --- DataConfig -------------------------------------------------------------------------------


def test_data_config_jsonl(tmp_path):
    write_lines(tmp_path / "train.jsonl", [json.dumps({"instruction": "a", "response": "b"})])
    cfg = DataConfig.from_dict({"source": "jsonl", "path": "train.jsonl", "condition": "direct"})
    split = load_split(cfg, "train", root=tmp_path)
    assert [s.condition for s in split.samples] == ["direct"]
    assert split.score(split.samples[0], " b ") == 1.0 and split.score(split.samples[0], "c") == 0.0
    assert load_split(cfg, "eval", root=tmp_path).samples == []


@pytest.mark.parametrize("d, words", [
    ({"source": "jsonl", "path": "x", "eval_pth": "y"}, "unknown key 'eval_pth' (did you mean 'eval_path'"),
    ({"source": "jsnl", "path": "x"}, "did you mean 'jsonl'"),
    ({"source": "jsonl"}, "data.path"),
    ({"tasks": ["gcd"], "size": "big"}, "data.size"),
    ({"tasks": ["gcd"], "condition": "a b"}, "data.condition"),
    ({"source": "reasoning_gym"}, "data.tasks"),
    ({"tasks": {"gcd": {"wieght": 2}}}, "did you mean 'weight'"),
    ({"tasks": {"gcd": {"config": {"seed": 2}}}}, "data.seed"),
])
def test_data_config_errors(d, words):
    with pytest.raises(DataError) as err:
        DataConfig.from_dict(d)
    assert words in str(err.value)


def test_data_config_defaults():
    cfg = DataConfig.from_dict({"tasks": ["basic_arithmetic"], "size": 20000, "condition": "direct"})
    assert cfg.source == "reasoning_gym" and cfg.size == 20000 and cfg.eval_size == 500 and cfg.dedupe_eval
