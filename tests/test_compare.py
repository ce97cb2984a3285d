"""`hrmspec compare`: budgets matched from the cost model, one data section for all, resume, failures kept."""

import json

import pytest
import yaml
from known_answers import KnownAnswers

from hrmspec.cli import main
from hrmspec.cost import RunFlops
from hrmspec.runtime.artifacts import checkpoint as ckpt
from hrmspec.runtime.artifacts.data import read_jsonl
from hrmspec.runtime.artifacts.plot import metric_records
from hrmspec.runtime.training import compare
from hrmspec.runtime.training.compare import Budget, CompareError, plan_runs, read_data, run_compare
from hrmspec.runtime.training.loop import train
from hrmspec.spec import load_spec

MODEL = """
  vocab: 300
  d_model: 16
  heads: 2
  ffn: 32
  max_seq_len: 48
"""
HRM = f"""
name: hrm
model:{MODEL}
  modules: {{L: {{layers: 1}}, H: {{layers: 1}}}}
  states: {{z_H: {{init: embed}}, z_L: {{init: buffer}}}}
  schedule:
    - repeat: 2
      do: [{{repeat: 2, do: ["z_L = L(z_L + z_H)"]}}, "z_H = H(z_H + z_L)"]
  output: z_H
  credit: {{depth: {{from: 2, to: 4, warmup: 0.5}}, priority: [H, L]}}
train: {{batch_size: 2, seq_len: 48, log_every: 1, save_every: 2, lr: 3.0e-3, max_new_tokens: 4, ema: null}}
"""
TRANSFORMER = f"""
name: transformer
model:{MODEL}
  modules: {{T: {{layers: 2}}}}
  states: {{h: {{init: embed}}}}
  schedule: ["h = T(h)"]
  output: h
  credit: none
train: {{batch_size: 3, seq_len: 32, log_every: 1, save_every: 2, lr: 3.0e-3, max_new_tokens: 4, ema: null}}
"""


@pytest.fixture
def workdir(tmp_path):
    """Two specs (an HRM and a Transformer, different batches and rows) and a JSONL data set."""
    words = [a + b + c for a in "abcd" for b in "efgh" for c in "ij"]
    for name, part in (("train", words[:24]), ("eval", words[24:])):
        lines = [json.dumps({"instruction": f"reverse {w}", "response": w[::-1]}) for w in part]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "data.yaml").write_text("source: jsonl\npath: train.jsonl\neval_path: eval.jsonl\n")
    (tmp_path / "hrm.yaml").write_text(HRM)
    (tmp_path / "transformer.yaml").write_text(TRANSFORMER)
    return tmp_path


def specs(root, *names, **overrides):
    return [load_spec(root / f"{n}.yaml", overrides or None) for n in names]


def four_hrm_steps(root) -> float:
    """The training FLOPs of four steps of the HRM spec, counted here from its per-token cost."""
    run = RunFlops(load_spec(root / "hrm.yaml"), seq_len=48)
    return 2 * 48 * sum(run.at(s / 4) for s in range(4))


def test_a_flops_budget_gives_each_spec_its_steps_within_one_steps_flops(workdir):
    budget = Budget.parse("flops=" + repr(four_hrm_steps(workdir)))
    hrm, tfm = plan_runs(specs(workdir, "hrm", "transformer"), budget, read_data(str(workdir / "data.yaml")))
    assert hrm.steps == 4 and tfm.steps > hrm.steps  # one call of two layers against four calls of one
    for p in (hrm, tfm):
        assert abs(p.train_flops - budget.value) <= max(p.step_flops)
        run = RunFlops(p.spec, p.seq_len)
        assert p.step_flops == [p.batch_size * p.seq_len * run.at(s / p.steps) for s in range(p.steps)]
    assert (tfm.batch_size, tfm.seq_len, tfm.tokens) == (3, 32, 3 * 32 * tfm.steps)
    assert hrm.spec.train["steps"] == 4 and hrm.spec.data["path"] == str(workdir / "train.jsonl")

    by_tokens = plan_runs(specs(workdir, "hrm", "transformer"), Budget.parse("tokens=960"),
                          read_data(str(workdir / "data.yaml")))
    assert [p.steps for p in by_tokens] == [10, 10]
    by_steps = plan_runs(specs(workdir, "hrm", "transformer"), Budget.parse("steps=7"),
                         read_data(str(workdir / "data.yaml")), evals=2)
    assert [(p.steps, p.spec.train["eval_every"]) for p in by_steps] == [(7, 3), (7, 3)]  # at steps 3 and 6


