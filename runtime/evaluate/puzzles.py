"""Evaluation on a dataset folder in the official HRM / TRM layout, scored as the official code scores it.

Every example of the split (`test/`), in order, is solved by deep supervision (runtime/execution/
supervision.py). As the official evaluation does, every row runs all its segments (`halt_max_steps`: the
official model halts early only while training); `halt=True` stops each row where its halting head says
instead. The metrics are those of the official `ACTLossHead`, over the examples evaluated:

    exact_accuracy   the share of examples whose every labelled cell is right
    token_accuracy   the mean over examples of the share of their labelled cells that are right
    q_halt_accuracy  the share whose halting head is right about it: q_halt >= 0 exactly when solved
    segments         the mean segments run (max_segments: the spec's)
    loss             the objective's cross-entropy per labelled cell of the final logits

For an ARC dataset (its test_puzzles.json beside the splits) every prediction also goes to the official
voting (`ArcEvaluator`: augmented copies inverted and voted, ties broken by the mean sigmoid(q_halt)),
reported as `ARC/pass@K`, and its Kaggle submission.json is written to the run folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hrmspec.runtime.artifacts.placement import to_device
from hrmspec.runtime.artifacts.puzzle_data import PuzzleSource, PuzzleSplit
from hrmspec.runtime.evaluate.arc import ArcEvaluator
from hrmspec.runtime.evaluate.weights import ema_weights
from hrmspec.runtime.execution.losses import IGNORE_INDEX, token_losses
from hrmspec.runtime.execution.supervision import Supervisor

PASS_KS = (1, 2, 5, 10, 100, 1000)
EXAMPLES = 3  # sample predictions drawn in the log and the report
# how a dataset's cells are drawn, by (vocab_size, seq_len) as the official builders write them
SYMBOLS = {"sudoku": "?.123456789", "maze": "?# SGo", "arc": "?|0123456789"}


def kind_of(split: PuzzleSplit) -> str | None:
    """sudoku, maze or arc, from the sizes the official builders give each (None: another dataset); arc is
    vocab 12 in any square canvas up to 30 x 30 (seq_len a perfect square, 900 officially)."""
    meta = split.metadata
    if meta.vocab_size == 11 and meta.seq_len == 81:
        return "sudoku"
    if meta.vocab_size == 6:
        return "maze"
    side = int(round(meta.seq_len ** 0.5))  # ARC: a square canvas, 30 x 30 (900) or smaller (build-data --canvas)
    if meta.vocab_size == 12 and 2 <= side <= 30 and side * side == meta.seq_len:
        return "arc"
    return None


def draw(tokens: list[int], kind: str | None) -> str:
    """A row as a grid of characters (row by row); ARC rows cropped at their EOS border."""
    side = int(len(tokens) ** 0.5)
    chars = SYMBOLS.get(kind or "", "")
    cells = [chars[t] if 0 <= t < len(chars) else str(t) for t in tokens]
    rows = ["".join(cells[r * side:(r + 1) * side]) for r in range(side)]
    if kind == "arc":  # the grid ends at its EOS border ('|') or at the padding
        rows = [r.split("|")[0].split("?")[0] for r in rows]
        rows = [r for r in rows if r][:30]
    return "\n".join(rows)


def evaluate_puzzles(model, source: PuzzleSource, n: int | None = None, ema=None, halt: bool = False,
                     batch_size: int = 64, split: str = "test", out: Path | None = None,
                     pass_ks: tuple[int, ...] = PASS_KS) -> dict:
    """Score `model` on the first `n` examples (None: all) of `source`'s `split` (see the module docstring).
    For an ARC dataset, `out` (a folder) receives submission.json."""
    data = source.split(split)
    total = len(data)
    count = total if n is None else min(n, total)
    kind = kind_of(data)
    limit = {"requested": n if n is not None else total,
             "limited_by": f"{source.path}/{split} holds {total:,} examples" if n is not None and count < n else None}
    if not count:
        return {"n": 0, **limit, "accuracy": 0.0, "exact_accuracy": 0.0, "token_accuracy": 0.0, "samples": []}
    sup = Supervisor(model)
    arc = ArcEvaluator(source.path, pass_ks=pass_ks) if source.arc else None
    device = model.embed.weight.device
    exact = tokens = right_halt = segments = loss = cells = 0.0
    shown = []
    was_training = model.training
    model.eval()
    with ema_weights(model, ema):
        for start in range(0, count, batch_size):
            index = torch.arange(start, min(start + batch_size, count))
            batch = to_device(data.batch(index), device)
            q = torch.zeros(len(index), dtype=torch.float32, device=device)
            logits, steps = sup.solve(batch, all_segments=not halt, q_halt=q)
            labels = batch["labels"]
            valid = labels != IGNORE_INDEX
            preds = logits.argmax(-1)
            correct = (preds == labels) & valid
            counted = valid.sum(-1).clamp(min=1)
            solved = correct.sum(-1) == valid.sum(-1)
            exact += float(solved.sum())
            tokens += float((correct.sum(-1) / counted).sum())
            right_halt += float(((q >= 0) == solved).sum())
            segments += float(steps.sum())
            loss += float(token_losses(logits, labels, sup.loss_kind).sum())
            cells += float(valid.sum())
            if arc is not None:
                arc.update_batch({"inputs": batch["input_ids"], "puzzle_identifiers": batch["puzzle_ids"]},
                                 {"preds": preds, "q_halt_logits": q})
            for i in range(min(EXAMPLES - len(shown), len(index))):
                target = torch.where(valid[i], labels[i], batch["input_ids"][i])
                shown.append({k: draw(t.tolist(), kind) for k, t in
                              (("prompt", batch["input_ids"][i]), ("expected", target), ("got", preds[i]))})
    model.train(was_training)
    res = {"n": count, **limit, "accuracy": exact / count, "exact_accuracy": exact / count,
           "token_accuracy": tokens / count, "q_halt_accuracy": right_halt / count if sup.halting else None,
           "segments": segments / count, "max_segments": sup.spec.segments,
           "loss": loss / cells if cells else None, "loss_tokens": int(cells), "halted_early": halt,
           "dataset": str(source.path), "split": split, "kind": kind, "samples": shown, "tasks": {}}
    if arc is not None:
        res.update(arc.result(save_path=out))
        if count < total:
            res["arc_note"] = (f"{count:,} of {total:,} test examples voted: pass@K counts the tasks whose rows "
                               "were not evaluated as wrong")
    return res


def summary_lines(res: dict) -> list[str]:
    """The official metrics in a few lines, for `eval` and the training log."""
    lines = [f"exact accuracy {100 * res['exact_accuracy']:.2f}%, token accuracy {100 * res['token_accuracy']:.2f}% "
             f"on {res['n']:,} examples of {res['dataset']}/{res['split']}"]
    more = [f"segments {res['segments']:.2f} of {res['max_segments']}"]
    if res.get("q_halt_accuracy") is not None:
        more.append(f"q_halt accuracy {100 * res['q_halt_accuracy']:.1f}%")
    if res.get("loss") is not None:
        more.append(f"loss {res['loss']:.4f} per cell")
    lines.append(", ".join(more) + ("" if res.get("halted_early") else " (every segment run, as the official "
                                    "evaluation does)"))
    passes = [f"pass@{k.split('@')[1]} {100 * v:.2f}%" for k, v in res.items() if k.startswith("ARC/pass@")]
    if passes:
        lines.append("ARC (voted over augmentations): " + ", ".join(passes))
    if res.get("arc_note"):
        lines.append(res["arc_note"])
    return lines


__all__ = ["PASS_KS", "draw", "evaluate_puzzles", "kind_of", "summary_lines"]
