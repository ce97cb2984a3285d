"""Greedy decoding the slow, obvious way, to check `generate` against: at every step the whole sequence so
far runs through the model's forward (no KV cache), the prompt marked as the PrefixLM prefix and every
token after it as response, and the argmax of the last position is appended. No eos handling: what
`generate` must do at an eos is derived from this stream by `stopped_at`."""

import torch


@torch.no_grad()
def greedy_loop(model, prompt: torch.Tensor, new: int,
                prefix_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(the prompt followed by `new` greedy tokens per row, the smallest gap between the best and second-best
    logit of any step: a near tie may break either way under another summation order)."""
    B, S = prompt.shape
    prefix = torch.ones(B, S, dtype=torch.bool) if prefix_mask is None else prefix_mask
    ids, gap = prompt, float("inf")
    for _ in range(new):
        mask = torch.cat([prefix, torch.zeros(B, ids.shape[1] - S, dtype=torch.bool)], dim=1)
        logits = model(ids, prefix_mask=mask).logits[:, -1]
        top = logits.topk(2, dim=-1).values
        gap = min(gap, float((top[:, 0] - top[:, 1]).min()))
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids, gap


def stopped_at(stream: torch.Tensor, prompt_len: int, eos: int) -> torch.Tensor:
    """What greedy decoding with `eos` returns given the eos-free `stream`: each row's tokens up to its first
    eos, eos after it; the columns end once every row has stopped (at the stream's end if one never does)."""
    response = stream[:, prompt_len:].clone()
    ends = []
    for row in response:
        hits = (row == eos).nonzero().flatten().tolist()
        ends.append(hits[0] + 1 if hits else len(row))
        row[ends[-1]:] = eos
    return torch.cat([stream[:, :prompt_len], response[:, :max(ends)]], dim=1)


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one batch, each ending at the last column: (ids, attention_mask),
    the padding holding `pad`."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    real = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        real[row, width - len(p):] = 1
    return ids, real