def test_budgets_and_data_that_cannot_be_shared_are_refused(workdir, monkeypatch):
    with pytest.raises(CompareError, match="expected flops=X, tokens=X or steps=N"):
        Budget.parse("flop=1e9")
    with pytest.raises(CompareError, match="whole number of steps"):
        Budget.parse("steps=2.5")
    with pytest.raises(CompareError, match="positive count"):
        Budget.parse("tokens=-3")
    data = read_data(str(workdir / "data.yaml"))
    grid = load_spec("trm-tiny")
    with pytest.raises(CompareError, match="different kinds of data"):
        plan_runs([*specs(workdir, "hrm"), grid], Budget("steps", 1), data)
    with pytest.raises(CompareError, match="no spec has a data: section"):
        plan_runs(specs(workdir, "hrm", "transformer"), Budget("steps", 1))
    other = load_spec(workdir / "hrm.yaml", {"name": "other", "data": {"source": "jsonl", "path": "x.jsonl"}})
    mine = load_spec(workdir / "transformer.yaml", {"data": {"source": "jsonl", "path": "y.jsonl"}})
    with pytest.raises(CompareError, match="data: sections differ"):
        plan_runs([other, mine], Budget("steps", 1))
    with pytest.raises(CompareError, match="two specs are named 'hrm'"):
        plan_runs(specs(workdir, "hrm", "hrm"), Budget("steps", 1), data)
    with pytest.raises(CompareError, match="source"):
        plan_runs(specs(workdir, "hrm"), Budget("steps", 1), {"source": "parquet"})
    monkeypatch.chdir(workdir)
    assert read_data("{source: jsonl, path: train.jsonl}")["path"] == str(workdir / "train.jsonl")
    with pytest.raises(CompareError, match="expected a YAML file or an inline mapping"):
        read_data("[1, 2]")
    (workdir / "sub").mkdir()
    (workdir / "sub" / "with-data.yaml").write_text(HRM + "data: {source: jsonl, path: ../train.jsonl}\n")
    assert read_data("sub/with-data.yaml") == {"source": "jsonl", "path": str(workdir / "train.jsonl")}
    # a spec's own data: section serves all, its paths taken against the spec's folder
    own = load_spec(workdir / "hrm.yaml", {"data": {"source": "jsonl", "path": "train.jsonl"}})
    plans = plan_runs([own, *specs(workdir, "transformer")], Budget("steps", 1))
    assert {p.spec.data["path"] for p in plans} == {str(workdir / "train.jsonl")}


