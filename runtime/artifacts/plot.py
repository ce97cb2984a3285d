"""`hrmspec plot`: loss, held-out accuracy, credit depth and halting of a run against steps; a `compare`
folder: each variant's loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hrmspec.errors import HrmspecError
from hrmspec.graph.credit_plan import credit_depth
from hrmspec.graph.layout import loop_layout, unroll
from hrmspec.runtime.artifacts.data import bounded_lines
from hrmspec.runtime.artifacts.files import (
    CHECKPOINT,
    INSIDE_CHECKPOINTS,
    OutputError,
    atomic_write,
    protected_folder,
    writing,
)
from hrmspec.spec.load import load_spec
from hrmspec.spec.source import read_json

MAX_RECORD_BYTES = 1 << 20  # a metrics record is a few hundred bytes; a longer line is damage, never read whole


def metric_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, streamed line by line (memory bounded by MAX_RECORD_BYTES whatever
    the file holds); a last line cut short (a run killed while writing it) is left out, a broken line
    before it is an error naming the line."""
    out, broken = [], None  # broken: (line number, why) of a bad line, an error once a line follows it
    with open(path, "rb") as f:
        for number, raw in enumerate(bounded_lines(f, MAX_RECORD_BYTES), start=1):
            if broken is not None:
                raise HrmspecError(f"{path}:{broken[0]}: {broken[1]}; the file is damaged")
            if raw is None:
                broken = (number, f"a line of more than {MAX_RECORD_BYTES:,} bytes, not a metrics record")
                continue
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8", errors="replace"))
            except (ValueError, RecursionError):
                broken = (number, "not a JSON record")
                continue
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
    """Plot a run (loss, held-out accuracy, credit depth, halting) or a `compare` folder (each variant's
    loss on one figure) to `out` (default DIR/training.png); returns the path written."""
    run_dir = Path(run_dir)
    path = Path(out) if out else run_dir / "training.png"
    compare = is_compare_folder(run_dir)
    metrics = None if compare else read_metrics(run_dir)  # no metrics: one line before the image's name is checked
    fmt = image_format(path)  # before anything is drawn
    return save_figure(compare_figure(run_dir) if compare else training_figure(run_dir, metrics), path, fmt)


def plot_readouts(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """The per-cycle readouts training logged (`readout` records of metrics.jsonl) as their own figure, to
    `out` (default DIR/readout.png); None when the run logged none (or `run_dir` is a compare folder)."""
    run_dir = Path(run_dir)
    if is_compare_folder(run_dir):
        return None
    steps, _ = read_metrics(run_dir)
    logged = [r for r in steps if isinstance(r.get("readout"), dict) and _readout_ok(r["readout"])]
    if not logged:
        return None
    path = Path(out) if out else run_dir / "readout.png"
    fmt = image_format(path)
    return save_figure(readout_figure(run_dir, logged), path, fmt)


def save_figure(fig, path: str | Path, fmt: str | None = None, what: str = "--out") -> Path:
    """Write `fig` to `path` in `fmt` (default: the one its suffix names, `image_format`) through a temp file
    renamed over it: a link there is replaced, never followed; a failure is one line. The path written."""
    path = Path(path)
    fmt = fmt or image_format(path, what)
    with writing(path):
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format=fmt))
    return path


def _readout_ok(r: dict) -> bool:
    """A readout record as training writes it (runtime/evaluate/readout.py `compact`): lists of numbers."""
    lists = [r.get(k) for k in ("loss", "accuracy", "norm", "change")]
    return all(isinstance(v, list) and all(x is None or _number(x) for x in v) for v in lists) and bool(lists[0])


MAX_CURVES = 6  # readouts drawn per panel: the first, the last and evenly spaced ones between


def readout_figure(run_dir: Path, logged: list[dict]):
    """Loss and accuracy read out after each step of the loop (one curve per logged training step, darker
    later), and how far each module call moved its state (the last readout): the depth a model uses, and
    whether its latent settles."""
    fig, axes = new_figure(3, 9, sharex=False)
    pick = sorted({round(i * (len(logged) - 1) / max(MAX_CURVES - 1, 1)) for i in range(MAX_CURVES)})
    chosen = [logged[i] for i in pick]
    from matplotlib import colormaps

    shades = colormaps["viridis_r"]
    for n, rec in enumerate(chosen):
        r = rec["readout"]
        depth = list(range(1, len(r["loss"]) + 1))
        color = shades(0.15 + 0.85 * n / max(len(chosen) - 1, 1))  # light early, dark late
        axes[0].plot(depth, r["loss"], marker=".", color=color, label=f"step {rec['step']}")
        axes[1].plot(depth, [100 * v for v in r["accuracy"]], marker=".", color=color)
    axes[0].set_ylabel("loss read out")
    axes[0].legend(loc="upper right", fontsize="small")
    axes[1].set_ylabel("token accuracy %")
    axes[1].set_xlabel("step of the loop (H cycle) read out")
    for ax in axes[:2]:
        ax.xaxis.get_major_locator().set_params(integer=True)
    last = chosen[-1]["readout"]
    calls = last.get("calls") if isinstance(last.get("calls"), list) else []
    change = last["change"]
    x = list(range(len(change)))
    states = {}
    for i, text in enumerate(calls[: len(change)]):
        states.setdefault(str(text).split("=")[0].strip(), []).append(i)
    for name, idx in (states or {"state": x}).items():
        axes[2].plot(idx, [change[i] for i in idx], marker="o", linestyle="-", label=name)
    axes[2].set_yscale("log" if all(v and v > 0 for v in change) else "linear")
    axes[2].set_ylabel("||new - old|| / ||new||")
    axes[2].set_xlabel(f"module call (step {chosen[-1]['step']})")
    axes[2].legend(loc="upper right", fontsize="small")
    fig.suptitle(f"{run_dir.name}: per-cycle readout")
    fig.tight_layout()
    return fig


