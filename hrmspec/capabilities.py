"""What each part of a spec supports, and the one place that refuses a combination it cannot run.

    attention type   mixes positions by      causal / PrefixLM-safe   decodes token by token   any row length
    gated, plain     attention and its mask  yes                      yes (a KV cache)          yes
    token_mlp        a fixed-length MLP      no: every position sees  no                        no
                     across the positions    every other

    how a forward runs         decodes with a cache    compiled decoding    an exit criterion (--exit)
    a fixed unrolling          yes                     yes                  with one top-level loop
    per-step halting           yes (latest KV policy)  no                   no (the model's own head)
    deep supervision / grids   no (whole rows)         no                   no
    an exit criterion          yes (latest KV policy)  no                   -

A combination that cannot work is refused where it is first known, with the reason and the way out:
the spec loader refuses a token_mlp, or a bidirectional mask, under a text objective (a position
would see the tokens it learns to predict), with file:line:col;
`refusal(spec, what)` answers for the regimes chosen at run time (`decode`, `compile`, `exit`), and
`validate`, `generate`, `eval` and the runtime's driver all ask it, before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionKind:
    causal_safe: bool  # can respect a causal or PrefixLM mask
    decodes: bool  # can run one new token at a time against a KV cache
    any_length: bool  # rows of any length (a token MLP's width is the row length)
    why: str = ""  # what it does that the others do not, for refusals


ATTENTION: dict[str, AttentionKind] = {
    "gated": AttentionKind(True, True, True),
    "plain": AttentionKind(True, True, True),
    "token_mlp": AttentionKind(False, False, False, "a token_mlp mixes every position of a fixed-length row "
                                                    "with every other"),
}

TEXT_OBJECTIVES = ("task_completion", "lm")  # the objectives that predict the next token


def mask_refusal(attention, objective_type: str) -> tuple[str, str] | None:
    """(what is wrong, the way out) for an attention spec under the objective, or None when it is sound."""
    kind = ATTENTION[attention.type]
    if not kind.causal_safe and objective_type in TEXT_OBJECTIVES:
        return (f"{kind.why}, whatever the mask: under the {objective_type} objective every position would see "
                "the tokens it learns to predict", "a token_mlp is for grids (objective: grid, where each position "
                "predicts its own cell); use attention type gated or plain for text")
    if objective_type in TEXT_OBJECTIVES and attention.mask == "bidirectional":
        return (f"the {objective_type} objective predicts each next token, but under mask 'bidirectional' every "
                "position sees the token it predicts",
                "use mask: prefix_lm (the instruction bidirectional, the response causal) or causal")
    return None


def refusal(spec, what: str, exit=None, use_cache: bool = True) -> str:
    """Why `spec` cannot run `what` ('' when it can):

        decode    token by token with a KV cache (generate, eval)
        compile   compiled decoding (generate(compile=True), eval --compile) under the other options
        exit      an exit criterion at inference (--exit)
    """
    m = spec.model
    grid = spec.supervision is not None or m.puzzle is not None or spec.objective.type == "grid"
    fixed = next((mod for mod in m.modules if not ATTENTION[mod.block.attention.type].decodes), None)
    if what == "decode":
        if grid:
            return "it runs whole puzzles in segments, one forward per segment; there is nothing to decode"
        if fixed is not None:
            return f"module {fixed.name}: {ATTENTION[fixed.block.attention.type].why}; it cannot decode token by " \
                   "token with a KV cache"
        return ""
    if what == "compile":
        why = refusal(spec, "decode")
        if why:
            return why
        if m.halting is not None or spec.objective.steps == "sum":
            return "the loop halts per step (model.halting)" if m.halting is not None else \
                "the loop is walked step by step (objective.steps: sum)"
        if exit is not None:
            return f"an exit criterion ({exit}) gives each position its own depth"
        if not use_cache:
            return "use_cache=False re-runs the whole sequence"
        return ""
    if what == "exit":
        if m.halting is not None:
            return (f"its positions halt by the model's own head (model.halting: {m.halting.type}); use --threshold "
                    "or --all-steps instead of --exit")
        if grid:
            return "it runs whole puzzles in segments (deep supervision); --exit is for a language model's loop"
        if fixed is not None:
            return f"module {fixed.name}: {ATTENTION[fixed.block.attention.type].why}; it cannot decode token by token"
        loops = sum(hasattr(item, "body") for item in m.schedule)  # a Repeat (the loader imports this module)
        if loops == 0:
            return "its schedule has no repeat block: there is no loop to exit from"
        if loops > 1:
            return f"its schedule has {loops} top-level repeat blocks; an exit criterion needs exactly one loop"
        return ""
    raise ValueError(f"unknown regime {what!r}; expected decode, compile or exit")


__all__ = ["ATTENTION", "TEXT_OBJECTIVES", "AttentionKind", "mask_refusal", "refusal"]
