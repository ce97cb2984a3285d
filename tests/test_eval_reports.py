"""What an evaluation reports: training evaluates at the end (and at each eval_every, the last step
included) into metrics.jsonl and eval.json; `eval` gives the held-out loss and perplexity beside the
accuracy, says how many samples it ran and why, and keeps one eval-<label>.json per configuration;
`compare` puts the held-out loss in its table."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hrmspec.cli import main
from hrmspec.runtime.artifacts.data import format_sample, read_jsonl
from hrmspec.runtime.evaluate.heldout import eval_label, evaluate_run, load_run
from hrmspec.runtime.execution.depth import DepthPolicy
from hrmspec.runtime.training.compare import Budget, plan_runs, run_compare
from hrmspec.runtime.training.compare_report import markdown, rows, summary
from hrmspec.runtime.training.loop import train
from hrmspec.spec import load_spec_text

SPEC = """
name: micro
model:
  vocab: 320
  d_model: 32
  heads: 2
  ffn: 64
  max_seq_len: 64
  modules: {L: {layers: 1}, H: {layers: 1}}
  states: {z_H: {init: embed}, z_L: {init: buffer}}
  schedule:
    - repeat: 2
      do: ["z_L = L(z_L + z_H)", "z_H = H(z_H + z_L)"]
  output: z_H
  credit: {last: 2}
data: {source: jsonl, path: train.jsonl, eval_path: eval.jsonl}
train: {steps: 2, batch_size: 2, seq_len: 64, log_every: 1, save_every: 2, lr: 3.0e-3, max_new_tokens: 4,
        threads: 1}
