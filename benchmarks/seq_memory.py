"""Memory and time of attention over long rows: a dense mask with SDPA vs the blocked attention.

    python benchmarks/seq_memory.py                        # S = 512 .. 8192 memory, S = 256 and 64 times; ~9 min
    python benchmarks/seq_memory.py --only timing          # re-time on an idle machine, keep the memory table
    python benchmarks/seq_memory.py --seq-lens 512 1024 --reps 5

Until this revision the runtime built a dense (B, 1, S, S) mask per batch and the reference
attention ran SDPA with it, which keeps the mask for backward. Now the mask is a description
(`hrmspec.mask.Mask`) and the reference attention runs blocked (backends/reference/attention.py).
`DenseAttention` below is the old path, plugged in as the op table's attention, so both are
measured in the same run on the same model and batch:

1. memory of one training step (forward + backward, the chunked loss of training, no optimizer)
   of a small hrm-text-tiny variant (one layer per module, one L and one H call, both carrying
   gradient; batch 2, a one-third PrefixLM prefix) at S = 512 .. 8192: the peak-RSS increase of a
   step over the RSS between steps, after a warm-up step, in a fresh process per point; and the
   bytes autograd saves for backward (deterministic);
2. time on the demo config (hrm-text-tiny: 2 layers per module, H 2 / L 3 cycles, L_bp_cycles
   [1, 2]) at 8 x 256 tokens and at the demo's own batch, 32 x 64: the attention op alone (q, k, v
   of one layer, forward + backward) and a whole training step, the two paths alternating; paired
   ratios.
"""

from __future__ import annotations

# OMP_WAIT_POLICY is left as the user has it (unset: OpenMP's spinning waits), the setting a training
# run gets; PASSIVE makes a step 1.5x slower on AVX2 cores (docs/kernels.md), so time on an idle machine.
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from loss_memory import alternate, answer_probe, paired_ratio
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from report import MiB, _status_kib, environment
from workloads import SPEC, Workload, make_batch, saved_activation_bytes, train_step_hrmspec

from hrmspec.backends import get_backend
from hrmspec.backends.reference.attention import BLOCK_K, BLOCK_Q, blocked_attention, default_engine
from hrmspec.backends.reference.table import ReferenceTable
from hrmspec.graph.build import build_graph
from hrmspec.graph.plan import execution_plan
from hrmspec.mask import Mask
from hrmspec.runtime.execution import CompiledModel
from hrmspec.spec.load import load_spec

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("dense", "blocked")
SMALL_BODY = {"model.modules": {"L": {"layers": 1}, "H": {"layers": 1}}}


class DenseAttention:
    """The reference attention as it was: the batch's mask as a dense additive (B, 1, Sq, Sk) tensor
    of q's dtype, built once per batch (kept with the boolean mask it came from, as the runtime's
    Context kept both) and shared by every call, then SDPA."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
        key = ("dense additive", q.dtype, q.shape[0], q.shape[2])
        if key not in mask._memo:
            dense = mask.dense(q.shape[2], batch=q.shape[0], device=q.device)
            additive = torch.zeros(dense.shape, dtype=q.dtype, device=q.device).masked_fill_(~dense, float("-inf"))
            mask._memo[key] = (dense, additive)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask._memo[key][1])


class DenseReference(ReferenceTable):
    """The reference op table with the old dense-mask attention."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
        return DenseAttention()(q, k, v, mask)


def op_table(path: str):
    """The reference op table, with the dense attention for 'dense'."""
    return get_backend("reference") if path == "blocked" else DenseReference()


def memory_workload(seq_len: int, batch: int) -> Workload:
    return Workload(1, 1, "none", batch=batch, seq_len=seq_len, extra=SMALL_BODY)


def model_for(w: Workload, path: str, seed: int = 0) -> CompiledModel:
    spec = load_spec(SPEC, w.overrides())
    ops = op_table(path)
    graph = build_graph(spec)
    model = CompiledModel(execution_plan(graph, fused=ops.fuses), ops, graph)
    model.reset_parameters(seed)
    return model.train()


def step(model: CompiledModel, b) -> torch.Tensor:
    return train_step_hrmspec(model, b, return_logits=False)


# --------------------------------------------------------------------------- memory, one process per point


