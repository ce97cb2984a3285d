"""Run the benchmarks outside pytest and write tables (results/*.md) and plots (results/*.png).

    python benchmarks/report.py                  # both parts, a few minutes on 2 cores
    python benchmarks/report.py --threads 1 2    # time at several thread counts
    python benchmarks/report.py --only memory    # one part: train-step or memory
    python benchmarks/report.py --no-rss         # skip the peak-RSS probes (one process each)

1. Training step (forward + backward, no optimizer) of hrmspec's reference runtime and of
   transformers' HrmTextForCausalLM on the same config, weights, batch and credit plan, fp32
   and bf16 autocast. The two are timed in alternation, so drifting machine load hits both.
2. Training memory versus schedule length at a fixed credit depth, and versus credit depth at
   a fixed schedule: the bytes autograd saves for backward (deterministic), the graph
   analysis' estimate of them, and the peak-RSS increase of a step over a no-grad forward,
   each RSS point in a fresh process.

Both take the loss from full logits (`return_logits=True`), as transformers does; the training
path's chunked loss at a large vocabulary is loss_memory.py's subject.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # its own timings (see conftest.py: spinning threads measure contention);
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # not for the scripts that import it

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from workloads import (  # noqa: E402
    DTYPES,
    SPEC,
    STEPS,
    Workload,
    hf_model,
    hrmspec_model,
    make_batch,
    predicted_activation_bytes,
    saved_activation_bytes,
    train_step_hrmspec,
)

import hrmspec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CYCLES = [(1, 2), (2, 3), (3, 4), (4, 6)]  # (H_cycles, L_cycles): 3, 8, 15, 28 module calls
FIXED_DEPTH = 3  # credit `last: 3` for the cycles sweep
DEPTH_CYCLES = (2, 3)  # HRM-Text's schedule for the depth sweep
DEPTHS = range(1, 9)
RSS_DEPTHS = (1, 2, 4, 8)
MiB = 2**20


# --------------------------------------------------------------------------- environment


def tiny_model() -> str:
    """The tiny spec's shape, read from the spec (it has changed under the benchmarks before)."""
    m = hrmspec.load_spec(SPEC).model
    layers = sorted({mod.layers for mod in m.modules})
    return (
        f"d_model {m.d_model}, {m.heads} heads x {m.head_dim}, SwiGLU {m.block.ffn}, "
        f"{'/'.join(map(str, layers))} layers per stack, vocab {m.vocab}"
    )


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def seed_mean(runs: list[dict], key: str) -> float:
    """The mean of `key` over runs of several seeds."""
    return sum(r[key] for r in runs) / len(runs)


def seed_percent(runs: list[dict], key: str, spread: bool = False) -> str:
    """The mean of a fraction over seeds as a percentage, with the least and the most when `spread`."""
    text = f"{100 * seed_mean(runs, key):.1f}%"
    if spread:
        text += f" ({100 * min(r[key] for r in runs):.1f}-{100 * max(r[key] for r in runs):.1f})"
    return text


def environment(threads: list[int]) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}; "
        f"threads {', '.join(map(str, threads))}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
        f"load average {load} (1, 5, 15 min) when the run ended; {time.strftime('%Y-%m-%d')}"
    )


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    impl: str
    dtype: str
    threads: int
    wall: list[float]  # seconds per step
    cpu: list[float]  # process CPU seconds per step (all threads)
    loss: float

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def time_train_steps(w: Workload, threads: int, dtype: str, reps: int, warmup: int) -> dict[str, Timing]:
    torch.set_num_threads(threads)
    ours = hrmspec_model(w)
    models = {"hrmspec": ours, "transformers": hf_model(ours)}
    b = make_batch(w, ours.spec.model.vocab)
    out = {k: Timing(k, dtype, threads, [], [], 0.0) for k in models}
    order = list(models)
    for rep in range(warmup + reps):
        for impl in order if rep % 2 else order[::-1]:  # alternate who goes first
            t0, c0 = time.perf_counter(), time.process_time()
            loss = STEPS[impl](models[impl], b, DTYPES[dtype])
            t1, c1 = time.perf_counter(), time.process_time()
            if rep >= warmup:
                out[impl].wall.append(t1 - t0)
                out[impl].cpu.append(c1 - c0)
                out[impl].loss = loss.item()
    return out


