"""`hrmspec plot`: loss, held-out accuracy and credit depth of a run against steps."""

from __future__ import annotations

import json
from pathlib import Path

from hrmspec.errors import HrmspecError


def metric_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a last line cut short (a run killed while writing it) is left out,
    a broken line before it is an error naming the line."""
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    out = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines):
                break
            raise HrmspecError(f"{path}:{i}: not a JSON record; the file is damaged") from None
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise HrmspecError(f"no metrics in {path}: train first")
    steps, evals = [], []
    for rec in metric_records(path):
        if "eval" in rec or "loss" in rec:
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
