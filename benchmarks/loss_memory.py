"""Memory and time of the training loss at a large vocabulary: full logits vs the chunked path.

    python benchmarks/loss_memory.py                          # vocab 32k and 65k, 8 x 512 tokens; ~8 min, < 6 GB
    python benchmarks/loss_memory.py --vocab 32768 --reps 3   # one vocabulary, fewer steps

`CompiledModel.forward(..., labels=...)` takes the loss in one of two ways:

* `return_logits=True` (the default, and what transformers does): the full (tokens, vocab) logits
  h W^T, then `ops.cross_entropy` on them, which keeps their log-softmax for backward;
* `return_logits=False` (training, runtime/training/loop.py): `chunked_linear_cross_entropy`
  (backends/common/chunked_linear_ce.py) computes the logits of a few rows at a time, keeps h and one
  log-sum-exp per row for backward, and recomputes each chunk's logits there (one GEMM more).

Per vocabulary and path, on a model whose body is small (`workloads.loss_workload`: d_model 256,
one layer per module, one L and one H call) so that the head and the loss dominate, fp32:

1. the peak-RSS increase of one training step (forward + backward, no optimizer) over the RSS
   between steps, each point in a fresh process, after a warm-up step of the same path;
2. the bytes autograd saves for backward (deterministic; the warm-up step of 1.);
3. the step time, each timed step after an untimed one of the same path, the paths alternating;
4. the loss alone (h -> loss, forward + backward) at the default chunk and at larger chunks: how
   much of the time difference is the recomputed GEMM and how much the chunk size.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # its own timings (see conftest.py: spinning threads measure contention);
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # not for the scripts that import it

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from report import MiB, _status_kib, environment  # noqa: E402
from workloads import (  # noqa: E402
    LOSS_BODY,
    hrmspec_model,
    loss_workload,
    make_batch,
    saved_activation_bytes,
    train_step_hrmspec,
)

from hrmspec.backends.common.chunked_linear_ce import chunked_linear_cross_entropy, default_chunk_rows  # noqa: E402
from hrmspec.backends.reference.linear_ce import TORCH_STEPS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = {"full": True, "chunked": False}  # name -> return_logits


def _timed(fn) -> tuple[dict[str, float], torch.Tensor]:
    """Wall and process CPU seconds of fn(), the system part of the CPU time, minor page faults."""
    r0, t0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu, r1 = time.perf_counter() - t0, time.process_time() - c0, resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": wall, "cpu": cpu, "sys": r1.ru_stime - r0.ru_stime, "minflt": r1.ru_minflt - r0.ru_minflt}, out


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-round ratios: a change in load between rounds cancels."""
    return statistics.median(a / b for a, b in zip(num, den))


# --------------------------------------------------------------------------- memory, one process per point


def probe(vocab: int, batch: int, seq_len: int, return_logits: bool) -> dict[str, int]:
    """In this process: the saved-for-backward bytes of a step (the warm-up step), then the peak RSS
    of a second step over the RSS between the steps (parameter gradients freed)."""
    w = loss_workload(vocab, batch, seq_len)
    model = hrmspec_model(w)
    b = make_batch(w, vocab)
    saved = saved_activation_bytes(model, b, return_logits=return_logits)
    model.zero_grad(set_to_none=True)
    gc.collect()
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
    except OSError:
        before = _status_kib("VmHWM")
    train_step_hrmspec(model, b, return_logits=return_logits)
    return {"saved": saved, "rss_before": before * 1024, "rss_peak": _status_kib("VmHWM") * 1024}


