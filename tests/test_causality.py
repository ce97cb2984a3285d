"""No position sees the future: for every shipped text spec and every attention type, changing a response
token never moves the logits of any position before it (the instruction's and the earlier response's), in
the training forward, at inference with the spec's halting, and token by token with the KV cache. A token
MLP, which mixes every position of a row, is refused under a text objective before anything runs
(hrmspec/capabilities.py)."""

from __future__ import annotations

import json

import pytest
import torch

import hrmspec
from hrmspec.capabilities import ATTENTION, TEXT_OBJECTIVES, refusal
from hrmspec.errors import SpecError
from hrmspec.spec import load_spec, load_spec_text, shipped_specs_dir

TEXT = sorted(p.stem for p in shipped_specs_dir().glob("*.yaml")
              if load_spec(p.stem).objective.type in TEXT_OBJECTIVES)
S, PREFIX = 9, 4  # a row of 9 tokens, the first 4 the instruction


def small(name: str, attention: str):
    """Spec `name` at a few thousand parameters with every module's attention of type `attention`."""
    raw = json.loads(json.dumps(load_spec(name).raw))
    m = raw["model"]
    m.update(d_model=16, heads=2, vocab=37, max_seq_len=32)
    m.pop("embed_scale", None)
    if "ffn" in m:
        m["ffn"] = 24
    m.setdefault("block", {}).setdefault("attention", {})["type"] = attention
    if attention == "token_mlp":  # its width over the positions
        m["block"]["attention"]["ffn"] = 16
    for mod in m["modules"].values():
        mod["layers"] = 1
        mod.get("attention", {}).pop("type", None)
    raw.pop("extends", None)
    for key in ("data", "train"):
        raw.pop(key, None)
    return load_spec_text(json.dumps(raw))


def _model(spec):
    model = hrmspec.compile(spec)
    model.reset_parameters(seed=0)
    with torch.no_grad():  # heads and gates away from their zero init, so every path carries signal
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model.eval()


def _logits(model, ids, prefix):
    torch.manual_seed(0)  # random initial states: the same draws for both rows
    with torch.no_grad():
        return model(ids, prefix_mask=prefix).logits


@pytest.mark.parametrize("attention", [a for a, k in ATTENTION.items() if k.causal_safe])
@pytest.mark.parametrize("name", TEXT)
def test_a_later_token_never_moves_an_earlier_position(name, attention):
    model = _model(small(name, attention))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 37, (1, S), generator=gen)
    prefix = torch.arange(S)[None] < PREFIX
    base = _logits(model, ids, prefix)
    for j in range(PREFIX, S):  # a response token changed: nothing before it may move
        changed = ids.clone()
        changed[0, j] = (ids[0, j] + 1 + int(torch.randint(0, 35, (1,), generator=gen))) % 37
        got = _logits(model, changed, prefix)
        torch.testing.assert_close(got[:, :j], base[:, :j], rtol=0, atol=0, msg=lambda m, j=j: f"token {j}: {m}")
        assert not torch.equal(got[:, j:], base[:, j:]), f"token {j} changed nothing at or after it"


@pytest.mark.parametrize("name", TEXT)
def test_decoding_with_the_cache_sees_what_the_whole_row_sees(name):
    """Greedy decoding with the KV cache, token by token, equals decoding by re-running the whole sequence:
    what a decoded token reads from the cache is what a causal row would show it."""
    spec = small(name, "gated")
    if refusal(spec, "decode"):
        pytest.skip(refusal(spec, "decode"))
    model = _model(spec)
    ids = torch.randint(1, 37, (2, 5), generator=torch.Generator().manual_seed(2))
    if any(s.init == "random" for s in spec.model.states):  # a fresh draw per forward: compare at zero
        kw = {"init_scale": 0.0}
    else:
        kw = {}
    a = model.generate(ids, 6, use_cache=True, **kw)
    b = model.generate(ids, 6, use_cache=False, **kw)
    assert torch.equal(a, b), (a.tolist(), b.tolist())


@pytest.mark.parametrize("name", TEXT)
def test_a_token_mlp_under_a_text_objective_is_refused_at_its_place(name):
    with pytest.raises(SpecError, match="a token_mlp mixes every position .* the tokens it learns to predict"):
        small(name, "token_mlp")


@pytest.mark.parametrize("name", TEXT)
def test_a_bidirectional_mask_under_a_text_objective_is_refused(name):
    raw = json.loads(json.dumps(load_spec(name).raw))
    raw.pop("extends", None)
    raw["model"].setdefault("block", {}).setdefault("attention", {})["mask"] = "bidirectional"
    for mod in raw["model"]["modules"].values():
        mod.get("attention", {}).pop("mask", None)
    with pytest.raises(SpecError, match="under mask 'bidirectional' every position sees the token it predicts"):
        load_spec_text(json.dumps(raw))
