"""The decode loop on the static cache (runtime/execution/decode.py): the same tokens as re-running the
whole sequence every step, prompts of different lengths in one left-padded batch giving each row what it
gives alone, learned positions, the compiled step, and what it refuses."""

from __future__ import annotations

import pytest
import torch
from greedy_oracle import left_pad
from hypothesis import given, settings
from hypothesis import strategies as st

import hrmspec
from hrmspec.backends import REGISTRY
from hrmspec.runtime.execution.depth import DepthPolicy

SMALL = {"model.vocab": 64, "model.d_model": 32, "model.heads": 2, "model.ffn": 64, "model.max_seq_len": 64,
         "model.modules": {"L": {"layers": 1}, "H": {"layers": 1}}}


@pytest.fixture(scope="module")
def model():
    m = hrmspec.compile("hrm-text-tiny", overrides=SMALL).eval()
    m.reset_parameters(seed=3)
    with torch.no_grad():  # sharper logits than at init: greedy choices without near ties
        m.embed.weight.mul_(8.0)
    return m


def full_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding the slow way: the whole sequence through the model for every new token."""
    ids = torch.tensor([prompt])
    for _ in range(n):
        prefix = torch.zeros_like(ids, dtype=torch.bool)
        prefix[:, : len(prompt)] = True
        logits = model(ids, prefix_mask=prefix).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), n=st.integers(1, 6), seed=st.integers(0, 999),
       pad=st.integers(0, 63))
def test_left_padded_prompts_decode_as_each_alone(model, lengths, n, seed, pad):
    """Each row of a batch of prompts of different lengths decodes to what the full-sequence loop gives it
    alone, whatever token the padding holds."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 64, (k,), generator=gen).tolist() for k in lengths]
    ids, real = left_pad(prompts, pad)
    with torch.no_grad():
        out = model.generate(ids, n, attention_mask=real)
    assert out.shape == (len(prompts), ids.shape[1] + n)
    for row, p in enumerate(prompts):
        assert out[row, ids.shape[1]:].tolist() == full_greedy(model, p, n), (row, p)


def test_the_static_cache_decodes_as_the_recompute_loop_with_eos(model):
    """Equal-length prompts: the static cache, the uncached recompute and an independent loop agree, and a row
    stops at an eos chosen by the test (not read off the output) and is padded with it after."""
    prompts = [[5, 9, 2, 7], [1, 1, 3, 60], [33, 4, 4, 8]]
    ids = torch.tensor(prompts)
    want = [full_greedy(model, p, 8) for p in prompts]
    eos = want[1][2]  # row 1 stops after its 3rd token; the others stop where (if ever) they produce it
    with torch.no_grad():
        fast = model.generate(ids, 8, eos_id=eos)
        slow = model.generate(ids, 8, eos_id=eos, use_cache=False)
    assert torch.equal(fast, slow)
    for row, tokens in enumerate(want):
        cut = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        got = fast[row, 4:].tolist()
        assert got[:cut] == tokens[:cut] and all(t == eos for t in got[cut:]), (row, got, tokens)
    assert fast.shape[1] <= 4 + 8


def test_learned_positions_decode_at_their_positions():
    """A spec with a learned position table: each decoded token embeds its own position, not position 0."""
    m = hrmspec.compile("hrm-text-tiny", overrides={**SMALL, "model.positions": "learned"}).eval()
    m.reset_parameters(seed=1)
    with torch.no_grad():
        m.positions.weight.mul_(20.0)  # positions that decide the argmax
        prompts = [[3, 4, 5], [9, 9, 1]]
        got = m.generate(torch.tensor(prompts), 5)
        slow = m.generate(torch.tensor(prompts), 5, use_cache=False)
    for row, p in enumerate(prompts):
        assert got[row, 3:].tolist() == full_greedy(m, p, 5)
    assert torch.equal(slow, got)


@pytest.mark.skipif(bool(REGISTRY["inductor"].missing()), reason=REGISTRY["inductor"].missing())
def test_the_compiled_step_decodes_the_same_tokens(model):
    ids, real = left_pad([[4, 5, 6, 7, 8], [9, 10]])
    with torch.no_grad():
        eager = model.generate(ids, 6, attention_mask=real)
        compiled = model.generate(ids, 6, attention_mask=real, compile=True)
    assert torch.equal(compiled, eager)


def test_compiled_decoding_builds_a_few_programs_for_many_shapes(monkeypatch):
    """Batches of neighbouring prompt lengths share one compiled step: the cache is rounded up to a bucket,
    programs are kept from one `generate` to the next, and a size that changes becomes a variable of the
    next program, so many shapes build a few programs. Counted with a backend that records every program
    dynamo builds (and runs it as captured), so the tokens must also equal eager decoding."""
    from torch._dynamo.testing import CompileCounter

    from hrmspec.runtime.evaluate.heldout import decode_responses
    from hrmspec.runtime.execution import decode

    m = hrmspec.compile("hrm-text-tiny", overrides={**SMALL, "model.max_seq_len": 160}).eval()
    m.reset_parameters(seed=5)
    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real_compile(fn, **options, backend=counter))
    decode.compiled_step.cache_clear()
    torch._dynamo.reset()
    try:
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 64, (k,), generator=gen).tolist() for k in range(2, 42, 2)]  # 20 prompts
        with torch.no_grad():
            eager = decode_responses(m, prompts, 8, None, batch_size=8)
            compiled = decode_responses(m, prompts, 8, None, batch_size=8, depth=DepthPolicy(compile=True))
            assert compiled == eager
            assert counter.frame_count == 2  # batches of 8, 8 and 4 rows, every width + 8 within one bucket
            longer = [torch.randint(0, 64, (k,), generator=gen).tolist() for k in (60, 70, 80)]
            assert decode_responses(m, longer, 8, None, batch_size=8, depth=DepthPolicy(compile=True)) == \
                decode_responses(m, longer, 8, None, batch_size=8)
            assert counter.frame_count == 3  # 88 positions: the next bucket, its length a variable now
            for rows in range(1, 6):  # 11 (batch, bucket) shapes in all: past dynamo's recompile limit of 8
                for width in (10, 70):
                    batch = [torch.randint(0, 64, (width,), generator=gen).tolist() for _ in range(rows)]
                    decode_responses(m, batch, 8, None, batch_size=rows, depth=DepthPolicy(compile=True))
            assert counter.frame_count == 4  # one program more, for 1 row: dynamo specializes a size of 1
    finally:
        decode.compiled_step.cache_clear()
        torch._dynamo.reset()


def test_compiled_decoding_refuses_a_depth_per_position(model):
    """The compiled step runs the static cache's fixed unrolling: halting per step, an exit criterion and
    decoding without a cache are refused, naming why, instead of decoding uncompiled."""
    ids = torch.tensor([[1, 2, 3]])
    ut = hrmspec.compile("ut", overrides={"model.vocab": 64, "model.d_model": 32, "model.heads": 2,
                                          "model.ffn": 64, "model.max_seq_len": 64}).eval()
    for m, options, why in ((ut, {}, "the loop halts per step"),
                            (model, {"use_cache": False}, "use_cache=False"),
                            (model, {"exit": "kl:1e-3"}, r"an exit criterion \(kl:1e-3\)")):
        with pytest.raises(ValueError, match=f"compiled decoding runs a schedule with a fixed unrolling.*{why}"):
            m.generate(ids, 2, compile=True, **options)


def test_padding_on_the_right_is_refused(model):
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    with pytest.raises(ValueError, match="pad prompts on the left"):
        model.generate(ids, 2, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
