"""Prompts of different lengths in one left-padded batch, for specs whose depth varies per position:
halting heads (ut: ACT, ouro: the exit gate) and exit rules (huginn-tiny under `exit`). Each row decodes to
the tokens it decodes alone, each of its positions running the steps it runs alone, with the KV cache
and without; the padding's steps are not counted. Models in fp64, so no exit decision sits on a rounding
difference between a batch and a single row."""

from __future__ import annotations

import pytest
import torch
from greedy_oracle import left_pad

import hrmspec
from hrmspec.runtime.execution.depth import DecodeStats, DepthPolicy

SMALL = {"model.vocab": 64, "model.d_model": 32, "model.heads": 2, "model.ffn": 64, "model.max_seq_len": 64}
SPECS = {
    "ut": {},
    "ouro": {"model.modules.net.layers": 1},
    "huginn-tiny": {},
}
CASES = [  # (spec, generate's options)
    ("ut", {}),
    ("ouro", {}),
    ("ouro", {"threshold": 0.9}),
    ("huginn-tiny", {"exit": "kl:5e-2", "max_steps": 6}),
    ("huginn-tiny", {"exit": "argmax:2", "max_steps": 6, "warm_start": True}),
    ("huginn-tiny", {"exit": "latent:0.3", "max_steps": 6}),
]
PROMPTS = [[5, 9, 13, 2, 7, 7, 31, 4], [11, 3], [40, 41, 42, 43, 44], [17]]


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, over in SPECS.items():
        m = hrmspec.compile(name, overrides={**SMALL, **over})
        m.reset_parameters(seed=5)
        with torch.no_grad():  # sharper logits than at init: greedy choices without near ties
            m.embed.weight.mul_(6.0)
        out[name] = m.double().eval()
    return out


def alone(model, prompt: list[int], n: int, options: dict) -> tuple[list[int], dict]:
    """The tokens one prompt decodes to in a batch of its own, and generate's stats."""
    stats = DecodeStats()
    out = model.generate(torch.tensor([prompt]), n, stats=stats, init_scale=0.0, **options)
    return out[0, len(prompt):].tolist(), stats


RUNS = [pytest.param(spec, options, use_cache, id=f"{spec}-{'-'.join(map(str, options.values())) or 'spec'}-"
                                                   f"{'cache' if use_cache else 'recompute'}")
        for spec, options in CASES for use_cache in (True, False)
        if use_cache or not options.get("warm_start")]  # a warm start decodes with the KV cache only


@pytest.mark.parametrize(("spec", "options", "use_cache"), RUNS)
def test_a_padded_batch_decodes_each_row_as_alone(models, spec, options, use_cache):
    model, n = models[spec], 5
    ids, real = left_pad(PROMPTS, pad=63)
    stats = DecodeStats()
    out = model.generate(ids, n, attention_mask=real, stats=stats, init_scale=0.0, use_cache=use_cache, **options)
    # (an exit rule that reads logits peeks at them differently with and without the cache: compare like with like)
    want = [alone(model, p, n, {**options, "use_cache": use_cache}) for p in PROMPTS]
    for row, (tokens, _) in enumerate(want):
        assert out[row, ids.shape[1]:].tolist() == tokens, (spec, row)
    # the steps each real position ran, summed over the rows alone: the padding's are not counted
    for key in ("positions", "steps"):
        assert getattr(stats, key) == sum(getattr(s, key) for _, s in want), key
    for part in ("prompt", "decoded"):
        assert getattr(stats, part) == [sum(d) for d in zip(*(getattr(s, part) for _, s in want))], part
    assert stats.positions == sum(map(len, PROMPTS)) + len(PROMPTS) * (n - 1)
    depths = stats.prompt + stats.decoded
    assert sum(1 for d in depths if d) > 1 or options.get("exit") is None, "every position ran one depth"


def test_the_padding_token_does_not_matter(models):
    ids, real = left_pad(PROMPTS, pad=0)
    a = models["ouro"].generate(ids, 4, attention_mask=real, init_scale=0.0)
    b = models["ouro"].generate(ids.masked_fill(real == 0, 50), 4, attention_mask=real, init_scale=0.0)
    assert torch.equal(a[:, ids.shape[1]:], b[:, ids.shape[1]:])


@pytest.mark.parametrize(("spec", "options"), [("hrm-text-tiny", {}), ("ut", {}), ("ouro", {}),
                                               ("huginn-tiny", {"exit": "latent:0.3", "max_steps": 6})])
def test_the_head_runs_on_the_last_position_only(models, spec, options, monkeypatch):
    """A prefill of B x S tokens never makes (B, S, vocab) logits: the head reads one position per row
    (criteria that read logits peek at every position; `latent` does not)."""
    model = models.get(spec) or hrmspec.compile(spec, overrides=SMALL).eval()
    shapes = []
    head = model.logits_of

    def recorded(h):
        shapes.append(tuple(h.shape))
        return head(h)

    monkeypatch.setattr(model, "logits_of", recorded)
    ids, real = left_pad(PROMPTS, pad=63)
    out = model.generate(ids.clone(), 3, attention_mask=real, init_scale=0.0, **options)
    assert out.shape == (len(PROMPTS), ids.shape[1] + 3)
    assert shapes, "the head never ran: nothing was checked"
    positions = [s[1] if len(s) == 3 else 1 for s in shapes]
    assert max(positions) == 1, shapes


def test_eval_batches_fit_the_logits_an_exit_criterion_peeks_at(models, monkeypatch):
    """Under an exit criterion that reads logits, held-out decoding puts fewer rows in a batch when rows x
    width x vocab would pass its budget, and decodes the same responses; other criteria keep full batches."""
    from hrmspec.runtime.evaluate import heldout

    model = models["huginn-tiny"]
    prompts = [p * k for p in PROMPTS for k in (1, 2)]  # 1-16 tokens
    batches = []
    generate = model.generate

    def recorded(ids, *args, **kwargs):
        batches.append(ids.shape)
        return generate(ids, *args, **kwargs)

    monkeypatch.setattr(model, "generate", recorded)
    options = {"exit": "kl:5e-2", "max_steps": 6, "init_scale": 0.0}
    full = heldout.decode_responses(model, prompts, 4, None, depth=DepthPolicy(**options))
    assert [b[0] for b in batches] == [len(prompts)]
    batches.clear()
    width, vocab = max(map(len, prompts)), model.spec.model.vocab
    monkeypatch.setattr(heldout, "PEEK_BYTES", 3 * width * vocab * heldout.PEEK_COPIES * 4)  # three widest rows
    assert heldout.decode_responses(model, prompts, 4, None, depth=DepthPolicy(**options)) == full
    assert max(b[0] for b in batches) <= 3 * width // min(b[1] for b in batches) and len(batches) > 1, batches
    assert all(b[0] * b[1] <= 3 * width for b in batches), batches  # rows x width within the budget
    batches.clear()
    heldout.decode_responses(model, prompts, 4, None,
                             depth=DepthPolicy(exit="latent:0.3", max_steps=6, init_scale=0.0))
    assert [b[0] for b in batches] == [len(prompts)]  # latent reads the states, not logits