def new_figure(rows: int, height: float, sharex: bool = True):
    """A figure of `rows` axes (sharing x), on the Agg canvas (no pyplot: no global state, no windows)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=sharex, squeeze=False)[:, 0]
    return fig, list(axes)


def training_figure(run_dir: str | Path, metrics: tuple[list[dict], list[dict]] | None = None):
    """The figure of one run: loss, held-out accuracy, credit depth and, when metrics.jsonl logs them, the
    halting steps (mean steps per position, or segments per sample) against the step. `metrics`: the run's
    `read_metrics`, when already read."""
    run_dir = Path(run_dir)
    steps, evals = metrics or read_metrics(run_dir)
    spec = _run_spec(run_dir)
    halting = [r for r in steps if _number(r.get("steps")) or _number(r.get("segments"))]
    fig, axes = new_figure(4 if halting else 3, 10 if halting else 8)
    x = [r["step"] for r in steps]
    losses = [r["loss"] for r in steps]
    axes[0].plot(x, losses, marker="." if len(x) < 20 else None)  # a few points: each one shown
    axes[0].set_ylabel("loss (response tokens)")
    axes[0].set_yscale("log")
    plain_log_ticks(axes[0].yaxis, losses)
    _accuracy(axes[1], run_dir, evals, x[-1] if x else 0)
    _credit(axes[2], steps, spec)
    if halting:
        _halting(axes[3], halting, spec)
    axes[-1].set_xlabel("step")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    return fig


def _accuracy(ax, run_dir: Path, evals: list[dict], last: int) -> None:
    if evals:
        ax.plot([r["step"] for r in evals], [100 * r["eval"]["accuracy"] for r in evals], marker="o", label="all")
    final = run_dir / "eval.json"
    if final.exists():
        res = json.loads(final.read_text())
        ax.plot([last], [100 * res["accuracy"]], marker="*", markersize=12, linestyle="none",
                label=f"final: {100 * res['accuracy']:.1f}% of {res['n']} (eval.json)")
    ax.set_ylabel("held-out accuracy %")
    ax.set_ylim(0, 105)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")


def _credit(ax, steps: list[dict], spec) -> None:
    """The credit depth as the plan ramps it, from step 0; a plan without a depth says so instead of a flat 0."""
    ax.set_ylabel("credit depth")
    logged = [(r["step"], r["credit_depth"]) for r in steps if _number(r.get("credit_depth"))]
    credit = spec.model.credit if spec is not None else None
    if credit is not None and credit.mode == "none":
        return _say(ax, "no credit limit: every call carries gradient (credit: none)")
    if credit is not None and credit.mode != "depth":
        return _say(ax, f"credit {credit_words(credit)}: no depth ramp")
    if not logged:
        return _say(ax, "no credit depth logged")
    if credit is not None:  # the ramp's start, which the first log line (at step log_every) misses
        start = (0, credit_depth(credit, 0.0))
    else:  # the run's spec cannot be read: the first depth logged, from step 0
        start = (0, logged[0][1])
    points = [start] + [p for p in logged if p[0] > 0]
    ax.step([p[0] for p in points], [p[1] for p in points], where="post")
    ax.set_ylim(0, max(p[1] for p in points) + 1)


def credit_words(credit) -> str:
    """A credit plan in a few words: 'last 3', 'truncate 2', 'per_cycle', 'last_cycle'."""
    value = {"last": credit.last, "truncate": credit.truncate}.get(credit.mode)
    return f"{credit.mode} {value}" if value is not None else credit.mode


def _halting(ax, records: list[dict], spec) -> None:
    """Mean steps per position (model.halting) or segments per sample (deep supervision), and the most there are."""
    key = "steps" if any(_number(r.get("steps")) for r in records) else "segments"
    points = [(r["step"], r[key]) for r in records if _number(r.get(key))]
    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
    most = _most_steps(spec, key)
    if most:
        ax.axhline(most, linestyle="--", color="#888888", lw=0.8, label=f"the most: {most}")
        ax.legend(loc="lower right")
    ax.set_ylabel("mean steps per position" if key == "steps" else "mean segments per sample")
    ax.set_ylim(0, max([p[1] for p in points] + [most or 0]) * 1.1)


def _most_steps(spec, key: str) -> int | None:
    """The loop's steps (model.halting) or the supervision's segments the spec allows; None when unknown."""
    if spec is None:
        return None
    if key == "segments":
        return spec.supervision.segments if spec.supervision is not None else None
    return loop_layout(unroll(spec.model.schedule)).count or None


def _run_spec(run_dir: Path):
    """The run's resolved spec (DIR/spec.yaml, as training wrote it), or None when it cannot be read."""
    try:
        return load_spec(run_dir / "spec.yaml") if (run_dir / "spec.yaml").is_file() else None
    except HrmspecError:
        return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _say(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#525252")
    ax.set_yticks([])


def plain_log_ticks(axis, values: list[float]) -> None:
    """Plain tick labels (3.5, 4, 0.2) on a log axis over less than two decades, where matplotlib would write
    3.8×10⁰; wider ranges keep its decades."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    positive = [v for v in values if _number(v) and v > 0]
    if not positive or max(positive) / min(positive) >= 100:
        return
    lo, hi = min(positive), max(positive)
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    if 1.01 < hi / lo < 10:  # within a decade: a few round values in between
        ticks = {f"{t:.3g}": t for t in MaxNLocator(nbins=5).tick_values(lo, hi) if t > 0}  # one per label
        axis.set_major_locator(FixedLocator(sorted(ticks.values())))
    elif hi / lo >= 10:
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    # else one value: matplotlib widens the axis to a decade around it, and its decades are labelled
    axis.set_minor_formatter(NullFormatter())
    axis.set_major_formatter(plain)


# what `hrmspec compare` writes in its folder (runtime/training/compare.py: RESULTS)
COMPARE_RESULTS = "compare.json"
COMPARE_BYTES, COMPARE_VALUES = 64 << 20, 2_000_000


def is_compare_folder(folder: Path) -> bool:
    """A folder `hrmspec compare` wrote: its compare.json, and no metrics of its own."""
    return (folder / COMPARE_RESULTS).is_file() and not (folder / "metrics.jsonl").exists()


def compare_runs(folder: Path) -> list[tuple[str, Path]]:
    """(name, run folder) of each variant compare.json lists, in its order; a folder that is not a plain name
    inside `folder` (a damaged or planted compare.json) is left out."""
    doc = read_json(folder / COMPARE_RESULTS, max_bytes=COMPARE_BYTES, max_values=COMPARE_VALUES)
    runs = doc.get("runs") if isinstance(doc, dict) else None
    out = []
    for r in runs if isinstance(runs, list) else []:
        name = r.get("folder") if isinstance(r, dict) else None
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            continue
        run = folder / name
        if run.is_symlink() or not run.is_dir():
            continue
        out.append((str(r.get("run") or r.get("spec") or name), run))
    return out


def compare_figure(folder: str | Path):
    """Each variant's training loss against the step on one axes, and held-out accuracy against training
    FLOPs when compare.json has the curves."""
    folder = Path(folder)
    curves = []
    for name, run in compare_runs(folder):
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and not metrics.is_symlink():
            steps, _ = read_metrics(run)
            if steps:
                curves.append((name, steps))
    if not curves:
        raise HrmspecError(f"{folder} is a comparison whose runs have logged no training metrics yet: see its "
                           f"report, {folder / 'compare.md'}")
    fig, axes = new_figure(1, 5)
    ax = axes[0]
    losses = []
    for name, steps in curves:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label=name)
        losses += [r["loss"] for r in steps]
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis, losses)
    ax.set_ylabel("loss (response tokens)")
    ax.set_xlabel("step")
    ax.legend(loc="upper right")
    fig.suptitle(f"{folder.name}: training loss of {len(curves)} variants (held-out accuracy: compare.png)")
    fig.tight_layout()
    return fig


def image_format(path: str | Path, what: str = "--out") -> str:
    """The image format `path` names by its suffix (png, svg, pdf, ...); one line when it names none (so a
    drawing never replaces metrics.jsonl, a spec or a checkpoint's file), is a folder, is inside a run's
    checkpoints or has no folder. `what`: the option that gave the path, for the message."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    formats = FigureCanvasBase.get_supported_filetypes()
    fmt = path.suffix.lstrip(".").lower()
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder: name the image file to write (e.g. {path / 'figure.png'})")
    if fmt not in formats:
        raise OutputError(f"{what} {path}: not an image file name; the suffix must be one of "
                          f"{', '.join('.' + f for f in sorted(formats))}")
    why = protected_folder(path.parent)
    if why.startswith(INSIDE_CHECKPOINTS) or why == CHECKPOINT:
        raise OutputError(f"{what} {path}: its folder is {why}; a drawing is never written there")
    if not path.parent.is_dir():
        raise OutputError(f"{what} {path}: the folder {path.parent} does not exist")
    return fmt
