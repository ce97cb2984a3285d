"""Memory of deep supervision in the number of segments: flat, because the carry is detached.

    python benchmarks/supervision_memory.py                    # segments 1 .. 16, ~2 min
    python benchmarks/supervision_memory.py --segments 1 4 --model-dim 64

HRM and TRM take one optimizer step per segment and carry the states to the next segment detached,
so a training step keeps the activations of one segment whatever the number of segments. Measured
on a sudoku-sized TRM (`trm` at d_model 128: 9 x 9 cells and 16 puzzle positions, batch 32, the
whole last outer cycle with gradient, BCE halting) for K = 1 .. 16 segments:

1. the bytes autograd saves for backward in one supervised step (`Supervisor.step` + its loss),
   deterministic: the unique storages the saved-tensor hooks see, parameters excluded;
2. the peak-RSS increase over K consecutive training steps (optimizer included; every row runs
   every segment: the untrained head, bias -5, never says halt), in a fresh process per K;
3. for contrast, the same K segments with the carry NOT detached and one backward through all of
   them (what deep supervision avoids): its saved bytes grow with K.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from report import MiB, _status_kib, environment  # noqa: E402
from workloads import saved_bytes  # noqa: E402

import hrmspec  # noqa: E402
from hrmspec.runtime.execution.supervision import Supervisor  # noqa: E402
from hrmspec.spec import load_spec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 32


def model_for(segments: int, d_model: int = 128, seed: int = 0):
    over = {"model.d_model": d_model, "model.heads": 4, "supervision.segments": segments}
    torch.manual_seed(seed)
    return hrmspec.compile(load_spec("trm", overrides=over))


def batch_for(model, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    S, V = model.spec.model.max_seq_len, model.spec.model.vocab
    return {"input_ids": torch.randint(1, V, (BATCH, S), generator=g),
            "labels": torch.randint(2, V, (BATCH, S), generator=g),
            "puzzle_ids": torch.zeros(BATCH, dtype=torch.long)}


def _saved_bytes(model, run) -> int:
    """`saved_bytes` of building the loss `run()` returns; then its backward, which frees the graph."""
    holder = {}
    n = saved_bytes(model, lambda: holder.setdefault("loss", run()))
    holder["loss"].backward()
    return n


def saved_per_step(segments: int, d_model: int = 128) -> int:
    """Saved bytes of the last of `segments` supervised steps (every earlier one carried detached)."""
    model = model_for(segments, d_model)
    sup, b = Supervisor(model), batch_for(model)
    carry = sup.initial_carry(b)
    for _ in range(segments - 1):
        carry, _ = sup.step(carry, b)
    holder = {}

    def run():
        holder["carry"], out = sup.step(carry, b)
        return sup.loss(holder["carry"], out)[0]

    return _saved_bytes(model, run)


def saved_undetached(segments: int, d_model: int = 128) -> int:
    """Saved bytes of `segments` segments chained WITH gradient through the states, one backward."""
    model = model_for(segments, d_model)
    b = batch_for(model)

    def run():
        states, loss = None, 0.0
        for _ in range(segments):
            out = model(b["input_ids"], puzzle_ids=b["puzzle_ids"], states=states)
            states = out.states  # not detached
            loss = loss + out.logits.float().square().mean()
        return loss

    return _saved_bytes(model, run)


def rss_probe(segments: int, d_model: int) -> int:
    """In this process: the peak-RSS increase over `segments` training steps after a warm-up step."""
    model = model_for(segments, d_model)
    sup, b = Supervisor(model), batch_for(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step(carry):
        carry, out = sup.step(carry, b)
        loss = sup.loss(carry, out)[0] / BATCH
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return carry

    carry = train_step(sup.initial_carry(b))  # warm-up: optimizer state and allocator pools exist
    carry = sup.initial_carry(b)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    for _ in range(segments):
        carry = train_step(carry)
    return (_status_kib("VmHWM") - before) * 1024


def measure(segment_counts: list[int], d_model: int) -> dict:
    rows = []
    for k in segment_counts:
        probe = subprocess.run([sys.executable, __file__, "--probe", str(k), "--model-dim", str(d_model)],
                               capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
        rows.append({"segments": k, "saved_step": saved_per_step(k, d_model),
                     "saved_undetached": saved_undetached(k, d_model), "rss_steps": int(probe.stdout.split()[-1])})
        print(rows[-1], flush=True)
    return {"d_model": d_model, "batch": BATCH, "rows": rows, "environment": environment([torch.get_num_threads()])}


def write(res: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "supervision_memory.json").write_text(json.dumps(res, indent=2))
    lines = [
        "# Deep supervision: memory in the number of segments",
        "",
        f"`trm` at d_model {res['d_model']} (9 x 9 sudoku rows + 16 puzzle positions), batch {res['batch']}, "
        "the whole last outer cycle with gradient. `python benchmarks/supervision_memory.py`.",
        "",
        "| segments | saved for backward, one supervised step | peak-RSS growth over the K steps, after a warm-up step "
        "| saved, segments chained without detaching |",
        "|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['segments']} | {r['saved_step'] / MiB:.1f} MiB | {r['rss_steps'] / MiB:.1f} MiB "
                     f"| {r['saved_undetached'] / MiB:.1f} MiB |")
    lines += ["", f"Environment: {res['environment']}.", ""]
    (RESULTS / "supervision_memory.md").write_text("\n".join(lines))
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ks = [r["segments"] for r in res["rows"]]
    ax.plot(ks, [r["saved_step"] / MiB for r in res["rows"]], "o-", label="deep supervision: saved per step")
    ax.plot(ks, [r["rss_steps"] / MiB for r in res["rows"]], "s-", label="peak-RSS growth over K steps")
    ax.plot(ks, [r["saved_undetached"] / MiB for r in res["rows"]], "^--", label="chained, not detached: saved")
    ax.set_xlabel("segments")
    ax.set_ylabel("MiB")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.set_title("Memory vs segments (trm, d 128, batch 32)")
    fig.tight_layout()
    fig.savefig(RESULTS / "supervision_memory.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segments", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--model-dim", type=int, default=128)
    ap.add_argument("--probe", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        print(rss_probe(args.probe, args.model_dim))
        return
    res = measure(args.segments, args.model_dim)
    write(res)
    print((RESULTS / "supervision_memory.md").read_text())


if __name__ == "__main__":
    main()
