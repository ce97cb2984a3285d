"""Huginn checkpoints as released (`model_type: huginn_raven`): read into a spec, the same logits as a
reference of the official forward written here, written back bit for bit, remote code never run."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import rel_rms
from safetensors.torch import load_file, save_file

import hrmspec
from hrmspec.errors import CheckpointError


def config(d=16, heads=2, ffn=24, vocab=48, prelude=1, core=2, coda=1, mean=4, backprop=2, **extra):
    """A config.json as RavenConfig writes it (the keys the released checkpoints carry)."""
    return {"architectures": ["RavenForCausalLM"], "model_type": "huginn_raven", "n_embd": d,
            "num_attention_heads": heads, "num_key_value_heads": heads, "intermediate_size": ffn,
            "vocab_size": vocab, "padded_vocab_size": vocab, "block_size": 64, "tie_embeddings": True,
            "bias": False, "block_class_name": "SandwichBlock", "norm_class_name": "RMSNorm_llama",
            "norm_eps": 1e-6, "mlp_class_name": "GatedMLP", "nonlin_name": "SiLU", "init_strategy": "takase",
            "state_init": "like-init", "injection_type": "linear", "n_layers_in_recurrent_block": core,
            "mean_recurrence": mean, "sampling_scheme": "poisson-lognormal-filling",
            "mean_backprop_depth": backprop, "n_layers_in_prelude": prelude, "n_layers_in_coda": coda,
            "qk_bias": True, "rope_base": 50000, "auto_map": {"AutoModelForCausalLM": "raven_modeling_minimal.X"},
            **extra}


def official_tensors(cfg, seed=0):
    """Random tensors under the official names and shapes (RavenForCausalLM's state dict)."""
    g = torch.Generator().manual_seed(seed)
    d, h, f, V = cfg["n_embd"], cfg["num_attention_heads"], cfg["intermediate_size"], cfg["vocab_size"]

    def w(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    def norm():
        return 1 + 0.2 * torch.randn(d, generator=g)

    T = {"transformer.wte.weight": torch.randn(V, d, generator=g), "transformer.adapter.weight": w(d, 2 * d),
         "transformer.ln_f.weight": norm(), "freqs_cis": torch.randn(1, 64, 1, d // h // 2, 2)}
    for stage, n in (("prelude", cfg["n_layers_in_prelude"]), ("core_block", cfg["n_layers_in_recurrent_block"]),
                     ("coda", cfg["n_layers_in_coda"])):
        for i in range(n):
            p = f"transformer.{stage}.{i}."
            T.update({p + f"norm_{j}.weight": norm() for j in (1, 2, 3, 4)})
            T[p + "attn.Wqkv.weight"] = w(3 * d, d)
            T[p + "attn.qk_bias"] = 0.5 * torch.randn(2, 1, h, d // h, generator=g)
            T[p + "attn.proj.weight"] = w(d, d)
            T[p + "mlp.fc.weight"] = w(2 * f, d)
            T[p + "mlp.proj.weight"] = w(d, f)
    return T


def reference_logits(T, cfg, ids, num_steps):
    """The official forward with a zero initial state (init_scale=0), in float64: SandwichBlocks, q/k
    biases, rotary embeddings over interleaved pairs, the adapter on [x; e], ln_f twice, tied head."""
    T = {k: v.double() for k, v in T.items()}
    d, h, eps, theta = cfg["n_embd"], cfg["num_attention_heads"], cfg["norm_eps"], cfg["rope_base"]
    hd = d // h
    B, S = ids.shape
    # the rotary table in float32, as precompute_freqs_cis makes it; the rest in float64
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.outer(torch.arange(S, dtype=torch.float32), inv)[None, :, None, :]
    cos, sin = ang.cos().double(), ang.sin().double()

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotate(x):  # pairs (2i, 2i + 1) as complex numbers times e^{i t theta_i}
        a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)

    def block(p, x):
        q, k, v = (rms(x, T[p + "norm_1.weight"]) @ T[p + "attn.Wqkv.weight"].T).split(d, -1)
        q, k, v = (t.view(B, S, h, hd) for t in (q, k, v))
        bias = T[p + "attn.qk_bias"]
        q, k = rotate(q + bias[0]), rotate(k + bias[1])
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = rms(y.transpose(1, 2).reshape(B, S, d) @ T[p + "attn.proj.weight"].T + x, T[p + "norm_2.weight"])
        gate, up = (rms(x, T[p + "norm_3.weight"]) @ T[p + "mlp.fc.weight"].T).chunk(2, -1)
        return rms((F.silu(gate) * up) @ T[p + "mlp.proj.weight"].T + x, T[p + "norm_4.weight"])

    e = T["transformer.wte.weight"][ids] * math.sqrt(d)
    for i in range(cfg["n_layers_in_prelude"]):
        e = block(f"transformer.prelude.{i}.", e)
    x = torch.zeros_like(e)
    for _ in range(num_steps):
        x = torch.cat([x, e], -1) @ T["transformer.adapter.weight"].T
        for i in range(cfg["n_layers_in_recurrent_block"]):
            x = block(f"transformer.core_block.{i}.", x)
    x = rms(x, T["transformer.ln_f.weight"])
    for i in range(cfg["n_layers_in_coda"]):
        x = block(f"transformer.coda.{i}.", x)
    return rms(x, T["transformer.ln_f.weight"]) @ T["transformer.wte.weight"].T


def write(directory, cfg, T):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file(T, directory / "model.safetensors")
    return directory


@settings(max_examples=8, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), hd=st.sampled_from([2, 4, 8]), core=st.integers(1, 2),
       steps=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_logits_equal_the_official_forward(tmp_path_factory, heads, hd, core, steps, seed):
    cfg = config(d=heads * hd, heads=heads, core=core)
    T = official_tensors(cfg, seed)
    model = hrmspec.from_hf(write(tmp_path_factory.mktemp("huginn"), cfg, T)).eval()
    ids = torch.randint(0, cfg["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(seed))
    want = reference_logits(T, cfg, ids, steps)
    with torch.no_grad():
        got32 = model(ids, num_steps=steps, init_scale=0.0).logits
        got64 = model.double()(ids, num_steps=steps, init_scale=0.0).logits
    torch.testing.assert_close(got64, want, rtol=1e-9, atol=1e-9)  # the semantics, exactly
    # fp32 rounding through the recurrence: relative RMS error (a few 1e-5 at most over 200 draws), and no
    # element off by more than 1e-3 of the largest logit (single elements reach 4.5e-4 of it)
    assert rel_rms(got32.double(), want) < 1e-4
    torch.testing.assert_close(got32.double(), want, rtol=0, atol=1e-3 * float(want.abs().max()))


def test_spec_of_a_released_config_and_its_defaults(tmp_path):
    cfg = config(d=32, heads=4)
    model = hrmspec.from_hf(write(tmp_path / "h", cfg, official_tensors(cfg)))
    m = model.spec.model
    loop = m.schedule[1]
    assert loop.sample.mean == 4 and loop.count == 4 and m.credit.truncate == 2  # mean_recurrence, backprop depth
    assert m.embed_scale == pytest.approx(math.sqrt(32)) and m.state("s").std == pytest.approx(math.sqrt(2 / 5))
    with torch.no_grad():  # init_scale=1.0 draws the state: two forwards differ
        ids = torch.randint(0, 48, (1, 6))
        assert not torch.equal(model(ids, num_steps=2).logits, model(ids, num_steps=2).logits)


def test_save_hf_writes_the_layout_back_bit_for_bit(tmp_path):
    cfg = config()
    T = official_tensors(cfg, seed=5)
    model = hrmspec.from_hf(write(tmp_path / "in", cfg, T))
    hrmspec.save_hf(model, tmp_path / "out")
    back = load_file(tmp_path / "out" / "model.safetensors")
    assert set(back) == set(T) - {"freqs_cis"}
    for k, v in back.items():
        assert torch.equal(v, T[k]), k
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("n_embd", "num_attention_heads", "intermediate_size", "mean_recurrence", "mean_backprop_depth",
                "n_layers_in_prelude", "n_layers_in_recurrent_block", "n_layers_in_coda", "rope_base", "qk_bias"):
        assert written[key] == cfg[key], key
    again = hrmspec.from_hf(tmp_path / "out")
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n


def test_remote_code_beside_the_checkpoint_never_runs(tmp_path):
    cfg = config()
    d = write(tmp_path / "h", cfg, official_tensors(cfg))
    marker = tmp_path / "ran"
    for name in ("raven_modeling_minimal.py", "raven_config_minimal.py"):
        (d / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    hrmspec.from_hf(d)
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    ({"block_class_name": "TransformerBlock"}, "block_class_name: expected 'SandwichBlock'"),
    ({"injection_type": "add"}, "injection_type: expected 'linear'"),
    ({"num_key_value_heads": 1}, "num_key_value_heads: expected 2"),
    ({"n_embd": "wide"}, "n_embd: expected an integer"),
])
def test_configs_the_official_code_would_not_build_are_one_error(tmp_path, change, message):
    cfg = config()
    T = official_tensors(cfg)
    with pytest.raises(CheckpointError, match=message):
        hrmspec.from_hf(write(tmp_path / "h", {**cfg, **change}, T))


def test_missing_and_foreign_tensors_are_named(tmp_path):
    cfg = config()
    T = official_tensors(cfg)
    gone = dict(T)
    del gone["transformer.core_block.1.attn.qk_bias"]
    with pytest.raises(CheckpointError, match="'transformer.core_block.1.attn.qk_bias' is missing"):
        hrmspec.from_hf(write(tmp_path / "a", cfg, gone))
    with pytest.raises(CheckpointError, match="tensors a Huginn model of this config does not have"):
        hrmspec.from_hf(write(tmp_path / "b", cfg, {**T, "transformer.core_block.2.norm_1.weight": torch.ones(16)}))


def test_the_shipped_spec_is_the_released_model():
    """specs/huginn.yaml and the spec a released config.json (Huginn-0125's values) makes are one model."""
    from hrmspec.runtime.interop.huginn import huginn_reasons, spec_from_huginn_config
    from hrmspec.spec import load_spec

    released = config(d=5280, heads=55, ffn=17920, vocab=65536, prelude=2, core=4, coda=2, mean=32, backprop=8)
    released["block_size"] = 4096
    ours, theirs = load_spec("huginn"), spec_from_huginn_config(released)
    assert huginn_reasons(ours) == []
    assert ours.model.modules == theirs.model.modules and ours.model.schedule == theirs.model.schedule
    assert ours.model.states[1].std == pytest.approx(theirs.model.states[1].std, rel=1e-4)
    assert ours.model.credit == theirs.model.credit and ours.model.head == theirs.model.head


def test_a_trained_huginn_tiny_exports_to_the_official_layout(tmp_path):
    """huginn-tiny as trained (every weight moved from its initial value, ln_f included) writes Huginn's
    layout, and reading it back gives the same model: ln_f is one module the schedule calls twice, so there
    are never two copies to disagree."""
    from hrmspec.runtime.interop.huginn import huginn_reasons

    model = hrmspec.compile("huginn-tiny")
    assert huginn_reasons(model.spec) == []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    hrmspec.save_hf(model, tmp_path / "out")
    T = load_file(tmp_path / "out" / "model.safetensors")
    assert "transformer.ln_f.weight" in T
    again = hrmspec.from_hf(tmp_path / "out")
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    ids = torch.randint(0, 320, (2, 7), generator=gen)
    want = reference_logits(T, cfg, ids, 3)  # the official forward, in float64
    with torch.no_grad():
        torch.testing.assert_close(again.double()(ids, num_steps=3, init_scale=0.0).logits, want, rtol=1e-9,
                                   atol=1e-9)
