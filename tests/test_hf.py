"""Hugging Face `hrm_text` interop: logits, greedy decoding and gradients agree with transformers.

Random small configs are drawn by hypothesis; weights are re-drawn at unit scale (and z_L_init
made nonzero) so that a wrong mapping cannot hide behind tiny activations.
"""

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import assume, given
from hypothesis import strategies as st
from mask_oracle import loop_mask
from safetensors.torch import load_file, save_file

import hrmspec
from hrmspec.errors import CheckpointError
from hrmspec.runtime.interop.convert import (
    export_hf,
    from_hf,
    hf_config_from_spec,
    import_hf,
    load_checkpoint,
    load_hf_state_dict,
    save_checkpoint,
    spec_from_hf_config,
    state_dict_to_hf,
    to_hf_tensors,
)
from hrmspec.spec import load_spec, load_spec_text

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, HrmTextConfig, HrmTextForCausalLM  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

# fp32 through up to 16 layer applications, summed in another order on each side (SDPA vs the blocked
# attention): a few units of 1e-5 relative (seen: 3.0e-5 at hidden size 2, seed 878205688 of the ci profile),
# and near-zero logits of unit-scale rows a few 1e-5 apart absolutely (seen: 1.24e-5 at hidden size 4)
TOL = dict(rtol=1e-4, atol=3e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)


def grad_tol(noise: torch.Tensor) -> dict:
    """GRAD_TOL widened by a gradient's own fp32 rounding: `noise` = |ours in fp32 - ours in fp64|. Both models
    sum the same terms in other orders; through an RMSNorm over a d_model of 2 (ill-conditioned where a row's
    norm is small) fp32 moves a gradient by up to 1% of its size (measured on a drawn config), so a fixed
    tolerance would test the rounding, not the model. Agreeing within 4x the model's own rounding still
    fails a wrong credit plan or a missing term, which are off by O(1)."""
    return {"rtol": GRAD_TOL["rtol"], "atol": GRAD_TOL["atol"] + 4 * float(noise.abs().max()) if noise.numel()
            else GRAD_TOL["atol"]}


# --------------------------------------------------------------------------- strategies and helpers


@st.composite
def hf_configs(draw) -> dict:
    heads = draw(st.integers(1, 3))
    return dict(
        vocab_size=draw(st.integers(8, 80)),
        hidden_size=heads * draw(st.integers(2, 8)),
        num_attention_heads=heads,
        head_dim=draw(st.sampled_from([4, 6, 8])),  # need not be hidden_size / heads
        intermediate_size=draw(st.integers(4, 40)),
        num_hidden_layers=draw(st.integers(1, 2)),  # per stack, before HrmTextConfig rewrites it
        H_cycles=draw(st.integers(1, 3)),
        L_cycles=draw(st.integers(1, 3)),
        L_bp_cycles=draw(st.lists(st.integers(0, 3), max_size=3)),
        tie_word_embeddings=draw(st.booleans()),
        attention_bias=draw(st.booleans()),
        prefix_lm=draw(st.booleans()),
        initializer_range=draw(st.sampled_from([0.02, 0.1, 0.5])),
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])),
        rope_parameters={"rope_type": "default", "rope_theta": draw(st.sampled_from([10000.0, 500.0]))},
    )


@st.composite
def batches(draw, vocab: int, min_len: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, S) and a prefix mask marking each row's first p tokens (p may be 0 or S)."""
    B, S = draw(st.integers(1, 3)), draw(st.integers(min_len, 16))
    ids = torch.tensor(draw(st.lists(st.integers(0, vocab - 1), min_size=B * S, max_size=B * S))).view(B, S)
    lengths = draw(st.lists(st.integers(0, S), min_size=B, max_size=B))
    prefix = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
    return ids, prefix


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale weights (std 1/sqrt(fan_in)) and visible biases. Buffers are left alone: HF keeps
    its rotary frequencies in one, and our z_L buffer is already drawn at unit scale."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        std = 1 / math.sqrt(p.shape[-1]) if p.dim() == 2 else 0.5
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def hf_model(cfg: dict, seed: int, attn: str = "sdpa") -> HrmTextForCausalLM:
    model = HrmTextForCausalLM(HrmTextConfig(**cfg, attn_implementation=attn))
    randomize(model, seed)
    with torch.no_grad():
        model.model.z_L_init.normal_(generator=torch.Generator().manual_seed(seed + 1))
    assert model.model.z_L_init.abs().sum() > 0
    return model


def hf_to_ours(model: HrmTextForCausalLM, tmp: str):
    model.save_pretrained(tmp)
    return hrmspec.from_hf(tmp)


