"""What every shipped spec computes, pinned: the runtime may be rebuilt, the numbers may not move.

For each spec in specs/, shrunk to a few thousand parameters (`small`) and seeded, the golden file
tests/golden/runtime/<spec>.safetensors holds:

    train      the losses of 3 training steps through `train()` (tiny jsonl data for text, mini sudoku
               for grids): data, tokenizer, trainer, optimizer, credit plan, recurrence draws
    logits     a forward's logits on a fixed batch (eval mode, the model as initialised)
    greedy     greedy tokens with the KV cache and without (re-running the whole sequence), and each
               choice's margin (top-1 minus top-2 logit)
    exit       one decode under an exit criterion (kl:1e-3) with the steps each position ran, for a
               spec with one loop an exit applies to
    segment    one supervised segment of a grid spec in training (logits, q_halt, q_continue, the Q
               target) and `solve`'s logits and segments

On the machine that recorded a file (the same CPU model, torch version and thread count: `SIGNATURE`)
every value must be bit-identical; elsewhere the float kernels may round differently, so values are
held to 1e-4 relative and tokens must agree up to the first choice whose recorded margin was below
1e-3 (past a near-tie a rounding difference may pick the other token, and what follows from it).
Regenerate with HRMSPEC_UPDATE_GOLDEN=1 only for an intended change of what a spec computes.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch
import yaml
from golden_file import GOLDEN, UPDATE_GOLDEN
from safetensors.torch import load_file, save_file

import hrmspec
from hrmspec.capabilities import refusal
from hrmspec.runtime.execution.depth import DecodeStats
from hrmspec.runtime.execution.supervision import Supervisor
from hrmspec.runtime.training.loop import train
from hrmspec.spec import load_spec, load_spec_text

SPECS = sorted(p.stem for p in (Path(hrmspec.__file__).parent.parent / "specs").glob("*.yaml"))
FOLDER = GOLDEN / "runtime"
WORDS = ["cat", "dog", "bird", "fish", "owl", "bee", "ant", "cow", "yak", "emu", "elk", "fox", "hen", "pig"]


def _cpu_model() -> str:
    """The processor's name, family and model (two EPYCs of other families share a name)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "cpu family", "model", "flags") and key.strip() not in fields:
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    if not fields:
        return platform.processor() or platform.machine()
    isa = " ".join(sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx", "fma", "amx"))))
    return f"{fields.get('model name')} family {fields.get('cpu family')} model {fields.get('model')} [{isa}]"


SIGNATURE = json.dumps({"cpu": _cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
                        "torch": torch.__version__, "threads": 1})


# -- the specs, small -------------------------------------------------------------------------------------
def _shrink_schedule(items: list) -> list:
    out = []
    for item in items:
        if isinstance(item, dict) and "repeat" in item:
            r = item["repeat"]
            if isinstance(r, dict):  # a sampled count: small, still drawn
                small = {"mean": 2, "max": 3, "low": 1, "high": 3, "eval": 2}
                r = {**r, **{k: v for k, v in small.items() if k in r}}
            else:
                r = min(int(r), 2)
            out.append({**item, "repeat": r, "do": _shrink_schedule(item["do"])})
        else:
            out.append(item)
    return out


def small(name: str, tmp: Path) -> hrmspec.spec.schema.Spec:
    """Spec `name` at a few thousand parameters, with tiny data and 3 training steps."""
    raw = load_spec(name).raw
    raw = json.loads(json.dumps(raw))  # a plain copy
    m = raw["model"]
    objective = raw.get("objective")
    grid = objective == "grid" or (isinstance(objective, dict) and objective.get("type") == "grid")
    m.update(d_model=32, heads=2)
    m.pop("embed_scale", None)
    for key in ("ffn",):
        if key in m:
            m[key] = 48
    if "expansion" in m:
        m["expansion"] = 2
    for mod in m["modules"].values():
        mod["layers"] = 1
    m["schedule"] = _shrink_schedule(m["schedule"])
    if raw.get("supervision"):
        raw["supervision"]["segments"] = min(raw["supervision"].get("segments", 2), 3)
    train_cfg = {"steps": 3, "batch_size": 4, "log_every": 1, "save_every": 3, "eval_every": 0, "lr": 3e-3,
                 "warmup": 0.0, "seed": 0, "threads": 1}
    if "ema" in (raw.get("train") or {}):
        train_cfg["ema"] = raw["train"]["ema"]
    if grid:
        m.update(vocab=max(m["vocab"], 6), max_seq_len=16)
        if m.get("puzzle"):
            m["puzzle"] = {**m["puzzle"], "identifiers": 4}
        raw["data"] = {"grids": ["mini_sudoku"], "size": 32, "eval_size": 4}
    else:
        m.update(vocab=320, max_seq_len=64)
        path = tmp / "train.jsonl"
        path.write_text("".join(json.dumps({"instruction": f"reverse {w}", "response": w[::-1]}) + "\n"
                                for w in WORDS))
        raw["data"] = {"source": "jsonl", "path": str(path)}
        train_cfg["seq_len"] = 32
    raw["train"] = train_cfg
    raw.pop("extends", None)
    return load_spec_text(yaml.safe_dump(raw, sort_keys=False))


# -- what is recorded ---------------------------------------------------------------------------------------
def _is_grid(spec) -> bool:
    return spec.objective.type == "grid"


def _model(spec):
    torch.manual_seed(0)
    model = hrmspec.compile(spec)
    model.reset_parameters(seed=1)
    with torch.no_grad():  # weights away from their init (zero heads, unit norms), so every part shows
        gen = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _greedy(model, ids, prefix, use_cache: bool, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and, for each choice, the margin between the two largest logits of a full-depth forward
    over the result (what tells a near-tie, where another machine's rounding may choose otherwise)."""
    tokens = model.generate(ids, 6, prefix_mask=prefix, use_cache=use_cache, **kw)
    S = ids.shape[1]
    full_prefix = torch.cat([prefix, torch.zeros_like(tokens[:, S:], dtype=torch.bool)], 1)
    logits = model(tokens, prefix_mask=full_prefix).logits[:, S - 1:-1].float()
    top = logits.topk(2, dim=-1).values
    return tokens, top[..., 0] - top[..., 1]


def record(name: str, tmp: Path) -> tuple[dict[str, torch.Tensor], dict]:
    spec = small(name, tmp)
    torch.set_num_threads(1)
    tensors: dict[str, torch.Tensor] = {}
    facts: dict = {}
    run = tmp / "run"
    train(spec, run, progress_bar=False)
    facts["train_losses"] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                             if "loss" in json.loads(line)]
    model = _model(spec)
    gen = torch.Generator().manual_seed(3)
    vocab = spec.model.vocab
    with torch.no_grad():
        if _is_grid(spec):
            ids = torch.randint(1, vocab, (2, 16), generator=gen)
            batch = {"input_ids": ids, "labels": torch.randint(1, vocab, (2, 16), generator=gen),
                     "puzzle_ids": torch.tensor([0, 1])}
            tensors["logits"] = model(ids, puzzle_ids=batch["puzzle_ids"]).logits
            sup = Supervisor(model)
            model.train()
            torch.manual_seed(4)  # exploration draws
            carry, out = sup.step(sup.initial_carry(batch), batch, training=True)
            tensors["segment.logits"] = out.logits
            for k in ("q_halt", "q_continue", "target_q_continue"):
                if getattr(out, k) is not None:
                    tensors[f"segment.{k}"] = getattr(out, k)
            model.eval()
            tensors["solve.logits"], tensors["solve.steps"] = sup.solve(batch)
        else:
            ids = torch.randint(1, vocab, (2, 7), generator=gen)
            prefix = torch.arange(7)[None].expand(2, 7) < 4
            tensors["logits"] = model(ids, prefix_mask=prefix).logits
            torch.manual_seed(5)  # random initial states
            tensors["greedy.cached"], tensors["greedy.cached_margin"] = _greedy(model, ids, prefix, True)
            torch.manual_seed(5)
            tensors["greedy.uncached"], tensors["greedy.uncached_margin"] = _greedy(model, ids, prefix, False)
            if not refusal(spec, "exit"):
                stats = DecodeStats()
                torch.manual_seed(6)
                tensors["exit.tokens"], tensors["exit.margin"] = _greedy(model, ids, prefix, True, exit="kl:1e-3",
                                                                         stats=stats)
                facts["exit_steps"] = {"prompt": stats.prompt, "decoded": stats.decoded}
    return {k: v.contiguous() for k, v in tensors.items()}, facts


# -- comparing ----------------------------------------------------------------------------------------------
def _tokens_agree(name: str, got: torch.Tensor, want: torch.Tensor, margin: torch.Tensor | None, exact: bool) -> None:
    if exact or margin is None or margin.numel() == 0:
        assert torch.equal(got, want), f"{name}: {got.tolist()} != {want.tolist()}"
        return
    new = got.shape[1] - margin.shape[1]
    for row in range(got.shape[0]):
        near = (margin[row] < 1e-3).nonzero()
        upto = new + (int(near[0]) if len(near) else margin.shape[1])
        assert torch.equal(got[row, :upto], want[row, :upto]), f"{name} row {row}: {got[row].tolist()} != " \
                                                               f"{want[row].tolist()}"


@pytest.mark.parametrize("name", SPECS)
def test_every_shipped_spec_computes_what_it_computed(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HRMSPEC_CACHE", str(tmp_path / "kernels"))
    threads = torch.get_num_threads()
    try:
        tensors, facts = record(name, tmp_path)
    finally:
        torch.set_num_threads(threads)
    path = FOLDER / f"{name}.safetensors"
    meta = {"signature": SIGNATURE, "facts": json.dumps(facts)}
    if UPDATE_GOLDEN:
        FOLDER.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
    assert path.is_file(), f"{path} is missing; record it with HRMSPEC_UPDATE_GOLDEN=1"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        stored_meta = f.metadata()
    want, want_facts = load_file(str(path)), json.loads(stored_meta["facts"])
    exact = stored_meta["signature"] == SIGNATURE
    assert sorted(tensors) == sorted(want), (sorted(tensors), sorted(want))
    assert facts.keys() == want_facts.keys()
    if exact:
        assert facts == want_facts
    else:
        assert facts["train_losses"] == pytest.approx(want_facts["train_losses"], rel=1e-4)
    for key, value in tensors.items():
        if key.endswith("_margin") or key.endswith(".margin"):
            continue
        if value.dtype.is_floating_point:
            if exact:
                assert torch.equal(value, want[key]), f"{name}: {key} differs (max |diff| " \
                                                      f"{float((value - want[key]).abs().max()):.3g})"
            else:
                torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        else:
            margin_key = key.replace("greedy.cached", "greedy.cached_margin").replace(
                "greedy.uncached", "greedy.uncached_margin").replace("exit.tokens", "exit.margin")
            _tokens_agree(f"{name} {key}", value, want[key], want.get(margin_key) if margin_key != key else None,
                          exact)
