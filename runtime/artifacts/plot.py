"""`hrmspec plot`: loss, held-out accuracy and credit depth of a run against steps."""

from __future__ import annotations

import json
from pathlib import Path

from hrmspec.errors import HrmspecError
from hrmspec.runtime.artifacts.files import (
    CHECKPOINT,
    INSIDE_CHECKPOINTS,
    OutputError,
    atomic_write,
    protected_folder,
    writing,
)

MAX_RECORD_BYTES = 1 << 20  # a metrics record is a few hundred bytes; a longer line is damage, never read whole


def metric_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, streamed line by line (memory bounded by MAX_RECORD_BYTES whatever
    the file holds); a last line cut short (a run killed while writing it) is left out, a broken line
    before it is an error naming the line."""
    out = []
    with open(path, "rb") as f:
        number = 0
        while raw := f.readline(MAX_RECORD_BYTES + 1):
            number += 1
            ended = raw.endswith(b"\n")
            if len(raw) > MAX_RECORD_BYTES and not ended:
                ended = _skip_rest_of_line(f)
                if not ended:  # the last line, cut short
                    break
                raise HrmspecError(f"{path}:{number}: a line of more than {MAX_RECORD_BYTES:,} bytes, not a "
                                   "metrics record; the file is damaged")
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8", errors="replace"))
            except (ValueError, RecursionError):
                if not ended or not f.peek(1):  # the last line: a record cut short
                    break
                raise HrmspecError(f"{path}:{number}: not a JSON record; the file is damaged") from None
            if isinstance(rec, dict):
                out.append(rec)
    return out


def _skip_rest_of_line(f, chunk: int = 1 << 20) -> bool:
    """Read past the rest of the current line in bounded chunks; whether a line end was found."""
    while piece := f.readline(chunk):
        if piece.endswith(b"\n"):
            return True
    return False


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
    from matplotlib.backend_bases import FigureCanvasBase

    run_dir = Path(run_dir)
    steps, evals = read_metrics(run_dir)
    path = Path(out) if out else run_dir / "training.png"
    fmt = _image_format(path, FigureCanvasBase.get_supported_filetypes())
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
    with writing(path):  # through a temp file renamed over it: a link there is replaced, never followed
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format=fmt))
    plt.close(fig)
    return path


def _image_format(path: Path, formats: dict[str, str]) -> str:
    """The image format `path` names by its suffix; one line when it names none (so a plot never replaces
    metrics.jsonl, a spec or a checkpoint's file), is a folder, is inside a run's checkpoints or has no folder."""
    fmt = path.suffix.lstrip(".").lower()
    if path.is_dir():
        raise OutputError(f"--out {path} is a folder: name the image file to write (e.g. {path / 'training.png'})")
    if fmt not in formats:
        raise OutputError(f"--out {path}: not an image file name; the suffix must be one of "
                          f"{', '.join('.' + f for f in sorted(formats))}")
    why = protected_folder(path.parent)
    if why.startswith(INSIDE_CHECKPOINTS) or why == CHECKPOINT:
        raise OutputError(f"--out {path}: its folder is {why}; a plot is never written there")
    if not path.parent.is_dir():
        raise OutputError(f"--out {path}: the folder {path.parent} does not exist")
    return fmt
