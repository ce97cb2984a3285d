"""Held-out decoding in batches: one batch per prompt length against left-padded batches of neighbouring lengths.

    python benchmarks/eval_batching.py          # about 1 minute on 2 idle cores

`hrmspec eval` decodes its held-out prompts with `decode_responses` (runtime/evaluate/heldout.py): sorted
by length, 64 to a batch, left-padded (generate's attention_mask). Specs with halting or an exit rule
used to decode one batch per prompt length. This measures both ways on the same prompts: 200 random
prompts of 12-30 tokens (19 lengths), 16 new tokens each, greedy, no eos; specs at their shipped size
(ut at d_model 128), untrained weights, zero initial states (`init_scale=0`) so that both ways decode
the same tokens. Each way runs once untimed, then twice; the table gives the faster run and whether
every response agrees.

Writes benchmarks/results/eval_batching.md.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from report import environment

import hrmspec
from hrmspec.runtime.evaluate.heldout import decode_responses
from hrmspec.runtime.execution.depth import DepthPolicy

RESULTS = Path(__file__).resolve().parent / "results"
CASES = [  # (spec, overrides, generate's options, what the row says)
    ("huginn-tiny", {}, {"exit": "kl:1e-3"}, "huginn-tiny, --exit kl:1e-3"),
    ("huginn-tiny", {}, {}, "huginn-tiny, its evaluation depth"),
    ("ut", {"model.vocab": 320, "model.d_model": 128, "model.heads": 4, "model.ffn": 384, "model.max_seq_len": 256},
     {}, "ut (ACT halting), d_model 128"),
    ("hrm-text-tiny", {}, {}, "hrm-text-tiny (static cache)"),
]
N, NEW = 200, 16


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 300) for _ in range(rng.randint(12, 30))] for _ in range(N)]


def by_length(model, ps: list[list[int]], options: dict) -> list[list[int]]:
    """The former way: one batch (of up to 64) per prompt length."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(ps):
        groups[len(p)].append(i)
    out: list[list[int]] = [[] for _ in ps]
    for idx in groups.values():
        for i, r in zip(idx, decode_responses(model, [ps[i] for i in idx], NEW, None, depth=DepthPolicy(**options))):
            out[i] = r
    return out


def padded(model, ps: list[list[int]], options: dict) -> list[list[int]]:
    return decode_responses(model, ps, NEW, None, depth=DepthPolicy(**options))


def main() -> None:
    ps = prompts()
    lines = ["# Held-out decoding: one batch per prompt length vs left-padded batches", "",
             f"{N} prompts of 12-30 tokens ({len(set(map(len, ps)))} lengths), {NEW} new tokens each, greedy; "
             "`python benchmarks/eval_batching.py`. Time: the faster of two runs after an untimed one.", "",
             "| spec | one batch per length | padded batches of 64 | speed-up | same responses |",
             "|---|---:|---:|---:|---:|"]
    for name, over, options, label in CASES:
        model = hrmspec.compile(name, overrides=over).eval()
        model.reset_parameters(seed=0)
        options = {**options, "init_scale": 0.0}
        got = {way.__name__: way(model, ps, options) for way in (by_length, padded)}  # untimed: warm-up
        times: dict[str, list[float]] = defaultdict(list)
        for _ in range(2):  # the two ways alternate
            for way in (by_length, padded):
                began = time.perf_counter()
                way(model, ps, options)
                times[way.__name__].append(time.perf_counter() - began)
        t_len, t_pad = min(times["by_length"]), min(times["padded"])
        same = sum(a == b for a, b in zip(got["by_length"], got["padded"]))
        lines.append(f"| {label} | {t_len:.2f} s | {t_pad:.2f} s | **{t_len / t_pad:.2f}x** | {same}/{N} |")
        print(lines[-1], flush=True)
    lines += ["", f"Environment: {environment([torch.get_num_threads()])}.", ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_batching.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'eval_batching.md'}")


if __name__ == "__main__":
    main()
