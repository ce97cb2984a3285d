"""Per-cycle readouts: what the model would answer after each cycle, and how its states move.

The plot the HRM and Huginn papers show — loss against depth, and the latent settling — for any spec.
One no-grad forward on one batch walks the schedule call by call (the driver's `run_calls`, the calls
of the loop layout in order) and records:

    points   after each step of the loop (an HRM H cycle, a Huginn core iteration): the output state
             read out through the head — after the calls that follow the loop (a coda), run on a copy
             of the states — as the objective's loss per counted label token, the token accuracy and
             the fraction of rows whose every counted token is right; a schedule without a loop has
             one point, its output
    calls    after each module call: its target state's RMS (`norm`) and how far the call moved it,
             ||new - old|| / ||new|| (`change`, the relative update; near 0 when the state converged)

Training logs one readout every `log_every` steps on a fixed batch of its first training rows
(`train.readout_rows`, 0: off), into metrics.jsonl (`readout`), and `hrmspec plot` draws it;
`hrmspec eval RUN --per-cycle` reads out on held-out rows. Under FSDP the readout is skipped (a
forward on one rank alone would wait on the others).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hrmspec.errors import CheckpointError
from hrmspec.runtime.artifacts.data import DataConfig, DataError, encode_samples
from hrmspec.runtime.artifacts.files import write_text_atomic, writing
from hrmspec.runtime.artifacts.grids import GridConfig
from hrmspec.runtime.artifacts.packing import pack
from hrmspec.runtime.evaluate.heldout import held_out_set, load_run
from hrmspec.runtime.execution.driver import NoCache, run_calls
from hrmspec.runtime.execution.losses import IGNORE_INDEX, token_losses

MODEL_INPUTS = ("input_ids", "prefix_mask", "doc_ids", "position_ids", "puzzle_ids")


@dataclass
class Readout:
    """A readout of one batch (see the module docstring)."""

    points: list[dict] = field(default_factory=list)  # {"step", "loss", "accuracy", "exact"} per loop step
    calls: list[dict] = field(default_factory=list)  # {"call", "state", "text", "norm", "change"} per module call
    rows: int = 0
    tokens: int = 0  # counted label tokens

    def as_dict(self) -> dict:
        return {"rows": self.rows, "tokens": self.tokens, "points": self.points, "calls": self.calls}

    def lines(self) -> list[str]:
        """A readable table: the loss and accuracy after each step, then each call's norm and change."""
        out = [f"per-cycle readout on {self.rows} rows ({self.tokens:,} counted tokens):",
               "  step      loss   accuracy   exact"]
        for p in self.points:
            loss = "-" if p["loss"] is None else f"{p['loss']:.4f}"
            out.append(f"  {p['step']:>4}  {loss:>8}  {p['accuracy']:>8.1%}  {p['exact']:>6.1%}")
        out.append("  call  state        norm    change  statement")
        for c in self.calls:
            out.append(f"  {c['call']:>4}  {c['state']:<8} {c['norm']:>8.4f}  {c['change']:>8.4f}  {c['text']}")
        return out


def _rms(t: torch.Tensor) -> float:
    return float(t.float().pow(2).mean().sqrt())


LOGITS = 1 << 22  # logits made at once by a readout point (16 MiB in fp32): a large vocabulary never gets S x V


