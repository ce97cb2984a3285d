"""What a run trains for, one class each: its data, the loss and metrics of a step, its held-out evaluation.

    Text      task_completion and lm: instruction-response samples, a trained tokenizer, packed PrefixLM
              rows (packing.py); the loss of a step is the token mean over the global batch's counted
              tokens, in row chunks (no full logits); a spec that halts per step adds the steps run
    Segments  grids (and any spec with `supervision:`): puzzles as fixed rows, one supervised segment of
              every row per step, the rows' carry kept across steps (runtime/execution/supervision.py);
              the loss of a step is the row mean; metrics count the rows whose sample ended

An objective is made from the spec (`objective_for`), prepares its rows (`prepare`), is bound to the
model and the wrapper the step runs (`bind`), and from a batch gives a `StepLoss`: the summed loss, what
it is divided by, the tokens computed and the step's metrics. `train_step` (runtime/training/step.py)
does the rest, the same for every objective; the trainer reads the metrics from the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from hrmspec.runtime.artifacts.config import TrainConfig, TrainError
from hrmspec.runtime.artifacts.data import DataConfig, DataError, encode_samples, format_sample, load_split
from hrmspec.runtime.artifacts.grids import GridConfig, load_grids
from hrmspec.runtime.artifacts.packing import pack
from hrmspec.runtime.artifacts.puzzle_data import PuzzleSource, is_puzzle_source
from hrmspec.runtime.artifacts.tokenizer import Tokenizer, TokenizerError, train_tokenizer
from hrmspec.runtime.evaluate.heldout import evaluate_grids, evaluate_model, held_out_set
from hrmspec.runtime.evaluate.puzzles import evaluate_puzzles
from hrmspec.runtime.execution.rules import expected_step
from hrmspec.runtime.execution.supervision import Carry, Supervisor
from hrmspec.spec.schema import Spec


@dataclass
class StepLoss:
    """One step's forward, as an objective gives it."""

    loss_sum: torch.Tensor  # the loss summed over what it counts (backpropagated after scaling)
    count: torch.Tensor  # what it is divided by on this rank: counted tokens, or rows
    tokens: int  # tokens computed on this rank (for tokens/s)
    metrics: dict[str, float] = field(default_factory=dict)  # summed over the step's rows or positions


DATA_PATHS = ("path", "eval_path")  # data: keys naming files, relative to the spec's folder


def record_absolute_paths(spec: Spec) -> None:
    """Resolve the data files a spec names against the spec's own folder, in `spec.data` and in the document
    the run records (checkpoints' spec.yaml): evaluating the run later, from anywhere, reads the same files,
    never a file of that name in the run folder."""
    root = Path(spec.source).parent
    for key in DATA_PATHS:
        value = spec.data.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            spec.data[key] = str((root / value).resolve())
            if isinstance(spec.raw.get("data"), dict):
                spec.raw["data"][key] = spec.data[key]


class Objective:
    """The part of a run that depends on what it trains for (see the module docstring)."""

    tokenizer: Tokenizer | None = None
    data_cfg = None
    carry: Carry | None = None  # a supervised run's rows across steps (Segments), saved with each checkpoint

    def __init__(self, spec: Spec, cfg: TrainConfig):
        self.spec, self.cfg = spec, cfg
        self.model = self.net = None
        record_absolute_paths(spec)

    def prepare(self, start: Path | None = None):
        """The training rows (checked against the model's vocabulary and length); `start`: the checkpoint a
        resumed run continues from (its tokenizer, for text)."""
        raise NotImplementedError

    def check_held_out(self) -> None:
        """A held-out set that cannot be made fails here, before the run starts."""
        try:
            held_out_set(self.data_cfg, self.root)
        except DataError as e:
            raise TrainError(f"the held-out set: {e}") from None

    def bind(self, model, net) -> None:
        """The model, and what runs its forward in a step (a data-parallel wrapper of it, or itself)."""
        self.model, self.net = model, net

    def loss(self, batch: dict[str, torch.Tensor]) -> StepLoss:
        raise NotImplementedError

    def evaluate(self, n: int, ema=None) -> dict:
        raise NotImplementedError

    def log_fields(self, window: dict[str, float]) -> dict:
        """What the log line shows of the metrics summed since the last one."""
        return {}

    @property
    def root(self) -> Path:
        return Path(self.spec.source).parent


