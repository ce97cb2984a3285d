"""Held-out answers fixed in advance, so that an evaluation's reported accuracy has a known value.

`KnownAnswers` stands in for heldout.decode_answers: the real decoding still runs (its timing and steps
statistics fill as usual), then the answer to held-out sample i is replaced by that sample's gold response
where `right(i, model, options)` says so and by WRONG elsewhere; `model` is the model evaluated and
`options` are decode_answers' keyword arguments (e.g. the exit criterion of adaptive depth). The task's own
checker must score the gold response 1 and WRONG 0, so the accuracy is exactly the fraction `right` chose."""

from collections.abc import Callable

from hrmspec.runtime.artifacts.data import Sample, format_sample
from hrmspec.runtime.evaluate import heldout

WRONG = "not an answer"
_decode = heldout.decode_answers


class KnownAnswers:
    def __init__(self, samples: list[Sample], right: Callable[[int, object, dict], bool]):
        self.samples, self.right = samples, right
        self.answered: list[list[int]] = []  # the samples each call answered, by index

    def install(self, monkeypatch) -> "KnownAnswers":
        monkeypatch.setattr(heldout, "decode_answers", self)
        return self

    def __call__(self, model, tokenizer, prompts: list[list[int]], max_new_tokens: int, **options) -> list[str]:
        decoded = _decode(model, tokenizer, prompts, max_new_tokens, **options)
        index = {tuple(tokenizer.encode(format_sample(s)[0])): i for i, s in enumerate(self.samples)}
        which = [index[tuple(p)] for p in prompts]
        self.answered.append(which)
        assert len(decoded) == len(which)
        return [self.samples[i].response if self.right(i, model, options) else WRONG for i in which]
