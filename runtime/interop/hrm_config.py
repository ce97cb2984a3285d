"""The `arch:` section of HRM's and TRM's `all_config.yaml` <-> an hrmspec Spec.

The official training scripts (`pretrain.py` of sapientinc/HRM and of
SamsungSAILMontreal/TinyRecursiveModels) write `all_config.yaml` beside their checkpoints: the
whole training config, whose `arch:` section builds the model together with three sizes the
dataset gives (vocab_size, seq_len, num_puzzle_identifiers). Both official models are points in
the space of specs, every layer post-norm, `h = rms(h + attention(h)); h = rms(h + swiglu(h))`
(RMSNorm without weights, bidirectional attention without gate or biases, no exit norm; with
`mlp_t`, a SwiGLU across the positions in place of attention: `attention: {type: token_mlp}`):

    HierarchicalReasoningModel_ACTV1 (HRM)     modules L and H, states z_H and z_L (H_init, L_init)
        repeat H_cycles: { repeat L_cycles: { z_L = L(z_L + z_H + x) };  z_H = H(z_H + z_L) }
        credit {last: 2} (the one-step gradient), q_learning halting
    TinyRecursiveReasoningModel_ACTV1 (TRM)    one module `net`, states y and z (z_H and z_L)
        repeat H_cycles: { repeat L_cycles: { z = net(z + y + x) };  y = net(y + z) }
        credit last_cycle (L_cycles + 1 calls), bce halting (no_ACT_continue) or q_learning

    arch key                          spec
    hidden_size, num_heads            d_model, heads, head_dim = hidden_size // num_heads
    expansion                         expansion (the SwiGLU width: 2/3 of it, rounded up to 256)
    H_layers, L_layers                the modules' layers (TRM: L_layers; H_layers is unused)
    rms_norm_eps                      block.norm.eps
    pos_encodings rope | learned      block.attention.rope_theta = rope_theta | positions: learned
    mlp_t (TRM's code)                block.attention.type: token_mlp (its width: the same expansion
                                      over the seq_len + puzzle positions of a row), else plain
    puzzle_emb_ndim (> 0)             puzzle: {identifiers, dim, positions}: ceil(dim / hidden_size)
                                      positions, TRM's puzzle_emb_len when it is not 0
    halt_max_steps                    supervision.segments
    halt_exploration_prob             supervision.halting.exploration (weight 0.5, as the loss head)
    no_ACT_continue (TRM only)        halting bce (true, TRM's default) or q_learning (false)
    loss.loss_type                    objective: {type: grid, loss: stablemax | softmax}

The sizes the config leaves out come from the weights' shapes (`Sizes`). `forward_dtype` is not
read: imported models compute in fp32; an export writes it, the dtype the official model holds
H_init and L_init in. Keys the official models do not read are ignored, as pydantic does there.
`spec_from_hrm_arch` raises CheckpointError naming the key for what does not map exactly;
`hrm_arch_from_spec` names every reason a spec is not an official model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hrmspec.errors import CheckpointError, SpecError
from hrmspec.runtime.interop.config_reader import ConfigReader, spec_from_document
from hrmspec.spec.schema import CreditSpec, Repeat, Spec, Statement, swiglu_width
from hrmspec.spec.source import quoted, read_yaml

ARCH_FILE = "all_config.yaml"
LOSS_HEAD = "losses@ACTLossHead"
LOSSES = {"stablemax_cross_entropy": "stablemax", "softmax_cross_entropy": "softmax"}
HRM_NAME = "hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1"  # sapientinc/HRM
TRM_HRM_NAME = "recursive_reasoning.hrm@HierarchicalReasoningModel_ACTV1"  # TRM's copy of HRM
TRM_NAME = "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1"
# arch.name -> the model; the TRM repository's code adds mlp_t and runs without positions for a
# pos_encodings other than rope or learned (sapientinc's raises, and has no mlp_t)
ARCHS = {HRM_NAME: "hrm", TRM_HRM_NAME: "hrm", TRM_NAME: "trm"}
FORWARD_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Sizes:
    """What all_config.yaml leaves to the dataset: read from the weights' shapes (and --seq-len)."""

    vocab: int
    identifiers: int  # rows of the puzzle table (0: none)
    seq_len: int