def token_types(prefix: torch.Tensor) -> torch.Tensor:
    return prefix.long()  # HF: token_type_ids == 1 forms the bidirectional (instruction) block


# --------------------------------------------------------------------------- HF -> ours


@given(cfg=hf_configs(), data=st.data(), attn=st.sampled_from(["sdpa", "eager"]), seed=st.integers(0, 2**16))
def test_hf_to_ours_logits(cfg, data, attn, seed):
    ids, prefix = data.draw(batches(cfg["vocab_size"]))
    hf = hf_model(cfg, seed, attn).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours = hf_to_ours(hf, tmp).eval()
    assert torch.equal(ours.init_z_L, hf.model.z_L_init)
    with torch.no_grad():
        want = hf(ids, token_type_ids=token_types(prefix)).logits
        got = ours(ids, prefix_mask=prefix).logits
    torch.testing.assert_close(got, want, **TOL)


# --------------------------------------------------------------------------- ours -> HF


@st.composite
def hrm_specs(draw) -> str:
    heads = draw(st.integers(1, 3))
    H, L = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    credit = draw(
        st.sampled_from(
            [
                None,
                {"depth": {"from": 2, "to": 3, "warmup": 0.0}, "priority": ["H", "L"]},
                {"last": 2},
                "per_cycle",
            ]
        )
    )
    if credit == "per_cycle":
        credit = {"per_cycle": {"L": draw(st.lists(st.integers(0, 3), max_size=3))}}
    layers = draw(st.integers(1, 2))
    model = {
        "vocab": draw(st.integers(8, 80)),
        # at least 4 channels: an RMSNorm over 2 of them amplifies fp32 rounding (and the order of
        # threaded reductions) past the fp32 tolerance on near-zero rows, and transformers' norm computes
        # in fp32 whatever the model's dtype, so float64 cannot rescue it
        "d_model": heads * draw(st.integers(4, 8)),
        "heads": heads,
        "head_dim": draw(st.sampled_from([4, 6, 8])),
        "ffn": draw(st.integers(4, 40)),
        "block": {
            "norm": {"eps": draw(st.sampled_from([1e-6, 1e-5]))},
            "attention": {
                "mask": draw(st.sampled_from(["prefix_lm", "causal"])),
                "bias": draw(st.booleans()),
                "rope_theta": draw(st.sampled_from([10000.0, 500.0])),
            },
        },
        "modules": {"L": {"layers": layers}, "H": {"layers": layers}},
        "states": {"z_H": {"init": "embed"}, "z_L": {"init": draw(st.sampled_from(["buffer", "zeros"]))}},
        "schedule": [
            {"repeat": H, "do": [{"repeat": L, "do": ["z_L = L(z_L + z_H)"]}, "z_H = H(z_H + z_L)"]}
        ],
        "output": "z_H",
        "head": draw(st.sampled_from(["tied", "untied"])),
        "init": draw(st.sampled_from(["lecun_normal", {"type": "normal", "std": 0.1}])),
    }
    if credit is not None:
        model["credit"] = credit
    return yaml.safe_dump({"name": "drawn", "model": model}, sort_keys=False)


@given(text=hrm_specs(), data=st.data(), seed=st.integers(0, 2**16))
def test_ours_to_hf_logits(text, data, seed):
    spec = load_spec_text(text)
    ours = hrmspec.compile(spec).eval()
    randomize(ours, seed)
    ids, prefix = data.draw(batches(spec.model.vocab))
    with tempfile.TemporaryDirectory() as tmp:
        hrmspec.save_hf(ours, tmp)
        config = json.loads((Path(tmp) / "config.json").read_text())
        hf = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").eval()
    assert config["architectures"] == ["HrmTextForCausalLM"] and config["model_type"] == "hrm_text"
    assert hf.config.num_layers_per_stack == spec.model.module("L").layers
    with torch.no_grad():
        want = ours(ids, prefix_mask=prefix).logits
        got = hf(ids, token_type_ids=token_types(prefix)).logits
    torch.testing.assert_close(got, want, **TOL)
    # the config converts back to the same model (credit and init aside, which HF only trains with)
    back = spec_from_hf_config(config).model
    for field in ("vocab", "d_model", "heads", "head_dim", "max_seq_len", "head", "embed_scale", "output"):
        assert getattr(back, field) == getattr(spec.model, field), field
    assert back.module("L").block == spec.model.module("L").block
    assert hrmspec.compile(spec_from_hf_config(config)).calls == ours.calls


# --------------------------------------------------------------------------- greedy generation


