"""The mask description (`hrmspec.mask`): the predicate, `Mask.dense` and the printed predicate
against loops over (batch, query, key); the block states' soundness against the dense mask."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mask_oracle import assert_sound, block_reduce, cases

from hrmspec.mask import FULL, KINDS, PARTIAL, SKIP, Mask, Sym, allowed, block_states, print_predicate

OFFSETS = (0, 1, 5, 40)


@given(cases(seq_lens=(1, 2, 9, 24), batch=(1, 3), offsets=OFFSETS, prefix_none=True))
def test_dense_matches_loops(case):
    assert torch.equal(case.mask.dense(case.q_len, batch=case.batch), case.loop())


@given(cases(seq_lens=(1, 9, 24), batch=(1, 3), sorted_docs=False, offsets=OFFSETS))
def test_dense_matches_loops_for_any_doc_ids_and_prefix_bits(case):
    assert torch.equal(case.mask.dense(case.q_len), case.loop())


@given(cases(seq_lens=(1, 9, 24), batch=(1, 3)))
def test_predicate_on_broadcast_index_tensors(case):
    """`allowed` over (b, q, k) index tensors, FlexAttention's mask_mod convention."""
    B, S = case.batch, case.q_len
    b, q, k = torch.arange(B)[:, None, None], torch.arange(S)[None, :, None], torch.arange(S)[None, None, :]
    pre = None if case.prefix is None else (case.prefix[b, q], case.prefix[b, k])
    doc = None if case.doc is None else (case.doc[b, q], case.doc[b, k])
    got = allowed(case.kind, q, k, pre, doc, case.window).expand(B, S, S)
    assert torch.equal(got[:, None], case.loop())


@given(cases(seq_lens=(1, 9, 24), batch=(1, 2), offsets=OFFSETS))
def test_printed_predicate_means_what_torch_evaluates(case):
    """The text the Triton template gets, evaluated with torch tensors bound to its names."""
    text = print_predicate(case.kind, case.doc is not None, case.window)
    q = case.q_offset + torch.arange(case.q_len)[None, :, None]
    k = torch.arange(case.k_len)[None, None, :]
    prefix = torch.zeros(case.batch, case.k_len, dtype=torch.bool) if case.prefix is None else case.prefix
    doc = torch.zeros(case.batch, case.k_len, dtype=torch.long) if case.doc is None else case.doc
    names = {"q_pos": q, "k_pos": k, "q_pre": prefix[:, q[0, :, 0], None], "k_pre": prefix[:, None, :],
             "q_doc": doc[:, q[0, :, 0], None], "k_doc": doc[:, None, :]}
    got = eval(compile(text, "<predicate>", "eval"), {"__builtins__": {}}, names)  # our own printed text
    assert torch.equal(got.expand(case.batch, case.q_len, case.k_len)[:, None], case.loop())


def test_printed_predicates():
    assert print_predicate("causal") == "(k_pos <= q_pos)"
    assert print_predicate("prefix_lm", documents=True) == "(((k_pos <= q_pos) | (q_pre & k_pre)) & (q_doc == k_doc))"
    assert print_predicate("bidirectional") == "((q_pos >= 0) & (k_pos >= 0))"
    assert print_predicate("bidirectional", window=3) == "(((q_pos - k_pos) < 3) & ((k_pos - q_pos) < 3))"


def test_symbols_refuse_truth_values_and_foreign_operands():
    with pytest.raises(TypeError, match="no truth value"):
        bool(Sym("q_pos") <= Sym("k_pos"))
    with pytest.raises(TypeError, match="not 1.5"):
        _ = Sym("q_pos") < 1.5


def test_prefix_lm_examples():
    # one row: a 3-token instruction then a 2-token response
    prefix = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    m = Mask("prefix_lm", prefix).dense()[0, 0]
    assert m[0, 2]  # an instruction token sees later instruction tokens
    assert not m[0, 3]  # ... but never the response
    assert m[4, 0] and m[4, 3] and m[4, 4] and not m[3, 4]  # the response is causal
    # without a prefix, prefix_lm is causal
    assert torch.equal(Mask("prefix_lm").dense(5), Mask("causal").dense(5))