def probe_in_fresh_process(vocab: int, batch: int, seq_len: int, return_logits: bool, threads: int) -> dict:
    arg = json.dumps(dict(vocab=vocab, batch=batch, seq_len=seq_len, return_logits=return_logits, threads=threads))
    done = subprocess.run([sys.executable, __file__, "--probe", arg], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- time


def alternate(cases: dict, reps: int, warmup: int) -> dict[str, dict[str, list]]:
    """Time each case `reps` times after `warmup` rounds. A round runs every case twice in a row and
    times the second run, so a timed step follows a step of its own kind, as in training: a
    full-logits step right after a chunked one spends several times the system time in page faults.
    The cases alternate their order from round to round, so drifting load hits all of them."""
    out = {str(k): {"wall": [], "cpu": [], "sys": [], "minflt": [], "result": None} for k in cases}
    order = list(cases)
    for rep in range(warmup + reps):
        for k in order if rep % 2 else order[::-1]:
            cases[k]()
            t, result = _timed(cases[k])
            if rep >= warmup:
                for field, v in t.items():
                    out[str(k)][field].append(v)
                out[str(k)]["result"] = None if result is None else result.item()
    return out


def time_steps(vocab: int, batch: int, seq_len: int, reps: int, warmup: int) -> dict:
    """Training steps of both paths on one model and batch."""
    w = loss_workload(vocab, batch, seq_len)
    model = hrmspec_model(w)
    b = make_batch(w, vocab)
    out = alternate({p: lambda p=p: train_step_hrmspec(model, b, return_logits=PATHS[p]) for p in PATHS}, reps, warmup)
    model.zero_grad(set_to_none=True)
    for v in out.values():
        v["loss"] = v.pop("result")
    return out


def time_loss_alone(vocab: int, batch: int, seq_len: int, chunks: list[int], reps: int, warmup: int) -> dict:
    """h (tokens, d) -> loss sum, forward + backward into h and W: `ops.cross_entropy(h @ W.T)` vs
    `chunked_linear_cross_entropy` at its default chunk and at `chunks` rows."""
    w = loss_workload(vocab, batch, seq_len)
    model = hrmspec_model(w)
    labels = make_batch(w, vocab).labels.reshape(-1)
    d = model.spec.model.d_model
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(labels.numel(), d, generator=gen).requires_grad_()
    W = model.head.weight
    default = default_chunk_rows(labels.numel(), vocab, d)
    losses = {"full": lambda: model.ops.cross_entropy(h @ W.T, labels)[0]}
    for c in [default, *(c for c in chunks if c != default)]:
        losses[c] = lambda c=c: chunked_linear_cross_entropy(h, W, labels, TORCH_STEPS, chunk_rows=c)[0]

    def run(loss):
        h.grad = W.grad = None
        loss().backward()

    out = alternate({k: lambda k=k: run(losses[k]) for k in losses}, reps, warmup)
    h.grad = W.grad = None
    return {"default_chunk": default, "wall": {k: v["wall"] for k, v in out.items()}}


# --------------------------------------------------------------------------- report


def tables(points: list[dict], args, env: str) -> str:
    tokens = args.batch * args.seq_len
    body = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in LOSS_BODY.items() if k != "model.modules")
    lines = [
        "# Training loss: full logits vs chunked linear + cross-entropy",
        "",
        f"hrm-text-tiny with a small body ({body}, one layer per module, one L and one H call, both "
        f"carrying gradient, untied head) under a large vocabulary; batch {args.batch} x {args.seq_len} = "
        f"{tokens} tokens, a one-third PrefixLM prefix (no loss there), fp32, {args.threads} threads. One "
        "training step is forward + backward, no optimizer. **full**: `model(..., labels=...)` "
        "(`return_logits=True`: the (tokens, vocab) logits, then `ops.cross_entropy`). **chunked**: "
        "`return_logits=False`, the training path (`chunked_linear_cross_entropy`, "
        "backends/common/chunked_linear_ce.py).",
        "",
        "## Memory of one training step",
        "",
        "**peak RSS**: MiB by which one step raises the resident set over the RSS between steps "
        "(parameter gradients freed), after a warm-up step of the same path, in a fresh process per "
        "cell (allocator-dependent). It includes the head's gradient (vocab x d_model x 4 bytes) and "
        "the pages of the embedding's that the batch's tokens touch, which neither path avoids. "
        "**saved**: MiB of the tensors autograd keeps for backward (unique storages, parameters "
        "excluded; deterministic). "
        "**logits**: one fp32 (tokens, vocab) tensor.",
        "",
        "| vocab | tokens | logits MiB | peak RSS MiB, full | peak RSS MiB, chunked | full / chunked "
        "| saved MiB, full | saved MiB, chunked | RSS between steps MiB, full / chunked |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        m = p["memory"]
        rss = {k: (v["rss_peak"] - v["rss_before"]) / MiB for k, v in m.items()}
        lines.append(
            f"| {p['vocab']:,} | {tokens:,} | {tokens * p['vocab'] * 4 / MiB:,.0f} | {rss['full']:,.0f} "
            f"| {rss['chunked']:,.0f} | **{rss['full'] / max(rss['chunked'], 1):.1f}x** "
            f"| {m['full']['saved'] / MiB:,.1f} "
            f"| {m['chunked']['saved'] / MiB:,.1f} | {m['full']['rss_before'] / MiB:,.0f} / "
            f"{m['chunked']['rss_before'] / MiB:,.0f} |"
        )
    lines += [
        "",
        "## Time of one training step",
        "",
        f"{args.reps} timed steps per path after {args.warmup} warm-up round; each timed step follows an "
        "untimed step of the same path (as in training), the paths alternating from round to round. "
        "Ratio chunked / full > 1: the chunked path is slower; **median**: the median of the per-round "
        "ratios, **best**: the ratio of the fastest steps. **sys**: the system part of the step's CPU "
        "time (median), most of it the kernel's handling of the **page faults** (minor, median per step): "
        "glibc maps every tensor above 32 MiB afresh and returns it when freed, so each full-logits step "
        "touches its (tokens, vocab) tensors' pages anew. (Right after a chunked step a full step spends "
        "several times as much system time; the timed steps avoid that.)",
        "",
        "| vocab | full ms (median, min) | chunked ms (median, min) | chunked / full, median "
        "| chunked / full, best | chunked / full, CPU time | sys s, full / chunked "
        "| page faults, full / chunked | loss, full / chunked |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        f, c = p["steps"]["full"], p["steps"]["chunked"]
        lines.append(
            f"| {p['vocab']:,} | {statistics.median(f['wall']) * 1e3:,.0f}, {min(f['wall']) * 1e3:,.0f} "
            f"| {statistics.median(c['wall']) * 1e3:,.0f}, {min(c['wall']) * 1e3:,.0f} "
            f"| **{paired_ratio(c['wall'], f['wall']):.2f}** | {min(c['wall']) / min(f['wall']):.2f} "
            f"| {paired_ratio(c['cpu'], f['cpu']):.2f} "
            f"| {statistics.median(f['sys']):.1f} / {statistics.median(c['sys']):.1f} "
            f"| {statistics.median(f['minflt']):,.0f} / {statistics.median(c['minflt']):,.0f} "
            f"| {f['loss']:.4f} / {c['loss']:.4f} |"
        )
    chunk_cols = [c for c in args.chunks if c not in {p["loss_alone"]["default_chunk"] for p in points}]

    def cell(wall: dict, c: int) -> str:
        return f"{statistics.median(wall[str(c)]) * 1e3:,.0f} ({paired_ratio(wall[str(c)], wall['full']):.2f}x)"

    lines += [
        "",
        "## The loss alone, by chunk size",
        "",
        f"h ({tokens} x {LOSS_BODY['model.d_model']}, random) -> loss sum, forward + backward into h and the "
        "head weight: `ops.cross_entropy(h @ W.T)` (full) vs `chunked_linear_cross_entropy` at `chunk_rows` "
        "rows (default: `default_chunk_rows`, which makes a chunk's logits about as large as h). ms, median "
        "of the steps; in brackets the median per-round ratio to full. Full runs three GEMMs of tokens x "
        "d_model x vocab (logits, dh, dW), chunked four (the logits again in backward): 1.33x if the "
        "GEMMs were all the time and ran as fast in chunks. A chunk's logits buffer is chunk x vocab x 4 "
        "bytes; backward holds it and its softmax gradient at once.",
        "",
        "| vocab | full | chunked, default chunk | " + " | ".join(f"chunked, {c} rows" for c in chunk_cols) + " |",
        "|---|---|---|" + "---|" * len(chunk_cols),
    ]
    for p in points:
        la = p["loss_alone"]
        wall, default = la["wall"], la["default_chunk"]
        cells = [f"{default} rows: {cell(wall, default)}", *(cell(wall, c) for c in chunk_cols)]
        lines.append(f"| {p['vocab']:,} | {statistics.median(wall['full']) * 1e3:,.0f} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{' '.join(['python benchmarks/loss_memory.py', *args.argv])}`.", ""]
    lines += [f"Environment: {env}.", ""]
    return "\n".join(lines)


def plot(points: list[dict], args, path: Path) -> None:
    fig = Figure(figsize=(8.4, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    mem, tim = fig.subplots(1, 2)
    colors = {"full": "#3182bd", "chunked": "#e6550d"}
    labels = [f"vocab {p['vocab'] // 1024}k" for p in points]
    for i, path_name in enumerate(PATHS):
        xs = [j + (i - 0.5) * 0.38 for j in range(len(points))]
        rss = [(p["memory"][path_name]["rss_peak"] - p["memory"][path_name]["rss_before"]) / MiB for p in points]
        bars = mem.bar(xs, rss, width=0.36, color=colors[path_name], label=path_name)
        mem.bar_label(bars, fmt="%.0f", fontsize=7)
        walls = [p["steps"][path_name]["wall"] for p in points]
        med = [statistics.median(w) for w in walls]
        lo = [m - min(w) for m, w in zip(med, walls)]
        hi = [max(w) - m for m, w in zip(med, walls)]
        tim.bar(xs, med, width=0.36, color=colors[path_name], label=path_name, yerr=[lo, hi], capsize=3)
    tokens = f"{args.batch} x {args.seq_len} tokens"
    mem.set_ylabel("MiB")
    mem.set_title(f"peak RSS increase of a train step, {tokens}", fontsize=9)
    tim.set_ylabel("s per train step")
    tim.set_title("train step time (median, min-max)", fontsize=9)
    for ax in (mem, tim):
        ax.set_xticks(range(len(points)), labels)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------- main


def answer_probe(args, probe) -> bool:
    """In a probe child (`--probe JSON`): measure one point with `probe` and print it as JSON. Else set
    the threads and make the output folder. True when this process was a probe."""
    if args.probe:
        spec = json.loads(args.probe)
        torch.set_num_threads(spec.pop("threads"))
        print(json.dumps(probe(**spec)))
        return True
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 65536])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=4, help="timed steps per path (each after an untimed one)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--chunks", type=int, nargs="*", default=[64, 256], help="chunk rows for the loss-alone table")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--probe", metavar="JSON", help=argparse.SUPPRESS)  # internal: one memory point
    args = p.parse_args(argv)
    args.argv = argv

    if answer_probe(args, probe):
        return 0
    start = time.perf_counter()
    points = []
    for vocab in args.vocab:
        point = {"vocab": vocab}
        point["steps"] = time_steps(vocab, args.batch, args.seq_len, args.reps, args.warmup)
        point["loss_alone"] = time_loss_alone(vocab, args.batch, args.seq_len, args.chunks, args.reps, args.warmup)
        gc.collect()
        point["memory"] = {
            name: probe_in_fresh_process(vocab, args.batch, args.seq_len, return_logits, args.threads)
            for name, return_logits in PATHS.items()
        }
        m = point["memory"]
        rss = {k: (v["rss_peak"] - v["rss_before"]) / MiB for k, v in m.items()}
        med = {k: statistics.median(v["wall"]) for k, v in point["steps"].items()}
        print(
            f"vocab {vocab}: peak RSS full {rss['full']:.0f} MiB, chunked {rss['chunked']:.0f} MiB; "
            f"step full {med['full']:.2f} s, chunked {med['chunked']:.2f} s",
            flush=True,
        )
        points.append(point)

    env = environment([args.threads])
    (args.out / "loss_memory.md").write_text(tables(points, args, env))
    plot(points, args, args.out / "loss_memory.png")
    raw = {"args": {k: v for k, v in vars(args).items() if k not in ("out", "probe")}, "points": points}
    (args.out / "loss_memory.json").write_text(json.dumps({**raw, "environment": env}, indent=1) + "\n")
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
