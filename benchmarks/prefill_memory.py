"""Peak memory of generate's prefill: a 64 x 256-token batch at vocab 32k, one process.

    python benchmarks/prefill_memory.py        # a few seconds; prints the rise of peak RSS

The head runs on each prompt's last position only, so no (64, 256, 32000) logits tensor is made
(2,632 MiB of peak RSS rise when every position's logits were computed, 504 MiB since, on the AVX2
EPYC). Run it under another revision (`git stash`, a worktree) to compare.
"""

from __future__ import annotations

import resource

import torch

import hrmspec


def main() -> None:
    model = hrmspec.compile("hrm-text-tiny", overrides={"model.vocab": 32000, "model.max_seq_len": 512}).eval()
    ids = torch.randint(0, 32000, (64, 256), generator=torch.Generator().manual_seed(0))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        model.generate(ids, 2)
    rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(f"peak RSS rise of a 64 x 256 prefill at vocab 32k, 2 new tokens: {rise:.0f} MiB")


if __name__ == "__main__":
    main()
