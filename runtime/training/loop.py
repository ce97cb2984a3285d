"""`hrmspec train`: train a compiled spec on instruction–response pairs.

One step: advance the credit plan to step / steps, run the packed PrefixLM batch, take the loss
on response tokens (task completion), clip, step the optimizer, update the EMA. Under torchrun
every rank takes its slice of the same global batch and the loss is averaged over all response
tokens of the global batch, so N processes follow the single-process loss curve.

The run computes where its placement says (placement.py: train.device, train.backend, train.dtype):
model, batches, EMA and optimizer state live on that device, one per local rank under torchrun.
Weights are initialised on the CPU (the same draws on every device) and checkpoints hold CPU
tensors, so a run resumes, and is evaluated, on either side.

`train()` reads as the run does: a `Trainer` is set up (data, tokenizer, model, parallel wrapper,
optimizer and EMA, each restored from the newest checkpoint with `--resume`), then `fit` runs
`step` until the last one, logging, evaluating and checkpointing on the way, and evaluates the
finished run: accuracy, held-out loss and a few sample predictions in the log and metrics.jsonl,
the last also in eval.json (`_log_eval`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import hrmspec
from hrmspec import progress
from hrmspec.errors import CheckpointError, HrmspecError, SpecError
from hrmspec.runtime.artifacts import checkpoint as ckpt
from hrmspec.runtime.artifacts.config import TrainConfig, TrainError
from hrmspec.runtime.artifacts.data import DataError
from hrmspec.runtime.artifacts.files import (
    read_tensors,
    reason,
    refuse_link,
    write_text_atomic,
    writing,
)
from hrmspec.runtime.artifacts.packing import Batches
from hrmspec.runtime.artifacts.placement import Placement, local_rank, resolve, to_device, world_size
from hrmspec.runtime.artifacts.plot import metric_records
from hrmspec.runtime.artifacts.runfolder import RunLock, StopSignals, TrainInterrupted, check_new_run, check_out_folder
from hrmspec.runtime.artifacts.sharded import is_sharded, load_sharded, save_sharded
from hrmspec.runtime.evaluate.adaptive_eval import loss_text
from hrmspec.runtime.evaluate.heldout import sample_lines, write_eval
from hrmspec.runtime.evaluate.readout import compact, probe_batch, read_out
from hrmspec.runtime.execution.supervision import Carry
from hrmspec.runtime.training.loggers import Loggers, open_loggers, run_config
from hrmspec.runtime.training.objective import objective_for
from hrmspec.runtime.training.optim import EMA, SparseSignSGD, lr_at, make_optimizer
from hrmspec.runtime.training.recurrence import draw_count, expected_count
from hrmspec.runtime.training.step import StepResult, TrainState, param_groups, train_step
from hrmspec.spec.schedule import sampled_loop
from hrmspec.spec.schema import Spec
from hrmspec.spec.source import read_yaml

# --------------------------------------------------------------------------- the loop


def train(
    spec: Spec,
    out: str | os.PathLike,
    resume: bool = False,
    fsdp: bool = False,
    progress_bar: bool = True,
    stop_after: int | None = None,
    overwrite: bool = False,
    backend: str | None = None,
    device: str | None = None,
) -> dict:
    """Train `spec`, writing checkpoints and metrics to `out`. Returns the final metrics.

    `stop_after` ends the run early at that step (after its checkpoint), as an interruption would.
    A new run into a folder holding another is refused unless `overwrite` (see runfolder.py).
    `backend` and `device` replace train.backend and train.device for this run (`--backend`, `--device`).
    """
    trainer = Trainer(spec, Path(out), resume=resume, fsdp=fsdp, overwrite=overwrite, backend=backend,
                      device=device)
    try:
        return trainer.fit(progress_bar=progress_bar, stop_after=stop_after)
    finally:
        trainer.release()


class Trainer:
    """One training run: everything `fit` needs, set up (or restored) in the order it depends on."""

    def __init__(self, spec: Spec, out: Path, resume: bool = False, fsdp: bool = False, overwrite: bool = False,
                 backend: str | None = None, device: str | None = None):
        self.spec, self.out = spec, out
        self.cfg = cfg = TrainConfig.from_dict(dict(spec.train))
        keys = ("--backend" if backend else "train.backend", "--device" if device else "train.device")
        self.placement: Placement = resolve(backend or cfg.backend, device or cfg.device, cfg.dtype, keys,
                                            rank=local_rank())
        self.device = self.placement.device
        self.lock, self.owns_group = None, not dist.is_initialized()
        self.rank, self.world = _dist(self.device)
        self.owns_group = self.owns_group and dist.is_initialized()
        try:
            self._prepare(out, resume, overwrite)
            self._setup(resume, fsdp)
        except BaseException:
            self.release()
            raise

    def _prepare(self, out: Path, resume: bool, overwrite: bool) -> None:
        """The checks that need no data or model, then the run folder, made and locked."""
        cfg, spec = self.cfg, self.spec
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.batch_size % self.world:
            raise TrainError(f"train.batch_size ({cfg.batch_size}) must be divisible by the number of processes "
                             f"({self.world})")
        if cfg.puzzle_optimizer is not None and spec.model.puzzle is None:
            raise TrainError(f"train.puzzle_optimizer: {spec.name} has no puzzle table (model.puzzle); remove it")
        ckpt.seed_rngs(cfg.seed)
        check_out_folder(out)  # not the root, the home folder, a checkpoint or a folder of other files
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainError(f"cannot create the run folder {out}: {e.strerror}") from None
        self.lock = RunLock(out) if self.rank == 0 else None
        if not resume and self.rank == 0:
            check_new_run(out, overwrite)

    def release(self) -> None:
        """Let go of the run folder (another trainer may take it) and of the process group this trainer made
        (a gloo process that exits with its group alive can abort in the group's worker threads)."""
        if self.lock is not None:
            self.lock.release()
        if self.owns_group and dist.is_initialized():
            _leave_group()
            self.owns_group = False

    def _setup(self, resume: bool, fsdp: bool) -> None:
        spec, out, cfg = self.spec, self.out, self.cfg
        start = ckpt.latest_checkpoint(out) if resume else None
        if resume and start is None:
            raise TrainError(f"--resume: no checkpoint in {out}/checkpoints")
        if start is not None:
            _check_same_model(start, spec, cfg)
        self.objective = objective_for(spec, cfg)  # what the run trains for: data, step loss, evaluation
        rows = self.objective.prepare(start)
        self.tokenizer, self.data_cfg = self.objective.tokenizer, self.objective.data_cfg
        if cfg.eval_every and self.rank == 0:  # the held-out set now: a config that cannot give one fails here
            self.objective.check_held_out()
        # weights, gradients, two optimizer moments, the EMA: refused before anything is allocated
        with progress.step(f"compiling {spec.name} for the {self.placement.backend} backend"):
            self.model = hrmspec.compile(spec, backend=self.placement.backend, copies=4 + (1 if cfg.ema else 0),
                                         copies_are="fp32 weights, gradients, optimizer moments"
                                         + (", EMA" if cfg.ema else ""))
        self.model.reset_parameters(seed=cfg.seed)  # on the CPU: the same weights whatever the device
        self.batches = Batches(rows, cfg.batch_size, seed=cfg.seed)
        # the per-cycle readout's fixed rows (rank 0; not under FSDP, whose forward needs every rank)
        self.probe = (probe_batch(rows, cfg.readout_rows, self.device)
                      if self.rank == 0 and not (self.world > 1 and fsdp) else None)
        self.step, self.skipped, self.nan_run = 0, 0, 0
        state = self._restore_model(start) if start is not None else None
        if start is not None and self.step > cfg.steps:
            raise TrainError(f"--resume: {start.name} is at step {self.step}, past train.steps {cfg.steps}: nothing "
                             f"to train; continue with --set train.steps=N (N > {self.step})")
        self.model.to(self.device)
        if self.rank == 0:
            with writing(out):  # through a temp file renamed over each: a link there is replaced, never followed
                if self.tokenizer is not None:
                    self.tokenizer.save(out)
                write_text_atomic(out / "spec.yaml", yaml.safe_dump(spec.raw, sort_keys=False))

        self.sharded = self.world > 1 and fsdp
        self.net = self._parallel()
        self.objective.bind(self.model, self.net)
        skip = ("puzzle.weight",) if cfg.puzzle_optimizer is not None else ()  # its own optimizer
        self.optimizer = make_optimizer(cfg.optimizer, param_groups(self.model, cfg.weight_decay, skip=skip), cfg.lr,
                                        cfg.betas, cfg.weight_decay)
        self.puzzle_optimizer = None  # HRM's sparse sign-SGD on the puzzle table (stateless: not checkpointed)
        if cfg.puzzle_optimizer is not None:
            po = cfg.puzzle_optimizer
            self.puzzle_optimizer = SparseSignSGD([self.model.puzzle.weight], po["lr"], po["weight_decay"])
        self.ema = EMA(self.model, cfg.ema) if cfg.ema else None
        # clipped: what the main optimizer steps (sign-SGD takes only the gradient's sign)
        self.state = TrainState(self.model, self.objective.loss,
                                (self.optimizer, *([self.puzzle_optimizer] if self.puzzle_optimizer else [])),
                                [p for g in self.optimizer.param_groups for p in g["params"]], cfg.grad_clip,
                                self.ema, self.world, self.device, self.placement.autocast)
        if start is not None and is_sharded(start):  # any number of ranks (or one process) reads shards
            load_sharded(start, self.model, self.optimizer, self.ema)
        elif start is not None:
            _load_training_state(start, self.model, self.optimizer, self.ema, self.sharded)
        if start is not None:
            if self.ema is not None:
                self.ema.steps = state.get("ema_steps", self.step)
            try:
                ckpt.set_rng_state(state["rng"])
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                raise CheckpointError(f"{start}/trainer.pt: its RNG states cannot be restored ({type(e).__name__}); "
                                      "the checkpoint is damaged") from None

    def _carry_state(self) -> dict:
        """The supervised rows' carry, so a resumed run continues every sample where it stood. Under torchrun
        each rank holds its own rows: collective, every rank's carry stacked in rank order ("carry_ranks")."""
        c = self.objective.carry
        if c is None:
            return {}
        carry = {"states": c.states, "steps": c.steps, "halted": c.halted, "data": c.data}
        if self.world == 1:
            return {"carry": to_device(carry, "cpu")}
        return {"carry": to_device(_map(lambda t: _gather_ranks(t, self.world), carry), "cpu"),
                "carry_ranks": self.world}

    def _restore_model(self, start: Path) -> dict:
        """Weights, data position and counters of checkpoint `start`; metrics logged after it are dropped."""
        state = ckpt.read_trainer_state(start)
        # the carry holds each rank's rows: under another number of processes the rows start afresh
        if "carry" in state and state.get("carry_ranks", 1) == self.world:
            c = state["carry"] if self.world == 1 else _map(lambda t: t[self.rank], state["carry"])
            c = to_device(c, self.device)
            self.objective.carry = Carry(c["states"], c["steps"], c["halted"], c["data"])
        if not is_sharded(start):  # shards are read once the model is sharded (load_sharded)
            ckpt.load_model_state(self.model, read_tensors(start / "model.safetensors"), start)
        self.batches.load_state_dict(state["data"])
        self.step, self.skipped = state["step"], state.get("skipped", 0)
        if self.rank == 0:
            _truncate_metrics(self.out / "metrics.jsonl", self.step)
        return state

    def _parallel(self) -> torch.nn.Module:
        """The model as the step runs it: FSDP2-sharded (per module stack, then whole), DDP, or itself."""
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            for stack in self.model.stacks.values():
                fully_shard(stack)
            return fully_shard(self.model)
        if self.world > 1:  # which parameters get gradient changes with the credit plan
            ids = [self.device.index] if self.device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)
        return self.model

    # ------------------------------------------------------------------ running

    def fit(self, progress_bar: bool = True, stop_after: int | None = None) -> dict:
        """Steps until `train.steps` (or `stop_after`), logging, evaluating and checkpointing."""
        cfg, lead = self.cfg, self.rank == 0
        # train.log's loggers (metrics.jsonl, TensorBoard, W&B: loggers.py), written by rank 0 only
        self.loggers: Loggers | None = open_loggers(cfg.log, self.out, self.step, run_config(self.spec.raw, cfg),
                                                    cfg.wandb_project) if lead else None
        bar = _progress(progress_bar and lead, cfg.steps, self.step, cfg.log_every)
        last: dict = {}
        first = self.step  # a run resumed at its last step trains nothing and is not evaluated again
        t_log, tokens = time.perf_counter(), 0
        window: dict[str, float] = {}  # supervised segments' metrics since the last log line
        signals = StopSignals().__enter__()  # left in the finally below
        if bar is not None:
            bar.note(f"{self.spec.name} on {self.placement}")
        try:
            while self.step < cfg.steps:
                lr = self._schedule()
                done = self.train_step(next(self.batches))
                if done.loss is None:  # a non-finite loss: skipped, and counted
                    continue
                loss, grad_norm = done.loss, done.grad_norm
                tokens += done.tokens
                for k, v in done.metrics.items():
                    window[k] = window.get(k, 0.0) + v
                if lead and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    now = time.perf_counter()
                    last = {"step": self.step, "loss": round(loss, 6), "lr": lr,
                            "credit_depth": self.model.credit_depth,
                            **({"recurrence": self.model.recurrence} if self.model.recurrence else {}),
                            **self._curriculum(),
                            "tokens_per_s": round(tokens / max(now - t_log, 1e-9), 1),
                            "grad_norm": round(_scalar(grad_norm), 6), "skipped_steps": self.skipped}
                    last.update(self.objective.log_fields(window))
                    if self.probe is not None:
                        last["readout"] = self._readout()
                    t_log, tokens, window = now, 0, {}
                    self._write(last)
                if bar is not None:
                    bar.update(self.step, loss, last.get("tokens_per_s"))
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps and lead:
                    self._log_eval(bar)
                stop = self._stop_signal(signals.received)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps or self.step == stop_after or stop:
                    self.save()
                if stop:
                    name = signal.Signals(stop).name
                    raise TrainInterrupted(f"stopped by {name} after step {self.step}; its checkpoint is written: "
                                           f"continue with --resume --out {self.out}", stop)
                if stop_after is not None and self.step >= stop_after:
                    break
            if lead and self.step == cfg.steps and self.step > first:  # the end: evaluated once, checkpointed
                self._log_eval(bar, final=True)
        finally:
            signals.__exit__()
            for closing in (bar, self.loggers):
                if closing is not None:
                    closing.close()
        if self.world > 1:
            dist.barrier()
        return last

    def _stop_signal(self, received: int | None) -> int:
        """The signal that stops the run after this step (0: none), the same on every rank."""
        if self.world == 1:
            return received or 0
        flag = torch.tensor([received or 0], device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def _log_eval(self, bar=None, final: bool = False) -> dict | None:
        """Held-out accuracy and loss now (EMA weights), with a few sample predictions, into metrics.jsonl and the
        log lines; a sampled loop at its evaluation count. Its random draws (a random initial state) come from a
        fork of the RNG: evaluating never changes what training computes. The `final` one, after the last
        checkpoint, also goes to eval.json and eval-full.json, as `hrmspec eval` writes them. Not run: a
        sharded model (every rank holds a part; `hrmspec eval` reads the checkpoint), and none is logged
        when there is no held-out sample."""
        cfg = self.cfg
        if self.sharded:
            if final and bar is not None:
                bar.note(f"not evaluated: a sharded run; evaluate it with hrmspec eval {self.out}")
            return None
        self.model.recurrence = None  # the next step draws its own
        try:
            with torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else []):
                res = self.objective.evaluate(cfg.eval_n, self.ema)
        except DataError as e:  # periodic evaluations checked the held-out set before the first step
            if bar is not None:
                bar.note(f"not evaluated: the held-out set: {e}")
            return None
        if not res["n"]:
            if bar is not None and final:
                bar.note(f"not evaluated: no held-out sample ({res.get('limited_by') or 'the held-out set is empty'})")
            return None
        self.loggers.log(res, self.step, "eval")  # metrics.jsonl: {"step": N, "eval": {...}}
        if final:  # naming the checkpoint it evaluated, as `hrmspec eval` does
            write_eval(self.out, {**res, "checkpoint": str(ckpt.latest_checkpoint(self.out))})
        if bar is not None:
            for line in eval_lines(self.step, res):
                bar.note(line)
        return res

    def _schedule(self) -> float:
        """Move the credit plan and the learning rate to this step; the learning rate."""
        cfg = self.cfg
        self.model.set_progress(self.step / cfg.steps)
        loop = sampled_loop(self.spec.model.schedule)
        if loop is not None:  # the same draw on every rank, and after a resume (recurrence.py)
            self.model.set_recurrence(draw_count(loop.sample, cfg.seed, self.step, self.step / cfg.steps))
        warmup = int(cfg.warmup * cfg.steps)
        lr = lr_at(self.step, cfg.steps, cfg.lr, warmup, cfg.schedule, cfg.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if self.puzzle_optimizer is not None:  # its own base rate on the same schedule, as HRM's
            base = cfg.puzzle_optimizer["lr"]
            for g in self.puzzle_optimizer.param_groups:
                g["lr"] = lr_at(self.step, cfg.steps, base, warmup, cfg.schedule, cfg.min_lr_ratio)
        return lr

    def train_step(self, batch: dict[str, torch.Tensor]) -> StepResult:
        """One global batch through `train_step` (runtime/training/step.py), this rank's slice of it; a loss that
        is not finite is skipped and counted (too many in a row end the run)."""
        if self.world > 1:
            batch = {k: v[self.rank::self.world] for k, v in batch.items()}
        done = train_step(self.state, to_device(batch, self.device))
        self.step += 1
        if done.loss is None:
            self.nan_run, self.skipped = self.nan_run + 1, self.skipped + 1
            if self.nan_run >= self.cfg.max_nan_steps:
                good = ckpt.latest_checkpoint(self.out)
                where = f"the last good checkpoint is {good}" if good else "no checkpoint was saved before it"
                raise TrainError(f"loss was not finite for {self.nan_run} steps in a row (at step {self.step - 1}); "
                                 f"{where}. Lower train.lr or use fp32.")
        else:
            self.nan_run = 0
        return done

    def _curriculum(self) -> dict:
        """The expected loop count a recurrence curriculum has reached at this step, for the log."""
        loop = sampled_loop(self.spec.model.schedule)
        if loop is None or loop.sample.curriculum is None:
            return {}
        return {"recurrence_mean": round(expected_count(loop.sample, (self.step - 1) / self.cfg.steps), 3)}

    def _readout(self) -> dict:
        """The per-cycle readout of the probe rows (runtime/evaluate/readout.py), no-grad, the training RNG
        untouched (a random initial state draws from a fork of it)."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return compact(read_out(self.model, self.probe))

    def _write(self, record: dict) -> None:
        """A logged step's record to every logger (metrics.jsonl: the record as it is, one line)."""
        self.loggers.log(record, record["step"], "train")

    def save(self) -> None:
        """A checkpoint of this step. Under FSDP every rank writes its own shards (sharded.py) into a
        staging folder that rank 0 completes and renames into place; otherwise rank 0 writes it all."""
        staged, model_state, optim_state, ema_state = None, None, None, None
        if self.sharded:
            if self.rank == 0:
                ckpt.staging_folder(self.out, self.step)
            dist.barrier()  # made (and emptied) before any rank writes into it
            staged = ckpt.staging_folder_name(self.out, self.step)
            try:
                save_sharded(staged, self.model, self.optimizer, self.ema)
            except Exception as e:  # DCP raises on every rank when any rank's write failed
                if self.rank == 0:  # no temp folder left to fill the disk; the previous checkpoint stays
                    shutil.rmtree(staged, ignore_errors=True)
                prev = ckpt.latest_checkpoint(self.out)
                kept = f"; the previous checkpoint {prev} is intact" if prev else ""
                raise CheckpointError(f"could not write the shards of checkpoint step {self.step}: {reason(e)}; "
                                      f"the disk may be full{kept}") from None
            dist.barrier()
        elif self.rank == 0:
            model_state, ema_state = self.model.state_dict(), self.ema.state_dict() if self.ema is not None else None
            optim_state = to_device(self.optimizer.state_dict(), "cpu")  # device-independent, as the weights
        carry = self._carry_state()  # every rank: a collective under torchrun
        if self.rank == 0:
            ckpt.save_checkpoint(
                self.out, self.step, model_state, self.spec.raw, self.tokenizer, optim_state, ema_state,
                {"data": self.batches.state_dict(), "skipped": self.skipped,
                 "ema_steps": self.ema.steps if self.ema else 0, **carry},
                keep=self.cfg.keep, staged=staged,
            )
        if self.sharded:
            dist.barrier()  # the checkpoint is in place before any rank goes on (or exits)


def eval_lines(step: int, res: dict) -> list[str]:
    """What the log shows of an evaluation: accuracy, held-out loss, the sample predictions."""
    return [f"held-out at step {step}: {100 * res['accuracy']:.1f}% of {res['n']}; {loss_text(res)}",
            *sample_lines(res)]


def _dist(device: torch.device) -> tuple[int, int]:
    """(rank, world size); under torchrun the process group is made: NCCL between CUDA devices, gloo on CPUs."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's communicator and every default allocation on this rank's device
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


SETTLE_S = 0.5  # how long gloo's worker threads get to drop the last collectives they ran


def _leave_group() -> None:
    """Destroy the process group, once gloo's worker threads have let go of their work. A thread drops a
    collective it ran after the caller has its result, and freeing the collective's tensors takes the
    interpreter lock. The group's destructor waits for those threads while it holds that lock (when the
    last reference goes, in DDP's reducer or at exit), so a thread still holding work then never returns:
    the process hangs, or aborts at interpreter exit. Sleeping releases the lock for the threads to finish."""
    time.sleep(SETTLE_S)
    dist.destroy_process_group()


RESUME_FIXED = ("model", "objective", "supervision")  # what a resumed run may not change (train: and data: may)


def _check_same_model(start: Path, spec: Spec, cfg: TrainConfig) -> None:
    """Refuse to resume checkpoint `start` under a spec whose model, objective or supervision differ from
    the one it was trained with (the weights would not fit, or would silently mean something else), or
    under another optimizer (its saved moments would not fit the new one)."""
    try:
        old = read_yaml(start / "spec.yaml") or {}
        if not isinstance(old, dict):
            raise SpecError(f"expected a mapping, found {type(old).__name__}")
        old_cfg = TrainConfig.from_dict(dict(old.get("train") or {}))
    except HrmspecError as e:
        raise TrainError(f"{start}/spec.yaml cannot be read ({str(e).splitlines()[0][:200]}); the checkpoint is "
                         "damaged") from None
    for key in ("optimizer", "puzzle_optimizer"):
        was, now = getattr(old_cfg, key), getattr(cfg, key)
        if (was if key == "optimizer" else was is None) != (now if key == "optimizer" else now is None):
            raise TrainError(f"--resume: {start.name} was trained with train.{key} {was}, this run asks for {now}: "
                             "its optimizer state does not fit another optimizer; resume with the one it was "
                             "trained with, or start a new run (another --out, or --overwrite)")
    changes = [line for key in RESUME_FIXED for line in _diff(old.get(key), spec.raw.get(key), key)]
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise TrainError(f"--resume: the spec changes what {start.name} was trained as ({shown}); resume with the "
                         "spec it was trained with, or start a new run (another --out, or --overwrite)")


def _diff(old, new, path: str) -> list[str]:
    """'path: old -> new' for every value that differs between two YAML trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in dict.fromkeys([*old, *new]) for line in _diff(old.get(k), new.get(k), f"{path}.{k}")]
    if old == new:
        return []

    def short(v) -> str:
        text = json.dumps(v) if v is not None else "(absent)"
        return text if len(text) <= 40 else text[:37] + "..."

    return [f"{path}: {short(old)} -> {short(new)}"]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after `step` (a run that died past its last checkpoint)."""
    refuse_link(path)  # neither read nor written through a link
    if not path.exists():
        return
    keep = [rec for rec in metric_records(path) if rec.get("step", 0) <= step]
    with writing(path):
        write_text_atomic(path, "".join(json.dumps(rec) + "\n" for rec in keep))


def _map(fn, tree: dict) -> dict:
    """`tree` (tensors in nested dicts) with `fn` applied to every tensor."""
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _gather_ranks(t: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's `t` (the same shape on each), stacked in rank order: (world, *t.shape)."""
    sent = t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()  # collectives take no bool everywhere
    parts = [torch.empty_like(sent) for _ in range(world)]
    dist.all_gather(parts, sent)
    return torch.stack(parts).to(t.dtype)


