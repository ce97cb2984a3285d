"""Generation with a KV cache: one [k, v] slot per (module call, layer).

The prompt is encoded once, with its bidirectional prefix (PrefixLM); then each new token runs
the whole recurrence, every module call attending to its own cached keys. Since prompt tokens
never attend to response tokens, this equals re-running the full sequence each step with the
prompt as prefix — which `generate(..., use_cache=False)` does, as a check.

With `model.halting` each position stops where its head says (`all_steps=True`: every step); a
token that stopped early fills the cache slots of later steps by the KV policy of
runtime/execution/driver.py, so both ways still agree. With `exit` (any spec with one
top-level loop) each position leaves the loop where that criterion says, by the same policy
(runtime/execution/adaptive.py; the criteria that read the latent agree both ways too).

How deep each position runs is one `DepthPolicy` (runtime/execution/depth.py: an exit criterion, a
halting spec's all_steps and threshold, the scale of random initial states, compiled decoding); what
decoding counts goes into a `DecodeStats` (tokens decoded, and the steps each position ran when the
forward walks its loop step by step).
"""

from __future__ import annotations

import torch

from hrmspec.capabilities import refusal
from hrmspec.runtime.execution.adaptive import AdaptiveDepth
from hrmspec.runtime.execution.decode import StaticCache, cache_length, compiled_step, decode_step, left_padded
from hrmspec.runtime.execution.depth import DecodeStats, DepthPolicy


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits (B, vocab): greedy at temperature 0, else sampled."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


def _choose(logits: torch.Tensor, done: torch.Tensor, temperature: float, top_k: int | None,
            gen: torch.Generator | None, eos_id: int | None, stats: DecodeStats | None) -> torch.Tensor:
    """The next token per row; rows already `done` get eos, rows producing eos are marked done (in place)."""
    nxt = _pick(logits, temperature, top_k, gen)
    if stats is not None:
        stats.tokens += int((~done).sum())
    if eos_id is not None:
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        done |= nxt == eos_id
    return nxt


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    prefix_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    depth: DepthPolicy | None = None,
    stats: DecodeStats | None = None,
    **policy,
) -> torch.Tensor:
    """Return (B, S + new) token ids: the prompts (B, S) followed by the decoded responses.

    `prefix_mask` (B, S) marks the instruction part of each prompt (default: the whole prompt).
    `attention_mask` (B, S) marks the real tokens of prompts of different lengths, left-padded to one
    length (1: token, 0: padding, as transformers has it): the padding is a document of its own that no
    real token sees, and each row's positions start at its first token, so every row decodes as it
    would alone, with halting or an exit rule too. A schedule with a fixed unrolling decodes on a static
    cache, one step function per token (runtime/execution/decode.py), compiled with torch.compile under
    `depth.compile`. Rows that produced `eos_id` are padded with it until every row is done. The prompts
    are moved to the model's device, and the ids returned live there.
    `depth`: how deep each position runs (`DepthPolicy`); its fields may also be given as keywords
    (`exit="kl:1e-3"`, `compile=True`, ...). `stats` receives what decoding counts (`DecodeStats`).
    """
    depth = DepthPolicy.of(depth, **policy)
    B, S = input_ids.shape
    device = model.embed.weight.device  # the prompts go where the model is; the ids come back from there
    input_ids = input_ids.to(device)
    if prefix_mask is None:
        prefix_mask = torch.ones_like(input_ids, dtype=torch.bool)
    prefix_mask = prefix_mask.to(device)
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    if padded and not left_padded(attention_mask):
        raise ValueError("generate: pad prompts on the left (attention_mask 0 before each row's first token)")
    static = depth.exit is None and not model.stepwise and use_cache
    if depth.compile and not static:
        raise ValueError(compile_refusal(model, depth.exit, use_cache))
    if static:
        return _decode_static(model, input_ids, max_new_tokens, prefix_mask, attention_mask, temperature, top_k,
                              eos_id, generator, stats, depth.init_scale, depth.compile)
    ids = input_ids
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    if depth.exit is None:  # the model's output states; the head on the last position only
        forward, options = model, {"all_steps": depth.all_steps, "threshold": depth.threshold,
                                   "init_scale": depth.init_scale, "return_logits": False}
        cache = model.new_cache() if use_cache else None
        most = model.plan.layout.count if model.stepwise else None
    else:
        forward = AdaptiveDepth(model, depth.exit, depth.max_steps, depth.warm_start, depth.init_scale)
        options = {"last_only": True}
        cache = forward.new_cache() if use_cache else None
        most = forward.max_steps
    real = attention_mask.to(device).bool() if padded else torch.ones_like(ids, dtype=torch.bool)
    prompt = _padding(real) if padded else {}
    prefix_mask = prefix_mask & real

    def run(new: int, part: str, *args, **kwargs) -> torch.Tensor:
        """The logits of the last position; the steps of the `new` last positions into `stats` (under `part`)."""
        out = forward(*args, **kwargs, **options)
        if stats is not None and out.steps is not None:
            counted = ~done[:, None] & (real[:, -new:] if part == "prompt" else True)  # not padding, not after eos
            stats.count(out.steps[:, -new:][counted], most, part)
        return out.logits[:, -1] if out.logits is not None else model.logits_of(out.hidden[:, -1])

    logits = run(S, "prompt", ids, prefix_mask=prefix_mask, cache=cache, **prompt)
    for step in range(max_new_tokens):
        nxt = _choose(logits, done, temperature, top_k, generator, eos_id, stats)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        decoded = ids.shape[1] - S
        if use_cache:
            logits = run(1, "decoded", nxt[:, None], cache=cache, **_continued(prompt, decoded, last_only=True))
        else:
            response = torch.zeros(B, decoded, dtype=torch.bool, device=ids.device)
            full_prefix = torch.cat([prefix_mask, response], dim=1)
            logits = run(1, "decoded", ids, prefix_mask=full_prefix, **_continued(prompt, decoded, last_only=False))
    return ids


