"""The CPU demo of deep supervision: trm-tiny against a Transformer of the same parameters and tokens.

    python benchmarks/grid_demo.py                     # trains both (~7 min on 2 idle cores), evaluates, writes results
    python benchmarks/grid_demo.py --reuse             # report runs already in runs/grid-demo/ without training

Both train on 4 x 4 mini sudoku from reasoning-gym (3,000 puzzles and 3 augmented copies of each),
with the same batches of 64 rows for the same number of steps, so they see the same training tokens:

    trm-tiny           one 2-layer net (d 64) called 8 times per segment (T 2 x (n 3 + 1)), the last
                       outer cycle with gradient, up to 8 segments per sample with BCE halting
    transformer-grid   the same 2-layer net called once per step, no recurrence, no supervision

Held-out: 500 puzzles from other seeds (those also in training dropped); a puzzle is solved when the
predicted grid is a valid completion. trm-tiny is evaluated halting where its head says and with
every segment. Results: benchmarks/results/grid_demo.{md,json,png}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from report import environment  # noqa: E402

from hrmspec.graph import build_graph  # noqa: E402
from hrmspec.graph.analysis import analyse  # noqa: E402
from hrmspec.runtime.training.heldout import evaluate_run  # noqa: E402
from hrmspec.spec import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SPECS = ("trm-tiny", "transformer-grid")
N_EVAL = 500


def train(name: str, out: Path) -> float:
    """Wall seconds of `hrmspec train name --out out` (a fresh run)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hrmspec", "train", name, "--out", str(out), "--no-progress", "--overwrite"],
                   check=True, cwd=ROOT)
    return time.perf_counter() - t


def curve(run: Path) -> list[tuple[int, float]]:
    """(step, held-out solved) of the periodic evaluations in metrics.jsonl."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["eval"]["accuracy"]) for r in recs if "eval" in r]


def report(name: str, run: Path, wall: float | None) -> dict:
    spec = load_spec(name)
    cfg = spec.train
    row = spec.model.max_seq_len + (spec.model.puzzle.positions if spec.model.puzzle else 0)
    res = evaluate_run(run, n=N_EVAL)
    out = {"spec": name, "params": analyse(build_graph(spec)).params, "steps": cfg["steps"],
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
             "| spec | parameters | training tokens | wall time (train) | held-out solved | segments used (of max) "
             "| solved, every segment |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        wall = f"{r['wall_s']:.0f} s" if r["wall_s"] else "-"
        every = f"{100 * r['solved_all_segments']:.1f}%" if "solved_all_segments" in r else "-"
        lines.append(f"| {r['spec']} | {r['params']:,} | {r['tokens']:,} | {wall} | {100 * r['solved']:.1f}% "
                     f"| {r['segments']:.2f} ({r['max_segments']}) | {every} |")
    lines += ["", f"Environment: {env}.", ""]
    (RESULTS / "grid_demo.md").write_text("\n".join(lines))
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in rows:
        pts = r["curve"] + [(r["steps"], r["solved"])]
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=f"{r['spec']} ({r['params']:,} params)")
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
    args = ap.parse_args()
    rows = []
    for name in SPECS:
        run = Path(args.runs) / name
        wall = None if args.reuse else train(name, run)
        rows.append(report(name, run, wall))
        print({k: v for k, v in rows[-1].items() if k != "curve"}, flush=True)
    write(rows)
    print((RESULTS / "grid_demo.md").read_text())


if __name__ == "__main__":
    main()