def _scalar(t: torch.Tensor) -> float:
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def _load_training_state(ckpt_dir: Path, model, optimizer, ema, sharded: bool) -> None:
    optim_state = ckpt.read_pt(ckpt_dir / "optimizer.pt")
    ema_state = read_tensors(ckpt_dir / "ema.safetensors") if ema is not None else None
    if not sharded:
        try:
            optimizer.load_state_dict(optim_state)
            if ema is not None:
                ema.load_state_dict(ema_state)
        except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
            what = "optimizer.pt" if not isinstance(e, RuntimeError) or ema is None else "optimizer.pt or the EMA"
            raise CheckpointError(f"{ckpt_dir}: {what} does not fit this run's optimizer and model ({type(e).__name__}:"
                                  f" {str(e).splitlines()[0][:160] if str(e) else 'no detail'}); the checkpoint is "
                                  "damaged, or was written for another spec") from None
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import distribute_tensor

    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    if ema is not None:
        for name, shadow in ema.shadow.items():
            shadow.copy_(distribute_tensor(ema_state[name], shadow.device_mesh, shadow.placements))


class _Bar:
    def __init__(self, total: int, start: int):
        self.p = Progress(
            TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(),
        )
        self.p.start()
        self.task = self.p.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, loss: float, tps) -> None:
        info = f"loss {loss:.4f}" + (f"  {tps:,.0f} tok/s" if tps else "")
        self.p.update(self.task, completed=step, info=info)

    def note(self, text: str) -> None:
        self.p.console.print(text)

    def close(self) -> None:
        self.p.stop()


class _Lines:
    """Progress off a terminal (a log file, a scheduler): one plain line per logged step."""

    def __init__(self, total: int, start: int, every: int):
        self.total, self.start, self.every = total, start, every
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, tps) -> None:
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(step - self.start, 1) * (self.total - step)
        speed = f"  {tps:,.0f} tok/s" if tps else ""
        print(f"step {step}/{self.total}  loss {loss:.4f}{speed}  elapsed {_clock(elapsed)}  eta {_clock(eta)}",
              flush=True)

    def note(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _progress(enabled: bool, total: int, start: int, every: int):
    """A rich progress bar on a terminal, plain lines otherwise; None when disabled."""
    if not enabled:
        return None
    return _Bar(total, start) if sys.stdout.isatty() else _Lines(total, start, every)


