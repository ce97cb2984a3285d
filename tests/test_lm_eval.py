"""lm-evaluation-harness: a run evaluated as `--model hrmspec` on local tasks (task YAMLs over JSONL files
written here), each sample's result checked against scoring the same sample directly with the model: a
forward of that one sample with its prompt as the PrefixLM prefix, log-probabilities taken from the logits
here, and greedy decoding with `generate`. Nothing reaches the network."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lm_eval
import lm_eval.evaluator
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import Registry, get_model
from lm_eval.tasks import TaskManager
from test_grids import GRID_SPEC
from test_train import SPEC

import hrmspec
from hrmspec.cli import main
from hrmspec.runtime.artifacts import checkpoint as ckpt
from hrmspec.runtime.artifacts.data import Sample, format_sample
from hrmspec.runtime.artifacts.tokenizer import Tokenizer
from hrmspec.runtime.evaluate.heldout import load_run
from hrmspec.runtime.evaluate.lm_harness import HrmspecLM, LmEvalError
from hrmspec.runtime.training.loop import train
from hrmspec.spec import load_spec, load_spec_text

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
MAX_GEN = 8
QUESTIONS = [  # choices that are prefixes of one another: only the end of the response tells them apart
    {"question": "Calculate 12 + 30.", "choices": ["42", "4", "412"], "answer": 0},
    {"question": "Calculate 7 * 6.", "choices": ["42", "36"], "answer": 0},
    {"question": "What is 9 - 3?", "choices": ["6", "3", "63", "six"], "answer": 0},
    {"question": "Spell cat backward.", "choices": ["tac", "cat"], "answer": 0},
    {"question": "Calculate 1 + 1.", "choices": ["2", "11"], "answer": 0},
]
TEXTS = [{"text": "12 + 30 = 42"}, {"text": " ".join(f"{n} + {n + 1} = {2 * n + 1}." for n in range(30))}]


@pytest.fixture(scope="module", autouse=True)
def offline():
    """The Hugging Face libraries told to stay offline, and any internet socket refused."""
    real = socket.socket.connect

    def refuse(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"a test tried to reach the network: {address}")
        return real(sock, address)

    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)  # seconds of `pip list`, untested here
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_eval") / "run"
    train(load_spec_text(SPEC, overrides={"train.steps": 3}), out, progress_bar=False)
    return out


@pytest.fixture(scope="module")
def direct(run):
    model, tok, *_ = load_run(run)
    return model, tok


def prompt_of(tok, instruction: str) -> list[int]:
    return tok.encode(format_sample(Sample(instruction, ""))[0])


@torch.no_grad()
def logprob(model, prompt: list[int], response: list[int], skip: int = 0) -> tuple[float, bool]:
    """log p(response[skip:]) after `prompt` (the PrefixLM prefix) from one unpacked forward, and whether each
    of those tokens is the argmax."""
    ids = torch.tensor([prompt + response])
    prefix = torch.zeros_like(ids, dtype=torch.bool)
    prefix[:, :len(prompt)] = True
    logp = model(ids, prefix_mask=prefix).logits[0].double().log_softmax(-1)
    rows = torch.arange(len(prompt) - 1 + skip, len(prompt) + len(response) - 1)  # position q predicts q + 1
    target = torch.tensor(response[skip:])
    return float(logp[rows, target].sum()), bool((logp[rows].argmax(-1) == target).all())


def greedy(model, tok, instruction: str, new: int = MAX_GEN) -> str:
    prompt = prompt_of(tok, instruction)
    out = model.generate(torch.tensor([prompt]), min(new, 96 - len(prompt)), eos_id=tok.eos_id)
    row = out[0, len(prompt):].tolist()
    return tok.decode(row[:row.index(tok.eos_id)] if tok.eos_id in row else row, skip_special=True)


def rolling(model, tok, text: str) -> float:
    """The text as a response to an empty instruction, in windows of the 96-token rows (docs: each window
    predicts the tokens it adds and sees up to a window of the text before them)."""
    prompt, tokens = prompt_of(tok, ""), tok.encode(text)
    width, total = 96 - len(prompt), 0.0
    for start in range(0, len(tokens), width):
        end = min(start + width, len(tokens))
        first = max(0, end - width)
        total += logprob(model, prompt, tokens[first:end], skip=start - first)[0]
    return total


def write_tasks(folder: Path, stops: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("questions", QUESTIONS), ("texts", TEXTS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "test_split": "test"}
    data = {name: {"data_files": {"test": str(folder / f"{name}.jsonl")}, "cache_dir": str(folder / "cache")}
            for name in ("questions", "texts")}
    tasks = {
        "hrm_mc": {"dataset_kwargs": data["questions"], "output_type": "multiple_choice",
                   "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
                   "metric_list": [{"metric": "acc"}]},
        "hrm_gen": {"dataset_kwargs": data["questions"], "output_type": "generate_until",
                    "doc_to_text": "{{question}}", "doc_to_target": "{{choices[0]}}",
                    "generation_kwargs": {"until": stops, "max_gen_toks": MAX_GEN, "do_sample": False},
                    "metric_list": [{"metric": "exact_match"}]},
        "hrm_text": {"dataset_kwargs": data["texts"], "output_type": "loglikelihood_rolling", "doc_to_text": "",
                     "doc_to_target": "{{text}}", "metric_list": [{"metric": "word_perplexity"}]},
    }
    for name, config in tasks.items():  # JSON is YAML
        (folder / f"{name}.yaml").write_text(json.dumps({"task": name, **common, **config}))
    return folder


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, direct):
    """The local tasks; the generation task's stop string is a character inside the longest greedy answer,
    so it must cut that answer short."""
    model, tok = direct
    longest = max((greedy(model, tok, q["question"]) for q in QUESTIONS), key=len)
    assert len(longest) >= 2, "the micro model answers every question with an empty response"
    return write_tasks(tmp_path_factory.mktemp("tasks"), [longest[len(longest) // 2], "never appears"])


def evaluate(run, tasks, names, **model_args):
    args = ",".join(f"{k}={v}" for k, v in {"path": run, **model_args}.items())
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    res = lm_eval.simple_evaluate(model="hrmspec", model_args=args, tasks=names, task_manager=manager,
                                  batch_size=3, log_samples=True)
    return res["samples"]


@pytest.fixture(scope="module")
def evaluated(run, tasks):
    """Every local task as the model scores it, one lm-eval run; and the multiple choice with score_eos."""
    return {False: evaluate(run, tasks, ["hrm_mc", "hrm_gen", "hrm_text"]),
            True: evaluate(run, tasks, ["hrm_mc"], score_eos=True)}


@pytest.mark.parametrize("score_eos", [False, True])
def test_multiple_choice_matches_direct_scoring(evaluated, direct, score_eos):
    model, tok = direct
    samples = evaluated[score_eos]["hrm_mc"]
    assert len(samples) == len(QUESTIONS)
    for s in samples:
        doc = s["doc"]
        prompt = prompt_of(tok, doc["question"])
        want = [logprob(model, prompt, tok.encode(c) + [tok.eos_id] * score_eos) for c in doc["choices"]]
        got = [r[0] for r in s["resps"]]
        # lm-eval puts its target delimiter before each choice; the layout's boundary is <|im_end|>
        assert [a[1] for a in s["arguments"]] == [" " + c for c in doc["choices"]]
        for (g, g_greedy), (w, w_greedy) in zip(got, want):
            assert g == pytest.approx(w, abs=1e-3) and g_greedy == w_greedy
        best = max(range(len(want)), key=lambda i: want[i][0])
        assert s["acc"] == float(best == doc["answer"])


def test_generation_and_rolling_match_direct_scoring(evaluated, tasks, direct):
    model, tok = direct
    samples = evaluated[False]
    stops = json.loads((tasks / "hrm_gen.yaml").read_text())["generation_kwargs"]["until"]
    cut = 0
    for s in samples["hrm_gen"]:
        text = greedy(model, tok, s["doc"]["question"])
        want = text[:min((text.find(x) for x in stops if x in text), default=len(text))]
        cut += want != text
        assert s["resps"] == [[want]]
    assert cut >= 1  # a stop string ended at least one answer
    assert len(samples["hrm_text"]) == len(TEXTS)
    for s in samples["hrm_text"]:
        assert s["resps"][0][0] == pytest.approx(rolling(model, tok, s["doc"]["text"]), abs=1e-3)
    assert len(tok.encode(TEXTS[1]["text"])) > 96  # the long text takes windows, the last one overlapping


def test_prompt_layout_and_a_long_context(run):
    lm = HrmspecLM(path=str(run), condition="direct", batch_size="auto")
    tok = lm.tokenizer
    assert tok.decode(lm.prompt_ids("Calculate 1 + 1.", 96)) == "<|im_start|><|direct|>Calculate 1 + 1.<|im_end|>"
    assert lm.batch_size == 16
    full = lm.prompt_ids("one two three " * 40, 1000)
    cut = lm.prompt_ids("one two three " * 40, 30)  # the instruction's end kept between the markers
    assert len(full) > 30 and cut == full[:2] + full[-28:-1] + full[-1:]
    with pytest.raises(LmEvalError, match="no room for a prompt"):
        lm.prompt_ids("x", 2)
    long_question = Instance("loglikelihood", {}, ("word " * 200, " 42"), 0)
    cached = []  # what lm-eval's response cache (--use_cache) is handed
    lm.set_cache_hook(SimpleNamespace(add_partial=lambda *entry: cached.append(entry)))
    ((value, is_greedy),) = lm.loglikelihood([long_question])
    assert cached == [("loglikelihood", long_question.args, (value, is_greedy))]
    prompt = lm.prompt_ids("word " * 200, 96 - 2)
    assert len(prompt) == 94 and value == pytest.approx(logprob(lm.model, prompt, tok.encode("42"))[0], abs=1e-3)
    # a generation gets the room the prompt leaves: 96 - 92 tokens here
    plain = HrmspecLM(path=str(run))
    question = "7" * (92 - len(plain.prompt_ids("", 96)))  # one token per digit
    assert len(plain.prompt_ids(question, 96)) == 92
    request = Instance("generate_until", {}, (question, {"until": [], "max_gen_toks": 500}), 0)
    assert plain.generate_until([request]) == [greedy(plain.model, tok, question, new=500)]


def test_compile_decodes_generate_until_with_the_compiled_step(run, tmp_path, monkeypatch):
    """compile=true asks decode_responses for the compiled decode step for generate_until's batches (the
    step itself is tested in test_decode.py); a spec whose depth is not fixed (here ACT halting) is refused
    when the model is made, with the reason."""
    from hrmspec.runtime.evaluate import lm_harness

    seen = []
    real = lm_harness.decode_responses
    monkeypatch.setattr(lm_harness, "decode_responses", lambda *a: seen.append(a[5].compile) or real(*a))
    request = Instance("generate_until", {}, ("Calculate 1 + 1.", {"until": [], "max_gen_toks": 4}), 0)
    for flag in (True, False):
        lm = HrmspecLM(path=str(run), compile=flag)
        assert lm.generate_until([request]) == [greedy(lm.model, lm.tokenizer, "Calculate 1 + 1.", new=4)]
    assert seen == [True, False]
    ut = load_spec("ut", overrides={"model.vocab": 320, "model.d_model": 16, "model.heads": 2, "model.ffn": 32,
                                    "model.max_seq_len": 96})
    ckpt.save_checkpoint(tmp_path / "ut", 1, hrmspec.compile(ut).state_dict(), ut.raw,
                         Tokenizer.load(ckpt.latest_checkpoint(run)))
    with pytest.raises(LmEvalError, match=r"compile=True: compiled decoding .* the loop halts per step"):
        HrmspecLM(path=str(tmp_path / "ut"), compile=True)


def test_what_cannot_be_evaluated_is_one_line(run, tmp_path):
    grid = tmp_path / "grid"
    train(load_spec_text(GRID_SPEC, overrides={"train.steps": 1}), grid, progress_bar=False)
    with pytest.raises(LmEvalError, match=r"is a grid run \(objective: grid\): it has no tokenizer"):
        HrmspecLM(path=str(grid))
    refused = [({"condition": "cot!"}, "condition 'cot!'"), ({"condition": "think"}, "not in the vocabulary"),
               ({"temperature": 1}, "unknown model argument"), ({"batch_size": "x"}, "batch_size 'x'"),
               ({"path": None}, "no run folder"), ({"device": "gpu"}, "device 'gpu': expected cpu")]
    for args, message in refused:
        with pytest.raises(LmEvalError, match=message):
            HrmspecLM(**{"path": str(run), **args})
    lm = HrmspecLM(path=str(run), device="cuda:0")  # lm-eval's default device
    assert lm.device == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    sampled = Instance("generate_until", {}, ("q", {"until": [], "do_sample": True, "temperature": 0.7}), 0)
    with pytest.raises(LmEvalError, match="decodes greedily"):
        lm.generate_until([sampled])
    with pytest.raises(LmEvalError, match="drop --apply_chat_template"):
        lm.apply_chat_template([{"role": "user", "content": "q"}])


def test_entry_point_and_command_hand_over_to_lm_eval(capsys, monkeypatch):
    from importlib.metadata import entry_points

    # an lm-eval that discovers plugins holds the entry point as a placeholder, loaded when asked for
    (ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == "hrmspec"]
    registry = Registry("model", base_cls=LM)
    registry.register("hrmspec", target=ep)
    assert registry.get("hrmspec") is HrmspecLM
    assert get_model("hrmspec") is HrmspecLM
    assert main(["lm-eval", "--help"]) == 0
    assert "lm-eval run --model" in capsys.readouterr().out  # lm-eval's own help, not ours
    assert main(["lm-eval", "run", "--no-such-flag"]) == 2
    capsys.readouterr()
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find(name, *a))
    assert main(["lm-eval", "--tasks", "x"]) == 2
    assert capsys.readouterr().err == "hrmspec: error: lm-eval is not installed: pip install 'hrmspec[eval]' (or " \
        "lm-eval itself)\n"


@pytest.mark.slow  # lm-eval's command line indexes its thousands of built-in task files first
def test_command_line_matches_the_python_api(run, tasks, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hrmspec", "lm-eval", "--model", "hrmspec", "--model_args", f"path={run}",
           "--tasks", "hrm_mc", "--include_path", str(tasks), "--batch_size", "3", "--log_samples",
           "--output_path", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (file,) = out.rglob("samples_hrm_mc_*.jsonl")
    got = {(s["doc_id"], i): float(r[0][0]) for s in map(json.loads, file.read_text().splitlines())
           for i, r in enumerate(s["resps"])}
    want = {(s["doc_id"], i): r[0][0] for s in evaluate(run, tasks, ["hrm_mc"])["hrm_mc"]
            for i, r in enumerate(s["resps"])}
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-5) for k in want)
    cmd[cmd.index("--model_args") + 1] = f"path={tmp_path / 'nothing'}"
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("hrmspec: error: no checkpoint")
