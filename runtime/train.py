"""`hrmspec train`: train a compiled spec on instruction–response pairs.

One step: advance the credit plan to step / steps, run the packed PrefixLM batch, take the loss
on response tokens (task completion), clip, step the optimizer, update the EMA. Under torchrun
every rank takes its slice of the same global batch and the loss is averaged over all response
tokens of the global batch, so N processes follow the single-process loss curve.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from hrmspec.errors import HrmspecError, close_match
from hrmspec.runtime import checkpoint as ckpt
from hrmspec.runtime.files import read_tensors
from hrmspec.runtime.optim import EMA, lr_at, make_optimizer
from hrmspec.spec.schema import Spec


class TrainError(HrmspecError):
    """A training configuration or run that cannot go on; the message says why and what to do."""


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # packed rows per step (global, over all processes)
    seq_len: int = 256
    optimizer: str = "adam_atan2"  # adam_atan2 | adamw
    lr: float = 1e-3
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup: float = 0.05  # fraction of steps with linear lr warmup
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0: off
    ema: float | None = 0.999  # decay of the parameter EMA; null: off
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_n: int = 64  # held-out samples per periodic evaluation
    save_every: int = 250
    keep: int = 2  # checkpoints kept
    max_nan_steps: int = 5  # non-finite losses in a row before giving up
    tokenizer: str | None = None  # an existing tokenizer.json (else one is trained on the data)
    threads: int = 0  # torch threads; 0: leave torch's default
    max_new_tokens: int = 32  # evaluation decoding budget

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = [f.name for f in fields(cls)]
        for key in d:
            if key not in names:
                hint = close_match(key, names)
                hint = f" ({hint})" if hint else ""
                raise TrainError(f"train.{key}: unknown key{hint}; known: {', '.join(names)}")
        for name in ("lr", "weight_decay", "warmup", "min_lr_ratio", "grad_clip", "ema"):
            v = d.get(name)
            if isinstance(v, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
                try:
                    d[name] = float(v)
                except ValueError:
                    raise TrainError(f"train.{name}: expected a number, found {v!r}") from None
            elif v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise TrainError(f"train.{name}: expected a number, found {v!r}")
        cfg = cls(**d)
        for name in ("steps", "batch_size", "seq_len"):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TrainError(f"train.{name}: expected a positive integer, found {v!r}")
        if cfg.optimizer not in ("adam_atan2", "adamw"):
            raise TrainError(f"train.optimizer: expected adam_atan2 | adamw, found {cfg.optimizer!r}")
        if cfg.schedule not in ("cosine", "constant"):
            raise TrainError(f"train.schedule: expected cosine | constant, found {cfg.schedule!r}")
        if cfg.dtype not in ("fp32", "bf16"):
            raise TrainError(f"train.dtype: expected fp32 | bf16, found {cfg.dtype!r}")
        return cfg


# --------------------------------------------------------------------------- data


def prepare_data(spec: Spec, cfg: TrainConfig, out: Path, tokenizer=None):
    """Samples -> tokenizer -> packed rows. Returns (tokenizer, rows, pack stats, data config)."""
    from hrmspec.runtime.data import DataConfig, DataError, encode_samples, format_sample, load_split
    from hrmspec.runtime.packing import pack
    from hrmspec.runtime.tokenizer import Tokenizer, TokenizerError, train_tokenizer

    try:
        dcfg = DataConfig.from_dict(spec.data)
        train = load_split(dcfg, "train", root=Path(spec.source).parent)
        if not train.samples:
            raise TrainError("the training set is empty: check data.path / data.tasks and data.size")
        if tokenizer is None and cfg.tokenizer:
            tokenizer = Tokenizer.load(cfg.tokenizer)
        if tokenizer is None:
            texts = (t for s in train.samples for t in format_sample(s))
            conditions = sorted({s.condition for s in train.samples if s.condition} | {"direct", "cot"})
            tokenizer = train_tokenizer(texts, spec.model.vocab, conditions=conditions)
    except (DataError, TokenizerError) as e:
        raise TrainError(str(e)) from None
    if tokenizer.vocab_size > spec.model.vocab:
        raise TrainError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab is {spec.model.vocab}: "
            f"set --set model.vocab={tokenizer.vocab_size} or more"
        )
    rows, stats = pack(encode_samples(train.samples, tokenizer), cfg.seq_len, spec.objective.type,
                       pad_id=tokenizer.pad_id)
    if len(rows) < cfg.batch_size:
        raise TrainError(
            f"only {len(rows)} packed rows for batch_size {cfg.batch_size}: use more data or a smaller batch"
        )
    return tokenizer, rows, stats, dcfg


# --------------------------------------------------------------------------- the loop


def _dist() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after `step` (a run that died past its last checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def train(
    spec: Spec,
    out: str | os.PathLike,
    resume: bool = False,
    fsdp: bool = False,
    progress_bar: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Train `spec`, writing checkpoints and metrics to `out`. Returns the final metrics.

    `stop_after` ends the run early at that step (after its checkpoint), as an interruption would.
    """
    import hrmspec
    from hrmspec.runtime.packing import Batches

    cfg = TrainConfig.from_dict(dict(spec.train))
    out = Path(out)
    rank, world = _dist()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % world:
        raise TrainError(f"train.batch_size ({cfg.batch_size}) must be divisible by the number of processes ({world})")
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)

    start_ckpt = ckpt.latest_checkpoint(out) if resume else None
    if resume and start_ckpt is None:
        raise TrainError(f"--resume: no checkpoint in {out}/checkpoints")
    tokenizer = None
    if start_ckpt is not None:
        from hrmspec.runtime.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(start_ckpt)
    tokenizer, rows, pstats, dcfg = prepare_data(spec, cfg, out, tokenizer)
    model = hrmspec.compile(spec)
    model.reset_parameters(seed=cfg.seed)
    batches = Batches(rows, cfg.batch_size, seed=cfg.seed)
    step, nan_run, skipped = 0, 0, 0
    if start_ckpt is not None:
        state = ckpt.read_trainer_state(start_ckpt)
        ckpt.load_model_state(model, read_tensors(start_ckpt / "model.safetensors"), start_ckpt)
        batches.load_state_dict(state["data"])
        step, skipped = state["step"], state.get("skipped", 0)
        if rank == 0:
            _truncate_metrics(out / "metrics.jsonl", step)
    if rank == 0:
        tokenizer.save(out)
        (out / "spec.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))

    sharded = world > 1 and fsdp
    net = model
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for stack in model.stacks.values():
            fully_shard(stack)
        net = fully_shard(model)
    elif world > 1:
        # which parameters get gradient changes with the credit plan
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    # optimizer and EMA see the parameters as they are after sharding (DTensors under FSDP)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or n.startswith("embed") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr, cfg.betas, cfg.weight_decay)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    if start_ckpt is not None:
        _load_training_state(start_ckpt, model, optimizer, ema, sharded)
        if ema is not None:
            ema.steps = state.get("ema_steps", step)
        ckpt.set_rng_state(state["rng"])

    metrics_file = open(out / "metrics.jsonl", "a") if rank == 0 else None
    board = _tensorboard(out) if rank == 0 else None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.dtype == "bf16" else nullcontext()
    warmup = int(cfg.warmup * cfg.steps)
    last: dict = {}
    bar = _progress(progress_bar and rank == 0, cfg.steps, step)
    t_log, tokens_since = time.perf_counter(), 0
    try:
        while step < cfg.steps:
            model.set_progress(step / cfg.steps)
            lr = lr_at(step, cfg.steps, cfg.lr, warmup, cfg.schedule, cfg.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            batch = next(batches)
            if world > 1:
                batch = {k: v[rank::world] for k, v in batch.items()}
            with autocast:
                outp = net(**batch, return_logits=False)  # the loss in row chunks: no full logits
            n_local = outp.n_tokens.float()
            n_global = n_local.clone()
            if world > 1:
                dist.all_reduce(n_global)
            # DDP averages gradients over ranks: scale so the result is sum / global tokens
            loss = outp.loss_sum * world / n_global.clamp(min=1)
            loss_value = float(outp.loss_sum.detach()) / max(float(n_local), 1.0)
            if world > 1:
                t = torch.tensor([float(outp.loss_sum.detach())])
                dist.all_reduce(t)
                loss_value = float(t) / max(float(n_global), 1.0)
            if not math.isfinite(loss_value):
                nan_run, skipped = nan_run + 1, skipped + 1
                optimizer.zero_grad(set_to_none=True)
                if nan_run >= cfg.max_nan_steps:
                    raise TrainError(
                        f"loss was not finite for {nan_run} steps in a row (at step {step}); "
                        f"the last good checkpoint is {ckpt.latest_checkpoint(out)}. Lower train.lr or use fp32."
                    )
                step += 1
                continue
            nan_run = 0
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip else 1e30)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            step += 1
            tokens_since += int((batch["doc_ids"] >= 0).sum()) * world
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                now = time.perf_counter()
                last = {
                    "step": step, "loss": round(loss_value, 6), "lr": lr, "credit_depth": model.credit_depth,
                    "tokens_per_s": round(tokens_since / max(now - t_log, 1e-9), 1),
                    "grad_norm": round(_scalar(grad_norm), 6), "skipped_steps": skipped,
                }
                t_log, tokens_since = now, 0
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
                if board is not None:
                    for key in ("loss", "lr", "credit_depth", "tokens_per_s", "grad_norm"):
                        board.add_scalar(f"train/{key}", last[key], step)
            if bar is not None:
                bar.update(step, loss_value, last.get("tokens_per_s"))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and rank == 0:
                _log_eval(model, ema, tokenizer, dcfg, cfg, cfg.eval_n, step, metrics_file)
            if step % cfg.save_every == 0 or step == cfg.steps or step == stop_after:
                model_state, optim_state, ema_state = _full_states(model, optimizer, ema, sharded)
                if rank == 0:
                    ckpt.save_checkpoint(
                        out, step, model_state, spec.raw, tokenizer, optim_state, ema_state,
                        {"data": batches.state_dict(), "skipped": skipped, "ema_steps": ema.steps if ema else 0},
                        keep=cfg.keep,
                    )
            if stop_after is not None and step >= stop_after:
                break
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if board is not None:
            board.close()
    if world > 1:
        dist.barrier()
    return last


def _scalar(t: torch.Tensor) -> float:
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def _full_states(model, optimizer, ema, sharded: bool):
    """Plain state dicts to save. Under FSDP this gathers shards: every rank must call it."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict(), ema.state_dict() if ema is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
    ema_state = {k: v.full_tensor() for k, v in ema.state_dict().items()} if ema is not None else None
    return model_state, optim_state, ema_state


def _load_training_state(ckpt_dir: Path, model, optimizer, ema, sharded: bool) -> None:
    optim_state = torch.load(ckpt_dir / "optimizer.pt", weights_only=False)
    ema_state = read_tensors(ckpt_dir / "ema.safetensors") if ema is not None else None
    if not sharded:
        optimizer.load_state_dict(optim_state)
        if ema is not None:
            ema.load_state_dict(ema_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import distribute_tensor

    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    if ema is not None:
        for name, shadow in ema.shadow.items():
            shadow.copy_(distribute_tensor(ema_state[name], shadow.device_mesh, shadow.placements))


def _tensorboard(out: Path):
    """TensorBoard event files beside metrics.jsonl, when tensorboard is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _log_eval(model, ema, tokenizer, dcfg, cfg, n, step, metrics_file) -> dict:
    from hrmspec.runtime.evaluate import evaluate_model

    res = evaluate_model(model, tokenizer, dcfg, n=n, ema=ema, max_new_tokens=cfg.max_new_tokens)
    metrics_file.write(json.dumps({"step": step, "eval": res}) + "\n")
    metrics_file.flush()
    return res


class _Bar:
    def __init__(self, total: int, start: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.p = Progress(
            TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(),
        )
        self.p.start()
        self.task = self.p.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, loss: float, tps) -> None:
        info = f"loss {loss:.4f}" + (f"  {tps:,.0f} tok/s" if tps else "")
        self.p.update(self.task, completed=step, info=info)

    def close(self) -> None:
        self.p.stop()


def _progress(enabled: bool, total: int, start: int):
    return _Bar(total, start) if enabled else None


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
