"""The report of `hrmspec compare`: a table (printed and DIR/compare.md) and DIR/compare.png, held-out
accuracy and held-out loss against training FLOPs, one line per run. With several seeds per spec, a
second table gives each spec's mean accuracy over its finished runs and their range, and the mean loss.

The held-out loss (the mean cross-entropy of the held-out responses' tokens, teacher-forced; of the
cells for grids) ranks runs whose accuracies are all 0% at a small budget: lower is better. Its column
is shown when a run has one (compare.json files written before it have none)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from hrmspec.graph.analysis import human

COLUMNS = ("spec", "params", "FLOPs/token", "steps", "tokens", "train FLOPs", "wall", "accuracy")
LOSS = "held-out loss"


def _clock(seconds: float | None) -> str:
    if not seconds:
        return "-"
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _loss(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def with_loss(runs: list[dict]) -> bool:
    """Whether some finished run has a held-out loss (the table and the plot then show it)."""
    return any(r.get("status") == "done" and r.get("loss") is not None for r in runs)


def rows(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The header and one row per run: the columns above, the held-out loss (when a run has one), then one
    accuracy column per task."""
    tasks = sorted({t for r in runs for t in r.get("tasks") or {}})
    loss = [LOSS] if with_loss(runs) else []
    header = [*COLUMNS, *loss, *(tasks if len(tasks) > 1 else [])]
    body = []
    for r in runs:
        if r.get("status") != "done":
            first = ((r.get("error") or "").splitlines() or [""])[0]
            last = f"{r.get('status', 'failed')}: {first[:80]}"
            row = [_name(r), f"{r['params']:,}" if r.get("params") else "-", "-", str(r.get("steps") or "-"), "-",
                   "-", _clock(r.get("wall_s")), last] + ["-" for _ in loss]
        else:
            row = [_name(r), f"{r['params']:,}", human(r["flops_per_token"]), str(r["steps"]), human(r["tokens"]),
                   f"{r['train_flops']:.3g}", _clock(r["wall_s"]), _pct(r["accuracy"])]
            row += [_loss(r.get("loss")) for _ in loss]
        body.append(row + ([_pct((r.get("tasks") or {}).get(t)) for t in tasks] if len(tasks) > 1 else []))
    return header, body


def _name(r: dict) -> str:
    return r.get("run") or r["spec"]


def seeded(runs: list[dict]) -> bool:
    """Whether the comparison ran some spec under several seeds."""
    return any(r.get("seed") is not None for r in runs)


def summary(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The header and one row per spec: its finished runs, the mean accuracy and its range, the mean held-out loss
    (when a run has one), the mean accuracy per task."""
    tasks = sorted({t for r in runs for t in r.get("tasks") or {}})
    loss = with_loss(runs)
    header = ["spec", "runs", "accuracy: mean", "min", "max", *(["loss: mean"] if loss else []),
              *(tasks if len(tasks) > 1 else [])]
    body = []
    for spec in dict.fromkeys(r["spec"] for r in runs):
        done = [r for r in runs if r["spec"] == spec and r.get("status") == "done"]
        acc = [r["accuracy"] for r in done]
        row = [spec, f"{len(done)} of {sum(r['spec'] == spec for r in runs)}",
               _pct(sum(acc) / len(acc) if acc else None), _pct(min(acc, default=None)), _pct(max(acc, default=None))]
        if loss:
            scored = [r["loss"] for r in done if r.get("loss") is not None]
            row.append(_loss(sum(scored) / len(scored) if scored else None))
        for t in tasks if len(tasks) > 1 else []:
            per = [(r.get("tasks") or {}).get(t) for r in done]
            per = [v for v in per if v is not None]
            row.append(_pct(sum(per) / len(per) if per else None))
        body.append(row)
    return header, body


def print_table(runs: list[dict], budget: str, console: Console | None = None) -> None:
    console = console or Console(width=None if Console().is_terminal else 160)
    tables = [(f"Held-out accuracy{' and loss' if with_loss(runs) else ''} at a budget of {budget}", rows(runs))]
    if seeded(runs):
        tables.append(("Mean over the seeds", summary(runs)))
    for title, (header, body) in tables:
        t = Table(title=title)
        for col in header:
            t.add_column(col, justify="left" if col == "spec" else "right")
        for row in body:
            t.add_row(*row)
        console.print(t)


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" if c == "spec" else "---:" for c in header) + "|",
            *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body)]


def markdown(runs: list[dict], budget: str, held_out: int) -> str:
    loss = "; held-out loss: the mean cross-entropy of their answers' tokens, lower is better" if with_loss(runs) \
        else ""
    lines = [f"Budget {budget}; accuracy on {held_out} held-out samples per spec (the same for all){loss}.", "",
             *_markdown_table(*rows(runs))]
    if seeded(runs):
        lines += ["", "Mean over the seeds (finished runs):", "", *_markdown_table(*summary(runs))]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path, budget: str) -> Path:
    """Held-out accuracy (%) against training FLOPs, log scale, and below it the held-out loss when a run has
    one; the final point of each spec a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("curve", "accuracy", "held-out accuracy (%)", 100)]
    panels += [("loss_curve", "loss", "held-out loss", 1)] if with_loss(runs) else []
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 4.5 * len(panels)), sharex=True, squeeze=False)
    colors: dict = {}
    for ax, (curve, key, label, scale) in zip(axes[:, 0], panels):
        drawn = False
        for r in runs:  # one line per run, one colour per spec (labelled once)
            points = [p for p in r.get(curve) or [] if p.get("flops") and p.get(key) is not None]
            if r.get("status") != "done" or not points:
                continue
            x, y = [p["flops"] for p in points], [scale * p[key] for p in points]
            name = None  # the legend is the top panel's, one entry per spec
            if ax is axes[0, 0] and r["spec"] not in colors:
                name = f"{r['spec']} ({human(r['params'])} params)"
            (line,) = ax.plot(x, y, marker="o", markersize=4, label=name, color=colors.get(r["spec"]))
            colors.setdefault(r["spec"], line.get_color())
            ax.plot(x[-1:], y[-1:], marker="*", markersize=13, color=line.get_color(), linestyle="none")
            drawn = True
        if drawn:
            ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, "no finished run", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    top = axes[0, 0]
    if colors:
        top.legend(loc="best", fontsize=8)
    top.set_ylim(-2, 102)
    axes[-1, 0].set_xlabel("training FLOPs")
    what = "accuracy and loss" if len(panels) > 1 else "accuracy"
    top.set_title(f"Held-out {what} against training FLOPs (budget {budget})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: Path, runs: list[dict], budget: str, held_out: int) -> tuple[Path, Path]:
    """DIR/compare.md and DIR/compare.png."""
    md = out / "compare.md"
    md.write_text(markdown(runs, budget, held_out))
    return md, plot(runs, out / "compare.png", budget)


__all__ = ["markdown", "plot", "print_table", "rows", "seeded", "summary", "write_report"]
