"""The reference runtime: block gradients, credit-plan gradient flow, unrolling, packing, generation."""

import pytest
import torch
from greedy_oracle import greedy_loop, stopped_at
from hypothesis import given
from hypothesis import strategies as st

import hrmspec
from hrmspec.backends import get_backend
from hrmspec.graph.plan import module_plan
from hrmspec.mask import Mask
from hrmspec.runtime.execution import Context, ModuleStack
from hrmspec.spec import load_spec_text

ops = get_backend("reference")


def compile_text(text, **overrides):
    return hrmspec.compile(load_spec_text(text, overrides=overrides or None))


@pytest.mark.parametrize("place", ["pre", "post", "sandwich"])
@pytest.mark.parametrize("attn,mlp,affine", [("gated", "swiglu", False), ("plain", "gelu", True)])
def test_block_gradcheck_float64(tiny_text, place, attn, mlp, affine):
    torch.manual_seed(0)
    spec = load_spec_text(tiny_text, overrides={
        "model.d_model": 8, "model.heads": 2, "model.ffn": 12, "model.modules.L.layers": 1,
        "model.modules.L.exit_norm": "none", "model.block.mlp": mlp, "model.block.attention.type": attn,
        "model.block.norm": {"eps": 1e-6, "affine": affine, "place": place}})
    block = ModuleStack("L", *module_plan(spec.model.module("L"), spec.model), ops).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, 1.0 if p.dim() == 1 else 0.0, 0.3)
    B, S = 2, 5
    prefix = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    cos, sin = ops.rope_tables(torch.arange(S).expand(B, S), 4, 10000.0, torch.float64)
    ctx = Context(mask={"prefix_lm": Mask("prefix_lm", prefix)}, rope={10000.0: (cos, sin)})
    x = torch.randn(B, S, 8, dtype=torch.float64, requires_grad=True)
    params = [p for p in block.parameters()]

    names = [n for n, _ in block.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), ([x], ctx))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def test_credit_depth_controls_gradient_reach(tiny_text):
    torch.manual_seed(0)
    model = compile_text(tiny_text)
    ids = torch.randint(0, 61, (2, 12))
    labels = torch.randint(0, 61, (2, 12))
    grads = {}
    for progress in (0.0, 0.1):  # depth 2 (H 1, L 1) and depth 3 (H 2, L 1)
        model.zero_grad(set_to_none=True)
        model.set_progress(progress)
        model(ids, labels=labels).loss.backward()
        grads[model.credit_depth] = model.embed.weight.grad
    # at depth 2 the only H call with gradient reads z_H from a no-grad H call: the embedding,
    # reachable only through no-grad calls, gets exactly no gradient
    assert grads[2] is None
    assert grads[3] is not None and grads[3].abs().sum() > 0


SCAN = """
model:
  vocab: 37
  d_model: 16
  heads: 2
  ffn: 24
  modules: {L: {layers: 1}}
  states: {z: {init: buffer}}
  schedule: [{repeat: 5, do: ["z = L(z + x)"]}]
  output: z
  credit: {last: 2}
"""


def manual_forward(model, ids, labels, detach_before):
    """The same computation with every call tracked, detaching the outputs of early calls."""
    B, S = ids.shape
    ctx = model.context(B, S, None, None, None)
    x = model.embed(ids) * model.embed_scale
    z = model.init_z.expand_as(x)
    for i in range(5):
        z = model.stacks["L"](z + x, ctx)
        if i < detach_before:
            z = z.detach()
    logits = model.head(z)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def test_no_grad_calls_equal_detached_boundary():
    torch.manual_seed(1)
    model = compile_text(SCAN)
    ids, labels = torch.randint(0, 37, (2, 7)), torch.randint(0, 37, (2, 7))
    model(ids, labels=labels).loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    manual_forward(model, ids, labels, detach_before=3).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)
    # and full backprop differs (the credit plan really cuts the graph)
    model.zero_grad(set_to_none=True)
    manual_forward(model, ids, labels, detach_before=0).backward()
    assert not torch.allclose(ours["embed.weight"], model.embed.weight.grad)