def test_decoding_queries_see_every_cached_key():
    m = Mask("causal", q_offset=4).dense(2, batch=3)
    assert m.shape == (3, 1, 2, 6)
    assert m[:, :, 0, :5].all() and not m[:, :, 0, 5].any() and m[:, :, 1].all()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown mask kind 'causl'"):
        Mask("causl")
    with pytest.raises(ValueError, match="window must be a positive integer"):
        Mask("causal", window=0)
    with pytest.raises(ValueError, match="q_offset must be a non-negative"):
        Mask("causal", q_offset=-1)
    with pytest.raises(ValueError, match="one shape"):
        Mask("prefix_lm", torch.zeros(2, 5, dtype=torch.bool), torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="need 7 keys, got 6"):
        Mask("causal", q_offset=4).check(1, 3, 6)
    with pytest.raises(ValueError, match=r"per-token tensors are \(2, 5\), expected \(batch 2, keys 6\)"):
        Mask("causal", doc=torch.zeros(2, 5, dtype=torch.long)).check(2, 6, 6)
    with pytest.raises(ValueError, match="give q_len"):
        Mask("causal").dense()


# -- block states -------------------------------------------------------------------------------------------
@settings(max_examples=200)
@given(case=cases(seq_lens=(1, 5, 31, 64, 97, 130), batch=(1, 3), sorted_docs=False, offsets=(0, 3, 50)),
       bm=st.sampled_from((8, 16, 32, 64)), bn=st.sampled_from((8, 16, 32, 64)))
def test_block_states_never_skip_an_allowed_element(case, bm, bn):
    states = block_states(case.mask, case.q_len, case.k_len, bm, bn)
    assert states.shape[0] in (1, case.batch) and states.dtype == torch.int8
    assert_sound(case.mask.dense(case.q_len, batch=case.batch), states, bm, bn)  # dense: held to the loops above


@settings(max_examples=100)
@given(case=cases(seq_lens=(1, 5, 31, 64, 97, 130), batch=(1, 3), windows=False), bm=st.sampled_from((8, 16, 32)),
       bn=st.sampled_from((8, 16, 32)))
def test_block_states_are_exact_for_packed_documents(case, bm, bn):
    # doc ids increase along the row (no padding) and prefixes lead their documents: then the block
    # summaries lose nothing, and a block is skipped exactly when the dense mask is empty there
    if case.doc is not None:
        case.doc = torch.where(case.doc < 0, case.doc.max() + 1, case.doc)
    states = block_states(case.mask, case.q_len, case.k_len, bm, bn).expand(case.batch, -1, -1)
    any_, all_ = block_reduce(case.mask.dense(case.q_len, batch=case.batch)[:, 0], bm, bn)
    assert torch.equal(states != SKIP, any_)
    if case.kind != "prefix_lm":  # prefix_lm marks a block full only if one rule covers all of it
        assert torch.equal(states == FULL, all_)


def test_skipped_block_counts():
    S, tile = 100, 16  # 7 x 7 blocks
    count = {}
    for name, mask in [("causal", Mask("causal")), ("bidirectional", Mask("bidirectional")),
                       ("window", Mask("causal", window=16)), ("docs", Mask("causal", doc=torch.arange(S)[None] // 40)),
                       ("decoding", Mask("causal", q_offset=84))]:
        states = block_states(mask, S - mask.q_offset, S, tile, tile)
        count[name] = (int((states == PARTIAL).sum()), int((states == FULL).sum()))
    assert count["causal"] == (7, 21)  # the diagonal is partial, the 21 blocks below it are full
    assert count["bidirectional"] == (0, 49)
    assert count["window"] == (13, 0)  # the diagonal and the first sub-diagonal
    # documents [0, 40), [40, 80), [80, 100): blocks 0, 1 | 3, 4 | 5, 6, and block 2 holds documents 0 and 1;
    # partial: the diagonal and (2, 0), (2, 1), (3, 2), (4, 2); full: (1, 0), (4, 3), (6, 5); 14 of 28 causal
    assert count["docs"] == (7 + 4, 3)
    # 16 queries at positions 84..99, one query block: keys 0..79 full, the blocks of 80..99 partial
    assert count["decoding"] == (2, 5)


def test_states_are_memoised_per_mask():
    mask = Mask("prefix_lm", torch.zeros(2, 40, dtype=torch.bool))
    assert mask.states(40, 40, 16, 16) is mask.states(40, 40, 16, 16)
    assert Mask("prefix_lm", mask.prefix).states(40, 40, 16, 16) is not mask.states(40, 40, 16, 16)


@pytest.mark.parametrize("kind", KINDS)
def test_a_mask_without_tokens_has_one_row_of_states(kind):
    states = block_states(Mask(kind), 33, 33, 16, 8)
    assert states.shape == (1, 3, 5)
