"""Mask semantics: the dense masks equal the definition evaluated by loops, and the predicate form."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from hrmspec.runtime.masks import dense_mask, mask_predicate


def loop_mask(kind, prefix, doc):
    B, S = prefix.shape
    out = torch.zeros(B, 1, S, S, dtype=torch.bool)
    for b in range(B):
        for q in range(S):
            for k in range(S):
                same = bool(doc[b, q] == doc[b, k])
                if kind == "bidirectional":
                    ok = same
                elif kind == "causal":
                    ok = same and k <= q
                else:
                    ok = same and (k <= q or (bool(prefix[b, q]) and bool(prefix[b, k])))
                out[b, 0, q, k] = ok
    return out


@st.composite
def packed_rows(draw):
    """Rows of packed samples: each a prefix (instruction) then a response, with doc ids."""
    B = draw(st.integers(1, 3))
    S = draw(st.integers(1, 24))
    prefix = torch.zeros(B, S, dtype=torch.bool)
    doc = torch.zeros(B, S, dtype=torch.int64)
    for b in range(B):
        t, d = 0, 0
        while t < S:
            n = draw(st.integers(1, S - t))
            p = draw(st.integers(0, n))
            prefix[b, t : t + p] = True
            doc[b, t : t + n] = d
            t, d = t + n, d + 1
    return prefix, doc


@given(packed_rows(), st.sampled_from(["causal", "prefix_lm", "bidirectional"]))
def test_dense_mask_matches_loops(rows, kind):
    prefix, doc = rows
    B, S = prefix.shape
    assert torch.equal(dense_mask(kind, B, S, prefix, doc), loop_mask(kind, prefix, doc))


@given(packed_rows())
def test_predicate_matches_dense(rows):
    prefix, doc = rows
    B, S = prefix.shape
    b = torch.arange(B)[:, None, None]
    q = torch.arange(S)[None, :, None]
    k = torch.arange(S)[None, None, :]
    pred = mask_predicate("prefix_lm", prefix, doc)(b, q, k)
    assert torch.equal(pred[:, None], dense_mask("prefix_lm", B, S, prefix, doc))


def test_prefix_lm_examples():
    # one row: a 3-token instruction then a 2-token response
    prefix = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    m = dense_mask("prefix_lm", 1, 5, prefix)[0, 0]
    assert m[0, 2]  # an instruction token sees later instruction tokens
    assert not m[0, 3]  # ... but never the response
    assert m[4, 0] and m[4, 3] and m[4, 4] and not m[3, 4]  # the response is causal
    # without a prefix, prefix_lm is causal
    assert torch.equal(dense_mask("prefix_lm", 1, 5, None), dense_mask("causal", 1, 5, None))