def test_unrolled_repeat_equals_written_out_steps():
    torch.manual_seed(2)
    a = compile_text(SCAN)
    written = SCAN.replace('[{repeat: 5, do: ["z = L(z + x)"]}]', "[" + ", ".join(['"z = L(z + x)"'] * 5) + "]")
    b = compile_text(written)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 37, (3, 9))
    torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3))
def test_packed_row_equals_samples_run_alone(lengths):
    """Packing with doc_ids and restarting positions must not let samples see each other."""
    torch.manual_seed(3)
    model = test_packed_row_equals_samples_run_alone.model
    ids, prefix, doc, pos, pieces = [], [], [], [], []
    for d, (p, r) in enumerate(lengths):
        t = torch.randint(0, 61, (p + r,))
        pieces.append((t, p))
        ids.append(t)
        prefix.append(torch.arange(p + r) < p)
        doc.append(torch.full((p + r,), d))
        pos.append(torch.arange(p + r))
    cat = lambda xs: torch.cat(xs)[None]  # noqa: E731
    packed = model(cat(ids), prefix_mask=cat(prefix), doc_ids=cat(doc), position_ids=cat(pos)).logits[0]
    start = 0
    for t, p in pieces:
        alone = model(t[None], prefix_mask=(torch.arange(len(t)) < p)[None]).logits[0]
        torch.testing.assert_close(packed[start : start + len(t)], alone, rtol=1e-4, atol=1e-5)
        start += len(t)


def test_generate_cache_matches_recompute_and_the_greedy_loop(tiny_text, one_thread):
    torch.manual_seed(4)
    model = compile_text(tiny_text).eval()
    prompt = torch.randint(0, 61, (3, 6))
    prefix = torch.ones_like(prompt, dtype=torch.bool)
    prefix[:, -1] = False  # the last prompt token starts the response (causal)
    a = model.generate(prompt, 8, prefix_mask=prefix)
    b = model.generate(prompt, 8, prefix_mask=prefix, use_cache=False)
    want, gap = greedy_loop(model, prompt, 8, prefix)
    assert gap > 1e-4  # no near tie: the argmax is the same under any summation order
    assert a.shape == (3, 14)
    assert torch.equal(a, want) and torch.equal(b, want)


def test_generate_stops_at_eos_where_the_greedy_loop_says(tiny_text, one_thread):
    torch.manual_seed(5)
    model = compile_text(tiny_text).eval()
    prompt = torch.randint(0, 61, (3, 4))
    stream, gap = greedy_loop(model, prompt, 6)
    assert gap > 1e-4
    # eos ids chosen from the loop's stream, one per way of stopping it gives (rows stopping at different
    # steps or not at all), two of them, and an id it never emits
    ways: dict[tuple, int] = {}
    for eos in sorted(set(stream[:, 4:].flatten().tolist())):
        ways.setdefault(tuple(stopped_at(stream, 4, eos)[:, 4:].eq(eos).sum(1).tolist()), eos)
    assert len(ways) >= 2
    never = next(t for t in range(61) if t not in stream[:, 4:])
    for i, eos in enumerate([*list(ways.values())[:2], never]):
        want = stopped_at(stream, 4, eos)
        for use_cache in (True, False) if i == 0 else (True,):  # cache against recompute: the test above
            assert torch.equal(model.generate(prompt, 6, eos_id=eos, use_cache=use_cache), want), (eos, use_cache)


def test_loss_ignores_masked_labels(tiny_text):
    torch.manual_seed(6)
    model = compile_text(tiny_text)
    ids = torch.randint(0, 61, (2, 8))
    labels = torch.randint(0, 61, (2, 8))
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 61), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    assert int(out.n_tokens) == 10


test_packed_row_equals_samples_run_alone.model = None


@pytest.fixture(autouse=True)
def _packed_model(tiny_text):
    if test_packed_row_equals_samples_run_alone.model is None:
        torch.manual_seed(7)
        test_packed_row_equals_samples_run_alone.model = compile_text(tiny_text).eval()