def compile_refusal(model, exit=None, use_cache: bool = True) -> str | None:
    """Why `generate(..., compile=True)` cannot decode with `model` under these options (None: it can). The
    compiled step is the static cache's: a fixed unrolling, every position at full depth."""
    if model.decode_refusal:  # it does not decode at all: compiling changes nothing
        return f"{model.spec.name}: {model.decode_refusal}"
    why = refusal(model.spec, "compile", exit=exit, use_cache=use_cache)
    if not why:
        return None
    return (f"compiled decoding runs a schedule with a fixed unrolling on the KV cache; for {model.spec.name} {why}: "
            "decode without compile")


def _padding(real: torch.Tensor) -> dict[str, torch.Tensor]:
    """doc_ids and position_ids of left-padded prompts, `real` (B, S) marking their tokens: the padding is a
    document of its own (-1), which no real token sees, and each row counts positions from its first token."""
    return {"doc_ids": torch.where(real, 0, -1), "position_ids": (real.long().cumsum(1) - 1).clamp(min=0)}


def _continued(prompt: dict[str, torch.Tensor], decoded: int, last_only: bool) -> dict[str, torch.Tensor]:
    """doc_ids and position_ids (`_padding`'s, or {} for prompts without padding) of the prompts followed by
    `decoded` tokens: document 0, positions on from each row's last prompt token. `last_only` (decoding
    with a KV cache): the last token's position; doc_ids cover every key, cached ones included."""
    if not prompt:
        return {}
    pos = prompt["position_ids"]
    tail = pos[:, -1:] + torch.arange(1, decoded + 1, device=pos.device)
    return {"doc_ids": torch.cat([prompt["doc_ids"], torch.zeros_like(tail)], 1),
            "position_ids": tail[:, -1:] if last_only else torch.cat([pos, tail], 1)}


def _decode_static(model, input_ids, max_new_tokens, prefix_mask, attention_mask, temperature, top_k, eos_id,
                   generator, stats, init_scale, compile_step) -> torch.Tensor:
    """generate on the static cache (runtime/execution/decode.py), prompts left-padded by `attention_mask`."""
    B, S = input_ids.shape
    device = input_ids.device
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
    padding = _padding(real)
    positions = padding["position_ids"]
    cache = model.new_cache()
    out = model(input_ids, prefix_mask=prefix_mask & real, cache=cache, init_scale=init_scale, return_logits=False,
                **padding)
    logits = model.logits_of(out.hidden[:, -1])  # the last position's only: no (B, S, vocab) logits
    static = StaticCache.from_prefill(cache, real, cache_length(S + max_new_tokens, compile_step))
    layout, _ = model.layout_at(model.recurrence)
    step = compiled_step() if compile_step else decode_step
    pos = positions[:, -1]
    like = model.embed.weight.new_empty(B, 1, model.spec.model.d_model)  # the shape of a step's states
    tokens = [input_ids]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        nxt = _choose(logits, done, temperature, top_k, generator, eos_id, stats)
        tokens.append(nxt[:, None])
        if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
            break
        pos = pos + 1
        slot = torch.tensor([S + i], device=device)
        logits = step(model, layout, nxt, pos, slot, static, model.random_states(like, init_scale))
    return torch.cat(tokens, dim=1)