@dataclass(frozen=True)
class HrmArch:
    """The arch section of an official config, read and checked: what the model computes."""

    name: str  # an ARCHS key
    loss: str  # stablemax | softmax
    H_cycles: int
    L_cycles: int
    H_layers: int  # TRM: unused (its one module has L_layers)
    L_layers: int
    hidden_size: int
    num_heads: int
    expansion: float
    rms_norm_eps: float
    rope_theta: float
    pos_encodings: str  # rope | learned | none (TRM's code only)
    puzzle_emb_ndim: int
    puzzle_emb_len: int  # the prefix positions the puzzle vector is laid over
    halt_max_steps: int
    halt_exploration_prob: float
    halting: str  # q_learning | bce
    mlp_t: bool = False  # a SwiGLU across the positions in place of attention (TRM's code only)
    forward_dtype: str = "bfloat16"

    @property
    def model(self) -> str:
        return ARCHS[self.name]

    def config(self) -> dict[str, Any]:
        """The arch section as the official config writes it."""
        a = asdict(self)
        loss = {"name": LOSS_HEAD, "loss_type": f"{self.loss}_cross_entropy"}
        out: dict[str, Any] = {"name": self.name, "loss": loss}
        for key in ("halt_exploration_prob", "halt_max_steps", "H_cycles", "L_cycles", "H_layers", "L_layers",
                    "hidden_size", "num_heads", "expansion", "puzzle_emb_ndim", "pos_encodings", "rms_norm_eps",
                    "rope_theta", "forward_dtype"):
            out[key] = a[key]
        if self.name != HRM_NAME:
            out["mlp_t"] = self.mlp_t
        if self.model == "trm":
            out["puzzle_emb_len"] = self.puzzle_emb_len
            out["no_ACT_continue"] = self.halting == "bce"
        return out


# --------------------------------------------------------------------------- reading a config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The whole document of `all_config.yaml` (or of an arch file), read with the limits of a spec."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"config file not found: {path}; give the all_config.yaml the checkpoint "
                              "was trained with (--config)")
    try:
        doc = read_yaml(path)  # with the limits of a spec: size, alias expansions, nesting
    except SpecError as e:
        raise CheckpointError(f"{e.loc}: not a readable YAML file ({e.message})") from None
    return doc if isinstance(doc, dict) else {}


def read_arch_file(path: str | Path) -> dict[str, Any]:
    """The arch section of `all_config.yaml` (the whole training config), or of an arch file itself
    (config/arch/*.yaml, with its `${.key}` references to keys beside them resolved)."""
    doc = read_config_file(path)
    arch = doc.get("arch", doc) if doc else None
    if not isinstance(arch, dict) or "name" not in arch:
        raise CheckpointError(f"{path}: expected an official training config with an 'arch:' section "
                              "(name, H_cycles, hidden_size, ...)")
    return {k: _resolve(arch, v) for k, v in arch.items()}


def _resolve(arch: dict, value: Any) -> Any:
    """`${.hidden_size}` (hydra's reference to a key beside it) -> that key's value."""
    if isinstance(value, str):
        m = re.fullmatch(r"\$\{\.(\w+)\}", value.strip())
        if m and m.group(1) in arch:
            return arch[m.group(1)]
    return value


