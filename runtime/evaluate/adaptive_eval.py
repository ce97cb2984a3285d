"""Adaptive depth against full depth on the held-out samples: accuracy, steps per position, tokens/s.

`hrmspec eval RUN --exit CRITERION` decodes the same samples twice, with the same draws of any random
initial state: at full depth (every position runs the cap, no warm start: the model as trained, at that
count) and with the exit (runtime/execution/adaptive.py). Both results go into eval.json, the exit's at
the top level as a plain evaluation's are, full depth's under "full_depth":

    accuracy, tasks, n       as `evaluate_model` reports them (and requested, limited_by, samples)
    loss, perplexity         the held-out loss: full depth's only (a teacher-forced forward runs the loop
                             to its cap; the exit decides token by token as it decodes), null for the exit
    depth                    steps per position: "mean" of "max_steps", "prompt" and "decoded" means (the
                             prompt's positions, the tokens fed back), "min", "median", "max", "histogram"
    tokens, seconds, tokens_per_s   tokens decoded (eos included) over the time decoding took
"""

from __future__ import annotations

import torch

from hrmspec.runtime.execution.adaptive import AdaptiveDepth
from hrmspec.runtime.execution.depth import DecodeStats, DepthPolicy


def checked(model, depth: DepthPolicy) -> DepthPolicy:
    """`depth` with its exit criterion parsed and its cap resolved, checked against the model: an
    AdaptiveError for a criterion or a spec that cannot run, before anything is decoded."""
    probe = AdaptiveDepth(model, depth.exit, depth.max_steps, depth.warm_start)
    return DepthPolicy.of(depth, exit=probe.criterion, max_steps=probe.max_steps)


def compare_depths(evaluate, model, tokenizer, dcfg, n: int, max_new_tokens: int, root, depth: DepthPolicy,
                   seed: int = 0) -> dict:
    """The exit's evaluation with full depth's beside it (see the module docstring): `evaluate` is heldout's
    `evaluate_model` (which calls this module), `depth` as `checked` gives it."""
    runs = {}
    for name, policy in (("full_depth", depth.full_depth()), ("exit", depth)):
        stats = DecodeStats()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            res = evaluate(model, tokenizer, dcfg, n=n, max_new_tokens=max_new_tokens, root=root, stats=stats,
                           depth=policy, loss=name == "full_depth")
        runs[name] = {"tasks": res["tasks"], "accuracy": res["accuracy"], "n": res["n"], "loss": res["loss"],
                      "perplexity": res["perplexity"], "depth": depth_summary(stats), **speed(stats)}
        shared = {k: res[k] for k in ("requested", "limited_by", "samples") if k in res}
    return {**runs["exit"], **shared, "exit": str(depth.exit), "warm_start": depth.warm_start,
            "full_depth": runs["full_depth"]}


def speed(stats: DecodeStats) -> dict:
    tokens, seconds = stats.tokens, stats.seconds
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else None}


def depth_summary(stats: DecodeStats) -> dict | None:
    """The steps per position of generate's `stats` (None if nothing was decoded)."""
    if not stats.positions:
        return None
    prompt, decoded = stats.prompt, stats.decoded
    hist = [a + b for a, b in zip(prompt, decoded)]
    used = [d for d, count in enumerate(hist) if count]
    half, seen, median = sum(hist) / 2, 0, used[0]
    for d in used:
        seen += hist[d]
        if seen >= half:
            median = d
            break
    return {"mean": _mean(hist), "max_steps": stats.max_steps, "prompt": _mean(prompt), "decoded": _mean(decoded),
            "min": used[0], "median": median, "max": used[-1],
            "histogram": {str(d): hist[d] for d in used}}


def _mean(hist: list[int]) -> float | None:
    total = sum(hist)
    return sum(d * count for d, count in enumerate(hist)) / total if total else None


def depth_lines(summary: dict | None) -> list[str]:
    """The steps per position, printed: the means, the spread, and how many positions ran each depth."""
    if summary is None:
        return ["no positions decoded"]
    s = summary
    parts = [f"prompt {s['prompt']:.2f}"] + ([f"decoded tokens {s['decoded']:.2f}"] if s["decoded"] is not None else [])
    return [f"steps per position: mean {s['mean']:.2f} of {s['max_steps']} ({', '.join(parts)}); "
            f"min {s['min']}, median {s['median']}, max {s['max']}",
            "positions by steps: " + ", ".join(f"{d}: {count}" for d, count in s["histogram"].items())]


def loss_text(res: dict) -> str:
    """The held-out loss of a result, e.g. "loss 2.3026 (perplexity 10.00)" ("loss -" when there is none)."""
    if res.get("loss") is None:
        return "loss -"
    ppl = res.get("perplexity")
    return f"loss {res['loss']:.4f}" + (f" (perplexity {ppl:.2f})" if ppl is not None else "")


def report_lines(res: dict) -> list[str]:
    """What `hrmspec eval --exit` prints below its accuracy table."""
    full = res["full_depth"]
    most = full["depth"]["max_steps"] if full["depth"] else "?"
    warm = " with a warm start" if res["warm_start"] else ""
    lines = [f"exit {res['exit']}{warm}: accuracy {100 * res['accuracy']:.1f}% against {100 * full['accuracy']:.1f}% "
             f"at full depth ({most} steps)"]
    if full.get("loss") is not None:
        lines.append(f"held-out {loss_text(full)} at full depth")
    if len(res["tasks"]) > 1:
        lines += [f"  {t}: {100 * r['accuracy']:.1f}% against {100 * full['tasks'][t]['accuracy']:.1f}%"
                  for t, r in res["tasks"].items()]
    lines += depth_lines(res["depth"])
    if res["tokens_per_s"] and full["tokens_per_s"]:
        lines.append(f"tokens/s: {res['tokens_per_s']:.1f} with the exit, {full['tokens_per_s']:.1f} at full depth "
                     f"({res['tokens']} and {full['tokens']} tokens decoded)")
    return lines


__all__ = ["checked", "compare_depths", "depth_lines", "depth_summary", "loss_text", "report_lines", "speed"]
