"""Loading valid specs: the shipped ones, defaults, `extends` and `--set`, widths, module overrides."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hrmspec.errors import SpecError
from hrmspec.spec import (
    AttentionSpec,
    CreditSpec,
    InitSpec,
    NormSpec,
    ObjectiveSpec,
    Repeat,
    Spec,
    load_spec,
    load_spec_text,
    parse_override,
    shipped_specs_dir,
)
from hrmspec.spec.schema import swiglu_width

MINIMAL = """\
model:
  vocab: 100
  d_model: 64
  heads: 4
  ffn: 128
  modules: {T: {layers: 2}}
  states: {h: {init: embed}}
  schedule: ["h = T(h)"]
"""


def exit_kind(module) -> str:
    """A module's exit norm as written: its kind, or none."""
    return "none" if module.exit_norm is None else module.exit_norm.type


def write(tmp_path, name: str, text: str):
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------------- the shipped specs


SHIPPED = sorted(p.stem for p in shipped_specs_dir().glob("*.yaml"))


def test_the_shipped_specs_are_found():
    assert {"hrm-text-1b", "hrm-text-tiny", "transformer"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_specs_load(name):
    spec = load_spec(name)
    assert spec.name == name
    assert spec == load_spec(shipped_specs_dir() / f"{name}.yaml")  # by name or by path


@pytest.mark.parametrize("name", SHIPPED)
def test_the_resolved_document_reloads_to_the_same_spec(name):
    spec = load_spec(name)
    again = load_spec_text(yaml.safe_dump(spec.raw, sort_keys=False), "again.yaml")
    assert again == spec and "extends" not in spec.raw


def test_hrm_text_1b():
    spec = load_spec("hrm-text-1b")
    m = spec.model
    assert (m.vocab, m.d_model, m.heads, m.head_dim, m.max_seq_len) == (65536, 1536, 12, 128, 4096)
    assert m.block.ffn == 4096 and m.block.mlp == "swiglu"
    assert m.block.norm == NormSpec(type="rms", eps=1e-6, affine=False, place="pre")
    assert m.block.attention == AttentionSpec(type="gated", rope_theta=10000.0, mask="prefix_lm", bias=False)
    assert [(x.name, x.layers, exit_kind(x)) for x in m.modules] == [("L", 16, "rms"), ("H", 16, "rms")]
    assert all(x.block == m.block for x in m.modules)
    assert [(s.name, s.init) for s in m.states] == [("z_H", "embed"), ("z_L", "buffer")]
    (outer,) = m.schedule
    assert isinstance(outer, Repeat) and outer.count == 2
    inner, h_call = outer.body
    assert isinstance(inner, Repeat) and inner.count == 3
    assert [str(s) for s in inner.body] == ["z_L = L(z_L + z_H)"] and str(h_call) == "z_H = H(z_H + z_L)"
    assert (m.output, m.head, m.init) == ("z_H", "untied", InitSpec("lecun_normal"))
    assert m.embed_scale == pytest.approx(math.sqrt(1536))
    assert m.credit == CreditSpec(mode="depth", depth_from=2, depth_to=5, warmup=0.2, priority=("H", "L"))
    assert spec.objective == ObjectiveSpec("task_completion")


def test_hrm_text_tiny_extends_the_1b_recipe():
    big, tiny = load_spec("hrm-text-1b").model, load_spec("hrm-text-tiny").model
    assert (tiny.vocab, tiny.d_model, tiny.heads, tiny.head_dim, tiny.block.ffn) == (320, 128, 4, 32, 384)
    assert [(x.name, x.layers, exit_kind(x)) for x in tiny.modules] == [("L", 2, "rms"), ("H", 2, "rms")]
    assert tiny.block.norm == big.block.norm and tiny.block.attention == big.block.attention
    assert (tiny.schedule, tiny.states, tiny.credit) == (big.schedule, big.states, big.credit)
    assert tiny.output == big.output == "z_H"
    assert tiny.embed_scale == pytest.approx(math.sqrt(128))


def test_transformer_baseline():
    m = load_spec("transformer").model
    assert [x.name for x in m.modules] == ["T"] and m.credit.mode == "none"
    assert [str(s) for s in m.schedule] == ["h = T(h)"]


# ---------------------------------------------------------------------- defaults


def test_defaults():
    spec = load_spec_text(MINIMAL, "minimal.yaml")
    m = spec.model
    assert spec.name == "minimal"  # the file's stem
    assert spec.objective.type == "task_completion"
    assert (spec.train, spec.data, spec.eval) == ({}, {}, {})
    assert m.head_dim == 16 and m.max_seq_len == 2048 and m.final_norm is None
    assert m.block.norm == NormSpec() == NormSpec("rms", 1e-6, False, "pre")
    assert m.block.attention == AttentionSpec() == AttentionSpec("gated", 10000.0, "prefix_lm", False)
    assert m.block.mlp == "swiglu" and m.block.ffn == 128
    assert exit_kind(m.module("T")) == "rms" and m.module("T").block == m.block
    assert m.output == "h" and m.head == "untied"
    assert m.init == InitSpec("lecun_normal", 0.02)
    assert m.embed_scale == pytest.approx(8.0)  # 1 / lecun_std(64) = sqrt(64)
    assert m.credit == CreditSpec(mode="none")


def test_output_defaults_to_the_first_state():
    text = MINIMAL.replace("states: {h: {init: embed}}", "states: {h: {init: embed}, g: {init: zeros}}")
    assert load_spec_text(text.replace('["h = T(h)"]', '["g = T(h)", "h = T(g)"]')).model.output == "h"


def test_embed_scale_follows_the_init():
    text = MINIMAL + "  init: {type: normal, std: 0.05}\n"
    assert load_spec_text(text).model.embed_scale == pytest.approx(20.0)
    assert load_spec_text(MINIMAL + "  embed_scale: 3\n").model.embed_scale == 3.0


def test_rope_can_be_switched_off():
    for word in ("none", "null"):
        text = MINIMAL + f"  block: {{attention: {{rope_theta: {word}}}}}\n"
        assert load_spec_text(text).model.block.attention.rope_theta is None
    # without rotary embeddings an odd head_dim is fine
    odd = MINIMAL.replace("d_model: 64", "d_model: 60") + "  block: {attention: {rope_theta: none}}\n"
    assert load_spec_text(odd.replace("heads: 4", "heads: 4\n  head_dim: 15")).model.head_dim == 15


def test_credit_depth_as_an_integer_defaults_priority_to_call_order():
    text = MINIMAL.replace("modules: {T: {layers: 2}}", "modules: {T: {layers: 2}, U: {layers: 1}}")
    text = text.replace('["h = T(h)"]', '["h = U(h)", "h = T(h)"]') + "  credit: {depth: 3}\n"
    credit = load_spec_text(text).model.credit
    assert credit == CreditSpec(mode="depth", depth_from=3, depth_to=3, warmup=0.0, priority=("U", "T"))


# ---------------------------------------------------------------------- immutability


def test_specs_are_frozen():
    spec = load_spec("hrm-text-tiny")
    for obj, field in [
        (spec, "name"),
        (spec.model, "d_model"),
        (spec.model.block, "ffn"),
        (spec.model.block.norm, "eps"),
        (spec.model.block.attention, "mask"),
        (spec.model.modules[0], "layers"),
        (spec.model.states[0], "init"),
        (spec.model.schedule[0], "count"),
        (spec.model.credit, "depth_to"),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, None)
    m = spec.model
    assert all(isinstance(x, tuple) for x in (m.modules, m.states, m.schedule, m.credit.priority))
    assert hash(m) == hash(load_spec("hrm-text-tiny").model)


def test_replace_makes_a_new_spec():
    spec = load_spec("hrm-text-tiny")
    wider = dataclasses.replace(spec, model=dataclasses.replace(spec.model, d_model=256))
    assert wider.model.d_model == 256 and spec.model.d_model == 128


# ---------------------------------------------------------------------- extends and overrides


BASE = MINIMAL + """\
  block:
    norm: {eps: 1.0e-5, place: pre}
    attention: {mask: causal}
train: {lr: 1.0e-3, steps: 10}
"""


def test_extends_merges_mappings_key_by_key(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(
        tmp_path,
        "child.yaml",
        "name: child\nextends: base.yaml\nmodel:\n  block: {norm: {place: post}}\ntrain: {steps: 20}\n",
    )
    spec = load_spec(child)
    assert spec.name == "child" and spec.source == str(child)
    assert spec.model.block.norm == NormSpec(eps=1e-5, place="post")  # eps from the base, place from child
    assert spec.model.block.attention.mask == "causal"
    assert spec.train == {"lr": 1e-3, "steps": 20}


def test_extends_replaces_lists_and_scalars(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(
        tmp_path, "child.yaml", 'extends: base.yaml\nmodel:\n  schedule: [{repeat: 3, do: ["h = T(h)"]}]\n'
    )
    (only,) = load_spec(child).model.schedule
    assert isinstance(only, Repeat) and only.count == 3


def test_extends_chains_and_subfolders(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "base.yaml", BASE)
    write(tmp_path, "sub/mid.yaml", "extends: ../base.yaml\nmodel: {vocab: 7}\n")
    leaf = write(tmp_path, "sub/leaf.yaml", "extends: mid.yaml\nmodel: {d_model: 32}\n")
    m = load_spec(leaf).model
    assert (m.vocab, m.d_model, m.head_dim, m.block.norm.eps) == (7, 32, 8, 1e-5)


def test_extends_a_shipped_spec_by_name_from_anywhere(tmp_path):
    leaf = write(tmp_path, "mine.yaml", "name: mine\nextends: hrm-text-1b\nmodel: {d_model: 256, heads: 4}\n")
    m = load_spec(leaf).model
    assert (m.d_model, m.head_dim, m.vocab, m.module("L").layers) == (256, 64, 65536, 16)
    # a file next to the spec wins over a shipped spec of the same name
    write(tmp_path, "hrm-text-1b.yaml", BASE)
    assert load_spec(leaf).model.vocab == load_spec(write(tmp_path, "b.yaml", BASE)).model.vocab != 65536


def test_overrides(tmp_path):
    p = write(tmp_path, "base.yaml", BASE)
    spec = load_spec(p, {"model.d_model": 128, "model.block.norm.place": "sandwich", "train.lr": 0.1})
    assert spec.model.d_model == 128 and spec.model.head_dim == 32
    assert spec.model.block.norm == NormSpec(eps=1e-5, place="sandwich")
    assert spec.train == {"lr": 0.1, "steps": 10}


def test_overrides_create_nested_keys(tmp_path):
    p = write(tmp_path, "min.yaml", MINIMAL)
    spec = load_spec(
        p,
        {
            "model.block.norm.affine": True,  # neither block nor norm exists in the file
            "model.credit.last": 1,
            "train.optimizer.betas": [0.9, 0.95],
            "data.tasks": ["gcd"],
        },
    )
    assert spec.model.block.norm.affine is True and spec.model.credit == CreditSpec(mode="last", last=1)
    assert spec.train == {"optimizer": {"betas": [0.9, 0.95]}} and spec.data == {"tasks": ["gcd"]}
    assert spec.raw["model"]["block"] == {"norm": {"affine": True}}


def test_overrides_from_the_command_line(tmp_path):
    p = write(tmp_path, "min.yaml", MINIMAL)
    sets = ["model.vocab=256", "model.block.attention.mask=causal", "data.tasks=[gcd, lcm]", "name=x"]
    spec = load_spec(p, dict(parse_override(s) for s in sets))
    assert (spec.model.vocab, spec.model.block.attention.mask, spec.data, spec.name) == (
        256,
        "causal",
        {"tasks": ["gcd", "lcm"]},
        "x",
    )


def test_overrides_on_a_loaded_spec():
    tiny = load_spec("hrm-text-tiny")
    assert load_spec(tiny) is tiny
    wider = load_spec(tiny, {"model.d_model": 256})
    assert wider.model.d_model == 256 and wider.model.vocab == 320 and tiny.model.d_model == 128


def test_overrides_do_not_touch_the_file(tmp_path):
    p = write(tmp_path, "min.yaml", MINIMAL)
    load_spec(p, {"model.vocab": 5})
    assert p.read_text() == MINIMAL and load_spec(p).model.vocab == 100


def test_an_override_error_names_the_override(tmp_path):
    p = write(tmp_path, "min.yaml", MINIMAL)
    with pytest.raises(SpecError) as info:
        load_spec(p, {"model.block.norm.place": "middle"})
    assert str(info.value).startswith("--set model.block.norm.place: model.block.norm.place: expected one of")


# ---------------------------------------------------------------------- MLP widths


@pytest.mark.parametrize(
    "d_model, expansion, width",
    [
        (1536, 4, 4096),  # round(4096) -> 4096, already a multiple of 256
        (1536, 8 / 3, 2816),  # round(2730.67) = 2731 -> 11 * 256
        (128, 4, 512),  # round(341.33) = 341 -> 2 * 256
        (64, 4, 256),  # round(170.67) = 171 -> 1 * 256
        (768, 4, 2048),  # round(2048) -> 2048
        (1024, 3, 2048),  # round(2048) -> 2048
        (4096, 4, 11008),  # LLaMA-7B's width: round(10922.67) = 10923 -> 43 * 256
    ],
)
def test_swiglu_width(d_model, expansion, width):
    assert swiglu_width(d_model, expansion) == width
    text = MINIMAL.replace("d_model: 64", f"d_model: {d_model}")
    text = text.replace("ffn: 128", f"expansion: {expansion}")
    assert load_spec_text(text).model.block.ffn == width


@given(d_model=st.integers(1, 8192), expansion=st.floats(0.1, 16))
def test_swiglu_width_rule(d_model, expansion):
    w = swiglu_width(d_model, expansion)
    exact = round(expansion * d_model * 2 / 3)
    assert w % 256 == 0 and exact <= w < exact + 256
    assert w == math.ceil(exact / 256) * 256


def test_gelu_expansion_is_not_rounded_to_256():
    text = MINIMAL.replace("ffn: 128", "expansion: 4") + "  block: {mlp: gelu}\n"
    assert load_spec_text(text).model.block.ffn == 256
    text = MINIMAL.replace("ffn: 128", "expansion: 3.5") + "  block: {mlp: gelu}\n"
    assert load_spec_text(text).model.block.ffn == 224


# ---------------------------------------------------------------------- module overrides of the block

TWO = """\
model:
  vocab: 100
  d_model: 64
  heads: 4
  expansion: 4
  block:
    norm: {eps: 1.0e-5, place: pre, affine: true}
    attention: {mask: prefix_lm, rope_theta: 500}
  modules:
    L: {layers: 2}
    H: {layers: 3, exit_norm: none, mlp: gelu, norm: {place: post}, attention: {mask: causal}}
  states: {z_H: {init: embed}, z_L: {init: zeros}}
  schedule: ["z_L = L(z_L + z_H)", "z_H = H(z_H + z_L)"]
  output: z_H
"""


def test_a_module_overrides_block_fields():
    m = load_spec_text(TWO).model
    L, H = m.module("L"), m.module("H")
    assert L.block == m.block and exit_kind(L) == "rms"
    assert (H.layers, exit_kind(H), H.block.mlp) == (3, "none", "gelu")
    assert H.block.norm == NormSpec(eps=1e-5, affine=True, place="post")  # merged over the shared norm
    assert H.block.attention == AttentionSpec(mask="causal", rope_theta=500.0)
    # model.expansion is a ratio: each module gets the width of its own MLP kind
    assert L.block.ffn == swiglu_width(64, 4) == 256 and H.block.ffn == 256 == round(4 * 64)
    assert m.block.ffn == 256


def test_a_module_sets_its_own_width():
    text = TWO.replace("L: {layers: 2}", "L: {layers: 2, ffn: 96}")
    text = text.replace("mlp: gelu,", "expansion: 2, mlp: gelu,")
    m = load_spec_text(text).model
    assert m.module("L").block.ffn == 96 and m.module("H").block.ffn == 128


def test_module_overrides_with_an_explicit_model_ffn():
    m = load_spec_text(TWO.replace("expansion: 4", "ffn: 100")).model
    assert m.module("L").block.ffn == m.module("H").block.ffn == 100


# ---------------------------------------------------------------------- random valid specs round-trip

NAMES = ["L", "H", "T", "net", "M2"]
STATES = ["z_H", "z_L", "h", "y", "z"]


@st.composite
def spec_docs(draw) -> dict:
    """A random valid spec document and the facts it must load to."""
    heads = draw(st.sampled_from([1, 2, 4, 8]))
    head_dim = draw(st.sampled_from([2, 4, 8, 16]))
    modules = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True))
    states = draw(st.lists(st.sampled_from(STATES), min_size=1, max_size=3, unique=True))
    inits = [draw(st.sampled_from(["embed", "buffer", "zeros", "learned"])) for _ in states]

    calls = modules + draw(st.lists(st.sampled_from(modules), max_size=3))
    statements = []
    for module in draw(st.permutations(calls)):
        target = draw(st.sampled_from(states))
        inputs = draw(st.lists(st.sampled_from(states + ["x"]), min_size=1, max_size=4, unique=True))
        statements.append((target, module, tuple(inputs)))
    if "embed" not in inits and not any("x" in s[2] for s in statements):
        inits[0] = "embed"
    texts = [f"{t} = {m}({' + '.join(i)})" for t, m, i in statements]
    schedule: list = list(texts)
    if len(texts) > 1 and draw(st.booleans()):
        i = draw(st.integers(0, len(texts) - 1))
        schedule = texts[:i] + [{"repeat": draw(st.integers(1, 3)), "do": texts[i:]}]

    block = {
        "norm": {
            "eps": draw(st.floats(1e-9, 1e-2)),
            "affine": draw(st.booleans()),
            "place": draw(st.sampled_from(["pre", "post", "sandwich"])),
        },
        "attention": {
            "type": draw(st.sampled_from(["gated", "plain"])),
            "rope_theta": draw(st.sampled_from([None, 500.0, 10000.0, 1e6])),
            # text objectives (below): a bidirectional mask would show each token the one it predicts
            "mask": draw(st.sampled_from(["causal", "prefix_lm"])),
            "bias": draw(st.booleans()),
        },
        "mlp": draw(st.sampled_from(["swiglu", "gelu"])),
    }
    model = {
        "vocab": draw(st.integers(1, 300_000)),
        "d_model": heads * head_dim,
        "heads": heads,
        "ffn": draw(st.integers(1, 5000)),
        "max_seq_len": draw(st.integers(1, 1 << 16)),
        "block": block,
        "modules": {m: {"layers": draw(st.integers(1, 24))} for m in modules},
        "states": {s: {"init": i} for s, i in zip(states, inits)},
        "schedule": schedule,
        "output": draw(st.sampled_from(sorted({t for t, _, _ in statements}))),
        "head": draw(st.sampled_from(["tied", "untied"])),
    }
    for m in modules:
        if draw(st.booleans()):
            model["modules"][m]["exit_norm"] = draw(st.sampled_from(["rms", "none"]))
        if draw(st.booleans()):
            model["modules"][m]["mlp"] = draw(st.sampled_from(["swiglu", "gelu"]))
    called = list(dict.fromkeys(m for _, m, _ in statements))
    credit = draw(st.sampled_from(["none", "last", "depth", "per_cycle"]))
    if credit == "last":
        model["credit"] = {"last": draw(st.integers(1, 10))}
    elif credit == "depth":
        lo = draw(st.integers(len(called), len(called) + 4))
        model["credit"] = {
            "depth": {"from": lo, "to": draw(st.integers(lo, lo + 4)), "warmup": draw(st.floats(0, 1))},
            "priority": draw(st.permutations(called)),
        }
    elif credit == "per_cycle":
        model["credit"] = {"per_cycle": {called[0]: draw(st.lists(st.integers(0, 4), max_size=3))}}
    else:
        model["credit"] = "none"
    doc = {"name": draw(st.sampled_from(["a", "hrm-x", "spec_1"])), "model": model}
    doc["objective"] = draw(st.sampled_from(["task_completion", "lm"]))
    return doc, statements


def flat(schedule) -> list:
    out = []
    for item in schedule:
        out += flat(item.body) if isinstance(item, Repeat) else [item]
    return out


@settings(max_examples=80, deadline=None)
@given(spec_docs())
def test_random_valid_specs_round_trip(case):
    doc, statements = case
    spec = load_spec_text(yaml.safe_dump(doc, sort_keys=False), "random.yaml")
    assert isinstance(spec, Spec) and spec.raw == doc
    m, d = spec.model, doc["model"]
    assert (spec.name, spec.objective.type) == (doc["name"], doc["objective"])
    assert (m.vocab, m.d_model, m.heads, m.max_seq_len, m.output, m.head) == (
        d["vocab"], d["d_model"], d["heads"], d["max_seq_len"], d["output"], d["head"]
    )
    assert m.head_dim == d["d_model"] // d["heads"]
    norm, attention = d["block"]["norm"], d["block"]["attention"]
    assert m.block.norm == NormSpec("rms", norm["eps"], norm["affine"], norm["place"])
    assert m.block.attention == AttentionSpec(
        attention["type"], attention["rope_theta"], attention["mask"], attention["bias"]
    )
    assert [x.name for x in m.modules] == list(d["modules"])
    for x in m.modules:
        mine = d["modules"][x.name]
        assert x.layers == mine["layers"] and exit_kind(x) == mine.get("exit_norm", "rms")
        assert x.block.mlp == mine.get("mlp", d["block"]["mlp"]) and x.block.ffn == d["ffn"]
        assert x.block.norm == m.block.norm and x.block.attention == m.block.attention
    assert [(s.name, s.init) for s in m.states] == [(k, v["init"]) for k, v in d["states"].items()]
    assert [(s.target, s.module, s.inputs) for s in flat(m.schedule)] == statements
    credit = d["credit"]
    if credit == "none":
        assert m.credit == CreditSpec(mode="none")
    elif "last" in credit:
        assert m.credit == CreditSpec(mode="last", last=credit["last"])
    elif "depth" in credit:
        depth = credit["depth"]
        assert m.credit == CreditSpec(
            mode="depth",
            depth_from=depth["from"],
            depth_to=depth["to"],
            warmup=depth["warmup"],
            priority=tuple(credit["priority"]),
        )
    else:
        ((name, counts),) = credit["per_cycle"].items()
        assert m.credit == CreditSpec(mode="per_cycle", per_cycle=((name, tuple(counts)),))
    # and the resolved document loads to the same spec again
    assert load_spec_text(yaml.safe_dump(spec.raw, sort_keys=False)) == spec
