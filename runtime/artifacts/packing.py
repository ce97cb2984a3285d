"""Packing encoded samples into fixed-length rows, and a resumable shuffling batch iterator.

Each sample is (prompt_ids, response_ids). Rows hold whole samples side by side (best-fit: a
sample goes into the open row it fills most tightly), never one sample across two rows, and end
in padding. Per row position t, ``pack`` produces

    input_ids     int64  token, ``pad_id`` on padding
    labels        int64  the token to predict at t, or -100 (no loss)
    prefix_mask   bool   True on prompt tokens: the prefix a PrefixLM mask lets attend both ways
    doc_ids       int32  0, 1, 2, ... per sample in the row; PAD_DOC (-1) on padding
    position_ids  int64  0, 1, 2, ... restarting at every sample (RoPE sees each sample alone)

Attention must stay within a document: query t may see key s only if doc_ids[t] == doc_ids[s]
(and the causal / prefix rule allows it). Real documents have ids >= 0, so no real token ever
attends to padding; padding attends only to padding, which keeps its softmax rows finite, and
it carries no loss.

Objectives. ``task_completion`` (HRM-Text): loss only on response tokens, so labels[t] =
input_ids[t + 1] when t + 1 is a response token of the same sample; the last prompt token thus
predicts the first response token. ``lm``: labels[t] = input_ids[t + 1] whenever t + 1 belongs
to the same sample.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hrmspec.runtime.artifacts.config import TrainError

IGNORE = -100  # label value that carries no loss (torch cross_entropy's ignore_index)
PAD_DOC = -1  # doc id of padding positions
OBJECTIVES = ("task_completion", "lm")


@dataclass
class PackStats:
    samples: int = 0  # samples given
    packed: int = 0  # samples placed in rows
    truncated: int = 0  # longer than seq_len, response end cut off
    dropped: int = 0  # longer than seq_len (overflow="drop") or prompt alone too long
    empty: int = 0  # no tokens at all
    rows: int = 0
    tokens: int = 0  # real (non-padding) tokens in the rows
    pad_tokens: int = 0
    loss_tokens: int = 0  # positions with a label

    @property
    def fill(self) -> float:
        """Fraction of row positions that hold real tokens."""
        total = self.tokens + self.pad_tokens
        return self.tokens / total if total else 0.0


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # (N, S) int64
    labels: torch.Tensor  # (N, S) int64, IGNORE where no loss
    prefix_mask: torch.Tensor  # (N, S) bool
    doc_ids: torch.Tensor  # (N, S) int32, PAD_DOC on padding
    position_ids: torch.Tensor  # (N, S) int64
    sources: list[list[int]] = field(default_factory=list)  # per row: sample indices, by doc id

    KEYS = ("input_ids", "labels", "prefix_mask", "doc_ids", "position_ids")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, index: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """The rows at ``index`` as a dict of (B, S) tensors."""
        index = torch.as_tensor(index, dtype=torch.long)
        return {k: getattr(self, k)[index] for k in self.KEYS}


def _fit(prompt: Sequence[int], response: Sequence[int], seq_len: int,
         overflow: str) -> tuple[Sequence[int], Sequence[int], str]:
    """Trim a sample to seq_len: 'ok', 'truncated' or 'dropped' (with the kept tokens)."""
    if len(prompt) + len(response) <= seq_len:
        return prompt, response, "ok"
    # A cut sample must keep its whole prompt and at least one response token to teach anything.
    if overflow == "drop" or len(prompt) >= seq_len:
        return prompt, response, "dropped"
    return prompt, response[: seq_len - len(prompt)], "truncated"


def pack(
    samples: Sequence[tuple[Sequence[int], Sequence[int]]],
    seq_len: int,
    objective: str = "task_completion",
    overflow: str = "truncate",
    pad_id: int = 0,
) -> tuple[PackedRows, PackStats]:
    """Pack (prompt_ids, response_ids) samples into rows of exactly ``seq_len`` tokens.

    ``overflow`` decides what happens to samples longer than a row: "truncate" cuts the end of
    the response, "drop" leaves the sample out. Samples keep their input order within a row.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    stats = PackStats(samples=len(samples))

    # Best-fit: `free` is sorted by (room left, row); the first entry with enough room fits tightest.
    rows: list[list[int]] = []  # per row: indices into `kept`
    room: list[int] = []
    free: list[tuple[int, int]] = []
    kept: list[tuple[Sequence[int], Sequence[int], int]] = []
    for i, (prompt, response) in enumerate(samples):
        n = len(prompt) + len(response)
        if n == 0:
            stats.empty += 1
            continue
        prompt, response, how = _fit(prompt, response, seq_len, overflow)
        if how == "dropped":
            stats.dropped += 1
            continue
        if how == "truncated":
            stats.truncated += 1
        n = len(prompt) + len(response)
        kept.append((prompt, response, i))
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            left, r = free.pop(j)
        else:
            r, left = len(rows), seq_len
            rows.append([])
            room.append(seq_len)
        rows[r].append(len(kept) - 1)
        left -= n
        room[r] = left
        if left > 0:
            bisect.insort(free, (left, r))

    N = len(rows)
    input_ids = np.full((N, seq_len), pad_id, dtype=np.int64)
    labels = np.full((N, seq_len), IGNORE, dtype=np.int64)
    prefix_mask = np.zeros((N, seq_len), dtype=bool)
    doc_ids = np.full((N, seq_len), PAD_DOC, dtype=np.int32)
    position_ids = np.zeros((N, seq_len), dtype=np.int64)
    sources: list[list[int]] = []
    for r, members in enumerate(rows):
        t = 0
        src = []
        for d, k in enumerate(members):
            prompt, response, i = kept[k]
            P, R = len(prompt), len(response)
            n = P + R
            ids = np.asarray(list(prompt) + list(response), dtype=np.int64)
            input_ids[r, t:t + n] = ids
            prefix_mask[r, t:t + P] = True
            doc_ids[r, t:t + n] = d
            position_ids[r, t:t + n] = np.arange(n)
            # labels[t + j] = ids[j + 1] for j in [first, n - 2]
            first = 0 if objective == "lm" else max(P - 1, 0)
            if n - 1 > first:
                labels[r, t + first:t + n - 1] = ids[first + 1:]
            t += n
            src.append(i)
        sources.append(src)

    stats.packed = len(kept)
    stats.rows = N
    stats.tokens = int((doc_ids != PAD_DOC).sum())
    stats.pad_tokens = N * seq_len - stats.tokens
    stats.loss_tokens = int((labels != IGNORE).sum())
    packed = PackedRows(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        prefix_mask=torch.from_numpy(prefix_mask),
        doc_ids=torch.from_numpy(doc_ids),
        position_ids=torch.from_numpy(position_ids),
        sources=sources,
    )
    return packed, stats


