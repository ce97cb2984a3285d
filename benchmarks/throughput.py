"""Training throughput and model FLOPs utilisation of the tiny spec's real training step.

    python benchmarks/throughput.py                       # waits up to 10 min for a quiet machine; ~3 min
    python benchmarks/throughput.py --reps 20 --max-wait 0

The workload is `specs/hrm-text-tiny.yaml`'s own `train:` configuration: batch_size packed rows
of seq_len tokens (PrefixLM samples, about a third of each sample the instruction, packed
best-fit as `hrmspec train` packs them), and a FULL training step as `runtime/training/loop.py` takes it:
forward (under bf16 autocast or not), backward, gradient clipping, the optimizer step, the EMA
update. hrmspec uses the trainer's AdamATan2 (runtime/training/optim.py) and parameter groups;
transformers' HrmTextForCausalLM, built from the same spec and weights, uses torch's AdamW with
the same groups and hyper-parameters (the table times the update phase, clip + optimizer + EMA,
separately from forward and backward).

transformers is given the exact packed-PrefixLM attention mask as a prepared 4-D boolean mask
(built inside its step, as hrmspec builds its own) and the per-sample position ids: its
token_type_ids route puts the instructions of all samples of a row in one bidirectional block,
which would let them see each other. Its labels are ours shifted by one (it shifts them back).

Credit is measured at two points of the warmup-deep-credit ramp (`depth: {from: 2, to: 5}`):
at full depth (progress >= warmup: H#0, L#3-5, H#1 carry gradient), which is transformers'
L_bp_cycles [0, 3] exactly, and at progress 0 (depth 2: L#5, H#1). transformers has no plan
that stops gradient at an H call, so at progress 0 it runs its nearest plan, L_bp_cycles [0, 1]
(depth 3), and hrmspec is timed at that plan too for a like-for-like ratio.

Model FLOPs per token come from `hrmspec.graph.analyse` at the run's seq_len and progress
(grad-carrying calls 3x forward, no-grad calls 1x). MFU = achieved model FLOP/s / the machine's
matmul peak, measured here with the same thread count: the best of several 2048^3 matmuls in
fp32 (for fp32 steps) and in bf16 (for bf16-autocast steps).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see conftest.py: spinning threads measure contention

import argparse  # noqa: E402
import contextlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from transformers import HrmTextConfig, HrmTextForCausalLM  # noqa: E402

import hrmspec  # noqa: E402
from hrmspec.graph import analyse, build_graph  # noqa: E402
from hrmspec.mask import Mask  # noqa: E402
from hrmspec.runtime.artifacts.packing import IGNORE, pack  # noqa: E402
from hrmspec.runtime.execution import CompiledModel  # noqa: E402
from hrmspec.runtime.interop.convert import hf_config_from_spec, state_dict_to_hf  # noqa: E402
from hrmspec.runtime.training.loop import TrainConfig  # noqa: E402
from hrmspec.runtime.training.objective import StepLoss  # noqa: E402
from hrmspec.runtime.training.optim import EMA, make_optimizer  # noqa: E402
from hrmspec.runtime.training.step import TrainState, param_groups, train_step  # noqa: E402

SPEC = "hrm-text-tiny"
RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEAK_N = 2048
MiB = 2**20


# --------------------------------------------------------------------------- environment


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


BF16_FLAGS = {"avx512_bf16": "AVX-512 BF16", "amx_bf16": "AMX-BF16", "amx_tile": "AMX tiles"}


def bf16_hardware(flags: set[str] | None = None) -> str:
    """Which bf16 matmul instructions the CPU advertises (/proc/cpuinfo flags)."""
    flags = cpu_flags() if flags is None else flags
    have = [name for flag, name in BF16_FLAGS.items() if flag in flags]
    missing = [name for flag, name in BF16_FLAGS.items() if flag not in flags]
    parts = ([f"has {', '.join(have)}"] if have else []) + ([f"no {', '.join(missing)}"] if missing else [])
    return "; ".join(parts)


def cpu_mhz() -> float | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def nominal_fp32_peak(threads: int) -> float | None:
    """threads x clock x FLOPs per cycle of two FMA units (AVX-512: 2 x 16 lanes x 2; AVX2: 2 x 8 x 2),
    at the clock /proc/cpuinfo reports: a reference for the measured peak, not a measurement."""
    mhz, flags = cpu_mhz(), cpu_flags()
    per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else None
    if mhz is None or per_cycle is None:
        return None
    return min(threads, os.cpu_count() or threads) * mhz * 1e6 * per_cycle


def load1() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(threshold: float, max_wait: float, poll: float = 15.0) -> tuple[float, float]:
    """Poll the 1-minute load average until it is below `threshold` or `max_wait` s have passed.
    Returns (load when measurement starts, seconds waited)."""
    start = time.perf_counter()
    while load1() >= threshold and time.perf_counter() - start + poll <= max_wait:
        print(f"load average {load1():.2f} >= {threshold}: waiting", flush=True)
        time.sleep(poll)
    return load1(), time.perf_counter() - start


# --------------------------------------------------------------------------- matmul peak


class MatmulPeak:
    """The machine's matmul peak per dtype at torch's thread count: the best n x n x n matmul
    (2 n^3 FLOPs) seen. Sampled before, between and after the training steps, so that one busy
    moment of a shared machine does not lower it."""

    def __init__(self, n: int = PEAK_N):
        gen = torch.Generator().manual_seed(0)
        self.n = n
        self.operands = {}
        for name, dt in DTYPES.items():
            a, b = (torch.randn(n, n, generator=gen).to(dt) for _ in range(2))
            self.operands[name] = (a, b, torch.empty(n, n, dtype=dt))
            torch.mm(a, b, out=self.operands[name][2])  # warm-up: kernel selection, page faults
        self.best = {name: 0.0 for name in DTYPES}
        self.samples = 0

    def sample(self, reps: int = 1) -> None:
        for _ in range(reps):
            for name, (a, b, c) in self.operands.items():
                t0 = time.perf_counter()
                torch.mm(a, b, out=c)
                self.best[name] = max(self.best[name], 2 * self.n**3 / (time.perf_counter() - t0))
            self.samples += 1


def matmul_peak(dtype: torch.dtype, n: int = PEAK_N, reps: int = 6) -> float:
    """FLOP/s of the best of `reps` n x n x n matmuls of `dtype`."""
    peak = MatmulPeak(n)
    peak.sample(reps)
    return peak.best[next(k for k, v in DTYPES.items() if v == dtype)]


# --------------------------------------------------------------------------- the workload


def train_config(model: CompiledModel) -> TrainConfig:
    return TrainConfig.from_dict(dict(model.spec.train))


def packed_batches(
    vocab: int,
    batch_size: int,
    seq_len: int,
    n_batches: int = 4,
    prefix_frac: float = 1 / 3,
    seed: int = 0,
    objective: str = "task_completion",
) -> tuple[list[dict[str, torch.Tensor]], float]:
    """`n_batches` batches of packed rows from random samples of 8 to seq_len / 2 tokens whose
    first `prefix_frac` is the instruction; packed best-fit by `hrmspec.runtime.artifacts.packing.pack`,
    as `hrmspec train` packs its data. Returns the batches and the fraction of real tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows_needed = batch_size * n_batches
    samples: list[tuple[list[int], list[int]]] = []
    while True:
        for _ in range(rows_needed):  # about two to four samples per row
            n = int(torch.randint(8, max(9, seq_len // 2 + 1), (1,), generator=gen))
            ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
            p = max(1, round(n * prefix_frac))
            samples.append((ids[:p], ids[p:]))
        rows, _ = pack(samples, seq_len, objective)
        if len(rows) > rows_needed:  # the last rows of a best-fit packing are the least full: skip them
            break
    index = torch.arange(rows_needed)
    batches = [rows.batch(index[i * batch_size : (i + 1) * batch_size]) for i in range(n_batches)]
    fill = float((rows.doc_ids[:rows_needed] >= 0).float().mean())
    return batches, fill


def hf_batch(batch: dict[str, torch.Tensor], mask_kind: str = "prefix_lm") -> dict[str, Any]:
    """transformers' inputs for a packed batch: the exact 4-D mask, per-sample positions, and
    labels shifted by one (transformers shifts them back: its logits at t predict labels[t + 1])."""
    ids = batch["input_ids"]
    B, S = ids.shape
    labels = torch.full_like(ids, IGNORE)
    labels[:, 1:] = batch["labels"][:, :-1]
    return {
        "input_ids": ids,
        "attention_mask": Mask(mask_kind, batch["prefix_mask"], batch["doc_ids"]).dense(S, batch=B),
        "position_ids": batch["position_ids"],
        "labels": labels,
        "use_cache": False,
    }


def hf_credit(model: CompiledModel) -> tuple[list[int], bool]:
    """transformers' L_bp_cycles nearest to `model`'s current credit plan, and whether it is exact.
    transformers' H calls always carry gradient, and in each H cycle its trailing L calls do."""
    exact = True
    per_cycle: dict[int, list[bool]] = {}
    for call, grad in zip(model.calls, model.grad_flags):
        cycle = call.cycle[0] if call.cycle else 0
        if call.module == "L":
            per_cycle.setdefault(cycle, []).append(grad)
        elif not grad:
            exact = False  # an H call without gradient: transformers cannot express it
    bp = []
    for cycle in sorted(per_cycle):
        flags = per_cycle[cycle]
        n = sum(flags)
        exact &= flags == [False] * (len(flags) - n) + [True] * n  # trailing calls only
        bp.append(n)
    return bp, exact


def hf_model_for(ours: CompiledModel, l_bp_cycles: list[int]) -> HrmTextForCausalLM:
    """transformers' HRM-Text with the config and weights of `ours` and the given L_bp_cycles."""
    config = HrmTextConfig.from_dict({**hf_config_from_spec(ours.spec), "use_cache": False, "L_bp_cycles": l_bp_cycles})
    config._attn_implementation = "sdpa"
    model = HrmTextForCausalLM(config)
    model.load_state_dict(state_dict_to_hf(ours, layout="module"), strict=True)
    return model.train()


def describe(model: CompiledModel) -> str:
    """hrm-text-tiny (d_model 128, 4 heads x 32, ...; 1.2M parameters; 2 H cycles x 3 L cycles)."""
    m = model.spec.model
    layers = ", ".join(f"{mod.name} {mod.layers} layers" for mod in m.modules)
    calls = ", ".join(c.module for c in model.calls)
    return (
        f"{model.spec.name} (d_model {m.d_model}, {m.heads} heads x {m.head_dim}, SwiGLU {m.modules[0].block.ffn}, "
        f"{layers}, vocab {m.vocab}; {model.num_parameters() / 1e6:.2f}M parameters; calls {calls})"
    )


def train_flops_per_token(model: CompiledModel, seq_len: int) -> float:
    return analyse(build_graph(model.spec, model.progress), seq_len=seq_len).train_flops_per_token


# --------------------------------------------------------------------------- one training step


class Trainer:
    """One implementation's full training step: runtime/training/step.py's `train_step`, as the trainer takes
    it (forward under autocast, backward, clip_grad_norm_, optimizer step, zero_grad, EMA update), with the
    trainer's parameter groups; the forward is the implementation's own (`forward(model, batch)` with a
    mean loss), so both sides compute their full logits."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        optimizer: str,
        forward: Callable,
        embed_prefix: str,
        dtype: torch.dtype = torch.float32,
    ):
        self.model, self.cfg, self.forward, self.dtype = model, cfg, forward, dtype
        groups = param_groups(model, cfg.weight_decay, embed_prefix)
        self.optimizer = make_optimizer(optimizer, groups, cfg.lr, cfg.betas, cfg.weight_decay)
        self.ema = EMA(model, cfg.ema) if cfg.ema else None
        autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
        self.state = TrainState(model, self.loss, (self.optimizer,), [p for g in groups for p in g["params"]],
                                cfg.grad_clip, self.ema, autocast=autocast)
        self.phases: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the last step's forward, backward, update (s)

    def loss(self, batch: dict[str, torch.Tensor]) -> StepLoss:
        out = self.forward(self.model, batch)
        return StepLoss(out.loss, torch.ones(()), int(batch["input_ids"].numel()))  # a mean: divided by 1

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        done = train_step(self.state, batch)
        self.phases = done.phases
        return done.loss


def forward_hrmspec(model: CompiledModel, batch: dict[str, torch.Tensor]):
    return model(**batch)


def forward_hf(model: HrmTextForCausalLM, batch: dict[str, torch.Tensor]):
    return model(**hf_batch(batch))


def hrmspec_trainer(ours: CompiledModel, cfg: TrainConfig, dtype: torch.dtype) -> Trainer:
    return Trainer(ours, cfg, cfg.optimizer, forward_hrmspec, "embed", dtype)


def hf_trainer(hf: HrmTextForCausalLM, cfg: TrainConfig, dtype: torch.dtype) -> Trainer:
    return Trainer(hf, cfg, "adamw", forward_hf, "model.embed_tokens", dtype)


# --------------------------------------------------------------------------- the measurements


@dataclass
class Cell:
    group: str  # credit point
    impl: str  # "hrmspec", "hrmspec (HF plan)", "transformers"
    dtype: str
    plan: str  # human-readable credit plan
    grad_calls: int
    flops_per_token: float  # model FLOPs of a training step per row position
    tokens_per_step: int
    optimizer: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    phases: list[tuple[float, float, float]] = field(default_factory=list)  # forward, backward, update
    loss: float = float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    def phase_median(self, i: int) -> float:
        return statistics.median(p[i] for p in self.phases)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.median

    @property
    def flops_per_s(self) -> float:
        return self.flops_per_token * self.tokens_per_s


def _plan_name(model: CompiledModel) -> str:
    return ", ".join(
        f"{c.module}#{sum(d.module == c.module for d in model.calls[: c.index])}"
        for c, g in zip(model.calls, model.grad_flags)
        if g
    )


def build_group(group: str, progress: float, dtype: str, cfg: TrainConfig, seq_len: int) -> list[tuple[Cell, Trainer]]:
    """The trainers of one credit point: hrmspec at `progress`, transformers at its nearest plan,
    and, when that plan is not exact, hrmspec at transformers' plan. Same initial weights."""
    dt = DTYPES[dtype]
    ours = hrmspec.compile(SPEC, progress=progress)
    ours.reset_parameters(cfg.seed)
    ours.train()
    tokens = cfg.batch_size * seq_len
    bp, exact = hf_credit(ours)
    out = [
        (
            Cell(
                group,
                "hrmspec",
                dtype,
                _plan_name(ours),
                sum(ours.grad_flags),
                train_flops_per_token(ours, seq_len),
                tokens,
                "AdamATan2",
            ),
            hrmspec_trainer(ours, cfg, dt),
        )
    ]
    same = ours
    if not exact:
        same = hrmspec.compile(SPEC, overrides={"model.credit": {"per_cycle": {"L": bp}}})
        same.reset_parameters(cfg.seed)
        same.train()
        out.append(
            (
                Cell(
                    group,
                    "hrmspec (HF plan)",
                    dtype,
                    _plan_name(same),
                    sum(same.grad_flags),
                    train_flops_per_token(same, seq_len),
                    tokens,
                    "AdamATan2",
                ),
                hrmspec_trainer(same, cfg, dt),
            )
        )
    hf = hf_model_for(ours, bp)
    out.append(
        (
            Cell(
                group,
                "transformers",
                dtype,
                f"L_bp_cycles {bp}: {_plan_name(same)}",
                sum(same.grad_flags),
                train_flops_per_token(same, seq_len),
                tokens,
                "AdamW",
            ),
            hf_trainer(hf, cfg, dt),
        )
    )
    return out


def time_group(
    trainers: list[tuple[Cell, Trainer]],
    batches: list[dict],
    reps: int,
    warmup: int,
    peak: MatmulPeak | None = None,
    loads: list[float] | None = None,
) -> None:
    """Alternate the trainers step by step (rotating who goes first), so drifting load hits all of
    them; each step takes the next of `batches`. Between rounds, sample the matmul peak and the
    1-minute load average."""
    k = len(trainers)
    for rep in range(warmup + reps):
        if peak is not None:
            peak.sample()
        if loads is not None:
            loads.append(load1())
        batch = batches[rep % len(batches)]
        for j in range(k):
            cell, trainer = trainers[(rep + j) % k]
            t0, c0 = time.perf_counter(), time.process_time()
            loss = trainer.step(batch)
            t1, c1 = time.perf_counter(), time.process_time()
            if rep >= warmup:
                cell.wall.append(t1 - t0)
                cell.cpu.append(c1 - c0)
                cell.phases.append(trainer.phases)
                cell.loss = loss


GROUPS = (("full depth", 1.0), ("progress 0", 0.0))


def measure(threads: int, reps: int, warmup: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    probe = hrmspec.compile(SPEC)
    cfg = train_config(probe)
    seq_len, vocab = cfg.seq_len, probe.spec.model.vocab
    batches, fill = packed_batches(vocab, cfg.batch_size, seq_len, objective=probe.spec.objective.type)
    prefix = float(torch.stack([b["prefix_mask"] for b in batches]).float().mean())
    peak, loads = MatmulPeak(), []
    peak.sample(3)
    cells: list[Cell] = []
    for group, progress in GROUPS:
        # both dtypes in one alternation: the bf16 / fp32 ratio sees the same load too
        trainers = [t for dtype in DTYPES for t in build_group(group, progress, dtype, cfg, seq_len)]
        time_group(trainers, batches, reps, warmup, peak, loads)
        cells += [c for c, _ in trainers]
        for c, _ in trainers:
            print(f"{group}, {c.dtype}, {c.impl}: {c.tokens_per_s:,.0f} tok/s", flush=True)
    peak.sample(3)
    return {
        "cells": cells,
        "peak": peak.best,
        "peak_samples": peak.samples,
        "loads": loads,
        "cfg": cfg,
        "fill": fill,
        "prefix": prefix,
        "threads": threads,
        "reps": reps,
        "credit": probe.spec.model.credit,
        "model": describe(probe),
    }


# --------------------------------------------------------------------------- table and plot


def paired_ratio(a: Cell, b: Cell) -> float:
    """Median over rounds of a's step time / b's step time in the same round (b's speed / a's).
    The trainers of a round run back to back, so a burst of load that hits one round hits both;
    the median of these ratios is steadier than the ratio of the medians."""
    return statistics.median(x / y for x, y in zip(a.wall, b.wall))


def _ratio_base(cells: list[Cell], c: Cell) -> Cell | None:
    """The hrmspec cell that ran the same plan as transformers' cell `c`."""
    same = [
        o
        for o in cells
        if o.group == c.group
        and o.dtype == c.dtype
        and o.impl != "transformers"
        and o.grad_calls == c.grad_calls
        and o.flops_per_token == c.flops_per_token
    ]
    return same[-1] if same else None


def table(res: dict[str, Any], env: str, command: str) -> str:
    cells: list[Cell] = res["cells"]
    cfg: TrainConfig = res["cfg"]
    peak = res["peak"]
    rows = [
        "| credit point | plan (grad-carrying calls) | dtype | implementation, optimizer | ms/step (median, min) "
        "| forward / backward / update ms | tokens/s (median, best step) | train MFLOP/token "
        "| model GFLOP/s | MFU (median, best step) | HF/ours tokens/s (paired) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        base = _ratio_base(cells, c) if c.impl == "transformers" else None
        ratio = f"**{paired_ratio(base, c):.2f}**" if base is not None else ""
        rows.append(
            f"| {c.group} | {c.plan} | {c.dtype} | {c.impl}, {c.optimizer} "
            f"| {c.median * 1e3:.0f}, {min(c.wall) * 1e3:.0f} "
            f"| {' / '.join(f'{c.phase_median(i) * 1e3:.0f}' for i in range(3))} "
            f"| {c.tokens_per_s:,.0f}, {c.tokens_per_step / min(c.wall):,.0f} | {c.flops_per_token / 1e6:.1f} "
            f"| {c.flops_per_s / 1e9:.1f} | {c.flops_per_s / peak[c.dtype]:.1%}, "
            f"{c.flops_per_token * c.tokens_per_step / min(c.wall) / peak[c.dtype]:.1%} | {ratio} |"
        )
    speed = []
    for impl in dict.fromkeys(c.impl for c in cells):
        for group, _ in GROUPS:
            by = {c.dtype: c for c in cells if c.impl == impl and c.group == group}
            if len(by) == 2:
                speed.append(f"{impl} at {group} {paired_ratio(by['bf16'], by['fp32']):.2f}")
    credit = res["credit"]
    return "\n".join(
        [
            "# Training throughput and MFU: hrm-text-tiny's real training step",
            "",
            f"{res['model']} with its `train:` configuration: **{cfg.batch_size} packed rows x {cfg.seq_len} tokens** "
            f"per step ({res['fill']:.0%} real tokens, {res['prefix']:.0%} of positions instruction prefix; random "
            "samples of 8-32 tokens, the first third the instruction, packed best-fit by "
            "`runtime/artifacts/packing.py`). "
            "A **full training step**: forward, backward, grad clip "
            f"({cfg.grad_clip}), optimizer step, EMA update ({cfg.ema}). hrmspec runs the trainer's AdamATan2 "
            "(`runtime/training/optim.py`); transformers' `HrmTextForCausalLM` (same config and initial weights, "
            'attn_implementation="sdpa") runs torch\'s **AdamW** with the same parameter groups and '
            "hyper-parameters, and is given the exact packed-PrefixLM mask as a 4-D mask built in its step, "
            "and the per-sample position ids.",
            "",
            credit_text(cells, credit),
            "",
            "tokens/s: row positions (batch x seq_len) per second of the median step; the trainer's own "
            f"count (real tokens only) is {res['fill']:.0%} of it. train MFLOP/token: "
            "`analyse(build_graph(spec, progress), seq_len).train_flops_per_token` (grad-carrying calls 3x "
            "forward, no-grad calls 1x; elementwise ops not counted). model GFLOP/s = that x tokens/s. "
            f"MFU = model FLOP/s / the matmul peak of the step's dtype, measured in this run at {res['threads']} "
            f"threads (the best of {res['peak_samples']} {PEAK_N}^3 matmuls per dtype, sampled before, between and "
            f"after the training steps): **fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} "
            f"GFLOP/s**{nominal_note(peak['fp32'], res['threads'])}. "
            "On a shared machine the median measures the load as well; the best step is closer to "
            "what the code does on two free cores. "
            f"{res['reps']} timed steps per cell after warm-up; the trainers of a credit point (both dtypes) "
            "alternate step by step.",
            "",
            *rows,
            "",
            "HF/ours tokens/s (paired): the median over rounds of hrmspec's step time / transformers' step time "
            "in the same round, at the same plan (> 1: transformers is faster).",
            "",
            f"bf16 autocast step time / fp32 step time (paired, as above; < 1: bf16 is faster): {'; '.join(speed)}. "
            f"Matmul peak bf16 / fp32: {peak['bf16'] / peak['fp32']:.2f}.",
            "",
            f"Environment: {env}.",
            "",
            f"Command: `{command}`",
            "",
        ]
    )


def nominal_note(fp32_peak: float, threads: int) -> str:
    nominal = nominal_fp32_peak(threads)
    if nominal is None:
        return ""
    note = (
        f" (the fp32 figure is {fp32_peak / nominal:.0%} of {nominal / 1e9:.0f} GFLOP/s, {threads} cores x "
        f"{cpu_mhz():.0f} MHz, the clock /proc/cpuinfo reports, which turbo can exceed, x two FMA units' "
        "FLOPs per cycle"
    )
    if fp32_peak < 0.75 * nominal:
        note += ": other jobs held the cores whenever it was sampled, so it is low and the MFU high"
    return note + ")"


def credit_text(cells: list[Cell], credit) -> str:
    """What the credit points are, from the plans the cells ran."""
    if credit.mode == "depth":
        ramp = f"from: {credit.depth_from}, to: {credit.depth_to}, warmup: {credit.warmup}"
        text = [f"Credit: the spec's `depth: {{{ramp}}}`."]
    else:
        text = [f"Credit: the spec's `{credit.mode}` plan."]
    for group, progress in GROUPS:
        mine = {c.impl: c for c in cells if c.group == group}
        ours, hf, same = mine.get("hrmspec"), mine.get("transformers"), mine.get("hrmspec (HF plan)")
        if ours is None or hf is None:
            continue
        at = "" if group.startswith("progress") else f" (progress {progress:g})"
        head = f"**{group}**{at}: {ours.plan} carry gradient"
        if same is None:
            text.append(f"{head}; transformers' {hf.plan.split(':')[0]} is the same plan.")
        else:
            text.append(
                f"{head}; transformers' H calls always carry gradient, so it runs its nearest plan, "
                f"{hf.plan.split(':')[0]} ({same.plan}), and hrmspec is timed at that plan too "
                "(*hrmspec (HF plan)*): the HF/ours ratio compares equal plans."
            )
    return " ".join(text)


IMPL_COLORS = {"hrmspec": "#e6550d", "hrmspec (HF plan)": "#fdae6b", "transformers": "#3182bd"}


def plot(res: dict[str, Any], path: Path) -> None:
    """Tokens/s per credit point and dtype, one bar per implementation, MFU on top."""
    cells: list[Cell] = res["cells"]
    fig = Figure(figsize=(6.4, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    keys = list(dict.fromkeys((c.group, c.dtype) for c in cells))
    width = 0.27
    labelled = set()
    for j, key in enumerate(keys):
        here = sorted((c for c in cells if (c.group, c.dtype) == key), key=lambda c: list(IMPL_COLORS).index(c.impl))
        for i, c in enumerate(here):
            x = j + (i - (len(here) - 1) / 2) * width
            label = None if c.impl in labelled else c.impl
            labelled.add(c.impl)
            best = c.tokens_per_step / min(c.wall) / 1e3
            ax.bar(x, c.tokens_per_s / 1e3, width=width * 0.95, color=IMPL_COLORS[c.impl], label=label)
            ax.errorbar(
                x,
                c.tokens_per_s / 1e3,
                yerr=[[0], [best - c.tokens_per_s / 1e3]],
                color="#444444",
                capsize=2,
                linewidth=0.8,
            )
            mfu = c.flops_per_s / res["peak"][c.dtype]
            ax.annotate(
                f"{mfu:.0%}",
                (x, best),
                textcoords="offset points",
                xytext=(0, 2),
                ha="center",
                fontsize=7,
            )
    ax.set_xticks(range(len(keys)), [f"{g}\n{d}" for g, d in keys], fontsize=8)
    ax.set_ylabel("k tokens/s (training)")
    cfg = res["cfg"]
    ax.set_title(
        f"{SPEC}: full training step, {cfg.batch_size} x {cfg.seq_len} tokens, {res['threads']} threads "
        "\nmedian step, whisker: best step; labels: MFU of the median step",
        fontsize=9,
    )
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda k: list(IMPL_COLORS).index(labels[k]))
    ax.legend([handles[k] for k in order], [labels[k] for k in order], fontsize=7, ncol=3, loc="upper right")
    ax.set_ylim(0, max(c.tokens_per_step / min(c.wall) for c in cells) / 1e3 * 1.3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def wait_note(load: float, waited: float, threshold: float) -> str:
    if load < threshold:
        return f"below {threshold:g} after waiting {waited:.0f} s"
    return f"other jobs running: it stayed at or above {threshold:g} for the {waited:.0f} s waited"


def environment(threads: int, load_start: float, waited: float, threshold: float, loads: list[float]) -> str:
    return (
        f"{cpu_name()}, {os.cpu_count()} cores (bf16 matmul instructions: {bf16_hardware()}); "
        f"torch {torch.__version__} "
        f"(CPU capability {torch.backends.cpu.get_cpu_capability()}), transformers {transformers.__version__}; "
        f"threads {threads}; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; 1-min load average "
        f"{load_start:.2f} when the timings started ({wait_note(load_start, waited, threshold)}), "
        f"{min(loads):.2f}-{max(loads):.2f} during them (this run's own {threads} threads included); "
        f"{time.strftime('%Y-%m-%d')}"
    )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (and for the matmul peak)")
    p.add_argument("--reps", type=int, default=16, help="timed steps per implementation and cell")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--wait-load", type=float, default=1.5, help="wait for a 1-min load average below this")
    p.add_argument("--max-wait", type=float, default=600, help="seconds to wait for it at most (0: do not wait)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    command = "python benchmarks/throughput.py" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    load_start, waited = wait_for_quiet(args.wait_load, args.max_wait)
    start = time.perf_counter()
    res = measure(args.threads, args.reps, args.warmup)
    env = environment(args.threads, load_start, waited, args.wait_load, res["loads"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.md").write_text(table(res, env, command))
    plot(res, args.out / "throughput.png")
    print(f"peak fp32 {res['peak']['fp32'] / 1e9:.0f} GFLOP/s, bf16 {res['peak']['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"wrote {args.out / 'throughput.md'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
