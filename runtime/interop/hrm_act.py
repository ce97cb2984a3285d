"""The ACT interface of the official HRM and TRM models, on any CompiledModel with deep supervision.

sapientinc/HRM's `HierarchicalReasoningModel_ACTV1` and TRM's `TinyRecursiveReasoningModel_ACTV1`
are driven one segment at a time:

    carry = hrmspec.initial_carry(model, batch)  # every row halted: the first step takes its sample
    carry, out = hrmspec.act_step(model, carry, batch)  # one segment of every row

with `batch = {"inputs": (B, S) int, "puzzle_identifiers": (B,) int, "labels": (B, S) int}` (labels
optional) and `out = {"logits": (B, S, vocab), "q_halt_logits": (B,), "q_continue_logits": (B,)}`,
plus `"target_q_continue"` (B,) in training with q_learning halting. The official `forward(carry,
batch)` is `act_step`. Everything runs on the Supervisor (runtime/execution/supervision.py): these
functions only translate the official names to ours (`inputs` -> `input_ids`, `puzzle_identifiers`
-> `puzzle_ids`). The carry is the Supervisor's `Carry`: `carry.data` is the official
`current_data` under our names, `carry.states` its inner carry.

As in the official code, a model in training mode halts rows where the head says so (with
exploration, and the Q-learning target from one more no-grad forward); in eval mode every row
runs all `segments` (halt_max_steps), unless `halt=True` asks for halting at inference.
"""

from __future__ import annotations

import torch

from hrmspec.runtime.execution.supervision import Carry, Supervisor

OFFICIAL_KEYS = {"inputs": "input_ids", "puzzle_identifiers": "puzzle_ids", "labels": "labels"}


def _ours(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "inputs" not in batch:
        raise ValueError(f"an ACT batch holds 'inputs' (B, S) and 'puzzle_identifiers' (B,); found {sorted(batch)}")
    return {OFFICIAL_KEYS[k]: v for k, v in batch.items() if k in OFFICIAL_KEYS}


def initial_carry(model, batch: dict[str, torch.Tensor]) -> Carry:
    """The carry before the first step: every row halted, so the first step takes `batch`'s samples."""
    return Supervisor(model).initial_carry(_ours(batch))


def act_step(model, carry: Carry, batch: dict[str, torch.Tensor], halt: bool = False
             ) -> tuple[Carry, dict[str, torch.Tensor]]:
    """One segment of every row (see the module docstring); `halt`: halt at inference where the head says so."""
    carry, out = Supervisor(model).step(carry, _ours(batch), training=model.training, halt=halt)
    outputs = {"logits": out.logits}
    if out.q_halt is not None:
        outputs.update(q_halt_logits=out.q_halt, q_continue_logits=out.q_continue)
    if out.target_q_continue is not None:
        outputs["target_q_continue"] = out.target_q_continue
    return carry, outputs


__all__ = ["OFFICIAL_KEYS", "act_step", "initial_carry"]
