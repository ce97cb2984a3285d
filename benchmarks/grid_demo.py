"""The CPU demo of deep supervision: trm-tiny against a Transformer of the same parameters and tokens.

    python benchmarks/grid_demo.py                     # both, 3 seeds each (~22 min on 2 idle cores), evaluated
    python benchmarks/grid_demo.py --seeds 1           # one seed each (~7 min)
    python benchmarks/grid_demo.py --reuse             # report runs already in runs/grid-demo/ without training

Both train on 4 x 4 mini sudoku from reasoning-gym (3,000 puzzles and 3 augmented copies of each),
with the same batches of 64 rows for the same number of steps, so they see the same training tokens:

    trm-tiny           one 2-layer net (d 64) called 8 times per segment (T 2 x (n 3 + 1)), the last
                       outer cycle with gradient, up to 8 segments per sample with BCE halting
    transformer-grid   the same 2-layer net called once per step, no recurrence, no supervision

Held-out: 500 puzzles from other seeds (those also in training dropped); a puzzle is solved when the
predicted grid is a valid completion. trm-tiny is evaluated halting where its head says and with
every segment. Each spec trains with `train.seed` 0, 1, ... (weights, batch order): at this size the
final accuracy of one run moves by several points with any change of rounding (a reordered sum
early in training), so the table gives every seed and their mean. Results:
benchmarks/results/grid_demo.{md,json,png}.
"""

from __future__ import annotations

# OMP_WAIT_POLICY is left as a training run has it (PASSIVE makes a step 1.5x slower on AVX2 cores)
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from report import environment, seed_mean, seed_percent

from hrmspec.graph import build_graph
from hrmspec.graph.analysis import analyse
from hrmspec.runtime.evaluate.heldout import evaluate_run
from hrmspec.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SPECS = ("trm-tiny", "transformer-grid")
N_EVAL = 500


def train(name: str, out: Path, seed: int) -> float:
    """Wall seconds of `hrmspec train name --out out --set train.seed=seed` (a fresh run)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hrmspec", "train", name, "--out", str(out), "--no-progress", "--overwrite",
                    "--set", f"train.seed={seed}"], check=True, cwd=ROOT)
    return time.perf_counter() - t


def curve(run: Path) -> list[tuple[int, float]]:
    """(step, held-out solved) of the periodic evaluations in metrics.jsonl."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["eval"]["accuracy"]) for r in recs if "eval" in r]


def report(name: str, run: Path, wall: float | None, seed: int) -> dict:
    spec = load_spec(name)
    cfg = spec.train
    row = spec.model.max_seq_len + (spec.model.puzzle.positions if spec.model.puzzle else 0)
    res = evaluate_run(run, n=N_EVAL)
    out = {"spec": name, "seed": seed, "params": analyse(build_graph(spec)).params, "steps": cfg["steps"],
           "batch": cfg["batch_size"], "tokens": cfg["steps"] * cfg["batch_size"] * row, "wall_s": wall,
           "solved": res["accuracy"], "n": res["n"], "segments": res.get("segments", 1.0),
           "max_segments": res.get("max_segments", 1), "curve": curve(run)}
    if out["max_segments"] > 1:
        every = evaluate_run(run, n=N_EVAL, all_segments=True)
        out["solved_all_segments"] = every["accuracy"]
    return out


def write(rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    env = environment([torch.get_num_threads()])
    (RESULTS / "grid_demo.json").write_text(json.dumps({"rows": rows, "environment": env}, indent=2))
    lines = ["# Deep supervision on a CPU: trm-tiny vs a Transformer of the same size", "",
             f"4 x 4 mini sudoku, {rows[0]['n']} held-out puzzles ({N_EVAL} drawn, those seen in training dropped; "
             "solved: a valid completion). "
             "`python benchmarks/grid_demo.py`.", "",
             "| spec | run | parameters | training tokens | wall time (train) | held-out solved "
             "| segments used (of max) | solved, every segment |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(_row(r["spec"], f"seed {r['seed']}", [r]))
    lines += ["", "Mean over the seeds:", "", "| spec | seeds | parameters | training tokens | wall time (train) "
              "| held-out solved (min-max) | segments used (of max) | solved, every segment (min-max) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["spec"] for r in rows):
        mine = [r for r in rows if r["spec"] == name]
        lines.append(_row(name, str(len(mine)), mine, spread=True))
    lines += ["", f"Environment: {env}.", ""]
    (RESULTS / "grid_demo.md").write_text("\n".join(lines))
    plot(rows)


def _row(name: str, label: str, runs: list[dict], spread: bool = False) -> str:
    """A table row: the runs' mean of each number, with the range of the accuracies when `spread`."""
    def mean(key):
        return seed_mean(runs, key)

    def pct(key):
        return seed_percent(runs, key, spread)

    r = runs[0]
    wall = f"{mean('wall_s'):.0f} s" if all(x["wall_s"] for x in runs) else "-"
    every = pct("solved_all_segments") if "solved_all_segments" in r else "-"
    return (f"| {name} | {label} | {r['params']:,} | {r['tokens']:,} | {wall} | {pct('solved')} "
            f"| {mean('segments'):.2f} ({r['max_segments']}) | {every} |")


def plot(rows: list[dict]) -> None:
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = {}
    for r in rows:  # one line per run, one colour per spec, labelled once
        pts = r["curve"] + [(r["steps"], r["solved"])]
        first = r["spec"] not in colors
        line, = ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", alpha=0.8, color=colors.get(r["spec"]),
                        label=f"{r['spec']} ({r['params']:,} params)" if first else None)
        colors.setdefault(r["spec"], line.get_color())
    ax.set_xlabel("training step (64 puzzles each)")
    ax.set_ylabel("held-out puzzles solved (%)")
    ax.set_title("4 x 4 mini sudoku on a CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "grid_demo.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", action="store_true", help="report the runs in --runs without training")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "grid-demo"))
    ap.add_argument("--seeds", type=int, default=3, help="runs per spec, train.seed 0 .. N-1 (default 3)")
    args = ap.parse_args()
    rows = []
    for name in SPECS:
        for seed in range(args.seeds):
            run = Path(args.runs) / name / f"seed{seed}"
            wall = None if args.reuse else train(name, run, seed)
            rows.append(report(name, run, wall, seed))
            print({k: v for k, v in rows[-1].items() if k != "curve"}, flush=True)
    write(rows)
    print((RESULTS / "grid_demo.md").read_text())


if __name__ == "__main__":
    main()