class Batches:
    """Endless shuffled batches of packed rows, resumable to the exact batch.

    Epoch e visits the rows in a permutation drawn from (seed, e) alone, so the stream depends
    only on the seed and where it stands: ``state_dict()`` is just (epoch, position).
    ``drop_last`` keeps every batch the same shape; without it an epoch's last batch is smaller.
    ``shuffle=False`` keeps row order (for evaluation).
    """

    def __init__(self, rows: PackedRows, batch_size: int, seed: int = 0,
                 drop_last: bool = True, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(rows) == 0 or (drop_last and len(rows) < batch_size):
            raise ValueError(f"only {len(rows)} packed rows for batch_size {batch_size}; "
                             "use more data, a smaller batch or drop_last=False")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # rows of the current epoch already served
        self._order: torch.Tensor | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        n = self._epoch_rows()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _epoch_order(self) -> torch.Tensor:
        """The rows of this epoch, in order: a permutation drawn from (seed, epoch); or, for rows that sample
        their own epochs (`epoch_order(seed, epoch)`: the official puzzle sampler, one puzzle of each group),
        what they draw; without shuffling, every row in order."""
        if self._order is None:
            n = len(self.rows)
            own = getattr(self.rows, "epoch_order", None)
            if self.shuffle and own is not None:
                self._order = torch.from_numpy(np.asarray(own(self.seed, self.epoch), dtype=np.int64))
            elif self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
                self._order = torch.from_numpy(order)
            else:
                self._order = torch.arange(n)
        return self._order

    def _epoch_rows(self) -> int:
        return len(self._epoch_order())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        end = self.position + self.batch_size
        n = self._epoch_rows()
        if self.position >= n or (self.drop_last and end > n):
            self.epoch += 1
            self.position = 0
            self._order = None
            end = self.batch_size
            n = self._epoch_rows()
        index = self._epoch_order()[self.position:end]
        self.position = min(end, n)
        return self.rows.batch(index)

    def epoch_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the current epoch, then stop (e.g. one pass over an eval set)."""
        while self.position < self._epoch_rows() and not (
            self.drop_last and self.position + self.batch_size > self._epoch_rows()
        ):
            yield next(self)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "num_rows"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                what = {"seed": "train.seed", "batch_size": "train.batch_size",
                        "num_rows": "packed rows (the data, train.seq_len or the tokenizer differ)"}[key]
                raise TrainError(f"--resume: the checkpoint's batches were drawn with {key} {state[key]}, this run "
                                 f"has {mine} ({what}): resuming would replay a different stream; resume with what "
                                 "the run was trained with, or start a new run (another --out, or --overwrite)")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = None
