"""`hrmspec.graph.analyse`'s activation-memory estimate against what autograd really keeps."""

import itertools

import pytest
import torch

import hrmspec
from hrmspec.graph import analyse, build_graph
from hrmspec.spec import load_spec_text


def _saved_bytes(model, ids, labels, prefix, return_logits: bool) -> int:
    """Unique storages autograd keeps for backward over one training forward, parameters excluded."""
    params = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, prefix_mask=prefix, labels=labels, return_logits=return_logits)
    return sum(storages.values())


BLOCKS = {
    "pre-gated-swiglu": {},
    "post-gelu": {"model.block.norm.place": "post", "model.block.mlp": "gelu"},
    "sandwich-plain": {"model.block.norm.place": "sandwich", "model.block.attention.type": "plain"},
}


@pytest.mark.parametrize("logits", [False, True], ids=["chunked-loss", "full-logits"])
@pytest.mark.parametrize("credit", [{"last": 1}, {"last": 3}, "none"], ids=["last1", "last3", "full-backprop"])
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_activation_estimate_is_within_ten_percent_of_what_autograd_keeps(tiny_text, block, credit, logits):
    over = {"model.credit": credit, "model.vocab": 1000, "model.d_model": 64, "model.ffn": 160, **BLOCKS[block]}
    spec = load_spec_text(tiny_text, overrides=over)
    torch.manual_seed(0)
    model = hrmspec.compile(spec)
    B, S = 4, 64
    ids = torch.randint(0, 1000, (B, S))
    prefix = torch.zeros(B, S, dtype=torch.bool)
    prefix[:, :20] = True
    labels = torch.where(prefix, -100, ids)
    measured = _saved_bytes(model, ids, labels, prefix, return_logits=logits)
    estimate = analyse(build_graph(spec), seq_len=S, dtype_bytes=4, logits=logits).activation_bytes_per_token * B * S
    assert abs(estimate - measured) / measured < 0.10, (estimate, measured)