def hf_greedy_loop(hf, ids: torch.Tensor, prefix: torch.Tensor, n: int) -> torch.Tensor:
    """HF greedy decoding without a cache: the whole sequence each step, the prompt's prefix marked."""
    B, S = ids.shape
    out = ids
    for _ in range(n):
        types = torch.zeros_like(out)
        types[:, :S] = token_types(prefix)
        nxt = hf(out, token_type_ids=types).logits[:, -1].argmax(-1)
        out = torch.cat([out, nxt[:, None]], dim=1)
    return out


@given(cfg=hf_configs(), data=st.data(), n=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_greedy_generation_matches(cfg, data, n, seed):
    ids, prefix = data.draw(batches(cfg["vocab_size"]))
    hf = hf_model(cfg, seed).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours = hf_to_ours(hf, tmp).eval()
    with torch.no_grad():
        cached = ours.generate(ids, n, prefix_mask=prefix)
        uncached = ours.generate(ids, n, prefix_mask=prefix, use_cache=False)
        # a near tie between the two best tokens may break either way at fp32 rounding: skip those
        full = torch.cat([prefix, torch.zeros(ids.shape[0], n, dtype=torch.bool)], dim=1)
        steps = ours(cached, prefix_mask=full).logits[:, ids.shape[1] - 1 : -1]
        top2 = steps.topk(2, dim=-1).values
        assume(bool((top2[..., 0] - top2[..., 1]).min() > 1e-4))
        loop = hf_greedy_loop(hf, ids, prefix, n)
        gen = hf.generate(
            ids,
            attention_mask=torch.ones_like(
                ids
            ),  # else HF infers padding wherever a token equals pad_token_id
            token_type_ids=token_types(prefix),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    assert torch.equal(cached, loop)
    assert torch.equal(uncached, loop)
    assert torch.equal(gen, loop)


# --------------------------------------------------------------------------- gradients and credit


@given(cfg=hf_configs(), data=st.data(), seed=st.integers(0, 2**16))
def test_loss_gradients_match_with_credit(cfg, data, seed):
    ids, prefix = data.draw(batches(cfg["vocab_size"], min_len=2))
    hf = hf_model(cfg, seed).train()
    with tempfile.TemporaryDirectory() as tmp:
        ours = hf_to_ours(hf, tmp).train()
    assert ours.spec.model.credit.per_cycle == (("L", tuple(cfg["L_bp_cycles"] or [1] * cfg["H_cycles"])),)
    # ours: labels[t] is the target of position t; HF shifts internally (labels[t + 1] is t's target)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, cfg["vocab_size"], ids.shape, generator=gen)
    labels[torch.rand(ids.shape, generator=gen) < 0.3] = -100
    labels[0, 0] = ids[0, 0]  # at least one counted token
    labels[:, -1] = -100  # the last position has no target in HF's shifted form
    hf_labels = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)

    out = ours(ids, prefix_mask=prefix, labels=labels)
    out.loss.backward()
    ref = hf(ids, token_type_ids=token_types(prefix), labels=hf_labels)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, **TOL)

    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in ours.named_parameters()}
    ours_grads = to_hf_tensors(ours.spec, grads, layout="module")
    exact = copy.deepcopy(ours).double()  # the same model in fp64: how far fp32 rounding moves each gradient
    exact.zero_grad()
    exact(ids, prefix_mask=prefix, labels=labels).loss.backward()
    exact_grads = to_hf_tensors(ours.spec, {n: p.grad if p.grad is not None else torch.zeros_like(p)
                                            for n, p in exact.named_parameters()}, layout="module")
    checked = 0
    for name, p in hf.named_parameters():
        if not p.requires_grad:  # z_L_init is frozen in HF, a buffer here
            continue
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        noise = ours_grads[name].double() - exact_grads[name]
        torch.testing.assert_close(ours_grads[name], want, **grad_tol(noise), msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    assert checked == sum(p.requires_grad for p in hf.parameters())


# --------------------------------------------------------------------------- packed documents


@st.composite
def packed_rows(draw, vocab: int, kind: str):
    """Rows of packed samples: documents of random lengths, each an instruction (prefix) then a response,
    positions restarting at every document, padding (doc -1) at the end; labels on responses only.
    The attention mask is the brute-force loop of tests/mask_oracle.py, independent of hrmspec.mask."""
    B, S = draw(st.integers(1, 2)), draw(st.integers(2, 16))
    ids = torch.tensor(draw(st.lists(st.integers(0, vocab - 1), min_size=B * S, max_size=B * S))).view(B, S)
    prefix = torch.zeros(B, S, dtype=torch.bool)
    doc = torch.full((B, S), -1)
    pos = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):
        end, t, d = S - draw(st.integers(0, S // 3)), 0, 0
        while t < end:
            n = draw(st.integers(1, end - t))
            prefix[b, t:t + draw(st.integers(0, n))] = True
            doc[b, t:t + n], pos[b, t:t + n] = d, torch.arange(n)
            t, d = t + n, d + 1
    labels = torch.full((B, S), -100)  # position t predicts the next token of its document's response
    for b in range(B):
        for t in range(S - 1):
            if doc[b, t] >= 0 and doc[b, t + 1] == doc[b, t] and not prefix[b, t + 1]:
                labels[b, t] = ids[b, t + 1]
    allowed = loop_mask(kind, B, S, prefix, doc)
    return ids, prefix, doc, pos, labels, allowed


@given(cfg=hf_configs(), data=st.data(), seed=st.integers(0, 2**16))
def test_packed_documents_match_transformers_given_the_brute_force_mask(cfg, data, seed):
    """Several samples per row with per-document positions and trailing padding: logits, loss and every
    gradient (under the drawn L_bp_cycles credit) equal transformers' given the 4-D mask built by loops."""
    kind = "prefix_lm" if cfg["prefix_lm"] else "causal"
    ids, prefix, doc, pos, labels, allowed = data.draw(packed_rows(cfg["vocab_size"], kind))
    hf = hf_model(cfg, seed).train()
    with tempfile.TemporaryDirectory() as tmp:
        ours = hf_to_ours(hf, tmp).train()
    assert ours.spec.model.module("L").block.attention.mask == kind
    hf_labels = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)  # HF shifts back
    out = ours(ids, prefix_mask=prefix, doc_ids=doc, position_ids=pos, labels=labels)
    ref = hf(ids, attention_mask=allowed, position_ids=pos, labels=hf_labels if (labels != -100).any() else None,
             use_cache=False)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    if (labels == -100).all():
        return
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    out.loss.backward()
    ref.loss.backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in ours.named_parameters()}
    ours_grads = to_hf_tensors(ours.spec, grads, layout="module")
    checked = 0
    for name, p in hf.named_parameters():
        if p.requires_grad:  # z_L_init is frozen in HF, a buffer here
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(ours_grads[name], want, **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")
            checked += 1
    assert checked == sum(p.requires_grad for p in hf.parameters())


# --------------------------------------------------------------------------- files and errors

SMALL = dict(
    vocab_size=40,
    hidden_size=16,
    num_attention_heads=2,
    head_dim=8,
    intermediate_size=24,
    num_hidden_layers=2,
    H_cycles=2,
    L_cycles=2,
)


@pytest.fixture
def hf_dir(tmp_path):
    model = hf_model(dict(SMALL, attention_bias=True), seed=0).eval()
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def test_checkpoint_round_trip_and_export(hf_dir, tmp_path):
    src, hf = hf_dir
    ids = torch.randint(0, 40, (2, 7))
    prefix = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        want = hf(ids, token_type_ids=token_types(prefix)).logits
    import_hf(src, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["model.safetensors", "spec.yaml"]
    ours = load_checkpoint(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, prefix_mask=prefix).logits, want, **TOL)
    export_hf(tmp_path / "ours", tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, token_type_ids=token_types(prefix)).logits, want, **TOL)
    assert not [p for p in (tmp_path / "back").iterdir() if p.name.endswith(".tmp")]  # no temp files left


