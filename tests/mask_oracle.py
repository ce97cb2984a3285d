"""The attention mask by brute force, and hypothesis strategies for masks: shared by the mask,
reference-attention and Triton-attention tests. The loop is the definition written out pair by
pair, independent of `hrmspec.mask` (no shared code), so the tests of `allowed`, `Mask.dense`, the
blocked attention and the printed predicate all answer to it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from hrmspec.mask import FULL, KINDS, SKIP, Mask


def loop_mask(kind: str, batch: int, q_len: int, prefix=None, doc=None, window=None, q_offset: int = 0
              ) -> torch.Tensor:
    """(batch, 1, q_len, q_offset + q_len) bool: may query i (position q_offset + i) see key k?"""
    k_len = q_offset + q_len
    pre = None if prefix is None else prefix.expand(batch, k_len).tolist()
    ids = None if doc is None else doc.expand(batch, k_len).tolist()
    out = torch.zeros(batch, 1, q_len, k_len, dtype=torch.bool)
    rows = []
    for b in range(batch):
        for i in range(q_len):
            q = q_offset + i
            row = []
            for k in range(k_len):
                if ids is not None and ids[b][q] != ids[b][k]:
                    ok = False
                elif kind == "causal":
                    ok = k <= q
                elif kind == "prefix_lm":
                    ok = k <= q or (pre is not None and pre[b][q] and pre[b][k])
                else:
                    ok = True
                if window is not None and abs(q - k) >= window:
                    ok = False
                row.append(ok)
            rows.append(row)
    if rows:
        out[:, 0] = torch.tensor(rows, dtype=torch.bool).view(batch, q_len, k_len)
    return out


@dataclass
class Case:
    """A mask to test, with the queries it is used with."""

    kind: str
    prefix: torch.Tensor | None  # (B, k_len) bool
    doc: torch.Tensor | None  # (B, k_len) int, -1 on padding
    window: int | None
    batch: int
    q_len: int
    q_offset: int = 0

    @property
    def k_len(self) -> int:
        return self.q_offset + self.q_len

    @property
    def mask(self) -> Mask:
        return Mask(self.kind, self.prefix, self.doc, self.window, self.q_offset)

    def loop(self) -> torch.Tensor:
        return loop_mask(self.kind, self.batch, self.q_len, self.prefix, self.doc, self.window, self.q_offset)


@st.composite
def cases(draw, seq_lens=(1, 7, 33, 64, 100), batch=(1, 2), sorted_docs=True, offsets=(0,), kinds=KINDS,
          windows=True, prefix_none=False):
    """Packed rows: documents of random lengths, each starting with a random-length prefix, then
    padding (doc -1); without documents, one sample per row with a random prefix length. With
    sorted_docs=False, doc ids and prefix bits are arbitrary (for the soundness of block skipping).
    The keys are q_offset + S positions, the queries the last S of them."""
    kind = draw(st.sampled_from(kinds))
    B, S = draw(st.integers(*batch)), draw(st.sampled_from(seq_lens))
    off = draw(st.sampled_from(offsets))
    T = off + S
    documents = draw(st.booleans())
    window = draw(st.none() | st.integers(1, 40)) if windows else None
    prefix = torch.zeros(B, T, dtype=torch.bool)
    doc = torch.full((B, T), -1, dtype=torch.int64)
    if not sorted_docs:
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        prefix = torch.rand(B, T, generator=g) < draw(st.sampled_from((0.0, 0.3, 0.9)))
        doc = torch.randint(-1, draw(st.integers(1, 4)), (B, T), generator=g)
    else:
        for b in range(B):
            end = T - (draw(st.integers(0, T // 4)) if documents else 0)
            t, d = 0, 0
            while t < end:
                n = draw(st.integers(1, end - t)) if documents else T
                prefix[b, t:t + draw(st.integers(0, n))] = True
                doc[b, t:t + n] = d
                t, d = t + n, d + 1
    if prefix_none and draw(st.booleans()):
        prefix = None
    return Case(kind, prefix, doc if documents else None, window, B, S, off)


def block_reduce(dense: torch.Tensor, bm: int, bn: int):
    """(B, nQ, nK): any / all of a (B, Sq, Sk) mask over each block's valid elements."""
    B, Sq, Sk = dense.shape
    nq, nk = -(-Sq // bm), -(-Sk // bn)
    padded = torch.zeros(B, nq * bm, nk * bn, dtype=torch.int32)
    valid = torch.zeros_like(padded)
    padded[:, :Sq, :Sk] = dense.int()
    valid[:, :Sq, :Sk] = 1
    blocks = padded.view(B, nq, bm, nk, bn).sum((2, 4))
    return blocks > 0, blocks == valid.view(B, nq, bm, nk, bn).sum((2, 4))


def assert_sound(allowed: torch.Tensor, states: torch.Tensor, bm: int, bn: int) -> None:
    """Block states (B or 1, nQ, nK) against the allowed pairs (B, 1, Sq, Sk): no block holding an
    allowed pair is skipped, no block holding a masked pair is full."""
    any_, all_ = block_reduce(allowed[:, 0], bm, bn)
    states = states.expand_as(any_)
    assert not (any_ & (states == SKIP)).any(), "a block with an allowed element was skipped"
    assert not (~all_ & (states == FULL)).any(), "a block with a masked element was marked full"
