"""Generation with a KV cache: one [k, v] slot per (module call, layer).

The prompt is encoded once, with its bidirectional prefix (PrefixLM); then each new token runs
the whole recurrence, every module call attending to its own cached keys. Since prompt tokens
never attend to response tokens, this equals re-running the full sequence each step with the
prompt as prefix — which `generate(..., use_cache=False)` does, as a check.
"""

from __future__ import annotations

import torch


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits (B, vocab): greedy at temperature 0, else sampled."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


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
) -> torch.Tensor:
    """Return (B, S + new) token ids: the prompts (B, S) followed by the decoded responses.

    `prefix_mask` (B, S) marks the instruction part of each prompt (default: the whole prompt).
    Rows that produced `eos_id` are padded with it until every row is done.
    """
    B, S = input_ids.shape
    if prefix_mask is None:
        prefix_mask = torch.ones_like(input_ids, dtype=torch.bool)
    ids = input_ids
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    cache = model.new_cache() if use_cache else None
    logits = model(ids, prefix_mask=prefix_mask, cache=cache).logits[:, -1]
    for step in range(max_new_tokens):
        nxt = _pick(logits, temperature, top_k, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if use_cache:
            logits = model(nxt[:, None], cache=cache).logits[:, -1]
        else:
            response = torch.zeros(B, ids.shape[1] - S, dtype=torch.bool, device=ids.device)
            response = torch.zeros(B, ids.shape[1] - S, dtype=torch.bool, device=ids.device)
            full_prefix = torch.cat([prefix_mask, response], dim=1)
            logits = model(ids, prefix_mask=full_prefix).logits[:, -1]
    return ids