def probe(path: str, seq_len: int, batch: int) -> dict[str, int]:
    """In this process: the saved-for-backward bytes of a step (the warm-up step), then the peak RSS
    of a second step over the RSS between the steps (parameter gradients freed)."""
    w = memory_workload(seq_len, batch)
    model = model_for(w, path)
    b = make_batch(w, model.spec.model.vocab)
    saved = saved_activation_bytes(model, b, return_logits=False)
    model.zero_grad(set_to_none=True)
    gc.collect()
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
    except OSError:
        before = _status_kib("VmHWM")
    t0 = time.perf_counter()
    step(model, b)
    return {"saved": saved, "rss_before": before * 1024, "rss_peak": _status_kib("VmHWM") * 1024,
            "step_s": time.perf_counter() - t0}


# glibc serves allocations above a threshold with their own pages and unmaps them when freed; the
# threshold rises (up to 32 MiB) as large blocks are freed, after which freed tensors stay in the
# heap and a second step reuses their pages unseen. Pinned at 64 KiB, the RSS follows the live tensors.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def probe_in_fresh_process(path: str, seq_len: int, batch: int, threads: int) -> dict:
    arg = json.dumps(dict(path=path, seq_len=seq_len, batch=batch, threads=threads))
    done = subprocess.run([sys.executable, __file__, "--probe", arg], check=True, capture_output=True, text=True,
                          env={**os.environ, **PROBE_ENV})
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- time at S = 256


SHAPES = ((8, 256), (32, 64))  # rows x tokens: S = 256, and the demo's own batch (train: 32 x 64)


