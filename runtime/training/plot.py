"""`hrmspec plot`: loss, held-out accuracy and credit depth of a run against steps."""

from __future__ import annotations

import json
from pathlib import Path

from hrmspec.errors import HrmspecError


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise HrmspecError(f"no metrics in {path}: train first")
    steps, evals = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            (evals if "eval" in rec else steps).append(rec)
    return steps, evals


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    steps, evals = read_metrics(run_dir)
    final = run_dir / "eval.json"
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    x = [r["step"] for r in steps]
    axes[0].plot(x, [r["loss"] for r in steps])
    axes[0].set_ylabel("loss (response tokens)")
    axes[0].set_yscale("log")
    if evals:
        axes[1].plot([r["step"] for r in evals], [100 * r["eval"]["accuracy"] for r in evals], marker="o", label="all")
    if final.exists():
        res = json.loads(final.read_text())
        last = x[-1] if x else 0
        axes[1].plot([last], [100 * res["accuracy"]], marker="*", markersize=12, linestyle="none",
                     label=f"final: {100 * res['accuracy']:.1f}% of {res['n']} (eval.json)")
    axes[1].set_ylabel("held-out accuracy %")
    axes[1].set_ylim(0, 105)
    axes[1].legend(loc="lower right")
    axes[2].step(x, [r["credit_depth"] or 0 for r in steps], where="post")
    axes[2].set_ylabel("credit depth")
    axes[2].set_xlabel("step")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = Path(out) if out else run_dir / "training.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
