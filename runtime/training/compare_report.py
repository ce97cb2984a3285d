"""The report of `hrmspec compare`: a table (printed and DIR/compare.md) and DIR/compare.png, held-out
accuracy against training FLOPs, one line per run. With several seeds per spec, a second table gives
each spec's mean accuracy over its finished runs and their range."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from hrmspec.graph.analysis import human

COLUMNS = ("spec", "params", "FLOPs/token", "steps", "tokens", "train FLOPs", "wall", "accuracy")


def _clock(seconds: float | None) -> str:
    if not seconds:
        return "-"
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def rows(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The header and one row per run: the columns above, then one accuracy column per task."""
    tasks = sorted({t for r in runs for t in r.get("tasks") or {}})
    header = [*COLUMNS, *tasks] if len(tasks) > 1 else list(COLUMNS)
    body = []
    for r in runs:
        if r.get("status") != "done":
            first = ((r.get("error") or "").splitlines() or [""])[0]
            last = f"{r.get('status', 'failed')}: {first[:80]}"
            row = [_name(r), f"{r['params']:,}" if r.get("params") else "-", "-", str(r.get("steps") or "-"), "-",
                   "-", _clock(r.get("wall_s")), last]
        else:
            row = [_name(r), f"{r['params']:,}", human(r["flops_per_token"]), str(r["steps"]), human(r["tokens"]),
                   f"{r['train_flops']:.3g}", _clock(r["wall_s"]), _pct(r["accuracy"])]
        body.append(row + ([_pct((r.get("tasks") or {}).get(t)) for t in tasks] if len(tasks) > 1 else []))
    return header, body


def _name(r: dict) -> str:
    return r.get("run") or r["spec"]


def seeded(runs: list[dict]) -> bool:
    """Whether the comparison ran some spec under several seeds."""
    return any(r.get("seed") is not None for r in runs)


def summary(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The header and one row per spec: its finished runs, the mean accuracy and its range, per task too."""
    tasks = sorted({t for r in runs for t in r.get("tasks") or {}})
    header = ["spec", "runs", "accuracy: mean", "min", "max"] + (tasks if len(tasks) > 1 else [])
    body = []
    for spec in dict.fromkeys(r["spec"] for r in runs):
        done = [r for r in runs if r["spec"] == spec and r.get("status") == "done"]
        acc = [r["accuracy"] for r in done]
        row = [spec, f"{len(done)} of {sum(r['spec'] == spec for r in runs)}",
               _pct(sum(acc) / len(acc) if acc else None), _pct(min(acc, default=None)), _pct(max(acc, default=None))]
        for t in tasks if len(tasks) > 1 else []:
            per = [(r.get("tasks") or {}).get(t) for r in done]
            per = [v for v in per if v is not None]
            row.append(_pct(sum(per) / len(per) if per else None))
        body.append(row)
    return header, body


def print_table(runs: list[dict], budget: str, console: Console | None = None) -> None:
    console = console or Console(width=None if Console().is_terminal else 160)
    tables = [(f"Held-out accuracy at a budget of {budget}", rows(runs))]
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
    lines = [f"Budget {budget}; accuracy on {held_out} held-out samples per spec (the same for all).", "",
             *_markdown_table(*rows(runs))]
    if seeded(runs):
        lines += ["", "Mean over the seeds (finished runs):", "", *_markdown_table(*summary(runs))]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path, budget: str) -> Path:
    """Held-out accuracy (%) against training FLOPs, log scale; the final point of each spec a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn, colors = False, {}
    for r in runs:  # one line per run, one colour per spec (labelled once)
        points = [p for p in r.get("curve") or [] if p.get("flops") and p.get("accuracy") is not None]
        if r.get("status") != "done" or not points:
            continue
        x, y = [p["flops"] for p in points], [100 * p["accuracy"] for p in points]
        label = None if r["spec"] in colors else f"{r['spec']} ({human(r['params'])} params)"
        (line,) = ax.plot(x, y, marker="o", markersize=4, label=label, color=colors.get(r["spec"]))
        colors.setdefault(r["spec"], line.get_color())
        ax.plot(x[-1:], y[-1:], marker="*", markersize=13, color=line.get_color(), linestyle="none")
        drawn = True
    if drawn:
        ax.set_xscale("log")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(f"Held-out accuracy against training FLOPs (budget {budget})", fontsize=10)
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
