"""Speed against transformers' HRM-Text: the training step per backend, and greedy decoding.

    python benchmarks/speed.py                 # about 10 minutes on 2 cores; waits for a quiet machine
    python benchmarks/speed.py --skip-large    # the demo config only

Training step: forward + backward on packed PrefixLM batches (benchmarks/throughput.py's
`packed_batches`, as `hrmspec train` packs them), full depth of hrm-text-tiny's credit ramp (H#0,
L#3-5, H#1 carry gradient, transformers' L_bp_cycles [0, 3]); the same weights in every
implementation: hrmspec on the reference backend, hrmspec on the inductor backend (runs between
attention ops compiled by torch.compile; its compilation is warm-up, not timed, and reported apart),
and transformers' HrmTextForCausalLM (sdpa, given the exact packed mask). Two configs: the demo's
(d_model 128, 2 layers per module, 32 x 64 tokens) and a larger one (d_model 512, 8 heads, ffn 1536,
4 layers per module, 8 x 512 tokens). The implementations alternate step by step; the ratio is the
median over rounds of transformers' step time / ours in the same round. MFU: model FLOPs of the step
(`hrmspec.graph.analyse`) per second / the fp32 matmul peak measured in this run (best 2048^3 matmul).

Decoding: greedy, 64 new tokens, batch 1 (a 24-token prompt) and batch 8 (prompts of 8 to 24 tokens,
left-padded), on weights trained briefly so that argmax choices are not near ties: hrmspec's
`generate` (static cache; eager and `compile=True`) against transformers' `generate` (its
DynamicCache, attention_mask for the padding, token_type_ids for the prompts). Tokens/s counts
batch x 64; "same tokens" compares every row.

Writes benchmarks/results/speed.md and speed.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "unset")  # as the OpenMP runtime read it (throughput.py sets one)

import torch  # noqa: E402
import transformers  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import throughput as tp  # noqa: E402

import hrmspec  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "demo": ({}, 32, 64),
    "d512": ({"model.d_model": 512, "model.heads": 8, "model.ffn": 1536,
              "model.modules": {"L": {"layers": 4}, "H": {"layers": 4}}}, 8, 512),
}
IMPLS = ("hrmspec reference", "hrmspec inductor", "transformers")


def build(overrides: dict, seq_len: int, seed: int = 0) -> dict:
    """The three implementations on one set of weights, at full credit depth."""
    over = {**overrides, "model.max_seq_len": max(256, seq_len)}
    ref = hrmspec.compile("hrm-text-tiny", overrides=over)
    ref.reset_parameters(seed)
    fast = hrmspec.compile("hrm-text-tiny", backend="inductor", overrides=over)
    fast.load_state_dict(ref.state_dict())
    for m in (ref, fast):
        m.set_progress(1.0)
        m.train()
    bp, exact = tp.hf_credit(ref)
    assert exact, "full depth is transformers' L_bp_cycles exactly"
    return {"hrmspec reference": ref, "hrmspec inductor": fast, "transformers": tp.hf_model_for(ref, bp)}


def step(name: str, model, batch: dict) -> tuple[float, float]:
    """(seconds, loss) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = tp.forward_hf(model, batch) if name == "transformers" else tp.forward_hrmspec(model, batch)
    out.loss.backward()
    return time.perf_counter() - t0, float(out.loss.detach())


def time_training(config: str, reps: int) -> dict:
    overrides, B, S = CONFIGS[config]
    models = build(overrides, S)
    batches, fill = tp.packed_batches(models["hrmspec reference"].spec.model.vocab, B, S, n_batches=2)
    t0 = time.perf_counter()
    step("hrmspec inductor", models["hrmspec inductor"], batches[0])
    compile_s = time.perf_counter() - t0
    losses = {}
    for name, m in models.items():  # warm-up, and the losses on one batch
        losses[name] = step(name, m, batches[0])[1]
    times = {name: [] for name in models}
    for r in range(reps):
        for name, m in models.items():
            times[name].append(step(name, m, batches[r % 2])[0])
    flops = tp.train_flops_per_token(models["hrmspec reference"], S) * B * S
    return {"config": config, "B": B, "S": S, "times": times, "losses": losses, "compile_s": compile_s,
            "flops": flops, "params": models["hrmspec reference"].num_parameters(), "fill": fill}