def time_demo(reps: int, warmup: int, batch: int = 8, seq_len: int = 256) -> dict:
    """The attention op alone and a whole training step at the demo config, both paths alternating."""
    w = Workload(batch=batch, seq_len=seq_len)  # hrm-text-tiny, H 2 / L 3, L_bp_cycles [1, 2]
    models = {p: model_for(w, p) for p in PATHS}
    models["dense"].load_state_dict(models["blocked"].state_dict())
    b = make_batch(w, models["blocked"].spec.model.vocab)
    m = models["blocked"].spec.model
    gen = torch.Generator().manual_seed(0)
    q, k, v, d_out = (torch.randn(w.batch, m.heads, w.seq_len, m.head_dim, generator=gen) for _ in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    mask = Mask("prefix_lm", b.prefix_mask)  # one batch: both paths reuse their per-batch mask, as the layers do
    tables = {p: op_table(p) for p in PATHS}

    def attention(path: str):
        if path == "blocked, plain-torch tiles":  # the definition's engine, for comparison
            out = blocked_attention(*leaves, mask, engine="torch")
        else:
            out = tables[path].attention(*leaves, mask)
        torch.autograd.grad(out, leaves, d_out)

    cases = [*PATHS, "blocked, plain-torch tiles"]
    ops = alternate({p: lambda p=p: attention(p) for p in cases}, reps * 4, warmup)
    steps = alternate({p: lambda p=p: step(models[p], b) for p in PATHS}, reps, warmup)
    for v_ in steps.values():
        v_["loss"] = v_.pop("result")
    return {"attention": ops, "step": steps, "engine": default_engine(q)}


# --------------------------------------------------------------------------- report


def _rss(m: dict) -> float:
    return (m["rss_peak"] - m["rss_before"]) / MiB


def tables(points: list[dict], timing: dict, args, env: str, load: str) -> str:
    engine = next(iter(timing.values()))["engine"] if timing else default_engine(torch.zeros(1))
    lines = [
        "# Attention over long rows: a dense mask with SDPA vs the blocked attention",
        "",
        "**dense**: the reference attention until this revision, as a benchmark-local op "
        "(`DenseAttention` in `benchmarks/seq_memory.py`): the batch's mask as a dense additive (B, 1, S, S) "
        "fp32 tensor (and the boolean mask it came from), built once per batch, then "
        "`F.scaled_dot_product_attention`, which keeps the mask for backward. **blocked**: the reference "
        f"attention now (`backends/reference/attention.py`): tiles of {BLOCK_Q} x {BLOCK_K}, SKIP tiles not "
        "computed, the predicate evaluated on PARTIAL tiles only, q, k, v, out and the log-sum-exp kept for "
        f"backward; tiles on the `{engine}` engine.",
        "",
        "## Memory of one training step",
        "",
        f"hrm-text-tiny with one layer per module, one L and one H call (both carrying gradient), batch "
        f"{args.batch} x S, a one-third PrefixLM prefix, fp32, {args.threads} threads; one step is forward + "
        "backward with the chunked loss of training, no optimizer. **peak RSS**: MiB by which the step raises "
        "the resident set over the RSS between steps, after a warm-up step, in a fresh process per cell, "
        "glibc's mmap threshold pinned at 64 KiB (`MALLOC_MMAP_THRESHOLD_`) so that freed tensors leave the "
        "resident set and the peak follows the live tensors (allocator-dependent still). **saved**: MiB of the "
        "tensors autograd keeps for backward (unique storages, "
        "parameters excluded; deterministic). **growth**: the ratio to the row above (S doubles).",
        "",
        "| S | peak RSS MiB, dense | growth | peak RSS MiB, blocked | growth | dense / blocked "
        "| saved MiB, dense | saved MiB, blocked | step s, dense / blocked |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    prev = None
    for p in points:
        d, bl = p["memory"]["dense"], p["memory"]["blocked"]
        grow = ("", "") if prev is None else (f"{_rss(d) / _rss(prev['dense']):.1f}x",
                                              f"{_rss(bl) / _rss(prev['blocked']):.1f}x")
        lines.append(
            f"| {p['seq_len']:,} | {_rss(d):,.0f} | {grow[0]} | {_rss(bl):,.0f} | {grow[1]} "
            f"| **{_rss(d) / max(_rss(bl), 1):.1f}x** | {d['saved'] / MiB:,.1f} | {bl['saved'] / MiB:,.1f} "
            f"| {d['step_s']:.1f} / {bl['step_s']:.1f} |"
        )
        prev = p["memory"]
    last = points[-1] if points else None
    # growth over the whole sweep, and over its last 4x (S = 2048 -> 8192 by default)
    for first in points[:1] + [p for p in points[1:-1] if 4 * p["seq_len"] == last["seq_len"]]:
        fm, lm = first["memory"], last["memory"]
        lines += ["", f"From S = {first['seq_len']:,} to {last['seq_len']:,} ({last['seq_len'] // first['seq_len']}x): "
                  f"peak RSS x{_rss(lm['dense']) / _rss(fm['dense']):.1f} (dense), "
                  f"x{_rss(lm['blocked']) / _rss(fm['blocked']):.1f} (blocked); saved bytes "
                  f"x{lm['dense']['saved'] / fm['dense']['saved']:.1f} (dense), "
                  f"x{lm['blocked']['saved'] / fm['blocked']['saved']:.1f} (blocked)."]
    if points:
        lines += ["", "The blocked path keeps what the dense one keeps less the mask: the difference of the saved "
                  "bytes is the (B, 1, S, S) fp32 mask, 2 S^2 x 4 bytes here. The step times are single steps in "
                  "the probe processes, one point each: indicative only."]
    for shape, t in (timing or {}).items():
        B, S = (int(x) for x in shape.split(" x "))
        lines += [
            "",
            f"## Time at {B} x {S} tokens, the demo config",
            "",
            "hrm-text-tiny as shipped (d_model 128, 4 heads x 32, 2 layers per module, H 2 / L 3 cycles, "
            f"credit L_bp_cycles [1, 2]), batch {B} x {S}, a one-third PrefixLM prefix, fp32. **attention**: one "
            f"layer's op, q, k, v ({B}, 4, {S}, 32), forward + backward into q, k, v, the batch's mask reused (as "
            "by every layer of a step); also on the plain-torch tiles (`engine=\"torch\"`, the definition; the "
            "default on CPU is torch's fused kernel per tile). **step**: forward + backward of the model with the "
            "chunked loss. Each timed run follows an untimed one of the same path; the paths alternate round by "
            "round. Ratio blocked / dense > 1: blocked is slower; **median**: the median of the per-round ratios, "
            "**best**: the ratio of the fastest runs.",
            "",
            "| what | runs | dense ms (median, min) | blocked ms (median, min) | blocked / dense, median "
            "| blocked / dense, best | blocked / dense, CPU time |",
            "|---|---|---|---|---|---|---|",
        ]
        rows = [("attention", "blocked"), ("step", "blocked")]
        if "blocked, plain-torch tiles" in t["attention"]:
            rows.insert(1, ("attention", "blocked, plain-torch tiles"))
        for what, case in rows:
            d, bl = t[what]["dense"], t[what][case]
            name = what if case == "blocked" else f"{what} ({case.split(', ')[1]})"
            lines.append(
                f"| {name} | {len(d['wall'])} | {statistics.median(d['wall']) * 1e3:,.1f}, {min(d['wall']) * 1e3:,.1f} "
                f"| {statistics.median(bl['wall']) * 1e3:,.1f}, {min(bl['wall']) * 1e3:,.1f} "
                f"| **{paired_ratio(bl['wall'], d['wall']):.2f}** | {min(bl['wall']) / min(d['wall']):.2f} "
                f"| {paired_ratio(bl['cpu'], d['cpu']):.2f} |"
            )
        st = t["step"]
        lines += ["", f"Loss of the timed steps: dense {st['dense']['loss']:.6f}, blocked {st['blocked']['loss']:.6f}."]
    if timing:
        lines += ["", f"**Machine load when the timings started** (`uptime`): {load}. Timings on a shared, busy "
                  "machine are not reliable; the ones here are to be read with that load."]
    lines += ["", f"Environment: {env}."]
    return "\n".join(lines)


def plot(points: list[dict], timing: dict, path: Path) -> None:
    fig = Figure(figsize=(8.4, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    mem, tim = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    colors = {"dense": "#3182bd", "blocked": "#e6550d"}
    xs = [p["seq_len"] for p in points]
    for name in PATHS:
        mem.plot(xs, [_rss(p["memory"][name]) for p in points], "o-", color=colors[name], label=f"{name}, peak RSS")
        mem.plot(xs, [p["memory"][name]["saved"] / MiB for p in points], "s--", color=colors[name], alpha=0.6,
                 label=f"{name}, saved for backward")
    mem.set_xscale("log", base=2)
    mem.set_xticks(xs, [f"{x:,}" for x in xs])
    mem.set_yscale("log")
    mem.set_xlabel("sequence length S")
    mem.set_ylabel("MiB")
    mem.set_title("memory of one training step (small tiny variant, batch 2)", fontsize=9)
    mem.legend(fontsize=7)
    if timing:
        labels, ratios = [], []
        for shape, t in timing.items():
            for w, name in (("attention", "attention op"), ("step", "training step")):
                labels.append(f"{name}\n{shape}")
                ratios.append(paired_ratio(t[w]["blocked"]["wall"], t[w]["dense"]["wall"]))
        bars = tim.bar(labels, ratios, color=colors["blocked"])
        tim.bar_label(bars, fmt="%.2f", fontsize=8)
        tim.axhline(1.0, color="k", lw=0.8)
        tim.tick_params(axis="x", labelsize=7)
        tim.set_ylabel("blocked / dense time")
        tim.set_title("demo config (median paired ratio)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=2, help="rows per step of the memory sweep")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10, help="timed training steps per path (the op: 4x as many)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--only", choices=("memory", "timing"),
                   help="measure one part; the other is read from the last run's seq_memory.json")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--render", action="store_true", help="measure nothing: rewrite the tables and the plot "
                   "from the last run's seq_memory.json")
    p.add_argument("--probe", metavar="JSON", help=argparse.SUPPRESS)  # internal: one memory point
    args = p.parse_args(argv)
    args.argv = argv

    if answer_probe(args, probe):
        return 0
    start = time.perf_counter()
    previous = args.out / "seq_memory.json"
    last = json.loads(previous.read_text()) if (args.only or args.render) and previous.exists() else {}
    timing, load, points = last.get("timing"), last.get("load", ""), last.get("points", [])
    commands = {part: (last.get("commands", {}).get(part) if args.render or args.only not in (None, part) else argv)
                for part in ("memory", "timing")}
    args.commands = commands
    if args.render:
        (args.out / "seq_memory.md").write_text(tables(points, timing, args, last["environment"], load))
        plot(points, timing, args.out / "seq_memory.png")
        return 0
    if args.only != "memory":
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        timing = {}
        for B, S in SHAPES:
            t = timing[f"{B} x {S}"] = time_demo(args.reps, args.warmup, B, S)
            r = {w: paired_ratio(t[w]["blocked"]["wall"], t[w]["dense"]["wall"]) for w in ("attention", "step")}
            print(f"{B} x {S}: blocked / dense, attention op {r['attention']:.2f}, training step {r['step']:.2f} "
                  f"({load})", flush=True)
    if args.only != "timing":
        points = []
        for S in args.seq_lens:
            m = {p_: probe_in_fresh_process(p_, S, args.batch, args.threads) for p_ in PATHS}
            print(f"S = {S}: peak RSS dense {_rss(m['dense']):.0f} MiB, blocked {_rss(m['blocked']):.0f} MiB; "
                  f"saved {m['dense']['saved'] / MiB:.1f} / {m['blocked']['saved'] / MiB:.1f} MiB", flush=True)
            points.append({"seq_len": S, "memory": m})

    env = environment([args.threads])
    raw = {"args": {k: v for k, v in vars(args).items() if k not in ("out", "probe", "commands")}, "points": points,
           "timing": timing, "load": load, "environment": env, "commands": commands}
    (args.out / "seq_memory.json").write_text(json.dumps(raw, indent=1) + "\n")  # first: the tables read it back
    (args.out / "seq_memory.md").write_text(tables(points, timing, args, env, load))
    plot(points, timing, args.out / "seq_memory.png")
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