def train_step_table(w: Workload, timings: list[dict[str, Timing]], env: str) -> str:
    rows = [
        "| dtype | threads | hrmspec ms/step (median, min) | transformers ms/step (median, min) "
        "| ratio HF/ours, wall | ratio HF/ours, CPU time | tokens/s, hrmspec | loss (both) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in timings:
        ours, hf = t["hrmspec"], t["transformers"]
        rows.append(
            f"| {ours.dtype} | {ours.threads} | {ours.median * 1e3:.0f}, {min(ours.wall) * 1e3:.0f} "
            f"| {hf.median * 1e3:.0f}, {min(hf.wall) * 1e3:.0f} | **{hf.median / ours.median:.2f}** "
            f"| {hf.cpu_median / ours.cpu_median:.2f} | {w.batch * w.seq_len / ours.median:,.0f} "
            f"| {ours.loss:.4f} / {hf.loss:.4f} |"
        )
    reps = len(timings[0]["hrmspec"].wall)
    return "\n".join(
        [
            "# Training step: hrmspec reference runtime vs transformers HrmTextForCausalLM",
            "",
            f"hrm-text-tiny ({tiny_model()}), "
            f"{w.h_cycles} H cycles x {w.l_cycles} L cycles, credit per_cycle L {w.credit['per_cycle']['L']} "
            f"(= L_bp_cycles), batch {w.batch} x {w.seq_len} tokens with a {w.prefix_frac:.0%} PrefixLM prefix; "
            "forward + backward, no optimizer; same weights in both (the losses match); the loss from full "
            'logits in both (hrmspec: return_logits=True). transformers uses attn_implementation="sdpa", '
            "token_type_ids = 1 on the prefix. "
            f"{reps} timed steps per cell after a warm-up, the two implementations alternating.",
            "",
            "Ratio > 1: hrmspec is faster. The CPU-time ratio (process CPU seconds per step) is less "
            "sensitive to other processes on the machine than wall time.",
            "",
            *rows,
            "",
            f"Environment: {env}.",
            "",
        ]
    )


def plot_train_step(w: Workload, timings: list[dict[str, Timing]], path: Path) -> None:
    fig = Figure(figsize=(5.2, 3.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [f"{t['hrmspec'].dtype}, {t['hrmspec'].threads} thr" for t in timings]
    for i, (impl, color) in enumerate((("hrmspec", "#e6550d"), ("transformers", "#3182bd"))):
        xs = [j + (i - 0.5) * 0.38 for j in range(len(timings))]
        med = [t[impl].median * 1e3 for t in timings]
        lo = [m - min(t[impl].wall) * 1e3 for m, t in zip(med, timings)]
        hi = [max(t[impl].wall) * 1e3 - m for m, t in zip(med, timings)]
        ax.bar(xs, med, width=0.36, color=color, label=impl, yerr=[lo, hi], capsize=3)
    ax.set_xticks(range(len(timings)), labels)
    ax.set_ylabel("ms per training step")
    ax.set_title(f"train step, hrm-text-tiny, {w.batch} x {w.seq_len} tokens (median, min-max)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------- memory


@dataclass
class MemoryPoint:
    h_cycles: int
    l_cycles: int
    credit: str
    calls: int
    grad_calls: int
    saved_bytes: int
    predicted_bytes: float
    rss_bytes: int | None = None  # peak-RSS increase of a training step over a no-grad forward


def credit_name(credit) -> str:
    return credit if isinstance(credit, str) else json.dumps(credit).replace('"', "")


def measure_memory(w: Workload) -> MemoryPoint:
    model = hrmspec_model(w)
    b = make_batch(w, model.spec.model.vocab)
    return MemoryPoint(
        w.h_cycles,
        w.l_cycles,
        credit_name(w.credit),
        w.calls,
        sum(model.grad_flags),
        saved_activation_bytes(model, b),
        predicted_activation_bytes(model, b),
    )


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_probe(w: Workload) -> int:
    """In this process: the peak RSS during a training step minus the RSS before it (after a
    no-grad forward has warmed the allocator). Uses /proc's VmHWM, not ru_maxrss: a child keeps
    its parent's ru_maxrss across exec."""
    model = hrmspec_model(w)
    b = make_batch(w, model.spec.model.vocab)
    with torch.no_grad():
        model(b.input_ids, prefix_mask=b.prefix_mask)
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
    except OSError:
        before = _status_kib("VmHWM")
    train_step_hrmspec(model, b)
    return (_status_kib("VmHWM") - before) * 1024


def rss_in_fresh_process(w: Workload, threads: int) -> int:
    arg = json.dumps({**asdict(w), "threads": threads})
    done = subprocess.run([sys.executable, __file__, "--rss-probe", arg], check=True, capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1])


def memory_both(w: Workload) -> dict[tuple[str, str], int]:
    """Saved bytes of both implementations at the timing workload, per dtype."""
    ours = hrmspec_model(w)
    models = {"hrmspec": ours, "transformers": hf_model(ours)}
    b = make_batch(w, ours.spec.model.vocab)
    return {(impl, dt): saved_activation_bytes(m, b, impl, DTYPES[dt]) for impl, m in models.items() for dt in DTYPES}


def memory_tables(
    by_cycles: list[MemoryPoint],
    full: list[MemoryPoint],
    by_depth: list[MemoryPoint],
    both: dict[tuple[str, str], int],
    w: Workload,
) -> str:
    def rss(p: MemoryPoint) -> str:
        return "" if p.rss_bytes is None else f"{p.rss_bytes / MiB:.1f}"

    lines = [
        "# Training memory: grows with credit depth, not with cycles",
        "",
        f"hrm-text-tiny ({tiny_model()}), batch {w.batch} x {w.seq_len} tokens, fp32, the loss from full logits "
        "(`return_logits=True`; at this vocabulary they are a few MiB). **saved**: MiB of the tensors autograd keeps "
        "for backward (unique storages, parameters excluded; deterministic). **estimate**: "
        "`hrmspec.graph.analyse` (activation_bytes_per_token x tokens). **RSS**: MiB by which a training "
        "step raises the peak resident set over a no-grad forward, measured in a fresh process "
        "(allocator-dependent, indicative only).",
        "",
        f"## Fixed credit depth (`last: {FIXED_DEPTH}`), growing schedule",
        "",
        "| H x L cycles | module calls | grad calls | saved MiB | estimate MiB | RSS MiB "
        "| saved MiB, no credit plan (full backprop) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, f in zip(by_cycles, full):
        lines.append(
            f"| {p.h_cycles} x {p.l_cycles} | {p.calls} | {p.grad_calls} | {p.saved_bytes / MiB:.1f} "
            f"| {p.predicted_bytes / MiB:.1f} | {rss(p)} | {f.saved_bytes / MiB:.1f} |"
        )
    h, l = DEPTH_CYCLES
    lines += [
        "",
        f"## Fixed schedule ({h} x {l} cycles, {h * (l + 1)} calls), growing credit depth (`last: k`)",
        "",
        "| depth k | saved MiB | estimate MiB | RSS MiB | saved MiB per grad call |",
        "|---|---|---|---|---|",
    ]
    for p in by_depth:
        lines.append(
            f"| {p.grad_calls} | {p.saved_bytes / MiB:.1f} | {p.predicted_bytes / MiB:.1f} | {rss(p)} "
            f"| {p.saved_bytes / p.grad_calls / MiB:.1f} |"
        )
    lines += [
        "",
        "## hrmspec vs transformers on the timing workload",
        "",
        f"{w.h_cycles} x {w.l_cycles} cycles, credit per_cycle L {w.credit['per_cycle']['L']} (= L_bp_cycles), "
        "5 grad calls; saved MiB (bf16: under autocast, its bf16 weight copies included).",
        "",
        "| dtype | hrmspec saved MiB | transformers saved MiB |",
        "|---|---|---|",
    ]
    for dt in DTYPES:
        lines.append(f"| {dt} | {both['hrmspec', dt] / MiB:.1f} | {both['transformers', dt] / MiB:.1f} |")
    lines += [
        "",
        "The training loss without full logits (the chunked path) against full logits at a 32k-65k "
        "vocabulary: [loss_memory.md](loss_memory.md) (`python benchmarks/loss_memory.py`).",
    ]
    return "\n".join(lines) + "\n"


def plot_memory_vs_calls(by_cycles: list[MemoryPoint], full: list[MemoryPoint], path: Path) -> None:
    fig = Figure(figsize=(5.2, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    calls = [p.calls for p in by_cycles]
    ax.plot(calls, [p.saved_bytes / MiB for p in full], "o-", color="#3182bd", label="full backprop: saved")
    ax.plot(calls, [p.saved_bytes / MiB for p in by_cycles], "o-", color="#e6550d", label=f"last {FIXED_DEPTH}: saved")
    ax.plot(calls, [p.predicted_bytes / MiB for p in by_cycles], "--", color="#e6550d", alpha=0.6, label="estimate")
    rss = [(p.calls, p.rss_bytes / MiB) for p in by_cycles if p.rss_bytes is not None]
    if rss:
        ax.plot(*zip(*rss), "s:", color="#636363", label=f"last {FIXED_DEPTH}: peak RSS increase")
    for p in by_cycles:
        ax.annotate(
            f"{p.h_cycles}x{p.l_cycles}",
            (p.calls, p.saved_bytes / MiB),
            textcoords="offset points",
            xytext=(0, -13),
            ha="center",
            fontsize=7,
        )
    ax.set_ylim(bottom=0)
    ax.set_xlabel("module calls in the schedule")
    ax.set_ylabel("MiB")
    ax.set_title("training memory vs schedule length", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def plot_memory_vs_depth(by_depth: list[MemoryPoint], path: Path) -> None:
    fig = Figure(figsize=(5.2, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    k = [p.grad_calls for p in by_depth]
    ax.plot(k, [p.saved_bytes / MiB for p in by_depth], "o-", color="#e6550d", label="saved for backward")
    ax.plot(k, [p.predicted_bytes / MiB for p in by_depth], "--", color="#e6550d", alpha=0.6, label="estimate")
    rss = [(p.grad_calls, p.rss_bytes / MiB) for p in by_depth if p.rss_bytes is not None]
    if rss:
        ax.plot(*zip(*rss), "s:", color="#636363", label="peak RSS increase")
    h, l = DEPTH_CYCLES
    ax.set_ylim(bottom=0)
    ax.set_xlabel("credit depth (grad-carrying calls)")
    ax.set_ylabel("MiB")
    ax.set_title(f"training memory vs credit depth ({h} x {l} cycles, {h * (l + 1)} calls)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------- main


PARTS = ("train-step", "memory")


def run_train_step(args, w: Workload) -> list[dict]:
    timings = []
    for threads in args.threads:
        for dtype in DTYPES:
            t = time_train_steps(w, threads, dtype, args.reps, args.warmup)
            timings.append(t)
            ratio = t["transformers"].median / t["hrmspec"].median
            print(f"train step {dtype}, {threads} threads: HF/ours = {ratio:.2f}", flush=True)
    env = environment(args.threads)
    (args.out / "train_step.md").write_text(train_step_table(w, timings, env))
    plot_train_step(w, timings, args.out / "train_step.png")
    return [{k: asdict(v) for k, v in t.items()} for t in timings]


def run_memory(args, w: Workload) -> dict:
    threads = args.threads[0]
    torch.set_num_threads(threads)
    by_cycles, full = [], []
    for h, l in CYCLES:
        point = measure_memory(Workload(h, l, {"last": FIXED_DEPTH}))
        if not args.no_rss:
            point.rss_bytes = rss_in_fresh_process(Workload(h, l, {"last": FIXED_DEPTH}), threads)
        by_cycles.append(point)
        full.append(measure_memory(Workload(h, l, "none")))
        print(f"memory {h}x{l}: {point.saved_bytes / MiB:.1f} MiB at last {FIXED_DEPTH}", flush=True)
    by_depth = []
    for k in DEPTHS:
        depth_w = Workload(*DEPTH_CYCLES, {"last": k})
        point = measure_memory(depth_w)
        if not args.no_rss and k in RSS_DEPTHS:
            point.rss_bytes = rss_in_fresh_process(depth_w, threads)
        by_depth.append(point)
    print(f"memory vs depth: {[round(p.saved_bytes / MiB, 1) for p in by_depth]} MiB", flush=True)
    both = memory_both(w)
    env = environment([threads])
    (args.out / "memory.md").write_text(memory_tables(by_cycles, full, by_depth, both, w) + f"\nEnvironment: {env}.\n")
    plot_memory_vs_calls(by_cycles, full, args.out / "memory_vs_calls.png")
    plot_memory_vs_depth(by_depth, args.out / "memory_vs_depth.png")
    return {
        "by_cycles": [asdict(m) for m in by_cycles],
        "full_backprop": [asdict(m) for m in full],
        "by_depth": [asdict(m) for m in by_depth],
        "both_saved_bytes": {f"{impl}/{dt}": v for (impl, dt), v in both.items()},
        "environment": env,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to run (default: both)")
    p.add_argument("--threads", type=int, nargs="+", default=[2], help="torch thread counts to time at")
    p.add_argument("--reps", type=int, default=7, help="timed steps per implementation and cell")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS probes")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--rss-probe", metavar="JSON", help=argparse.SUPPRESS)  # internal: one RSS measurement
    args = p.parse_args(argv)

    if args.rss_probe:
        spec = json.loads(args.rss_probe)
        torch.set_num_threads(spec.pop("threads"))
        print(rss_probe(Workload(**spec)))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    w = Workload()
    raw_path = args.out / "results.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}  # a part run alone keeps the others'
    if "train-step" in args.only:
        raw["timings"] = run_train_step(args, w)
        raw["environment"] = environment(args.threads)
    if "memory" in args.only:
        raw["memory"] = run_memory(args, w)
    raw_path.write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
