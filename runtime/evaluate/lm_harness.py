"""A trained run as a model of EleutherAI's lm-evaluation-harness (`lm_eval --model hrmspec`).

Importing this module registers the model class `HrmspecLM` under the name ``hrmspec``; the package
also declares it as an ``lm_eval.models`` entry point, for lm-eval releases that discover plugins.

Every request is laid out as training lays out a sample (`format_sample`): the context is the
instruction, ``<|im_start|>[<|condition|>]context<|im_end|>``, seen both ways as the PrefixLM prefix,
and the continuation is the response after it, scored causally. The whitespace lm-eval puts between
the two (a task's `target_delimiter`) is dropped: in this layout `<|im_end|>` is the boundary, and a
trained response never starts with a space.

- ``loglikelihood``: the log-probability of the response tokens (with ``score_eos=true`` also of the
  `<|box_end|>` that ends a response) and whether greedy decoding gives exactly them. Requests are
  sorted by length and packed side by side into rows, ``batch_size`` requests per forward, with the
  document mask and restarted positions of training rows.
- ``loglikelihood_rolling``: the text as one long response to an empty instruction, in windows of the
  model's length: each window predicts the tokens it adds, seeing up to a window of the text before.
- ``generate_until``: greedy decoding with the KV cache until `<|box_end|>` or ``max_gen_toks``, the
  text then cut at the first stop string of ``until``. Sampling is refused.

A context too long for ``model.max_seq_len`` loses the start of its instruction (the markers stay);
a generation gets the room the prompt leaves, at most ``max_gen_toks``.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import lm_eval.models  # noqa: F401  (the built-in models first: lm-eval fills an empty registry only)
import torch
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from hrmspec.errors import HrmspecError
from hrmspec.runtime.artifacts.data import DataError, Sample, format_sample
from hrmspec.runtime.artifacts.packing import pack
from hrmspec.runtime.artifacts.tokenizer import TokenizerError
from hrmspec.runtime.evaluate.heldout import decode_responses, load_run
from hrmspec.runtime.execution.depth import DepthPolicy
from hrmspec.runtime.execution.generate import compile_refusal

log = logging.getLogger(__name__)

DEFAULT_BATCH = 16  # requests per forward when lm-eval asks for "auto"


class LmEvalError(HrmspecError):
    """A run or a request lm-eval cannot evaluate with an hrmspec model."""


@dataclass
class Scored:
    """Score response[skip:] after the prompt (the tokens before `skip` are context inside the response)."""

    prompt: list[int]
    response: list[int]
    skip: int = 0


@register_model("hrmspec")
class HrmspecLM(LM):
    """The newest checkpoint of a run folder. Model arguments: ``path`` (the run), ``condition`` (a
    condition token put before every instruction, e.g. ``direct``), ``score_eos``, ``ema`` (default true:
    the EMA weights, as `hrmspec eval` uses), ``compile`` (generate_until decodes with the compiled decode
    step, as `hrmspec eval --compile`), and lm-eval's ``batch_size`` and ``device``."""

    def __init__(self, path: str | None = None, condition: str | None = None, score_eos: bool = False,
                 ema: bool = True, batch_size: int | str | None = None, max_batch_size: int | None = None,
                 device: str | None = None, compile: bool = False, **unknown) -> None:  # noqa: A002
        super().__init__()
        if unknown:
            raise LmEvalError(f"unknown model argument(s) {', '.join(sorted(unknown))}; hrmspec takes path, "
                              "condition, score_eos, ema, compile")
        if not path:
            raise LmEvalError("no run folder: pass --model_args path=RUN_DIR")
        model, tokenizer, spec, last = load_run(Path(path), use_ema=bool(ema))
        if tokenizer is None:
            raise LmEvalError(f"{path} is a grid run (objective: grid): it has no tokenizer and scores no text; "
                              "evaluate it with `hrmspec eval`")
        self.spec, self.checkpoint, self.tokenizer = spec, last, tokenizer
        self.max_length = spec.model.max_seq_len
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self._device = _device(device)
        self.model = model.to(self._device).eval()
        self.compile = bool(compile)
        why = compile_refusal(self.model) if self.compile else None
        if why:
            raise LmEvalError(f"compile=True: {why}")
        self.score_eos = bool(score_eos)
        self.head = [tokenizer.im_start_id]  # the markers before the instruction's own tokens
        self.condition = condition or None
        if self.condition is not None:
            try:
                self.head.append(tokenizer.token_id(self.condition))
            except (TokenizerError, DataError) as e:
                raise LmEvalError(f"condition {self.condition!r}: {e}") from None

    # ------------------------------------------------------------------ layout

    def prompt_ids(self, context: str, room: int) -> list[int]:
        """The prompt of a context (format_sample's layout), at most `room` tokens: a longer one loses the
        start of its instruction, never its markers."""
        ids = self.tokenizer.encode(format_sample(Sample(context.rstrip(), "", self.condition))[0])
        if len(ids) <= room:
            return ids
        keep = room - len(self.head) - 1  # instruction tokens that fit between the markers
        if keep < 0:
            raise LmEvalError(f"no room for a prompt: {room} tokens left of model.max_seq_len {self.max_length}")
        log.warning("a prompt of %d tokens is cut to %d (model.max_seq_len %d)", len(ids), room, self.max_length)
        return self.head + ids[len(ids) - 1 - keep:-1] + ids[-1:]

    # ------------------------------------------------------------------ lm-eval's requests

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        items = []
        for req in requests:
            context, continuation = req.args
            response = self.tokenizer.encode(continuation.lstrip())
            response += [self.tokenizer.eos_id] if self.score_eos else []
            if len(response) > self.max_length - len(self.head) - 1:
                raise LmEvalError(f"a continuation of {len(response)} tokens leaves no room for its prompt in "
                                  f"model.max_seq_len {self.max_length}")
            items.append(Scored(self.prompt_ids(context, self.max_length - len(response)), response))
        return self._cached("loglikelihood", requests, self.score(items))

    def loglikelihood_rolling(self, requests) -> list[float]:
        prompt = self.prompt_ids("", self.max_length)
        width = self.max_length - len(prompt)  # response tokens per window
        items, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            tokens = self.tokenizer.encode(text)
            for start in range(0, len(tokens), width):
                end = min(start + width, len(tokens))
                first = max(0, end - width)  # the window fills up with the text before it
                items.append(Scored(prompt, tokens[first:end], skip=start - first))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self.score(items)):
            totals[n] += logprob
        return self._cached("loglikelihood_rolling", requests, totals)

    def generate_until(self, requests) -> list[str]:
        groups: dict[int, list[int]] = defaultdict(list)  # new tokens -> requests (their prompts fit beside them)
        prompts, stops = [], []
        for n, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample", float(kwargs.get("temperature") or 0) > 0):
                raise LmEvalError("hrmspec decodes greedily under lm-eval: set do_sample: false (and temperature: 0)")
            until = kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            ids = self.prompt_ids(context, self.max_length - 1)
            new = min(int(kwargs.get("max_gen_toks", 256)), self.max_length - len(ids))
            prompts.append(ids)
            groups[new].append(n)
        texts = [""] * len(requests)
        for new, members in tqdm(groups.items(), desc="hrmspec generate_until", unit="group"):
            rows = decode_responses(self.model, [prompts[n] for n in members], new, self.tokenizer.eos_id,
                                    self.batch_size, DepthPolicy(compile=self.compile))
            for n, row in zip(members, rows):
                texts[n] = cut_at_stops(self.tokenizer.decode(row, skip_special=True), stops[n])
        return self._cached("generate_until", requests, texts)

    def _cached(self, kind: str, requests, results: list) -> list:
        """`results`, each also handed to lm-eval's response cache (--use_cache)."""
        for req, res in zip(requests, results):
            self.cache_hook.add_partial(kind, req.args, res)
        return results

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        raise LmEvalError("hrmspec models lay out every request in their own chat format; drop --apply_chat_template")

    def get_model_info(self) -> dict:
        return {"model_name": self.spec.name, "checkpoint": str(self.checkpoint),
                "model_num_parameters": self.model.num_parameters()}

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, items: list[Scored]) -> list[tuple[float, bool]]:
        """(sum of log p(response[skip:]), whether greedy decoding gives them) per item. Longest first,
        `batch_size` items per forward, packed into rows as training packs samples."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(items)
        todo = sorted((i for i, it in enumerate(items) if len(it.response) > it.skip),
                      key=lambda i: -len(items[i].prompt) - len(items[i].response))
        for start in tqdm(range(0, len(todo), self.batch_size), desc="hrmspec scoring", unit="batch"):
            chunk = todo[start:start + self.batch_size]
            pairs = [(items[i].prompt, items[i].response) for i in chunk]
            rows, stats = pack(pairs, max(len(p) + len(r) for p, r in pairs), pad_id=self.tokenizer.pad_id)
            assert stats.packed == len(pairs), stats  # every pair fits: the row is as long as the longest
            logits = self.model(rows.input_ids.to(self._device), prefix_mask=rows.prefix_mask.to(self._device),
                                doc_ids=rows.doc_ids.to(self._device),
                                position_ids=rows.position_ids.to(self._device)).logits
            for r, members in enumerate(rows.sources):
                t = 0  # where the sample starts in its row
                for k in members:
                    it = items[chunk[k]]
                    P, R = len(it.prompt), len(it.response)
                    # position q predicts token q + 1: the last prompt token the first response token
                    logp = logits[r, t + P - 1 + it.skip:t + P + R - 1].float().log_softmax(-1)
                    target = torch.tensor(it.response[it.skip:], device=logp.device)
                    results[chunk[k]] = (float(logp.gather(-1, target[:, None]).sum()),
                                         bool((logp.argmax(-1) == target).all()))
                    t += P + R
        return results


def run_cli(argv: list[str]) -> int:
    """lm-eval's command line on `argv` (its arguments, without the program name), with `hrmspec`
    registered: the exit code."""
    saved, sys.argv = sys.argv, ["lm-eval", *argv]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    except SystemExit as e:  # its usage errors and --help
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = saved
    return 0


def cut_at_stops(text: str, stops: list[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    end = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:end]


def _device(name: str | None) -> torch.device:
    """The device asked for; CPU where a CUDA device is asked for (lm-eval's command line asks for cuda:0
    by default) and there is none."""
    try:
        device = torch.device(name or "cpu")
    except RuntimeError:
        raise LmEvalError(f"device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("no CUDA device here: evaluating on the CPU")
        return torch.device("cpu")
    return device


def _batch_size(value: int | str | None, most: int | None) -> int:
    """lm-eval's batch size: an integer, or 'auto' / 'auto:N' (no search here: DEFAULT_BATCH, at most
    max_batch_size)."""
    if value is None:
        return 1
    text = str(value)
    if text.startswith("auto"):
        return min(DEFAULT_BATCH, most or DEFAULT_BATCH)
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise LmEvalError(f"batch_size {text!r}: expected a positive integer or 'auto'")
    return size
