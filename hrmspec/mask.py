"""The attention mask as a description: a kind, per-token inputs, and one predicate.

A mask is a predicate over (batch, query position, key position), as FlexAttention's `mask_mod`.
For PrefixLM with packed samples and a sliding window of w:

    allowed(q, k) = doc[q] == doc[k] & (k <= q | (prefix[q] & prefix[k])) & |q - k| < w

so instruction tokens (prefix) see their whole instruction, response tokens see everything
before them, and nothing crosses a sample boundary (padding has doc id -1: it sees only padding).
`allowed` below is the only place the rule is written. It is evaluated on torch index tensors (the
reference attention, `Mask.dense`) and on `Sym`, a tiny expression type that prints it as source
text for the Triton attention template.

Queries may start after the keys (decoding with a KV cache): with `q_offset` = t, query i is key
position t + i, and the k_len = t + q_len keys are the cached ones followed by the new ones.

`block_states` summarises a mask over tiles of queries x keys, for every backend that skips work:
SKIP (no allowed element), FULL (every element allowed: the predicate need not be evaluated),
PARTIAL otherwise. It is computed from per-block summaries, never from the dense mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KINDS = ("causal", "prefix_lm", "bidirectional")
SKIP, PARTIAL, FULL = 0, 1, 2


def allowed(kind: str, q, k, pre: tuple | None = None, doc: tuple | None = None, window: int | None = None):
    """May query position q attend to key position k? The mask rule, written once.

    `q`, `k` are positions; `pre` = (prefix[q], prefix[k]) and `doc` = (doc[q], doc[k]) the
    per-token inputs, or None when the mask has none. The operands only need `& | <= < == -`
    (and `>=` when nothing constrains the pair): torch tensors broadcast to the pairs, `Sym`
    prints the expression."""
    terms = []
    if kind != "bidirectional":
        visible = k <= q
        if kind == "prefix_lm" and pre is not None:
            visible = visible | (pre[0] & pre[1])
        terms.append(visible)
    if doc is not None:
        terms.append(doc[0] == doc[1])
    if window is not None:
        terms.append((q - k < window) & (k - q < window))
    if not terms:  # every pair: still an expression of both positions, so it broadcasts to the tile
        return (0 <= q) & (0 <= k)
    out = terms[0]
    for t in terms[1:]:
        out = out & t
    return out


class Sym:
    """A symbolic operand: operators build the source text of the expression (fully bracketed)."""

    def __init__(self, src: str):
        self.src = src

    @staticmethod
    def _text(x) -> str:
        if isinstance(x, Sym):
            return x.src
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"a mask expression takes positions, per-token values and integers, not {x!r}")
        return str(x)

    def _op(self, op: str, other, reflected: bool = False) -> Sym:
        a, b = self.src, self._text(other)
        return Sym(f"({b} {op} {a})" if reflected else f"({a} {op} {b})")

    def __and__(self, o):
        return self._op("&", o)

    def __rand__(self, o):
        return self._op("&", o, True)

    def __or__(self, o):
        return self._op("|", o)

    def __ror__(self, o):
        return self._op("|", o, True)

    def __sub__(self, o):
        return self._op("-", o)

    def __rsub__(self, o):
        return self._op("-", o, True)

    def __le__(self, o):
        return self._op("<=", o)

    def __lt__(self, o):
        return self._op("<", o)

    def __ge__(self, o):
        return self._op(">=", o)

    def __gt__(self, o):
        return self._op(">", o)

    def __eq__(self, o):  # type: ignore[override]
        return self._op("==", o)

    __hash__ = None  # type: ignore[assignment]

    def __bool__(self):
        raise TypeError("a symbolic mask expression has no truth value: combine it with & and |, not and/or")

    def __str__(self) -> str:
        return self.src


def print_predicate(kind: str, documents: bool = False, window: int | None = None) -> str:
    """`allowed` as source text over q_pos, k_pos and the per-token q_pre, k_pre (bool), q_doc, k_doc."""
    pre = (Sym("q_pre"), Sym("k_pre")) if kind == "prefix_lm" else None
    doc = (Sym("q_doc"), Sym("k_doc")) if documents else None
    return str(allowed(kind, Sym("q_pos"), Sym("k_pos"), pre, doc, window))


@dataclass(frozen=True, eq=False)
class Mask:
    """Which keys each query may attend to, built once per batch and shared by every module call.

    The per-token tensors are indexed by key position (queries are positions q_offset..), so they
    have one column per key. A Mask compares by identity; it memoises its block plans."""

    kind: str  # causal | prefix_lm | bidirectional
    prefix: torch.Tensor | None = None  # (B, k_len) bool: instruction tokens (prefix_lm); None: none
    doc: torch.Tensor | None = None  # (B, k_len) int: packed documents, -1 on padding; None: one document
    window: int | None = None  # |q - k| < window; None: no window
    q_offset: int = 0  # queries are key positions q_offset .. q_offset + q_len - 1
    _memo: dict = field(default_factory=dict, init=False, repr=False)  # what is derived from the mask, by key

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown mask kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise ValueError(f"sliding window must be a positive integer, got {self.window!r}")
        if isinstance(self.q_offset, bool) or not isinstance(self.q_offset, int) or self.q_offset < 0:
            raise ValueError(f"q_offset must be a non-negative integer, got {self.q_offset!r}")
        for name in ("prefix", "doc"):
            t = getattr(self, name)
            if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 2):
                raise ValueError(f"Mask.{name} must be a (batch, keys) tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if self.prefix is not None and self.doc is not None and self.prefix.shape != self.doc.shape:
            raise ValueError(f"Mask.prefix {tuple(self.prefix.shape)} and Mask.doc {tuple(self.doc.shape)} "
                             "must have one shape (batch, keys)")
        if self.prefix is not None and self.prefix.dtype != torch.bool:
            object.__setattr__(self, "prefix", self.prefix.bool())

    @property
    def tokens(self) -> torch.Tensor | None:
        """The first per-token tensor the mask has (for its shape and device), or None."""
        return self.prefix if self.prefix is not None else self.doc

    @property
    def batch(self) -> int:
        """Rows the mask distinguishes: B of its per-token tensors, 1 when it has none (it broadcasts)."""
        return 1 if self.tokens is None else self.tokens.shape[0]

    def check(self, batch: int, q_len: int, k_len: int, what: str = "attention") -> None:
        """Raise a ValueError naming the mismatch unless the mask fits these queries and keys."""
        if k_len != self.q_offset + q_len:
            raise ValueError(f"{what}: {q_len} queries at offset {self.q_offset} need {self.q_offset + q_len} "
                             f"keys, got {k_len}")
        t = self.tokens
        if t is not None and (t.shape[1] != k_len or t.shape[0] not in (1, batch)):
            raise ValueError(f"{what}: the mask's per-token tensors are {tuple(t.shape)}, expected "
                             f"(batch {batch}, keys {k_len})")

    def block(self, q0: int, q1: int, k0: int, k1: int, device=None) -> torch.Tensor:
        """(batch or 1, 1, q1 - q0, k1 - k0) bool: `allowed` for queries q0..q1-1 (query indices,
        offset by q_offset into positions) and keys k0..k1-1."""
        t = self.tokens
        device = t.device if t is not None else device
        qa, qb = self.q_offset + q0, self.q_offset + q1
        q = torch.arange(qa, qb, device=device)[:, None]
        k = torch.arange(k0, k1, device=device)[None, :]
        pre = doc = None
        if self.kind == "prefix_lm" and self.prefix is not None:
            pre = (self.prefix[:, qa:qb, None], self.prefix[:, None, k0:k1])
        if self.doc is not None:
            doc = (self.doc[:, qa:qb, None], self.doc[:, None, k0:k1])
        ok = allowed(self.kind, q, k, pre, doc, self.window)
        return ok[None, None] if ok.dim() == 2 else ok[:, None]

    def dense(self, q_len: int | None = None, batch: int | None = None, device=None) -> torch.Tensor:
        """(B, 1, q_len, k_len) bool, True where a query may attend to a key: for tests, comparisons
        and interop (an S x S tensor; attention never builds it). q_len defaults to the keys the
        per-token tensors cover, less q_offset; B to their batch (or `batch`)."""
        if q_len is None:
            if self.tokens is None:
                raise ValueError("Mask.dense: give q_len (the mask has no per-token tensors to read it from)")
            q_len = self.tokens.shape[1] - self.q_offset
        k_len = self.q_offset + q_len
        B = batch if batch is not None else self.batch
        self.check(B, q_len, k_len, "Mask.dense")
        return self.block(0, q_len, 0, k_len, device).expand(B, 1, q_len, k_len).contiguous()

    @property
    def mask_mod(self):
        """`allowed` as a function with FlexAttention's `mask_mod` signature (batch, head, query index,
        key index): `torch.nn.attention.flex_attention.create_block_mask(mask.mask_mod, ...)` runs this
        mask in torch's FlexAttention (the tests hold the reference attention to it)."""
        kind, prefix, doc_ids, window, offset = self.kind, self.prefix, self.doc, self.window, self.q_offset

        def mask_mod(b, h, q_idx, kv_idx):
            q = q_idx + offset
            pre = (prefix[b, q], prefix[b, kv_idx]) if kind == "prefix_lm" and prefix is not None else None
            doc = (doc_ids[b, q], doc_ids[b, kv_idx]) if doc_ids is not None else None
            return allowed(kind, q, kv_idx, pre, doc, window)

        return mask_mod

    def states(self, q_len: int, k_len: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
        """`block_states(self, ...)`, memoised: one mask serves every layer of every call."""
        key = ("states", q_len, k_len, block_q, block_k, None if self.tokens is not None else str(device))
        if key not in self._memo:
            self._memo[key] = block_states(self, q_len, k_len, block_q, block_k, device)
        return self._memo[key]


# -- block summaries: a state per (query block, key block) --------------------------------------------
_BIG = 1 << 40


def _summaries(pos0: int, doc: torch.Tensor, prefix: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    """Per block of `block` consecutive tokens (positions pos0..): position range, doc id range
    over all tokens and over prefix tokens (empty range = (+BIG, -BIG)), all tokens prefix."""
    B, L = doc.shape
    n = -(-L // block)
    pad = n * block - L
    valid = torch.nn.functional.pad(torch.ones_like(doc, dtype=torch.bool), (0, pad)).view(B, n, block)
    d = torch.nn.functional.pad(doc, (0, pad)).view(B, n, block)
    p = torch.nn.functional.pad(prefix, (0, pad)).view(B, n, block) & valid
    start = torch.arange(n, device=doc.device) * block
    return {
        "start": pos0 + start, "end": pos0 + torch.clamp(start + block, max=L) - 1,
        "dmin": torch.where(valid, d, _BIG).amin(-1), "dmax": torch.where(valid, d, -_BIG).amax(-1),
        "pmin": torch.where(p, d, _BIG).amin(-1), "pmax": torch.where(p, d, -_BIG).amax(-1),
        "all_pre": (p | ~valid).all(-1),
    }


def block_states(mask: Mask, q_len: int, k_len: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """(mask.batch, n_q_blocks, n_k_blocks) int8: SKIP, PARTIAL or FULL per tile of `block_q`
    queries x `block_k` keys (a batch of 1 broadcasts over rows).

    Sound for any doc ids and prefix bits (a tile with an allowed element is never SKIP, a FULL
    tile has no masked element) and exact for causal / bidirectional / window masks and for doc
    ids increasing along the row with prefixes leading their documents (the packer's rows)."""
    mask.check(mask.batch, q_len, k_len, "block_states")
    t = mask.tokens
    device = t.device if t is not None else device
    B = mask.batch
    doc = mask.doc.long() if mask.doc is not None else torch.zeros(B, k_len, dtype=torch.long, device=device)
    pre = (mask.prefix if mask.kind == "prefix_lm" and mask.prefix is not None
           else torch.zeros(B, k_len, dtype=torch.bool, device=device))
    o = mask.q_offset
    Q = {k: (v[:, :, None] if v.dim() == 2 else v[:, None])
         for k, v in _summaries(o, doc[:, o:], pre[:, o:], block_q).items()}
    K = {k: (v[:, None, :] if v.dim() == 2 else v[None, :]) for k, v in _summaries(0, doc, pre, block_k).items()}
    qs, qe, ks, ke = Q["start"], Q["end"], K["start"], K["end"]
    doc_any = (Q["dmin"] <= K["dmax"]) & (K["dmin"] <= Q["dmax"])
    doc_full = (Q["dmin"] == Q["dmax"]) & (K["dmin"] == K["dmax"]) & (Q["dmin"] == K["dmin"])
    if mask.kind == "bidirectional":
        any_, full = doc_any, doc_full
    elif mask.kind == "causal":
        any_, full = doc_any & (ks <= qe), doc_full & (ke <= qs)
    else:  # the k > q part needs a prefix token of the same document on both sides
        prefix_any = (Q["pmin"] <= K["pmax"]) & (K["pmin"] <= Q["pmax"])
        any_ = (doc_any & (ks <= qe)) | prefix_any
        full = doc_full & ((ke <= qs) | (Q["all_pre"] & K["all_pre"]))
    if mask.window is not None:  # the nearest pair closer than w / the farthest pair closer than w
        w = mask.window
        any_ = any_ & (ks - qe < w) & (qs - ke < w)
        full = full & (qe - ks < w) & (ke - qs < w)
    any_, full = torch.broadcast_tensors(any_, full)
    return torch.where(full, FULL, torch.where(any_, PARTIAL, SKIP)).to(torch.int8).contiguous()