def test_compare_trains_resumes_records_a_failure_and_skips_what_finished(workdir, monkeypatch, capsys):
    held_out, _ = read_jsonl(workdir / "eval.jsonl")
    # answers fixed in advance: the HRM answers the first held-out sample right, the Transformer the first three
    known = KnownAnswers(held_out, lambda i, model, options: i < {"hrm": 1, "transformer": 3}[model.spec.name])
    known.install(monkeypatch)
    accuracy = {"hrm": 0.25, "transformer": 0.75}
    budget = Budget.parse("flops=" + repr(four_hrm_steps(workdir)))
    bad = load_spec(workdir / "hrm.yaml", {"name": "too-small", "model.vocab": 100})
    chosen = [*specs(workdir, "hrm", "transformer"), bad]
    plans = plan_runs(chosen, budget, read_data(str(workdir / "data.yaml")), evals=1, eval_n=4)
    out = workdir / "out"
    train(plans[0].spec, out / "hrm", progress_bar=False, stop_after=2)  # an interrupted run

    runs = run_compare(plans, budget, out, eval_n=4, progress_bar=False)
    assert [r["status"] for r in runs] == ["done", "done", "failed"]
    assert "vocab_size 100 is too small" in runs[2]["error"]
    doc = json.loads((out / "compare.json").read_text())
    assert doc["budget"] == {"kind": "flops", "value": budget.value} and doc["runs"] == runs
    for r, p in zip(runs[:2], plans):
        assert r["params"] == p.params > 0 and r["steps"] == p.steps and r["tokens"] == p.tokens
        assert abs(r["train_flops"] - budget.value) <= max(p.step_flops)
        assert r["flops_per_token"] == pytest.approx(r["train_flops"] / r["tokens"])
        assert r["accuracy"] == accuracy[r["spec"]] and r["n"] == 4 and r["tasks"] == {"data": accuracy[r["spec"]]}
        assert r["wall_s"] >= r["train_s"] > 0
        # one evaluation on the way (at half the steps, rounded up), then the final one
        assert [c["step"] for c in r["curve"]] == [-(-p.steps // 2), p.steps]
        assert r["curve"][-1] == {"step": p.steps, "flops": r["train_flops"], "accuracy": r["accuracy"]}
        assert r["curve"][0]["accuracy"] == accuracy[r["spec"]]  # the evaluation on the way scores the same answers
    # the interrupted run went on from its checkpoint at step 2: every step logged once
    logged = [rec["step"] for rec in metric_records(out / "hrm" / "metrics.jsonl") if "loss" in rec]
    assert logged == [1, 2, 3, 4]

    again = []
    monkeypatch.setattr(compare, "train", lambda spec, *a, **k: again.append(spec.name) or train(spec, *a, **k))
    args = [str(workdir / f"{n}.yaml") for n in ("hrm", "transformer")]
    code = main(["compare", *args, "--budget", f"flops={budget.value!r}", "--data", str(workdir / "data.yaml"),
                 "--out", str(out), "--n", "4", "--evals", "1", "--no-progress"])
    assert code == 0 and again == []  # both finished: skipped
    text = capsys.readouterr().out
    assert text.count("finished earlier, skipped") == 2 and "Held-out accuracy" in text
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "compare.md").read_text()
    assert "| hrm |" in md and "| transformer |" in md and "too-small" not in md  # the run of this command only
    assert json.loads((out / "compare.json").read_text())["runs"][:2] == runs[:2]

    # another budget into the same folder: the runs there belong to another plan, and stay untouched
    other = plan_runs(specs(workdir, "hrm"), Budget("steps", 5), read_data(str(workdir / "data.yaml")))
    (entry,) = run_compare(other, Budget("steps", 5), out, eval_n=4, say=lambda _: None)
    assert entry["status"] == "failed" and "holds a run of another plan (its train differ)" in entry["error"]
    assert again == [] and [p.name for p in ckpt.list_checkpoints(out / "hrm")][-1] == "step_00000004"


def test_any_exception_in_one_spec_is_recorded_and_retried_while_the_others_finish(workdir, monkeypatch):
    calls, scored = [], []

    def fake_train(spec, out, **kwargs):
        calls.append(spec.name)
        if spec.name == "hrm":
            raise RuntimeError("boom")
        last = out / "checkpoints" / f"step_{spec.train['steps']:08d}"  # what the compare reads of a checkpoint
        last.mkdir(parents=True)
        (last / "trainer.pt").write_bytes(b"")
        (last / "spec.yaml").write_text(yaml.safe_dump(spec.raw))

    def fake_eval(run, n):
        scored.append((run.name, n))
        (run / "eval.json").write_text("{}")
        return {"accuracy": 0.5, "n": n, "tasks": {"data": {"accuracy": 0.5, "n": n}}}

    monkeypatch.setattr(compare, "train", fake_train)
    monkeypatch.setattr(compare, "evaluate_run", fake_eval)
    plans = plan_runs(specs(workdir, "hrm", "transformer"), Budget("steps", 3), read_data(str(workdir / "data.yaml")))
    runs = run_compare(plans, Budget("steps", 3), workdir / "out", eval_n=4, say=lambda _: None)
    assert [(r["status"], r["error"]) for r in runs] == [("failed", "RuntimeError: boom"), ("done", None)]
    assert runs[1]["accuracy"] == 0.5 and runs[1]["tasks"] == {"data": 0.5} and runs[1]["curve"][-1]["step"] == 3
    run_compare(plans, Budget("steps", 3), workdir / "out", eval_n=4, say=lambda _: None)
    assert calls == ["hrm", "transformer", "hrm"]  # the failed one is retried, the finished one skipped
    run_compare(plans, Budget("steps", 3), workdir / "out", eval_n=5, say=lambda _: None)
    assert calls == ["hrm", "transformer", "hrm", "hrm"]  # another held-out size: evaluated again, not trained
    assert scored == [("transformer", 4), ("transformer", 5)]


@pytest.mark.parametrize("args, message", [
    (["--budget", "flops=lots"], "--budget flops: expected a positive count"),
    (["--budget", "steps=3", "--data", "{source: jsonl}"], "data.path: source jsonl needs a path"),
    (["--budget", "steps=3", "--n", "0"], "--n must be >= 1"),
])
def test_cli_refuses_bad_input_in_one_line(workdir, capsys, args, message):
    code = main(["compare", str(workdir / "hrm.yaml"), "--out", str(workdir / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1



def test_the_table_has_a_column_per_task_and_names_a_failure():
    from hrmspec.runtime.training.compare_report import markdown

    done = {"spec": "a", "status": "done", "params": 1234, "flops_per_token": 2.5e6, "steps": 10, "tokens": 5000,
            "train_flops": 1.25e10, "wall_s": 75.0, "accuracy": 0.5, "tasks": {"gcd": 0.25, "lcm": 0.75}}
    failed = {"spec": "b|c", "status": "failed", "params": 99, "steps": 3, "wall_s": 0.0,
              "error": "train.lr: expected a number\n  hint: ..."}
    lines = markdown([done, failed], "flops=1e10", 200).splitlines()
    assert lines[2] == ("| spec | params | FLOPs/token | steps | tokens | train FLOPs | wall | accuracy | gcd | lcm |")
    assert lines[4] == "| a | 1,234 | 2.50M | 10 | 5.00k | 1.25e+10 | 0:01:15 | 50.0% | 25.0% | 75.0% |"
    assert lines[5] == "| b\\|c | 99 | - | 3 | - | - | - | failed: train.lr: expected a number | - | - |"


def test_a_signal_records_the_spec_as_interrupted_and_stops_the_command(workdir, monkeypatch):
    from hrmspec.runtime.artifacts.runfolder import TrainInterrupted

    def stopped(spec, out, **kwargs):
        raise TrainInterrupted("stopped by SIGTERM after step 2; its checkpoint is written: continue with ...", 15)

    monkeypatch.setattr(compare, "train", stopped)
    plans = plan_runs(specs(workdir, "hrm", "transformer"), Budget("steps", 3), read_data(str(workdir / "data.yaml")))
    with pytest.raises(TrainInterrupted, match="hrm: stopped by SIGTERM after step 2, with a checkpoint; run the same "
                       "command again") as e:
        run_compare(plans, Budget("steps", 3), workdir / "out", say=lambda _: None)
    assert e.value.exit_code == 143
    (entry,) = json.loads((workdir / "out" / "compare.json").read_text())["runs"]  # the second never started
    assert entry["status"] == "interrupted" and entry["spec"] == "hrm"


def test_seeds_run_each_spec_under_its_own_seeds_and_the_report_averages_them(workdir, monkeypatch, capsys):
    held_out, _ = read_jsonl(workdir / "eval.jsonl")
    # seed 0 answers the first held-out sample right, seed 1 the first three: accuracies 1/4 and 3/4
    known = KnownAnswers(held_out, lambda i, model, options: i < {0: 1, 1: 3}[model.spec.train["seed"]])
    known.install(monkeypatch)
    trained = []
    monkeypatch.setattr(compare, "train",
                        lambda spec, *a, **k: trained.append(spec.train["seed"]) or train(spec, *a, **k))
    out = workdir / "out"
    args = ["compare", str(workdir / "hrm.yaml"), "--budget", "steps=2", "--data", str(workdir / "data.yaml"),
            "--out", str(out), "--n", "4", "--evals", "0", "--seeds", "2", "--no-progress"]
    assert main(args) == 0
    assert trained == [0, 1]
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert [(r["run"], r["seed"], r["folder"], r["accuracy"]) for r in runs] == [
        ("hrm (seed 0)", 0, "hrm/seed0", 0.25), ("hrm (seed 1)", 1, "hrm/seed1", 0.75)]
    # the two runs started from different weights
    first, second = (ckpt.model_tensors(ckpt.latest_checkpoint(out / "hrm" / f"seed{k}")) for k in (0, 1))
    assert any(not (first[n] == second[n]).all() for n in first)
    md = (out / "compare.md").read_text()
    assert "| hrm (seed 0) |" in md and "| hrm (seed 1) |" in md
    assert "| hrm | 2 of 2 | 50.0% | 25.0% | 75.0% |" in md  # the mean and the range
    capsys.readouterr()
    assert main(args) == 0 and trained == [0, 1]  # both finished: skipped by run, not by spec
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    with pytest.raises(CompareError, match="--seeds: expected 1 to 64 runs per spec, found 0"):
        plan_runs(specs(workdir, "hrm"), Budget("steps", 2), seeds=0)
