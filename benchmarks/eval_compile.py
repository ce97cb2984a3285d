"""Held-out decoding with the compiled decode step (`hrmspec eval --compile`) against eager decoding.

    python benchmarks/eval_compile.py          # about 3 minutes on 2 idle cores

`eval` decodes its prompts with `decode_responses` (runtime/evaluate/heldout.py): sorted by length, 64 to a
batch, left-padded, on the static KV cache. With `compile=True` each token runs one program that
torch.compile built from the decode step (runtime/execution/decode.py); the cache is rounded up to a bucket
of 64 positions, so the batches of one evaluation share a program per batch size. This decodes the same
prompts both ways: 500 random prompts of 12-30 tokens, 32 new tokens each (the demo's
`train.max_new_tokens`), greedy, no eos, untrained weights at the specs' shipped sizes (huginn-tiny at its
evaluation depth, random initial states drawn as eager draws them).

- each spec is measured in a process of its own (the compiled step's programs, and the sizes dynamo has
  learned to treat as variables, live for a process), with TorchInductor's disk cache in an empty folder;
- cold: the first compiled evaluation, compilation included;
- warm: the same in another fresh process that finds the programs in that disk cache (a second `eval`);
- eager and compiled: the faster of two runs after that, alternating;
- programs: how many the evaluation built (dynamo's count of compiled frames).

Writes benchmarks/results/eval_compile.md.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))  # never the user's cache

import torch  # noqa: E402  (after the cache folder is chosen)
from report import environment  # noqa: E402

import hrmspec  # noqa: E402
from hrmspec.runtime.evaluate.heldout import decode_responses  # noqa: E402
from hrmspec.runtime.execution.depth import DepthPolicy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SPECS = ["hrm-text-tiny", "huginn-tiny"]
N, NEW = 500, 32


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 300) for _ in range(rng.randint(12, 30))] for _ in range(N)]


def decode(model, ps: list[list[int]], compiled: bool) -> tuple[float, list[list[int]]]:
    """(seconds, responses)."""
    torch.manual_seed(0)  # the random initial states: the same draws both ways
    began = time.perf_counter()
    out = decode_responses(model, ps, NEW, None, depth=DepthPolicy(compile=compiled))
    return time.perf_counter() - began, out


def first_evaluation(name: str) -> float:
    """Seconds of the first compiled evaluation of `name` in a fresh process, compilation included."""
    model = hrmspec.compile(name).eval()
    model.reset_parameters(seed=0)
    with torch.no_grad():
        return decode(model, prompts(), True)[0]


def child(args: list[str], cache: str) -> str:
    """The last line this script prints when run with `args` in a fresh process, Inductor's cache in `cache`."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    return out.stdout.strip().splitlines()[-1]


def row(name: str) -> str:
    """The table row of `name`, measured in this process (a fresh one, with an empty Inductor cache)."""
    from torch._dynamo.utils import counters

    ps = prompts()
    model = hrmspec.compile(name).eval()
    model.reset_parameters(seed=0)
    with torch.no_grad():
        cold, first = decode(model, ps, True)
        programs = counters["stats"]["unique_graphs"]
        t_eager, t_compiled = [], []
        for _ in range(2):
            t, eager = decode(model, ps, False)
            t_eager.append(t)
            t, compiled = decode(model, ps, True)
            t_compiled.append(t)
    assert compiled == first
    same = sum(a == b for a, b in zip(eager, compiled))
    e, c = min(t_eager), min(t_compiled)
    hot = float(child(["--first", name], os.environ["TORCHINDUCTOR_CACHE_DIR"]))  # the programs on disk now
    even = [N * (t - c) / (e - c) for t in (cold, hot)]  # prompts at which compiling has saved its own time
    return (f"| {name} | {e:.2f} s | {c:.2f} s | **{e / c:.2f}x** | {cold:.1f} s / {hot:.1f} s | "
            f"{even[0]:,.0f} / {even[1]:,.0f} prompts | {programs} | {same}/{N} |")


def main() -> None:
    lines = ["# Held-out decoding: the compiled decode step against eager", "",
             f"{N} prompts of 12-30 tokens, {NEW} new tokens each, greedy, batches of 64; "
             "`python benchmarks/eval_compile.py`. Each spec in a fresh process with an empty Inductor cache. "
             "Eager and compiled: the faster of two runs; cold: the first compiled evaluation, compilation "
             "included; warm: the same in another fresh process that finds the programs in that cache.", "",
             "| spec | eager | compiled | speed-up | cold / warm (compiling) | pays off after (cold / warm) | programs "
             "| same responses |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in SPECS:
        lines.append(child(["--row", name], tempfile.mkdtemp(prefix="inductor-")))
        print(lines[-1], flush=True)
    lines += ["", "Pays off after: the prompts an evaluation must decode for compiling to save its own time, "
              f"{N} x (cold - compiled) / (eager - compiled), and the same with the warm time.", "",
              f"Environment: {environment([torch.get_num_threads()])}.", ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_compile.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'eval_compile.md'}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--first"]:
        print(f"{first_evaluation(sys.argv[2]):.3f}")
    elif sys.argv[1:2] == ["--row"]:
        print(row(sys.argv[2]))
    else:
        main()