@torch.enable_grad()
def trained_weights(model, steps: int = 60) -> None:
    """A few optimizer steps on a copy task, so that greedy choices are decided, not near ties."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, model.spec.model.vocab, (16, 48), generator=gen)
        ids[:, 24:] = ids[:, :24]
        prefix = torch.zeros_like(ids, dtype=torch.bool)
        prefix[:, :24] = True
        labels = torch.full_like(ids, -100)
        labels[:, 23:-1] = ids[:, 24:]
        out = model(ids, prefix_mask=prefix, labels=labels, return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def prompts_for(B: int, gen: torch.Generator, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [24] if B == 1 else torch.randint(8, 25, (B,), generator=gen).tolist()
    width = max(lengths)
    ids = torch.zeros(B, width, dtype=torch.long)
    real = torch.zeros(B, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=gen)
        real[row, width - n:] = 1
    return ids, real


@torch.no_grad()
def time_decoding(reps: int, new: int = 64) -> list[dict]:
    ours = hrmspec.compile("hrm-text-tiny")
    ours.reset_parameters(0)
    trained_weights(ours)
    bp, _ = tp.hf_credit(ours)
    hf = tp.hf_model_for(ours, bp).eval()
    hf.generation_config.pad_token_id = 0
    gen = torch.Generator().manual_seed(2)
    rows = []
    for B in (1, 8):
        ids, real = prompts_for(B, gen, ours.spec.model.vocab)
        runs = {
            "hrmspec eager": lambda ids=ids, real=real: ours.generate(ids, new, attention_mask=real),
            "hrmspec compiled": lambda ids=ids, real=real: ours.generate(ids, new, attention_mask=real, compile=True),
            "transformers": lambda ids=ids, real=real: hf.generate(
                ids, attention_mask=real, token_type_ids=real, max_new_tokens=new, min_new_tokens=new, do_sample=False),
        }
        t0 = time.perf_counter()
        out = {name: run() for name, run in runs.items()}  # warm-up (compiles the step once per batch size)
        warm = time.perf_counter() - t0
        times = {name: [] for name in runs}
        for _ in range(reps):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
        same = {name: int((out[name][:, ids.shape[1]:] == out["transformers"][:, ids.shape[1]:]).all(1).sum())
                for name in runs}
        rows.append({"B": B, "lengths": real.sum(1).tolist(), "times": times, "same": same, "warm_s": warm,
                     "new": new})
    return rows


def ratio(times: dict, ours: str, peer: str = "transformers") -> float:
    return statistics.median(p / o for p, o in zip(times[peer], times[ours]))


def report(train: list[dict], decode: list[dict], peak: float, env: str, command: str) -> str:
    lines = ["# Speed against transformers' HRM-Text: the training step per backend, and greedy decoding", "",
             "Forward + backward of hrm-text-tiny's recipe at full credit depth on packed PrefixLM rows, the same "
             "weights and batch in each implementation (see benchmarks/speed.py for the method). Ratio > 1: "
             "hrmspec is faster (median over rounds of transformers' step / ours, paired).", "",
             "| config | tokens | implementation | ms/step (median, min) | ratio HF/ours | model GFLOP/s | MFU "
             "| loss |",
             "|---|---|---|---|---|---|---|---|"]
    for t in train:
        for name in IMPLS:
            ts = t["times"][name]
            med = statistics.median(ts)
            r = "" if name == "transformers" else f"**{ratio(t['times'], name):.2f}**"
            lines.append(f"| {t['config']} ({t['params'] / 1e6:.1f}M params) | {t['B']} x {t['S']} | {name} | "
                         f"{1e3 * med:,.0f}, {1e3 * min(ts):,.0f} | {r} | {t['flops'] / med / 1e9:.1f} | "
                         f"{t['flops'] / med / peak:.0%} | {t['losses'][name]:.5f} |")
    lines += ["", "Inductor's compilation (the first step, not timed above): "
              + ", ".join(f"{t['config']} {t['compile_s']:.0f} s" for t in train)
              + ". It is cached on disk (TorchInductor's FX graph cache): later runs of the same shapes load it.", "",
              "## Greedy decoding, 64 new tokens", "",
              "| batch | prompt lengths | implementation | s (median, min) | tokens/s | ratio HF/ours | rows with "
              "transformers' tokens |", "|---|---|---|---|---|---|---|"]
    for d in decode:
        for name, ts in d["times"].items():
            med = statistics.median(ts)
            r = "" if name == "transformers" else f"**{ratio(d['times'], name):.2f}**"
            lens = "24" if d["B"] == 1 else f"{min(d['lengths'])}-{max(d['lengths'])}, left-padded"
            lines.append(f"| {d['B']} | {lens} | {name} | {med:.3f}, {min(ts):.3f} | "
                         f"{d['B'] * d['new'] / med:,.0f} | {r} | {d['same'][name]} / {d['B']} |")
    lines += ["", "The compiled decode step is built once per batch size and cache length (first call "
              + ", ".join(f"batch {d['B']}: {d['warm_s']:.0f} s for all three warm-ups" for d in decode) + ").",
              "", f"fp32 matmul peak measured in this run: {peak / 1e9:.0f} GFLOP/s.", "", env, "",
              f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def plot(train: list[dict], decode: list[dict], path: Path) -> None:
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for i, t in enumerate(train):
        for j, name in enumerate(IMPLS):
            ax1.bar(i + 0.27 * (j - 1), 1e3 * statistics.median(t["times"][name]), 0.25,
                    label=name if i == 0 else None, color=f"C{j}")
    ax1.set_xticks(range(len(train)), [f"{t['config']}\n{t['B']} x {t['S']}" for t in train])
    ax1.set_yscale("log")
    ax1.set_ylabel("ms per training step (forward + backward)")
    ax1.legend(fontsize=8)
    names = list(decode[0]["times"])
    for i, d in enumerate(decode):
        for j, name in enumerate(names):
            ax2.bar(i + 0.27 * (j - 1), d["B"] * d["new"] / statistics.median(d["times"][name]), 0.25,
                    label=name if i == 0 else None, color=f"C{j + 3}")
    ax2.set_xticks(range(len(decode)), [f"batch {d['B']}" for d in decode])
    ax2.set_ylabel("greedy tokens/s (64 new tokens)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--max-wait", type=float, default=600.0)
    args = ap.parse_args(argv)
    load, waited = tp.wait_for_quiet(1.5, args.max_wait)
    peak = tp.matmul_peak(torch.float32)
    train = [time_training("demo", args.reps)]
    if not args.skip_large:
        train.append(time_training("d512", max(3, args.reps // 2)))
    decode = time_decoding(args.reps)
    peak = max(peak, tp.matmul_peak(torch.float32))
    env = (f"Environment: {tp.cpu_name()}, {os.cpu_count()} cores, CPU capability "
           f"{torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}, transformers "
           f"{transformers.__version__}; threads {torch.get_num_threads()}; OMP_WAIT_POLICY="
           f"{WAIT_POLICY}; 1-min load average {load:.2f} at the start (waited "
           f"{waited:.0f} s), {tp.load1():.2f} at the end; {time.strftime('%Y-%m-%d')}.")
    command = "python benchmarks/speed.py" + (" --skip-large" if args.skip_large else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.md").write_text(report(train, decode, peak, env, command))
    plot(train, decode, RESULTS / "speed.png")
    print((RESULTS / "speed.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