"""
WORDS = [a + b + c for a in "abcd" for b in "efgh" for c in "ij"]  # 32: 24 to train on, 8 held out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    for name, part in (("train", WORDS[:24]), ("eval", WORDS[24:])):
        lines = [json.dumps({"instruction": f"reverse {w}", "response": w[::-1]}) for w in part]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "micro.yaml").write_text(SPEC)
    return root


def spec(folder, **overrides):
    return load_spec_text(SPEC, str(folder / "micro.yaml"), overrides or None)


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(folder):
    """A run trained 2 steps with eval_every 0: evaluated at the end only."""
    out = folder / "run"
    train(spec(folder), out, progress_bar=False)
    return out


def test_eval_every_0_evaluates_at_the_end_into_metrics_and_eval_json(run, folder):
    evals = [r for r in records(run) if "eval" in r]
    assert [r["step"] for r in evals] == [2]  # once, at the last step
    res = json.loads((run / "eval.json").read_text())
    assert json.loads((run / "eval-full.json").read_text()) == res and res["label"] == "full"
    logged = evals[0]["eval"]
    assert (res["accuracy"], res["n"], res["loss"]) == (logged["accuracy"], logged["n"], logged["loss"])
    assert res["checkpoint"].endswith("step_00000002") and res["n"] == 8  # eval_n 64, capped by the 8 held out
    assert res["requested"] == 64 and res["limited_by"] == "data.eval_path holds 8 samples"
    held_out, _ = read_jsonl(folder / "eval.jsonl")
    shown = res["samples"]
    assert len(shown) == 3 and all(set(s) == {"prompt", "expected", "got"} for s in shown)
    assert [(s["prompt"], s["expected"]) for s in shown] == [(h.instruction, h.response) for h in held_out[:3]]


def test_eval_every_that_does_not_divide_steps_evaluates_the_final_step_too(folder, capsys):
    out = folder / "every2"
    args = ["train", str(folder / "micro.yaml"), "--out", str(out), "--set", "train.steps=3",
            "--set", "train.eval_every=2", "--set", "train.save_every=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert [r["step"] for r in records(out) if "eval" in r] == [2, 3]
    assert json.loads((out / "eval.json").read_text())["checkpoint"].endswith("step_00000003")
    # the log lines: accuracy and loss at each evaluation, then the sample predictions
    assert printed.count("held-out at step ") == 2 and "held-out at step 3: " in printed
    assert printed.count("  prompt: reverse ") == 6 and "| expected: " in printed and "| got: " in printed


def test_a_run_stopped_early_is_not_evaluated_until_it_ends(folder):
    out = folder / "stopped"
    train(spec(folder), out, progress_bar=False, stop_after=1)
    assert not (out / "eval.json").exists() and not [r for r in records(out) if "eval" in r]
    train(spec(folder), out, progress_bar=False, resume=True)
    assert [r["step"] for r in records(out) if "eval" in r] == [2] and (out / "eval.json").is_file()


def test_the_held_out_loss_is_the_teacher_forced_cross_entropy_of_the_responses(run, folder):
    res = evaluate_run(run, n=2)
    model, tokenizer, _, _ = load_run(run)
    held_out, _ = read_jsonl(folder / "eval.jsonl")
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in held_out[:2]:  # each sample alone, the logits of every position, torch's cross-entropy
            prompt, response = (tokenizer.encode(text) for text in format_sample(sample))
            ids = torch.tensor([prompt + response])
            prefix = torch.tensor([[True] * len(prompt) + [False] * len(response)])
            logits = model(ids, prefix_mask=prefix).logits[0].float()
            predicted = logits[len(prompt) - 1: ids.shape[1] - 1]  # each position predicts the next token
            total += float(F.cross_entropy(predicted, ids[0, len(prompt):], reduction="sum"))
            count += len(response)
    assert res["n"] == 2 and res["loss_tokens"] == count
    assert res["loss"] == pytest.approx(total / count, rel=1e-4)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]), rel=1e-12)
    assert 0 < res["loss"] < 2 * math.log(320)


def test_eval_says_how_many_samples_it_ran_and_why(run, capsys):
    assert main(["eval", str(run), "--n", "200"]) == 0
    out = capsys.readouterr().out
    assert "ran 8 of --n 200: data.eval_path holds 8 samples" in out
    assert "held-out loss " in out and "(perplexity " in out and "sample predictions:" in out
    assert main(["eval", str(run), "--n", "3"]) == 0
    out = capsys.readouterr().out
    assert "ran 3 held-out samples (--n 3)" in out and "ran 3 of" not in out


def test_a_reasoning_gym_held_out_set_names_eval_size(folder, capsys):
    out = folder / "gym"
    overrides = {"data": {"source": "reasoning_gym", "tasks": ["basic_arithmetic"], "size": 24, "eval_size": 5},
                 "train.steps": 1, "train.save_every": 1}
    train(spec(folder, **overrides), out, progress_bar=False)
    assert main(["eval", str(out), "--n", "200"]) == 0
    assert "ran 5 of --n 200: data.eval_size is 5" in capsys.readouterr().out


def test_each_configuration_keeps_its_own_eval_file(run, capsys):
    configs = {"full": [], "threshold-0.5": ["--threshold", "0.5"], "exit-kl-0.01-max-steps-3": ["--exit", "kl:1e-2",
                                                                                                 "--max-steps", "3"]}
    written = {}
    for label, flags in configs.items():
        assert main(["eval", str(run), "--n", "4", *flags]) == 0
        assert f"wrote {run}/eval-{label}.json and {run}/eval.json" in capsys.readouterr().out
        written[label] = (run / f"eval-{label}.json").read_text()
        assert json.loads(written[label])["label"] == label
        assert (run / "eval.json").read_text() == written[label]  # eval.json: the latest evaluation
    for label in configs:  # none overwrote another
        assert (run / f"eval-{label}.json").read_text() == written[label]
    exit_res = json.loads(written["exit-kl-0.01-max-steps-3"])
    assert exit_res["exit"] == "kl:0.01" and exit_res["loss"] is None  # the exit decides as it decodes
    full_depth = exit_res["full_depth"]
    assert full_depth["loss"] > 0 and full_depth["perplexity"] == pytest.approx(math.exp(full_depth["loss"]))


def test_labels_name_every_option():
    assert eval_label(DepthPolicy()) == "full"
    assert eval_label(DepthPolicy(exit="latent:0.03", warm_start=True)) == "exit-latent-0.03-warm-start"
    assert eval_label(DepthPolicy(all_steps=True)) == "all-steps"
    assert eval_label(DepthPolicy(threshold=0.25), all_segments=True) == "threshold-0.25-all-segments"
    assert eval_label(DepthPolicy(), tasks=["gcd", "lcm"]) == "tasks-gcd+lcm"
    assert eval_label(DepthPolicy(exit="kl:1e-3", max_steps=8)) == "exit-kl-1e-3-max-steps-8"


def test_compare_reports_the_held_out_loss(folder):
    budget = Budget("steps", 2)
    plans = plan_runs([spec(folder)], budget, evals=1, eval_n=4)  # the spec's own data: section
    out = folder / "compare"
    (entry,) = run_compare(plans, budget, out, eval_n=4, progress_bar=False, say=lambda _: None)
    final = json.loads((out / "micro" / "eval.json").read_text())
    assert entry["status"] == "done" and entry["loss"] == final["loss"] and entry["perplexity"] == final["perplexity"]
    assert [p["step"] for p in entry["loss_curve"]] == [1, 2] and entry["loss_curve"][-1]["loss"] == entry["loss"]
    assert [p["step"] for p in entry["curve"]] == [1, 2]  # the final evaluation once, not also as logged
    header, (row,) = rows([entry])
    assert row[header.index("held-out loss")] == f"{entry['loss']:.4f}"


def test_the_table_ranks_runs_by_loss_when_every_accuracy_is_zero():
    base = {"status": "done", "params": 100, "flops_per_token": 1e6, "steps": 2, "tokens": 100, "train_flops": 1e8,
            "wall_s": 3.0, "accuracy": 0.0, "tasks": {"data": 0.0}}
    runs = [{**base, "spec": "a", "run": "a (seed 0)", "seed": 0, "loss": 3.25},
            {**base, "spec": "a", "run": "a (seed 1)", "seed": 1, "loss": 3.75},
            {**base, "spec": "b", "run": "b (seed 0)", "seed": 0, "loss": 5.5},
            {"spec": "c", "status": "failed", "params": 5, "steps": 2, "wall_s": 0.0, "error": "boom"}]
    header, body = rows(runs)
    column = header.index("held-out loss")
    assert header[column - 1] == "accuracy" and [r[column] for r in body] == ["3.2500", "3.7500", "5.5000", "-"]
    header, body = summary(runs)
    assert [r[header.index("loss: mean")] for r in body] == ["3.5000", "5.5000", "-"]
    md = markdown(runs, "steps=2", 4)
    assert "held-out loss" in md.splitlines()[0] and "| a (seed 0) |" in md
    without = [{k: v for k, v in r.items() if k != "loss"} for r in runs]  # compare.json of an older version
    assert "held-out loss" not in rows(without)[0] and "loss: mean" not in summary(without)[0]


def test_a_grid_run_reports_the_mean_cross_entropy_per_cell(tmp_path):
    from test_grids import GRID_SPEC

    from hrmspec.runtime.artifacts.grids import GridConfig, load_grids
    from hrmspec.runtime.execution.supervision import Supervisor

    grid_spec = load_spec_text(GRID_SPEC, overrides={"train.steps": 2, "train.save_every": 2})
    train(grid_spec, tmp_path, progress_bar=False)
    trained = json.loads((tmp_path / "eval.json").read_text())
    assert trained["n"] == 8 and trained["loss"] is not None and len(trained["samples"]) == 3
    res = evaluate_run(tmp_path, n=4)
    model, _, loaded, _ = load_run(tmp_path)
    rows = load_grids(GridConfig.from_dict(loaded.data), "eval")
    batch = rows.batch(torch.arange(4))
    with torch.no_grad():
        logits, _ = Supervisor(model).solve(batch)
    s = logits.double()
    s = torch.where(s < 0, 1 / (1 - s), s + 1)  # stablemax, the spec's loss, written out
    picked = (s / s.sum(-1, keepdim=True)).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    assert res["loss_tokens"] == batch["labels"].numel() and "perplexity" not in res
    assert res["loss"] == pytest.approx(float(-picked.log().mean()), rel=1e-6)
    assert res["samples"][0]["expected"].count("\n") == rows.side - 1  # drawn as a grid, row by row


def test_sweep_values_and_their_grid():
    from hrmspec.runtime.training.compare import CompareError, parse_sweep, sweep_grid

    assert parse_sweep("model.schedule[0].repeat=1,2,4") == ("model.schedule[0].repeat", [1, 2, 4])
    assert parse_sweep("data.tasks=[[gcd], [gcd, lcm]]") == ("data.tasks", [["gcd"], ["gcd", "lcm"]])
    assert parse_sweep("train.lr=0.001,0.003") == ("train.lr", [0.001, 0.003])
    grid = sweep_grid([("a", [1, 2]), ("b", ["x", "y", "z"])])
    assert grid[:3] == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"}] and len(grid) == 6
    for bad in ("train.lr=1,,2", "train.lr=1,1"):
        with pytest.raises(CompareError):
            parse_sweep(bad)
    with pytest.raises(CompareError, match="swept twice"):
        sweep_grid([("a", [1]), ("a", [2])])


def test_compare_sweeps_a_grid_of_variants_under_one_budget(folder, capsys):
    out = folder / "sweep"
    code = main(["compare", str(folder / "micro.yaml"), "--budget", "steps=1", "--out", str(out), "--n", "2",
                 "--evals", "0", "--no-progress", "--sweep", "model.schedule[0].repeat=1,2",
                 "--sweep", "model.d_model=32,64"])
    assert code == 0, capsys.readouterr().err
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert len(runs) == 4 and all(r["status"] == "done" for r in runs)
    # each variant trained the model its values make: parameters grow with d_model, calls with the repeat
    names = [r["spec"] for r in runs]
    assert names[0] == "micro [model.schedule[0].repeat=1, model.d_model=32]"
    params = {n: r["params"] for n, r in zip(names, runs)}
    assert params[names[1]] > params[names[0]] and params[names[0]] == params[names[2]]
    for r in runs:
        trained = load_spec_text((out / r["folder"] / "spec.yaml").read_text())
        repeat = trained.model.schedule[0].count
        assert f"repeat={repeat}," in r["spec"] and f"d_model={trained.model.d_model}]" in r["spec"]
    assert main(["compare", str(folder / "micro.yaml"), "--budget", "steps=1", "--out", str(folder / "sweep2"),
                 "--sweep", "model.d_model=32", "--sweep", "model.d_model=64"]) == 2
    assert "swept twice" in capsys.readouterr().err


def test_compare_scores_a_run_once_reusing_the_evaluation_training_ended_with(folder, monkeypatch):
    import hrmspec.runtime.training.compare as compare

    calls = []
    real = compare.evaluate_run
    monkeypatch.setattr(compare, "evaluate_run", lambda run, n: calls.append(n) or real(run, n=n))
    budget = Budget("steps", 2)
    out = folder / "once"
    (first,) = run_compare(plan_runs([spec(folder)], budget, evals=0, eval_n=4), budget, out, eval_n=4,
                           progress_bar=False, say=lambda _: None)
    assert calls == [] and first["n"] == 4
    assert first["loss"] == json.loads((out / "micro" / "eval.json").read_text())["loss"]
    # scored on another number of samples: the finished run is evaluated again, on that number
    (again,) = run_compare(plan_runs([spec(folder)], budget, evals=0, eval_n=3), budget, out, eval_n=3,
                           progress_bar=False, say=lambda _: None)
    assert calls == [3] and again["n"] == 3