class Text(Objective):
    """task_completion and lm on packed rows (see the module docstring)."""

    def prepare(self, start=None):
        spec, cfg = self.spec, self.cfg
        tokenizer = Tokenizer.load(start) if start is not None else None
        if cfg.seq_len > spec.model.max_seq_len:
            raise TrainError(f"train.seq_len {cfg.seq_len} is longer than model.max_seq_len "
                             f"{spec.model.max_seq_len}: lower train.seq_len or set --set "
                             f"model.max_seq_len={cfg.seq_len}")
        try:
            self.data_cfg = DataConfig.from_dict(spec.data)
            train = load_split(self.data_cfg, "train", root=self.root)
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
            raise TrainError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab is "
                             f"{spec.model.vocab}: set --set model.vocab={tokenizer.vocab_size} or more")
        self.tokenizer = tokenizer
        rows, self.pack_stats = pack(encode_samples(train.samples, tokenizer), cfg.seq_len, spec.objective.type,
                                     pad_id=tokenizer.pad_id)
        if len(rows) < cfg.batch_size:
            raise TrainError(f"only {len(rows)} packed rows for batch_size {cfg.batch_size}: use more data or a "
                             "smaller batch")
        return rows

    def loss(self, batch):
        out = self.net(**batch, return_logits=False)  # the loss in row chunks: no full logits
        metrics = {}
        if out.steps is not None:  # halting per step: the steps the counted positions ran
            counted = batch["labels"] != -100
            steps = expected_step(self.spec, out.steps, out.step_weights)[:, self.model.prefix_len:][counted]
            metrics = {"positions": float(counted.sum()), "position_steps": float(steps.sum())}
        return StepLoss(out.loss_sum, out.n_tokens.float(), int((batch["doc_ids"] >= 0).sum()), metrics)

    def evaluate(self, n, ema=None):
        return evaluate_model(self.model, self.tokenizer, self.data_cfg, n=n, ema=ema,
                              max_new_tokens=self.cfg.max_new_tokens, root=self.root)

    def log_fields(self, window):
        if not window.get("positions"):
            return {}
        return {"steps": round(window["position_steps"] / window["positions"], 3)}  # per counted position


class Segments(Text):
    """Deep supervision of grids (or of text, with `supervision:`): one segment of every row per step, the
    carry kept across steps (see the module docstring)."""

    @property
    def grid(self) -> bool:
        return self.spec.objective.type == "grid"

    def prepare(self, start=None):
        if not self.grid:  # supervised text: packed rows as the text objective makes them
            return super().prepare(start)
        spec, cfg = self.spec, self.cfg
        if is_puzzle_source(spec.data):
            return self._prepare_dataset()
        try:
            self.data_cfg = GridConfig.from_dict(spec.data)
            rows = load_grids(self.data_cfg, "train")
        except DataError as e:
            raise TrainError(str(e)) from None
        need, cells = self.data_cfg.vocab, rows.inputs.shape[1]
        if need > spec.model.vocab:
            raise TrainError(f"{', '.join(self.data_cfg.tasks())} grids need {need} tokens but model.vocab is "
                             f"{spec.model.vocab}: set --set model.vocab={need}")
        if cells > spec.model.max_seq_len:
            raise TrainError(f"a grid is {cells} cells but model.max_seq_len is {spec.model.max_seq_len}: "
                             f"set --set model.max_seq_len={cells}")
        if len(rows) < cfg.batch_size:
            raise TrainError(f"only {len(rows)} training grids for batch_size {cfg.batch_size}: use more data "
                             "(data.size, data.augment) or a smaller batch")
        return rows

    def _prepare_dataset(self):
        """The train split of a dataset folder in the official layout (`data: {source: hrm_dataset, path}`),
        checked against the model."""
        try:
            self.data_cfg = PuzzleSource.from_dict(self.spec.data)
            return self.data_cfg.training_split(self.spec.model, self.cfg.batch_size, self.cfg.seed)
        except DataError as e:
            raise TrainError(str(e)) from None

    def check_held_out(self) -> None:
        if not is_puzzle_source(self.spec.data):
            super().check_held_out()

    def bind(self, model, net):
        super().bind(model, net)
        self.supervisor = Supervisor(model, forward=net)  # segments run through the data-parallel wrapper

    def loss(self, batch):
        sup = self.supervisor
        if self.carry is None:
            self.carry = sup.initial_carry(batch)
        self.carry, out = sup.step(self.carry, batch, training=True)
        loss_sum, metrics = sup.loss(self.carry, out)
        rows = batch["input_ids"].shape[0]
        return StepLoss(loss_sum, torch.tensor(float(rows), device=loss_sum.device),
                        rows * (batch["input_ids"].shape[1] + self.model.prefix_len), metrics)

    def evaluate(self, n, ema=None):
        if not self.grid:
            return super().evaluate(n, ema)
        if isinstance(self.data_cfg, PuzzleSource):  # scored as the official code scores it
            return evaluate_puzzles(self.model, self.data_cfg, n=n, ema=ema)
        return evaluate_grids(self.model, self.data_cfg, n=n, ema=ema)

    def log_fields(self, window):
        if not window.get("rows"):
            return {}
        return {"solved": round(window["exact"] / window["rows"], 4),  # of the rows whose sample ended
                "segments": round(window["steps"] / window["rows"], 3)}


def objective_for(spec: Spec, cfg: TrainConfig) -> Objective:
    """The objective a spec trains for: segments for grids and supervised specs, packed text otherwise."""
    if spec.objective.type == "grid" or spec.supervision is not None:
        return Segments(spec, cfg)
    return Text(spec, cfg)


__all__ = ["Objective", "Segments", "StepLoss", "Text", "objective_for"]
