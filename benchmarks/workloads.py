"""The workloads the benchmarks measure, shared by the pytest suites and report.py.

One HRM-Text configuration (the tiny spec: d_model 128, 4 heads x 32, SwiGLU 384, 2 layers per
stack, vocab 320) run two ways on the same weights and the same batch:

* hrmspec's reference runtime, `hrmspec.compile(spec, overrides=...)`;
* transformers' `HrmTextForCausalLM` (attn_implementation="sdpa"), built from the spec with
  `hrmspec.runtime.interop.convert.hf_config_from_spec` and loaded with our weights.

The credit plan is the same in both: transformers' `L_bp_cycles` is our
`credit: {per_cycle: {L: [...]}}` (H calls always carry gradient in both).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import HrmTextConfig, HrmTextForCausalLM

import hrmspec
from hrmspec.graph import analyse, build_graph
from hrmspec.runtime.execution import CompiledModel
from hrmspec.runtime.interop.convert import hf_config_from_spec, state_dict_to_hf

SPEC = "hrm-text-tiny"


def hrm_schedule(h_cycles: int, l_cycles: int) -> list:
    """HRM-Text's schedule as a spec value (for the `model.schedule` override)."""
    return [{"repeat": h_cycles, "do": [{"repeat": l_cycles, "do": ["z_L = L(z_L + z_H)"]}, "z_H = H(z_H + z_L)"]}]


@dataclass(frozen=True)
class Workload:
    """A schedule, a credit plan and a batch shape."""

    h_cycles: int = 2
    l_cycles: int = 3
    credit: dict[str, Any] = field(default_factory=lambda: {"per_cycle": {"L": [1, 2]}})  # L_bp_cycles [1, 2]
    batch: int = 8
    seq_len: int = 256
    prefix_frac: float = 1 / 3  # instruction tokens (bidirectional, no loss) at the start of each row
    extra: dict[str, Any] = field(default_factory=dict)  # further spec overrides, e.g. {"model.vocab": 32768}

    @property
    def calls(self) -> int:
        return self.h_cycles * (self.l_cycles + 1)

    def overrides(self) -> dict[str, Any]:
        return {
            "model.schedule": hrm_schedule(self.h_cycles, self.l_cycles),
            "model.credit": self.credit,
            "model.max_seq_len": max(256, self.seq_len),
            **self.extra,
        }


# loss_memory.py: a small body under a large vocabulary, so the head and the loss dominate
LOSS_BODY = {
    "model.d_model": 256,
    "model.heads": 4,  # x 64
    "model.ffn": 768,
    "model.modules": {"L": {"layers": 1}, "H": {"layers": 1}},
}


def loss_workload(vocab: int, batch: int = 8, seq_len: int = 512) -> Workload:
    """The loss-path workload: d_model 256, one layer per module, one L and one H call (both carry
    gradient), `vocab` tokens, untied head."""
    return Workload(1, 1, "none", batch=batch, seq_len=seq_len, extra={"model.vocab": vocab, **LOSS_BODY})


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, S)
    prefix_mask: torch.Tensor  # (B, S) bool, True on instruction tokens
    labels: torch.Tensor  # (B, S) ours: the token position t predicts, -100 where not counted
    hf_labels: torch.Tensor  # (B, S) transformers': the tokens themselves (it shifts), -100 on the prefix
    token_type_ids: torch.Tensor  # (B, S) 1 on the prefix: transformers' bidirectional block

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def make_batch(w: Workload, vocab: int, seed: int = 0) -> Batch:
    """Random tokens; the first third of each row is the instruction, the rest the response."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (w.batch, w.seq_len), generator=gen)
    prefix = torch.zeros(w.batch, w.seq_len, dtype=torch.bool)
    prefix[:, : round(w.seq_len * w.prefix_frac)] = True
    hf_labels = ids.masked_fill(prefix, -100)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = hf_labels[:, 1:]  # the last instruction token predicts the first response token
    return Batch(ids, prefix, labels, hf_labels, prefix.long())


def hrmspec_model(w: Workload, seed: int = 0) -> CompiledModel:
    model = hrmspec.compile(SPEC, overrides=w.overrides())
    model.reset_parameters(seed)
    return model.train()


def hf_model(ours: CompiledModel) -> HrmTextForCausalLM:
    """transformers' HRM-Text with the config and the weights of `ours`."""
    config = HrmTextConfig.from_dict({**hf_config_from_spec(ours.spec), "use_cache": False})
    config._attn_implementation = "sdpa"
    model = HrmTextForCausalLM(config)
    model.load_state_dict(state_dict_to_hf(ours, layout="module"), strict=True)
    return model.train()


def _autocast(dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


def train_step_hrmspec(
    model: CompiledModel, b: Batch, dtype: torch.dtype = torch.float32, return_logits: bool = True
) -> torch.Tensor:
    """Forward + backward (no optimizer); returns the loss. `return_logits=True` (the default, as
    transformers does) builds the full (B, S, vocab) logits and takes the loss from them;
    `return_logits=False` is the training path (runtime/training/loop.py): the loss in row chunks."""
    model.zero_grad(set_to_none=True)
    with _autocast(dtype):
        out = model(b.input_ids, prefix_mask=b.prefix_mask, labels=b.labels, return_logits=return_logits)
    out.loss.backward()
    return out.loss.detach()


def train_step_hf(model: HrmTextForCausalLM, b: Batch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Forward + backward (no optimizer); returns the loss."""
    model.zero_grad(set_to_none=True)
    with _autocast(dtype):
        out = model(input_ids=b.input_ids, token_type_ids=b.token_type_ids, labels=b.hf_labels, use_cache=False)
    out.loss.backward()
    return out.loss.detach()


STEPS = {"hrmspec": train_step_hrmspec, "transformers": train_step_hf}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- memory


def saved_activation_bytes(
    model: torch.nn.Module, b: Batch, impl: str = "hrmspec", dtype: torch.dtype = torch.float32, **step_kwargs
) -> int:
    """Bytes of the tensors a training step keeps for backward (`saved_bytes` of the step; hrmspec
    `step_kwargs`: `return_logits`)."""
    return saved_bytes(model, lambda: STEPS[impl](model, b, dtype, **step_kwargs))


def saved_bytes(model: torch.nn.Module, run) -> int:
    """Bytes of the tensors autograd saves while `run()` runs: the unique storages it saves during the
    forward pass, parameters and buffers excluded (autocast's low-precision weight copies are counted).
    Deterministic: no allocator involved."""
    params = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    # every saved storage stays alive until backward, so no two of them share an address
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def predicted_activation_bytes(model: CompiledModel, b: Batch, return_logits: bool = True) -> float:
    """The graph analysis' estimate of the same quantity, in fp32 (with full logits, as the step's default)."""
    stats = analyse(build_graph(model.spec, model.progress), seq_len=b.input_ids.shape[1], dtype_bytes=4,
                    logits=return_logits)
    return stats.activation_bytes_per_token * b.tokens