def read_hrm_arch(arch: Mapping[str, Any], source: str) -> HrmArch:
    """Check an arch section as the official model would read it; CheckpointError names the key."""
    c = ConfigReader(arch, source, {"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "puzzle_emb_ndim": 0,
                                    "forward_dtype": "bfloat16", "mlp_t": False, "puzzle_emb_len": 16,
                                    "no_ACT_continue": True}, prefix="arch.")
    name = c.text("name")
    if name not in ARCHS:
        raise c.fail("name", f"'{name}' is not a model hrmspec converts; expected one of {', '.join(ARCHS)} "
                             "(TRM's trm_singlez, trm_hier6 and the transformer baseline are other models)")
    model = ARCHS[name]
    loss = c.required("loss")
    if not isinstance(loss, dict) or loss.get("name") != LOSS_HEAD:
        raise c.fail("loss", f"expected {{name: {LOSS_HEAD}, loss_type: ...}}, found {quoted(loss)}")
    loss_type = loss.get("loss_type")
    if loss_type not in LOSSES:
        raise c.fail("loss.loss_type", f"expected one of {', '.join(LOSSES)}, found {quoted(loss_type)}")
    mlp_t = name != HRM_NAME and c.boolean("mlp_t")
    hidden, heads = c.integer("hidden_size"), c.integer("num_heads")
    if heads > hidden:
        raise c.fail("num_heads", f"expected at most hidden_size ({hidden}) heads, found {heads}")
    pos = c.text("pos_encodings")
    if pos not in ("rope", "learned"):
        if name == HRM_NAME:
            raise c.fail("pos_encodings", f"expected rope or learned, found {quoted(pos)}")
        pos = "none"  # TRM's code runs without position encodings then
    head_dim = hidden // heads
    if pos == "rope" and head_dim % 2 and not mlp_t:  # (mlp_t's blocks never apply the rotary tables)
        raise c.fail("num_heads", f"rotary embeddings need an even head_dim; hidden_size // num_heads is {head_dim}")
    ndim = c.integer("puzzle_emb_ndim", 0)
    positions = -(-ndim // hidden)
    if model == "trm" and c.integer("puzzle_emb_len", 0):
        positions = c.integer("puzzle_emb_len", 0)
        if ndim == 0:
            raise c.fail("puzzle_emb_len", f"{positions} puzzle positions without a puzzle embedding "
                                           "(puzzle_emb_ndim 0): the official model cannot run this; set 0")
        if positions * hidden < ndim:
            raise c.fail("puzzle_emb_len", f"{positions} positions of {hidden} cannot hold a puzzle vector of "
                                           f"puzzle_emb_ndim {ndim}; expected at least {-(-ndim // hidden)}")
    halting = "q_learning" if model == "hrm" or not c.boolean("no_ACT_continue") else "bce"
    dtype = c.text("forward_dtype")
    return HrmArch(
        name=name, loss=LOSSES[loss_type], H_cycles=c.integer("H_cycles"), L_cycles=c.integer("L_cycles"),
        H_layers=c.integer("H_layers") if model == "hrm" else c.integer("H_layers", 0), L_layers=c.integer("L_layers"),
        hidden_size=hidden, num_heads=heads, expansion=_expansion(c), rms_norm_eps=c.number("rms_norm_eps"),
        rope_theta=c.number("rope_theta"), pos_encodings=pos, puzzle_emb_ndim=ndim, puzzle_emb_len=positions,
        halt_max_steps=c.integer("halt_max_steps"), halt_exploration_prob=c.number("halt_exploration_prob", 1.0),
        halting=halting, mlp_t=mlp_t, forward_dtype=dtype,
    )


def _expansion(c: ConfigReader) -> float:
    e = c.number("expansion")
    if e <= 0:
        raise c.fail("expansion", f"expected a positive number, found {quoted(e)}")
    return c.get("expansion")  # as written (4 stays 4): it goes back into the spec and the config


# --------------------------------------------------------------------------- arch -> spec


def spec_from_hrm_arch(a: HrmArch, sizes: Sizes, name: str, source: str = ARCH_FILE,
                       train: dict[str, Any] | None = None, data: dict[str, Any] | None = None) -> Spec:
    """The spec of an official model (see the module docstring), with the `train:` and `data:` sections of
    the official run when given (`training_from_config`)."""
    rotary = a.pos_encodings == "rope" and not a.mlp_t  # mlp_t's blocks never apply the rotary tables
    block = {
        "norm": {"type": "rms", "eps": a.rms_norm_eps, "affine": False, "place": "post"},
        "attention": {"type": "token_mlp" if a.mlp_t else "plain", "mask": "bidirectional",
                      "rope_theta": a.rope_theta if rotary else None},
        "mlp": "swiglu",
    }
    if a.model == "hrm":
        H, L, z_H, z_L = "H", "L", "z_H", "z_L"
        modules = {L: {"layers": a.L_layers, "exit_norm": "none"}, H: {"layers": a.H_layers, "exit_norm": "none"}}
        credit = {"last": 2}  # the one-step gradient: the last L call and the last H call
    else:
        H = L = "net"
        z_H, z_L = "y", "z"
        modules = {"net": {"layers": a.L_layers, "exit_norm": "none"}}
        credit = "last_cycle"  # the whole last outer cycle: L_cycles + 1 calls
    model: dict[str, Any] = {
        "vocab": sizes.vocab,
        "d_model": a.hidden_size,
        "heads": a.num_heads,
        "head_dim": a.hidden_size // a.num_heads,
        "expansion": a.expansion,
        "max_seq_len": sizes.seq_len,
        "block": block,
        "modules": modules,
        "states": {z_H: {"init": "buffer"}, z_L: {"init": "buffer"}},
        "schedule": [{"repeat": a.H_cycles, "do": [{"repeat": a.L_cycles, "do": [f"{z_L} = {L}({z_L} + {z_H} + x)"]},
                                                   f"{z_H} = {H}({z_H} + {z_L})"]}],
        "output": z_H,
        "head": "untied",
        "embed_scale": math.sqrt(a.hidden_size),
        "credit": credit,
    }
    if a.puzzle_emb_ndim:
        model["puzzle"] = {"identifiers": sizes.identifiers, "dim": a.puzzle_emb_ndim, "positions": a.puzzle_emb_len}
    if a.pos_encodings == "learned":
        model["positions"] = "learned"
    doc = {
        "name": name,
        "model": model,
        "objective": {"type": "grid", "loss": a.loss},
        "supervision": {"segments": a.halt_max_steps,
                        "halting": {"type": a.halting, "exploration": a.halt_exploration_prob, "weight": 0.5}},
    }
    if data:
        doc["data"] = data
    if train:
        doc["train"] = train
    return spec_from_document(doc, source)


# --------------------------------------------------------------------------- the training config


def training_from_config(doc: Mapping[str, Any], source: str, has_puzzle: bool,
                         root: Path | None = None) -> tuple[dict[str, Any], dict[str, Any] | None, list[str]]:
    """(train:, data:, notes) of a spec that repeats the official run `doc` (all_config.yaml) describes:

        lr, beta1 / beta2, weight_decay    lr, betas, weight_decay (AdamATan2: optimizer adam_atan2)
        global_batch_size                  batch_size
        lr_min_ratio                       min_lr_ratio; schedule constant when it is 1, else cosine
        lr_warmup_steps, epochs            warmup (a fraction of the steps) and steps, when the dataset's
                                           train/dataset.json is found: epochs x total_groups x
                                           mean_puzzle_examples / global_batch_size steps, as pretrain.py
        puzzle_emb_lr, _weight_decay       puzzle_optimizer: {type: sign_sgd, lr, weight_decay}
        ema, ema_rate (TRM)                ema: ema_rate, or null (HRM has none)
        seed                               seed
        data_path / data_paths[0]          data: {source: hrm_dataset, path}

    A value that is missing or not a number is left to the spec's default, and said in `notes`."""
    notes: list[str] = []
    train: dict[str, Any] = {"optimizer": "adam_atan2"}

    def number(key: str):
        v = doc.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            return None
        try:
            f = float(v)
        except ValueError:
            return None
        return f if math.isfinite(f) else None

    for key, name in (("lr", "lr"), ("weight_decay", "weight_decay"), ("lr_min_ratio", "min_lr_ratio")):
        v = number(key)
        if v is None:
            notes.append(f"{key} not in {source}: train.{name} keeps its default")
        else:
            train[name] = v
    if number("beta1") is not None and number("beta2") is not None:
        train["betas"] = [number("beta1"), number("beta2")]
    batch = number("global_batch_size")
    if batch is not None and batch >= 1 and batch == int(batch):
        train["batch_size"] = int(batch)
    if "min_lr_ratio" in train:
        train["schedule"] = "constant" if train["min_lr_ratio"] >= 1.0 else "cosine"
    seed = number("seed")
    if seed is not None and seed >= 0 and seed == int(seed):
        train["seed"] = int(seed)
    if isinstance(doc.get("ema"), bool):
        rate = number("ema_rate")
        train["ema"] = (rate if rate is not None else 0.999) if doc["ema"] else None
    else:
        train["ema"] = None  # sapientinc/HRM trains without one
    if has_puzzle and number("puzzle_emb_lr") is not None:
        wd = number("puzzle_emb_weight_decay")
        train["puzzle_optimizer"] = {"type": "sign_sgd", "lr": number("puzzle_emb_lr"),
                                     "weight_decay": wd if wd is not None else train.get("weight_decay", 0.1)}
    paths = doc.get("data_paths") if isinstance(doc.get("data_paths"), list) else [doc.get("data_path")]
    path = data_path_of(doc)
    data = {"source": "hrm_dataset", "path": path} if path else None
    if paths and len(paths) > 1:
        notes.append(f"data_paths lists {len(paths)} datasets; data.path takes the first ({path})")
    steps = _official_steps(doc, path, root, number, notes)
    if steps:
        train["steps"] = steps
        warmup = number("lr_warmup_steps")
        if warmup is not None:
            train["warmup"] = min(1.0, round(warmup) / steps)
    return train, data, notes


def config_from_training(train: Mapping[str, Any], data: Mapping[str, Any] | None) -> dict[str, Any]:
    """The top-level keys of all_config.yaml for a spec's `train:` and `data:` (the inverse of
    `training_from_config` for what the spec gives): an exported checkpoint carries its run's settings."""
    out: dict[str, Any] = {}
    if data and data.get("source") == "hrm_dataset" and isinstance(data.get("path"), str):
        out["data_path"] = data["path"]
    for name, key in (("lr", "lr"), ("weight_decay", "weight_decay"), ("min_lr_ratio", "lr_min_ratio"),
                      ("batch_size", "global_batch_size"), ("seed", "seed")):
        if name in train:
            out[key] = train[name]
    betas = train.get("betas")
    if isinstance(betas, (list, tuple)) and len(betas) == 2:
        out["beta1"], out["beta2"] = betas
    if "ema" in train:
        out["ema"] = train["ema"] is not None
        if train["ema"] is not None:
            out["ema_rate"] = train["ema"]
    po = train.get("puzzle_optimizer")
    if isinstance(po, Mapping):
        out["puzzle_emb_lr"] = po.get("lr")
        if "weight_decay" in po:
            out["puzzle_emb_weight_decay"] = po["weight_decay"]
    if "steps" in train and "warmup" in train:
        out["lr_warmup_steps"] = round(float(train["warmup"]) * int(train["steps"]))
    return out


def data_path_of(doc: Mapping[str, Any]) -> str | None:
    """The (first) dataset folder an official config trains on: data_paths[0] (TRM) or data_path (HRM)."""
    paths = doc.get("data_paths") if isinstance(doc.get("data_paths"), list) else [doc.get("data_path")]
    return paths[0] if paths and isinstance(paths[0], str) and paths[0] else None


def official_dataset(doc: Mapping[str, Any], root: Path | None = None) -> tuple[dict | None, str]:
    """(the train split's dataset.json, where it was looked for) of the dataset an official config names, read
    from the working directory (as pretrain.py does) or beside the config; None when it is not there."""
    path = data_path_of(doc)
    if path is None:
        return None, "the config names no data_path"
    candidates = [Path(path)] if Path(path).is_absolute() else [Path(path), *([root / path] if root else [])]
    for folder in candidates:
        meta_path = folder / "train" / "dataset.json"
        if meta_path.is_file():
            try:
                meta = read_yaml(meta_path)  # JSON is YAML; read with the same limits
            except SpecError:
                return None, f"{meta_path} is not readable"
            return (meta if isinstance(meta, dict) else None), str(meta_path)
    return None, f"{path}/train/dataset.json not found"


def _official_steps(doc, path: str | None, root: Path | None, number, notes: list[str]) -> int | None:
    """pretrain.py's total_steps, from the epochs, the batch and the dataset's train/dataset.json."""
    epochs, batch = number("epochs"), number("global_batch_size")
    if path is None or epochs is None or not batch:
        return None
    meta, where = official_dataset(doc, root)
    try:
        steps = int(epochs * float(meta["total_groups"]) * float(meta["mean_puzzle_examples"]) / batch)
    except (KeyError, TypeError, ValueError):
        notes.append(f"{where}: train.steps and warmup keep their defaults (pretrain.py takes them from the "
                     "dataset: epochs x total_groups x mean_puzzle_examples / global_batch_size)")
        return None
    return steps if steps >= 1 else None


# --------------------------------------------------------------------------- spec -> arch


@dataclass(frozen=True)
class Roles:
    """Which of a spec's modules and states play the official H and L (TRM: one module for both)."""

    H: str
    L: str
    z_H: str
    z_L: str
    H_cycles: int
    L_cycles: int


def _call(item: Any, target: str, inputs: set[str]) -> str | None:
    """The module of `target = module(sum of inputs)`, if `item` is that statement."""
    if isinstance(item, Statement) and item.target == target and set(item.inputs) == inputs:
        return item.module
    return None


def roles(spec: Spec) -> Roles | None:
    """The roles of an HRM- or TRM-shaped schedule (see the module docstring), else None."""
    m, s = spec.model, spec.model.schedule
    if len(s) != 1 or not isinstance(s[0], Repeat) or len(s[0].body) != 2 or len(m.states) != 2:
        return None
    inner, h_call = s[0].body
    if not isinstance(inner, Repeat) or len(inner.body) != 1 or not isinstance(h_call, Statement):
        return None
    z_H, z_L = h_call.target, next((st.name for st in m.states if st.name != h_call.target), "")
    L, H = _call(inner.body[0], z_L, {z_L, z_H, "x"}), _call(h_call, z_H, {z_H, z_L})
    if L is None or H is None or m.output != z_H:
        return None
    return Roles(H, L, z_H, z_L, s[0].count, inner.count)


def _expansion_of(spec: Spec, ffn: int) -> float | None:
    """An expansion the official SwiGLU rule turns into `ffn` at this d_model: the spec's own, else one made up."""
    d = spec.model.d_model
    written = (spec.raw.get("model") or {}).get("expansion")
    for e in (written, ffn * 3 / (2 * d)):
        if isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0 and swiglu_width(d, e) == ffn:
            return e
    return None


def _why_not(spec: Spec, r: Roles | None) -> list[str]:
    """Why `spec` is not an official HRM or TRM model (empty when it is)."""
    m, why = spec.model, []
    if r is None:
        why.append("the schedule must be [{repeat: H_cycles, do: [{repeat: L_cycles, do: ['z_L = L(z_L + z_H + x)']}, "
                   "'z_H = H(z_H + z_L)']}] with the output z_H and two states (L and H may be one module: TRM)")
    if {s.init for s in m.states} != {"buffer"}:
        why.append("both states must have init: buffer (H_init, L_init)")
    blocks = {mod.block for mod in m.modules}
    if len(blocks) > 1:
        why.append("every module must share one block")
    b = m.modules[0].block
    if (b.norm.type, b.norm.affine, b.norm.place) != ("rms", False, "post"):
        why.append("the block norm must be rms with affine false and place post")
    a, e = b.attention, _expansion_of(spec, b.ffn)
    token = a.type == "token_mlp"  # TRM's mlp_t
    if not token and (a.type, a.mask, a.bias) != ("plain", "bidirectional", False):
        why.append("attention must be plain and bidirectional without biases (or a token_mlp: TRM's mlp_t)")
    if a.rope_theta is not None and m.positions == "learned" and not token:
        why.append("rotary embeddings and learned positions together (pos_encodings is one of them)")
    if b.mlp != "swiglu" or e is None:
        why.append(f"the MLP must be swiglu of a width the official rule makes of an expansion (a multiple of 256), "
                   f"found {b.mlp} of {b.ffn}")
    length = m.max_seq_len + (m.puzzle.positions if m.puzzle else 0)
    if token and e is not None and a.ffn != swiglu_width(length, e):
        why.append(f"the token_mlp's width must be the official rule at the MLP's expansion {e:g} over the {length} "
                   f"positions of a row ({swiglu_width(length, e)}), found {a.ffn}")
    if any(mod.exit_norm is not None for mod in m.modules):
        why.append("modules must have exit_norm: none")
    if m.final_norm is not None:
        why.append("final_norm must be false")
    if m.head != "untied":
        why.append("the head must be untied (lm_head)")
    if m.head_dim != m.d_model // m.heads:
        why.append(f"head_dim must be d_model // heads ({m.d_model // m.heads}), found {m.head_dim}")
    if not math.isclose(m.embed_scale, math.sqrt(m.d_model), rel_tol=1e-12):
        why.append(f"embed_scale must be sqrt(d_model) ({math.sqrt(m.d_model):g}), found {m.embed_scale:g}")
    trm = len(m.modules) == 1
    if r is not None and trm and m.credit not in (CreditSpec(mode="last_cycle"), CreditSpec(mode="last",
                                                                                             last=r.L_cycles + 1)):
        why.append(f"credit must be last_cycle (or {{last: {r.L_cycles + 1}}}): TRM's gradient")
    if r is not None and not trm and m.credit != CreditSpec(mode="last", last=2):
        why.append("credit must be {last: 2} (HRM's one-step gradient)")
    if m.puzzle is not None and not trm and m.puzzle.positions != -(-m.puzzle.dim // m.d_model):
        why.append("HRM's puzzle positions must be ceil(puzzle dim / d_model)")
    o, sup = spec.objective, spec.supervision
    if (o.type, o.loss) not in {("grid", loss) for loss in LOSSES.values()}:
        why.append(f"the objective must be grid (stablemax or softmax), found {o.type}")
    if sup is None or sup.halting is None:
        why.append("the official models halt: supervision needs halting q_learning or bce")
    else:
        if sup.halting.weight != 0.5:
            why.append(f"the halting weight must be 0.5 (the official loss head's), found {sup.halting.weight:g}")
        if sup.halting.type == "bce" and not trm:
            why.append("HRM halts by q_learning only (bce halting is TRM's no_ACT_continue)")
    return why


def hrm_arch_from_spec(spec: Spec, forward_dtype: str = "bfloat16") -> HrmArch:
    """The official arch of an HRM- or TRM-shaped spec; CheckpointError listing every reason when it is not."""
    r = roles(spec)
    why = _why_not(spec, r)
    if why:
        raise CheckpointError(f"{spec.source}: spec '{spec.name}' is not an official HRM or TRM model: "
                              + "; ".join(why))
    if forward_dtype not in FORWARD_DTYPES:
        raise CheckpointError(f"forward_dtype must be one of {', '.join(FORWARD_DTYPES)}, "
                              f"found {quoted(forward_dtype)}")
    m, sup = spec.model, spec.supervision
    trm = r.H == r.L
    a = m.modules[0].block.attention
    token = a.type == "token_mlp"
    # a token_mlp model writes rope when it has no learned positions: its blocks never apply the tables
    pos = "learned" if m.positions == "learned" else "rope" if a.rope_theta is not None or token else "none"
    name = TRM_NAME if trm else TRM_HRM_NAME if token or pos == "none" else HRM_NAME
    return HrmArch(
        name=name, loss=spec.objective.loss, H_cycles=r.H_cycles, L_cycles=r.L_cycles,
        H_layers=0 if trm else m.module(r.H).layers, L_layers=m.module(r.L).layers,
        hidden_size=m.d_model, num_heads=m.heads, expansion=_expansion_of(spec, m.modules[0].block.ffn),
        rms_norm_eps=m.modules[0].block.norm.eps, rope_theta=a.rope_theta or 10000.0, pos_encodings=pos,
        puzzle_emb_ndim=m.puzzle.dim if m.puzzle else 0, puzzle_emb_len=m.puzzle.positions if m.puzzle else 0,
        halt_max_steps=sup.segments, halt_exploration_prob=sup.halting.exploration, halting=sup.halting.type,
        mlp_t=token, forward_dtype=forward_dtype,
    )


__all__ = [
    "ARCHS",
    "ARCH_FILE",
    "FORWARD_DTYPES",
    "HrmArch",
    "Roles",
    "Sizes",
    "hrm_arch_from_spec",
    "read_arch_file",
    "read_hrm_arch",
    "roles",
    "spec_from_hrm_arch",
    "training_from_config",
    "config_from_training",
    "official_dataset",
]