def _point(model, step: int, hidden: torch.Tensor, labels: torch.Tensor) -> dict:
    """The loss, token accuracy and fully right rows of the output state `hidden` read through the head,
    position chunks at a time (at most LOGITS logits exist at once)."""
    h = hidden[:, model.prefix_len:]
    counted = labels != IGNORE_INDEX
    n = int(counted.sum())
    per = max(1, LOGITS // (h.shape[0] * model.spec.model.vocab))
    total, right = 0.0, torch.zeros_like(counted)
    for start in range(0, h.shape[1], per):
        logits = model.logits_of(h[:, start:start + per])
        part = labels[:, start:start + per]
        total += float(token_losses(logits, part, model.spec.objective.loss).sum())
        right[:, start:start + per] = (logits.argmax(-1) == part) & counted[:, start:start + per]
    rows_right = (right | ~counted).all(-1) & counted.any(-1)
    loss = total / n if n and math.isfinite(total) else None
    return {"step": step, "loss": None if loss is None else round(loss, 6),
            "accuracy": round(float(right.sum()) / max(n, 1), 6),
            "exact": round(float(rows_right.float().mean()), 6)}


@torch.no_grad()
def read_out(model, batch: dict[str, torch.Tensor], num_steps: int | None = None) -> Readout:
    """The per-cycle readout of `model` on `batch` (the model's inputs and `labels`), with the loop run
    `num_steps` times (default: as the forward runs it)."""
    was_training = model.training
    model.eval()
    try:
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
        labels = batch["labels"]
        z, ctx, _ = model.begin(**inputs)
        layout, _ = model.layout_at(num_steps if num_steps is not None else model.recurrence)
        out_name = model.spec.model.output
        policy = NoCache()
        res = Readout(rows=int(labels.shape[0]), tokens=int((labels != IGNORE_INDEX).sum()))

        def call(c) -> None:
            old = z[c.target]
            run_calls(model, [c], None, z, ctx, policy)
            new = z[c.target]
            size = _rms(new)
            change = _rms(new.float() - old.float()) / size if size > 0 else 0.0
            res.calls.append({"call": c.index, "state": c.target, "text": c.text,
                              "norm": round(size, 6), "change": round(change, 6)})

        for c in layout.before:
            call(c)
        for t, calls in enumerate(layout.steps, 1):
            for c in calls:
                call(c)
            after = dict(z)  # the coda on a copy: the loop goes on from z
            run_calls(model, layout.after, None, after, ctx, policy)
            res.points.append(_point(model, t, after[out_name], labels))
        for c in layout.after:
            call(c)
        if not layout.steps:
            res.points.append(_point(model, 1, z[out_name], labels))
        return res
    finally:
        model.train(was_training)


def merge(parts: list[Readout]) -> Readout:
    """One readout of several batches: losses and accuracies weighted by counted tokens, exact by rows,
    norms and changes by rows."""
    out = Readout(rows=sum(r.rows for r in parts), tokens=sum(r.tokens for r in parts))
    for i, p in enumerate(parts[0].points):
        got = [r.points[i] for r in parts]
        losses = [(q["loss"], r.tokens) for q, r in zip(got, parts) if q["loss"] is not None]
        loss = sum(v * n for v, n in losses) / max(sum(n for _, n in losses), 1) if losses else None
        out.points.append({"step": p["step"], "loss": None if loss is None else round(loss, 6),
                           "accuracy": round(sum(q["accuracy"] * r.tokens for q, r in zip(got, parts))
                                             / max(out.tokens, 1), 6),
                           "exact": round(sum(q["exact"] * r.rows for q, r in zip(got, parts)) / out.rows, 6)})
    for i, c in enumerate(parts[0].calls):
        got = [r.calls[i] for r in parts]
        out.calls.append({**c, **{k: round(sum(q[k] * r.rows for q, r in zip(got, parts)) / out.rows, 6)
                                  for k in ("norm", "change")}})
    return out


def held_out_rows(model, spec, tokenizer, root=None):
    """The held-out set as rows with labels: grids as they are, text samples packed as training packs them
    (task completion, rows of model.max_seq_len)."""
    if spec.objective.type == "grid":
        return held_out_set(GridConfig.from_dict(dict(spec.data)))
    samples = held_out_set(DataConfig.from_dict(dict(spec.data)), root).samples
    rows, _ = pack(encode_samples(samples, tokenizer), spec.model.max_seq_len, "task_completion",
                   pad_id=tokenizer.pad_id)
    return rows


def read_out_rows(model, rows, n: int, batch_size: int = 16) -> Readout:
    """The readout of the first `n` of `rows` (at most all), `batch_size` rows per forward, merged."""
    count = min(n, len(rows))
    device = model.embed.weight.device
    parts = []
    for start in range(0, count, batch_size):
        batch = rows.batch(torch.arange(start, min(start + batch_size, count)))
        parts.append(read_out(model, {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}))
    return merge(parts)


def readout_run(run_dir: str | Path, n: int = 64, backend: str = "auto", device: str = "auto",
                allow_nonfinite: bool = False) -> dict:
    """The per-cycle readout of a run's newest checkpoint (EMA weights) on its first `n` held-out rows; writes
    run_dir/readout.json. The dict: "rows", "tokens", "points", "calls" (see `Readout`), "checkpoint"."""
    run_dir = Path(run_dir)
    model, tokenizer, spec, last = load_run(run_dir, backend=backend, device=device, allow_nonfinite=allow_nonfinite)
    try:
        rows = held_out_rows(model, spec, tokenizer, run_dir)
    except DataError as e:
        raise CheckpointError(str(e)) from None
    if not len(rows):
        raise CheckpointError(f"{run_dir}: no held-out rows to read out (data.eval_size is 0?)")
    res = {**read_out_rows(model, rows, n).as_dict(), "checkpoint": str(last)}
    path = run_dir / "readout.json"
    with writing(path):
        write_text_atomic(path, json.dumps(res, indent=2))
    return res


def probe_batch(rows, count: int, device) -> dict[str, torch.Tensor] | None:
    """The first `count` rows of a training set (packed text rows or grids): a fixed batch, drawn without
    touching the training stream's order or RNG. None when `count` is 0."""
    n = min(count, len(rows))
    if n <= 0:
        return None
    batch = rows.batch(torch.arange(n))
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def compact(res: Readout) -> dict:
    """What metrics.jsonl keeps of a readout: each point's loss and accuracy, each call's norm and change."""
    return {"loss": [p["loss"] for p in res.points], "accuracy": [p["accuracy"] for p in res.points],
            "exact": [p["exact"] for p in res.points],
            "norm": [c["norm"] for c in res.calls], "change": [c["change"] for c in res.calls],
            "calls": [c["text"] for c in res.calls]}


__all__ = ["Readout", "compact", "held_out_rows", "merge", "probe_batch", "read_out", "read_out_rows", "readout_run"]
