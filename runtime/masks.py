"""Attention masks as predicates, and the dense boolean masks built from them.

A mask is a predicate over (batch, query, key) positions. For PrefixLM with packed samples:

    allowed(q, k) = same_doc(q, k) & (k <= q | (prefix[q] & prefix[k]))

so instruction tokens (prefix) see their whole instruction, response tokens see everything
before them, and nothing crosses a sample boundary. The same predicate is what a generated
attention kernel prints into its template; here it is evaluated densely once per batch and
shared by every module call.
"""

from __future__ import annotations

import torch

MASK_KINDS = ("causal", "prefix_lm", "bidirectional")


def mask_predicate(kind: str, prefix: torch.Tensor | None, doc: torch.Tensor | None):
    """A function (b, q, k) -> bool tensor, broadcasting over index tensors (FlexAttention style)."""

    def allowed(b, q, k):
        ok = torch.ones_like(q >= 0) & torch.ones_like(k >= 0)
        if doc is not None:
            ok = ok & (doc[b, q] == doc[b, k])
        if kind == "bidirectional":
            return ok
        visible = k <= q
        if kind == "prefix_lm" and prefix is not None:
            visible = visible | (prefix[b, q] & prefix[b, k])
        return ok & visible

    return allowed


def dense_mask(
    kind: str,
    batch: int,
    seq_len: int,
    prefix_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask (B, 1, S, S), True where a query may attend to a key."""
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
    pos = torch.arange(seq_len, device=device)
    q, k = pos[:, None], pos[None, :]
    if kind == "bidirectional":
        m = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).expand(batch, seq_len, seq_len)
    else:
        m = (k <= q).expand(batch, seq_len, seq_len)
        if kind == "prefix_lm" and prefix_mask is not None:
            p = prefix_mask.to(device=device, dtype=torch.bool)
            m = m | (p[:, :, None] & p[:, None, :])
    if doc_ids is not None:
        d = doc_ids.to(device)
        m = m & (d[:, :, None] == d[:, None, :])
    return m[:, None]
