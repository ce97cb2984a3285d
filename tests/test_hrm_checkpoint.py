"""Official HRM / TRM checkpoints in and out (runtime/interop/hrm_*.py), and their ACT interface.

`Official` below is a small reference of the official models, written here from their semantics
(sapientinc/HRM's HierarchicalReasoningModel_ACTV1, TinyRecursiveModels' TinyRecursiveReasoningModel_ACTV1):
it reads a state dict under the official names and runs the ACT wrapper step by step. Hypothesis
draws small configs (HRM or TRM, heads, cycles, layers, rope / learned / no positions, puzzle
prefix lengths, torch.compile's prefix, no_ACT_continue), random weights are saved with
torch.save as pretrain.py saves them, imported, and every ACT step is compared: logits, both q
logits, the Q-learning target, which rows halted. Also: a pickle payload is refused and never
runs, export and import round-trip bit for bit, and the command line's errors are one line.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import hrmspec
from hrmspec.cli import main
from hrmspec.errors import CheckpointError
from hrmspec.runtime.interop.convert import load_checkpoint, save_checkpoint
from hrmspec.runtime.interop.hrm_config import hrm_arch_from_spec
from hrmspec.spec import load_spec, load_spec_text

HRM = "hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1"
TRM_HRM = "recursive_reasoning.hrm@HierarchicalReasoningModel_ACTV1"  # TRM's repository's HRM: with mlp_t
TRM = "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1"
# fp64 is the semantic check; fp32 is the dtype path, where two fp32 computations in different op
# orders drift apart through tens of post-norm layers at these tiny widths (a wrong mapping is off by O(1))
TOL = {torch.float32: dict(rtol=1e-2, atol=1e-2), torch.float64: dict(rtol=1e-9, atol=1e-9)}


# --------------------------------------------------------------------------- the reference


def prefix_len(a: dict) -> int:
    """Puzzle positions in front of the grid: TRM's puzzle_emb_len when set, else ceil(ndim / hidden)."""
    ndim = a.get("puzzle_emb_ndim", 0)
    if "Tiny" in a["name"] and a.get("puzzle_emb_len", 16):
        return a.get("puzzle_emb_len", 16)
    return -(-ndim // a["hidden_size"])


def swiglu_width(a: dict, width: int) -> int:
    """The official SwiGLU's hidden width over rows of `width`: 2/3 of the expansion, up to a multiple of 256."""
    return 256 * math.ceil(round(a["expansion"] * width * 2 / 3) / 256)


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half form: the first half of each head pairs with the second."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + turned * sin


class Official:
    """The official ACT model on a state dict `w` (names after `model.inner.`), in `w`'s dtype."""

    def __init__(self, a: dict, w: dict[str, torch.Tensor], dtype: torch.dtype):
        self.a, self.dtype = a, dtype
        self.w = {k: v.to(dtype) for k, v in w.items()}
        self.P = prefix_len(a)
        self.hrm = "Hierarchical" in a["name"]

    def embed(self, inputs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        a, w, h = self.a, self.w, self.a["hidden_size"]
        e = w["embed_tokens.embedding_weight"][inputs]
        if a.get("puzzle_emb_ndim", 0):
            p = w["puzzle_emb.weights"][ids]  # (B, ndim), laid over P positions
            p = torch.cat([p, p.new_zeros(p.shape[0], self.P * h - p.shape[1])], 1)
            e = torch.cat([p.view(-1, self.P, h), e], 1)
        if a["pos_encodings"] == "learned":
            e = 0.707106781 * (e + w["embed_pos.embedding_weight"])
        return math.sqrt(h) * e

    def attention(self, p: str, x: torch.Tensor) -> torch.Tensor:
        a, w = self.a, self.w
        B, S, _ = x.shape
        heads = a["num_heads"]
        hd = a["hidden_size"] // heads
        q, k, v = (x @ w[p + "self_attn.qkv_proj.weight"].T).view(B, S, 3, heads, hd).unbind(2)
        if a["pos_encodings"] == "rope":
            inv = 1.0 / (a.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            angles = torch.arange(S, dtype=torch.float32)[:, None] * inv  # (S, hd / 2), in fp32
            cos = torch.cat([angles, angles], -1).cos().to(x.dtype)[:, None]  # (S, 1, hd)
            sin = torch.cat([angles, angles], -1).sin().to(x.dtype)[:, None]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)  # every position sees every one
        y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, S, heads * hd)
        return y @ w[p + "self_attn.o_proj.weight"].T

    def mlp(self, p: str, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU over the last axis of x: the channels (p = "...mlp."), or the positions (p = "...mlp_t.")."""
        gate, up = (x @ self.w[p + "gate_up_proj.weight"].T).chunk(2, -1)
        return (torch.nn.functional.silu(gate) * up) @ self.w[p + "down_proj.weight"].T

    def level(self, name: str, z: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
        eps = self.a.get("rms_norm_eps", 1e-5)
        h = z + injection
        layers = self.a["L_layers"] if name == "L_level" else self.a["H_layers"]
        for i in range(layers):
            p = f"{name}.layers.{i}."
            if self.a.get("mlp_t"):  # an MLP across the positions, normed over them, in place of attention
                t = h.transpose(1, 2)
                h = rms(t + self.mlp(p + "mlp_t.", t), eps).transpose(1, 2)
            else:
                h = rms(h + self.attention(p, h), eps)  # post-norm
            h = rms(h + self.mlp(p + "mlp.", h), eps)
        return h

    def inner(self, z_H, z_L, data):
        """One segment: the nested cycles, then the head on the grid and the q head on position 0."""
        x = self.embed(data["inputs"], data["puzzle_identifiers"])
        H = "H_level" if self.hrm else "L_level"  # TRM: one network for both roles
        for _ in range(self.a["H_cycles"]):
            for _ in range(self.a["L_cycles"]):
                z_L = self.level("L_level", z_L, z_H + x)
            z_H = self.level(H, z_H, z_L)
        logits = (z_H @ self.w["lm_head.weight"].T)[:, self.P:]
        q = (z_H[:, 0] @ self.w["q_head.weight"].T + self.w["q_head.bias"]).float()  # q logits in fp32
        return z_H, z_L, logits, q[:, 0], q[:, 1]

    def initial_carry(self, batch):
        B, S = batch["inputs"].shape
        z = torch.zeros(B, self.P + S, self.a["hidden_size"], dtype=self.dtype)
        return dict(z_H=z, z_L=z, steps=torch.zeros(B, dtype=torch.long), halted=torch.ones(B, dtype=torch.bool),
                    data={k: torch.zeros_like(v) for k, v in batch.items()})

    def step(self, carry, batch, training: bool, halt_at_inference: bool = False):
        """The ACT wrapper's forward: reset halted rows, one segment, then who halts (and the Q target)."""
        a, reset = self.a, carry["halted"]
        z_H = torch.where(reset[:, None, None], self.w["H_init"], carry["z_H"])
        z_L = torch.where(reset[:, None, None], self.w["L_init"], carry["z_L"])
        data = {k: torch.where(reset.view(-1, *[1] * (v.dim() - 1)), batch[k], v) for k, v in carry["data"].items()}
        z_H, z_L, logits, q_halt, q_cont = self.inner(z_H, z_L, data)
        steps = torch.where(reset, 0, carry["steps"]) + 1
        last = steps >= a["halt_max_steps"]
        halted = last
        out = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_cont}
        q_learning = self.hrm or not a.get("no_ACT_continue", True)
        says = q_halt > q_cont if q_learning else q_halt > 0
        if training and a["halt_max_steps"] > 1:
            assert a["halt_exploration_prob"] == 0  # exploration draws random minimums: tested elsewhere
            halted = halted | says
            if q_learning:  # the target: the next segment's q, from the new states
                _, _, _, next_halt, next_cont = self.inner(z_H, z_L, data)
                out["target_q_continue"] = torch.sigmoid(torch.where(last, next_halt, torch.maximum(next_halt,
                                                                                                    next_cont)))
        elif halt_at_inference:
            halted = halted | says
        return dict(z_H=z_H, z_L=z_L, steps=steps, halted=halted, data=data), out


# --------------------------------------------------------------------------- official files


def official_tensors(a: dict, vocab: int, identifiers: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the official names (after model.inner.), laid out as the official modules hold
    them: parameters in fp32, H_init and L_init in bfloat16 (the default forward_dtype)."""
    g = torch.Generator().manual_seed(seed)
    h, heads = a["hidden_size"], a["num_heads"]
    inner, ffn, row = heads * (h // heads), swiglu_width(a, h), seq_len + prefix_len(a)

    def rnd(*shape, std=None):
        return torch.randn(*shape, generator=g) * (1 / math.sqrt(shape[-1]) if std is None else std)

    w = {"embed_tokens.embedding_weight": rnd(vocab, h), "lm_head.weight": rnd(vocab, h),
         "q_head.weight": rnd(2, h, std=1.0), "q_head.bias": rnd(2, std=0.5),
         "H_init": rnd(h, std=1.0).bfloat16(), "L_init": rnd(h, std=1.0).bfloat16()}
    if a.get("puzzle_emb_ndim", 0):
        w["puzzle_emb.weights"] = rnd(identifiers, a["puzzle_emb_ndim"])
    if a["pos_encodings"] == "learned":
        w["embed_pos.embedding_weight"] = rnd(seq_len + prefix_len(a), h)
    levels = {"L_level": a["L_layers"]} | ({"H_level": a["H_layers"]} if "Hierarchical" in a["name"] else {})
    for level, layers in levels.items():
        for i in range(layers):
            p = f"{level}.layers.{i}."
            if a.get("mlp_t"):
                w[p + "mlp_t.gate_up_proj.weight"] = rnd(2 * swiglu_width(a, row), row)
                w[p + "mlp_t.down_proj.weight"] = rnd(row, swiglu_width(a, row))
            else:
                w[p + "self_attn.qkv_proj.weight"] = rnd(3 * inner, h)
                w[p + "self_attn.o_proj.weight"] = rnd(h, inner)
            w[p + "mlp.gate_up_proj.weight"] = rnd(2 * ffn, h)
            w[p + "mlp.down_proj.weight"] = rnd(h, ffn)
    return w


def write_official(directory, a: dict, w: dict[str, torch.Tensor], compiled: bool = True, step: int = 7):
    """What pretrain.py leaves in its checkpoint_path: step_<N> and all_config.yaml."""
    directory.mkdir(parents=True, exist_ok=True)
    prefix = ("_orig_mod." if compiled else "") + "model.inner."
    torch.save({prefix + k: v for k, v in w.items()}, directory / f"step_{step}")
    config = {"arch": a, "data_path": "data/sudoku-extreme-1k-aug-1000", "global_batch_size": 768, "lr": 1e-4}
    (directory / "all_config.yaml").write_text(yaml.dump(config))
    return directory / f"step_{step}"


@st.composite
def archs(draw) -> dict:
    name = draw(st.sampled_from([HRM, TRM_HRM, TRM]))
    trm, tiny_repo = name == TRM, name != HRM  # TinyRecursiveModels' code: mlp_t, and no positions
    heads = draw(st.integers(1, 2))
    h = heads * draw(st.sampled_from([2, 4]))
    a = {"name": name,
         "loss": {"name": "losses@ACTLossHead",
                  "loss_type": draw(st.sampled_from(["stablemax_cross_entropy", "softmax_cross_entropy"]))},
         "halt_exploration_prob": 0.0, "halt_max_steps": draw(st.integers(2, 3)),
         "H_cycles": draw(st.integers(1, 2)), "L_cycles": draw(st.integers(1, 2)),
         "H_layers": 0 if trm else draw(st.integers(1, 2)), "L_layers": draw(st.integers(1, 2)),
         "hidden_size": h, "num_heads": heads, "expansion": draw(st.sampled_from([1, 2.5, 4])),
         "puzzle_emb_ndim": draw(st.sampled_from([0, h, h + 1, max(1, h // 2)])),
         "pos_encodings": draw(st.sampled_from(["rope", "learned"] + (["none"] if tiny_repo else []))),
         "rms_norm_eps": draw(st.sampled_from([1e-5, 1e-6])), "rope_theta": draw(st.sampled_from([10000.0, 50.0])),
         "forward_dtype": "bfloat16"}
    if tiny_repo:
        a["mlp_t"] = draw(st.booleans())
    if trm:
        least = -(-a["puzzle_emb_ndim"] // h)
        a["puzzle_emb_len"] = draw(st.sampled_from([0, least + 1])) if least else 0
        a["no_ACT_continue"] = draw(st.booleans())
    return a


def batch_for(a: dict, vocab: int, identifiers: int, B: int, S: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randint(0, vocab, (B, S), generator=g),
            "puzzle_identifiers": torch.randint(0, max(identifiers, 1), (B,), generator=g),
            "labels": torch.randint(0, vocab, (B, S), generator=g)}


def compare_steps(model, ref: Official, a, vocab, identifiers, S, seed, training: bool, steps: int,
                  halt: bool = False) -> None:
    """Run both ACT models side by side over `steps` steps (a new batch each step: halted rows take it)."""
    model.train(training)
    first = batch_for(a, vocab, identifiers, 4, S, seed)
    carry, ref_carry = hrmspec.initial_carry(model, first), ref.initial_carry(first)
    for t in range(steps):
        b = batch_for(a, vocab, identifiers, 4, S, seed + t)
        carry, out = hrmspec.act_step(model, carry, b, halt=halt)
        ref_carry, want = ref.step(ref_carry, b, training, halt_at_inference=halt)
        assert set(out) == set(want), (t, sorted(out), sorted(want))
        for k in want:  # the q logits are fp32 in both: of an fp64 model, rounded alike
            tol = TOL[ref.dtype] if want[k].dtype == ref.dtype else dict(rtol=1e-6, atol=1e-6)
            assert out[k].dtype == want[k].dtype, k
            torch.testing.assert_close(out[k].detach(), want[k], **tol, msg=f"{k} at step {t}")
        assert torch.equal(carry.halted, ref_carry["halted"]), t
        assert torch.equal(carry.steps, ref_carry["steps"]), t
        assert torch.equal(carry.data["input_ids"], ref_carry["data"]["inputs"]), t


# --------------------------------------------------------------------------- the forward, step by step


@settings(max_examples=8, deadline=None)
@given(a=archs(), compiled=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 10_000), S=st.integers(2, 5))
def test_every_act_step_in_eval_matches_the_official_model(tmp_path_factory, a, compiled, dtype, seed, S):
    # fp64 holds the semantics at 1e-9 at every draw; fp32 checks the dtype path where it is well
    # conditioned: norms over 2 channels, or mlp_t's norms over a few positions, amplify fp32 rounding
    # through the cycles past 2e-4 (two fp32 computations in different op orders then differ)
    assume(dtype == torch.float64 or (a["hidden_size"] >= 4 and not a.get("mlp_t")))
    vocab, identifiers = 7, 3
    w = official_tensors(a, vocab, identifiers, S, seed)
    path = write_official(tmp_path_factory.mktemp("ckpt"), a, w, compiled)
    model = hrmspec.from_hrm_checkpoint(path, seq_len=S).to(dtype)
    # eval: every row runs all halt_max_steps; the steps after that take new samples
    compare_steps(model, Official(a, w, dtype), a, vocab, identifiers, S, seed, False, a["halt_max_steps"] + 1)


@settings(max_examples=6, deadline=None)
@given(a=archs(), seed=st.integers(0, 10_000), S=st.integers(2, 5))
def test_every_act_step_in_training_matches_the_official_model(tmp_path_factory, a, seed, S):
    """Training mode (no exploration): rows halt where the head says, the Q-learning target from one more forward."""
    vocab, identifiers = 7, 3
    w = official_tensors(a, vocab, identifiers, S, seed)
    path = write_official(tmp_path_factory.mktemp("ckpt"), a, w)
    model = hrmspec.from_hrm_checkpoint(path, seq_len=S).double()
    compare_steps(model, Official(a, w, torch.float64), a, vocab, identifiers, S, seed, True, 3)


def test_halting_at_inference_when_asked(tmp_path):
    a = archs_example(trm=True)  # puzzle_emb_ndim: ${.hidden_size}, as the official arch files write it
    w = official_tensors(resolved(a), 7, 3, 4, seed=8)
    model = hrmspec.from_hrm_checkpoint(write_official(tmp_path, a, w), seq_len=4).double()
    ref = Official(resolved(a), w, torch.float64)
    compare_steps(model, ref, resolved(a), 7, 3, 4, seed=8, training=False, steps=3, halt=True)
    # the head of these weights halts some rows early: the flag changed something
    model.eval()
    b = batch_for(a, 7, 3, 4, 4, seed=8)
    carry, _ = hrmspec.act_step(model, hrmspec.initial_carry(model, b), b, halt=True)
    assert carry.halted.any() and not carry.halted.all()


def test_an_arch_file_serves_as_the_config(tmp_path):
    """config/arch/hrm_v1.yaml itself (no arch: section, `${.hidden_size}` unresolved) in place of all_config.yaml."""
    a = archs_example(trm=False)
    write_official(tmp_path / "run", a, official_tensors(resolved(a), 7, 3, 4, seed=0))
    (tmp_path / "run" / "all_config.yaml").unlink()
    (tmp_path / "hrm_v1.yaml").write_text(yaml.dump(a))
    model = hrmspec.from_hrm_checkpoint(tmp_path / "run", config=tmp_path / "hrm_v1.yaml", seq_len=4)  # a folder
    assert model.spec.model.puzzle.dim == 8 and model.spec.model.puzzle.identifiers == 3


def archs_example(trm: bool, **overrides) -> dict:
    """A fixed small config (the official arch files' keys, at test sizes)."""
    a = {"name": TRM if trm else HRM, "loss": {"name": "losses@ACTLossHead", "loss_type": "stablemax_cross_entropy"},
         "halt_exploration_prob": 0.0, "halt_max_steps": 3, "H_cycles": 2, "L_cycles": 2,
         "H_layers": 0 if trm else 1, "L_layers": 1, "hidden_size": 8, "num_heads": 2, "expansion": 4,
         "puzzle_emb_ndim": "${.hidden_size}", "pos_encodings": "rope", "forward_dtype": "bfloat16"}
    if trm:
        a.update(mlp_t=False, puzzle_emb_len=2, no_ACT_continue=True)
    a.update(overrides)
    return a


def resolved(a: dict) -> dict:
    return {k: a["hidden_size"] if v == "${.hidden_size}" else v for k, v in a.items()}


# --------------------------------------------------------------------------- safety


class Payload:
    """Unpickling this makes a directory: what a planted payload could do instead."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_planted_pickle_payload_is_refused_and_never_runs(tmp_path):
    a = archs_example(trm=False)
    path = write_official(tmp_path, a, official_tensors(resolved(a), 7, 3, 4, seed=0))
    marker = tmp_path / "payload-ran"
    state = torch.load(path, weights_only=True)
    state["_orig_mod.model.inner.H_init"] = Payload(str(marker))
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="corrupt or unsafe checkpoint file") as e:
        hrmspec.from_hrm_checkpoint(path, seq_len=4)
    assert "\n" not in str(e.value) and "never pickled objects" in str(e.value)
    assert not marker.exists()


# --------------------------------------------------------------------------- round trips


@settings(max_examples=4, deadline=None)
@given(a=archs(), compiled=st.booleans(), seed=st.integers(0, 10_000))
def test_export_writes_the_official_file_back_bit_for_bit(tmp_path_factory, a, compiled, seed):
    S = 4
    w = official_tensors(a, 7, 3, S, seed)
    model = hrmspec.from_hrm_checkpoint(write_official(tmp_path_factory.mktemp("in"), a, w, compiled), seq_len=S)
    out = tmp_path_factory.mktemp("out")
    file = hrmspec.to_hrm_checkpoint(model, out)
    written = torch.load(file, weights_only=True)
    assert set(written) == {"_orig_mod.model.inner." + k for k in w}
    for k, v in w.items():
        got = written["_orig_mod.model.inner." + k]
        assert got.dtype == v.dtype and torch.equal(got, v), k
    arch = yaml.safe_load((out / "all_config.yaml").read_text())["arch"]
    for key in ("loss", "H_cycles", "L_cycles", "L_layers", "hidden_size", "num_heads", "expansion",
                "puzzle_emb_ndim", "halt_max_steps", "halt_exploration_prob", "rms_norm_eps"):
        assert arch[key] == a[key], key
    assert arch.get("mlp_t", False) == a.get("mlp_t", False)
    if a["pos_encodings"] != "none":  # (without positions TRM's code runs an mlp_t as with rope)
        assert arch["pos_encodings"] == a["pos_encodings"]
    # TRM's copy of HRM is sapientinc's model unless it uses what only TRM's code has
    same = a["name"] == TRM_HRM and not a.get("mlp_t") and a["pos_encodings"] != "none"
    assert arch["name"] == (HRM if same else a["name"])
    again = hrmspec.from_hrm_checkpoint(file, seq_len=S)
    assert dataclasses.replace(again.spec, name=model.spec.name) == model.spec  # named after its folder
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_the_shipped_hrm_and_trm_specs_export_the_official_arch_files():
    hrm = hrm_arch_from_spec(load_spec("hrm-act")).config()  # sapientinc/HRM config/arch/hrm_v1.yaml
    assert {k: hrm[k] for k in ("H_cycles", "L_cycles", "H_layers", "L_layers", "hidden_size", "num_heads",
                                "expansion", "puzzle_emb_ndim", "pos_encodings", "halt_max_steps")} == dict(
        H_cycles=2, L_cycles=2, H_layers=4, L_layers=4, hidden_size=512, num_heads=8, expansion=4,
        puzzle_emb_ndim=512, pos_encodings="rope", halt_max_steps=16)
    assert hrm["name"] == HRM and hrm["loss"]["loss_type"] == "stablemax_cross_entropy"
    trm = hrm_arch_from_spec(load_spec("trm")).config()  # TinyRecursiveModels config/arch/trm.yaml
    assert {k: trm[k] for k in ("name", "H_cycles", "L_cycles", "L_layers", "puzzle_emb_len", "no_ACT_continue",
                                "mlp_t")} == dict(name=TRM, H_cycles=3, L_cycles=6, L_layers=2, puzzle_emb_len=16,
                                                  no_ACT_continue=True, mlp_t=False)
    assert hrm_arch_from_spec(load_spec("trm-mlp")).config()["mlp_t"] is True  # TRM's attention-free variant


@pytest.mark.parametrize("overrides, reason", [
    ({"supervision.halting.type": "bce"}, "HRM halts by q_learning only"),
    ({"model.credit": {"last": 3}}, r"credit must be \{last: 2\}"),
    ({"model.block.norm.place": "pre"}, "place post"),
    ({"model.block.attention.type": "gated"}, "plain and bidirectional"),
    ({"supervision": None}, "supervision needs halting"),
    ({"model.positions": "learned"}, "rotary embeddings and learned positions together"),
])
def test_export_refuses_what_the_official_code_cannot_run_and_says_why(overrides, reason):
    spec = load_spec("hrm-act", overrides)
    with pytest.raises(CheckpointError, match=reason) as e:
        hrm_arch_from_spec(spec)
    assert "\n" not in str(e.value) and "not an official HRM or TRM model" in str(e.value)


def test_export_lists_every_reason():
    with pytest.raises(CheckpointError) as e:
        hrm_arch_from_spec(load_spec("hrm-text-tiny"))
    for part in ("the schedule must be", "place post", "exit_norm: none", "objective must be grid"):
        assert part in str(e.value)


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("variant", [dict(pos_encodings="learned"), dict(mlp_t=True)], ids=["learned", "mlp_t"])
def test_import_and_export_on_the_command_line(tmp_path, capsys, variant):
    a = archs_example(trm=True, **variant)
    w = official_tensors(resolved(a), 7, 3, 5, seed=1)
    path = write_official(tmp_path / "run", a, w)
    # no --seq-len: a table with a row per position (learned positions, the mlp_t) says it
    assert main(["import-hrm", str(path), "--out", str(tmp_path / "ours")]) == 0
    model = load_checkpoint(tmp_path / "ours")
    assert model.spec.model.max_seq_len == 5 and model.spec.supervision.halting.type == "bce"
    assert main(["export-hrm", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    written = torch.load(tmp_path / "back" / "model.pt", weights_only=True)
    assert all(torch.equal(written["_orig_mod.model.inner." + k], v) for k, v in w.items())
    capsys.readouterr()


def _mutations():
    """(what to break, the text the one-line error must hold)."""
    def drop(key):
        return lambda a, s: s.pop("_orig_mod.model.inner." + key)

    def arch(**kv):
        return lambda a, s: a.update(kv)

    def garbage(path):
        path.write_bytes(b"not a checkpoint")

    return [
        ("missing", drop("L_level.layers.0.mlp.down_proj.weight"), None, "L_level.layers.0.mlp.down_proj.weight"),
        ("shape", arch(expansion=100), None, "mlp.gate_up_proj.weight' has shape"),
        ("loss", arch(loss={"name": "losses@ACTLossHead", "loss_type": "focal"}), None, "arch.loss.loss_type"),
        ("name", arch(name="recursive_reasoning.trm_singlez@TinyRecursiveReasoningModel_ACTV1"), None, "arch.name"),
        ("file", None, garbage, "corrupt or unsafe checkpoint file"),
        ("seq_len", None, None, "--seq-len"),
        ("prefix", lambda a, s: s.update({"model.other": torch.zeros(1)}), None, "not under 'model.inner.'"),
        ("no_puzzle", arch(puzzle_emb_ndim=0), None, "puzzle_emb_len"),
        ("positions", arch(pos_encodings="learned"), None, "embed_pos.embedding_weight', which arch.pos_encodings"),
    ]


@pytest.mark.parametrize("case, mutate, damage, needle", _mutations(), ids=[m[0] for m in _mutations()])
def test_import_errors_are_one_line_naming_the_key(tmp_path, capsys, case, mutate, damage, needle):
    a = archs_example(trm=True)
    state = {"_orig_mod.model.inner." + k: v for k, v in official_tensors(resolved(a), 7, 3, 4, seed=2).items()}
    if mutate is not None:
        mutate(a, state)
    tmp_path.mkdir(exist_ok=True)
    torch.save(state, tmp_path / "step_1")
    (tmp_path / "all_config.yaml").write_text(yaml.dump({"arch": a}))
    if damage is not None:
        damage(tmp_path / "step_1")
    seq = [] if case == "seq_len" else ["--seq-len", "4"]
    assert main(["import-hrm", str(tmp_path / "step_1"), *seq, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hrmspec: error: ") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, err


def test_a_missing_config_and_a_spec_the_official_code_cannot_run_are_one_line(tmp_path, capsys, tiny_text):
    a = archs_example(trm=False)
    path = write_official(tmp_path / "run", a, official_tensors(resolved(a), 7, 3, 4, seed=0))
    (tmp_path / "run" / "all_config.yaml").unlink()
    assert main(["import-hrm", str(path), "--seq-len", "4", "--out", str(tmp_path / "x")]) == 2
    assert "config file not found" in capsys.readouterr().err
    save_checkpoint(hrmspec.compile(load_spec_text(tiny_text)), tmp_path / "text")  # an HRM-Text model
    assert main(["export-hrm", str(tmp_path / "text"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not an official HRM or TRM model" in err and "\n" not in err