def test_sharded_hf_checkpoint(hf_dir, tmp_path):
    src, hf = hf_dir
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((src / "config.json").read_text())
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(out / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ours = from_hf(out).eval()
    ids = torch.randint(0, 40, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **TOL)


def test_module_layout_loads_too():
    """HrmTextForCausalLM.state_dict() (unfused projections, lm_head of a tied model) loads as well."""
    for tied in (False, True):
        hf = hf_model(dict(SMALL, tie_word_embeddings=tied), seed=3).eval()
        ours = hrmspec.compile(spec_from_hf_config(hf.config.to_dict())).eval()
        load_hf_state_dict(ours, hf.state_dict())
        ids = torch.randint(0, 40, (2, 5))
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **TOL)
        back = state_dict_to_hf(ours, layout="module")
        assert back.keys() == hf.state_dict().keys()
        assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())


def test_missing_files_name_the_path(hf_dir, tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        from_hf(tmp_path)
    (tmp_path / "only-config").mkdir()
    (tmp_path / "only-config" / "config.json").write_text((hf_dir[0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_hf(tmp_path / "only-config")
    with pytest.raises(CheckpointError, match="not found"):
        from_hf(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="spec.yaml"):
        load_checkpoint(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(hf_dir):
    src, _ = hf_dir
    path = src / "model.safetensors"
    tensors = load_file(path)
    name = "model.H_module.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name][:, :20].contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"down_proj.weight' has shape \(16, 20\), expected \(16, 24\)"):
        from_hf(src)
    # a fused projection is checked before it is split
    fused = "model.L_module.layers.0.attn.gqkv_proj.weight"
    tensors[name] = tensors[name].new_zeros(16, 24)
    tensors[fused] = tensors[fused][:-8].contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"gqkv_proj.weight' has shape \(56, 16\), expected \(64, 16\)"):
        from_hf(src)
    del tensors[fused]
    tensors["model.extra"] = torch.zeros(3)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor .*q_proj.weight' of shape \(16, 16\)") as e:
        from_hf(src)
    assert "unexpected tensor 'model.extra'" in str(e.value)


def test_our_checkpoint_rejects_tensors_that_do_not_fit_its_spec(hf_dir, tmp_path):
    import_hf(hf_dir[0], tmp_path / "ours")
    path = tmp_path / "ours" / "model.safetensors"
    tensors = load_file(path)
    tensors["stacks.L.layers.0.attn.qkvg.weight"] = torch.zeros(60, 16)
    save_file(tensors, str(path))
    with pytest.raises(
        CheckpointError,
        match=r"'stacks.L.layers.0.attn.qkvg.weight' has shape \(60, 16\), expected \(64, 16\)",
    ):
        load_checkpoint(tmp_path / "ours")


@pytest.mark.parametrize(
    "change, key",
    [
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        (
            {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
            "rope_parameters",
        ),
        ({"model_type": "llama"}, "model_type"),
        ({"L_bp_cycles": [1, -1]}, "L_bp_cycles"),
    ],
)
def test_unsupported_configs(change, key):
    config = HrmTextConfig(**SMALL).to_dict()
    config.update(change)
    with pytest.raises(CheckpointError, match=key):
        spec_from_hf_config(config)


def test_config_defaults_match_transformers():
    """A sparse config.json reads here as transformers reads it (defaults, legacy layer count)."""
    sparse = {
        "model_type": "hrm_text",
        "vocab_size": 32,
        "hidden_size": 16,
        "num_attention_heads": 2,
        "head_dim": 8,
    }
    m = spec_from_hf_config(sparse).model
    ref = HrmTextConfig(**{k: v for k, v in sparse.items() if k != "model_type"})
    assert m.module("L").layers == ref.num_layers_per_stack
    assert m.embed_scale == ref.embedding_scale and m.module("L").block.ffn == ref.intermediate_size
    assert m.credit.per_cycle == (("L", tuple(ref.L_bp_cycles)),)
    assert m.module("L").block.attention.rope_theta == ref.rope_parameters["rope_theta"]


def test_specs_transformers_cannot_run_are_rejected(tmp_path):
    spec = load_spec_text(
        """
model:
  vocab: 32
  d_model: 16
  heads: 2
  ffn: 24
  block: {norm: {affine: true}}
  modules: {L: {layers: 1}, H: {layers: 2}}
  states: {z_H: {init: embed}, z_L: {init: learned}}
  schedule: ["z_L = L(z_L + z_H)", "z_H = H(z_H + z_L)"]
"""
    )
    with pytest.raises(CheckpointError) as e:
        hf_config_from_spec(spec)
    for part in ("equal layers", "affine false", "z_L (init buffer or zeros)"):
        assert part in str(e.value)
    model = hrmspec.compile(spec)
    with pytest.raises(CheckpointError, match="not representable"):
        hrmspec.save_hf(model, tmp_path)
    # the norm kinds and the norms outside the layers transformers' hrm_text does not have
    for over, part in (({"model.block.norm.type": "layer"}, "the block norm must be rms"),
                       ({"model.modules.L.exit_norm": "layer"}, "need exit_norm: rms"),
                       ({"model.final_norm": True}, "final_norm must be false"),
                       ({"model.block.mlp": "geglu"}, "the MLP must be swiglu")):
        with pytest.raises(CheckpointError, match=part):
            hf_config_from_spec(load_spec("hrm-text-tiny", over))


def test_save_checkpoint_keeps_the_spec(tmp_path):
    model = hrmspec.compile(
        "hrm-text-tiny", overrides={"model.vocab": 64, "model.d_model": 32, "model.ffn": 48}
    )
    save_checkpoint(model, tmp_path)
    again = load_checkpoint(tmp_path)
    assert again.spec.model == model.spec.model and again.spec.name == model.spec.name
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
