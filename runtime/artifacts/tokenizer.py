"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) with the chat markers as special tokens.

Ids 0.. are the special tokens, in this order: ``<|pad|>``, ``<|im_start|>``, ``<|im_end|>``,
``<|box_end|>`` (the eos: it ends a response), then one ``<|condition|>`` token per condition.
The 256 byte symbols follow, so any text can be encoded, and BPE merges fill the rest of the
vocabulary. Digits are split one per token by default: numbers then share their digit tokens
and a small model can learn arithmetic column by column instead of memorising merged numbers.

The tokenizer is stored as a standard ``tokenizer.json``; ``Tokenizer.load`` also accepts one
made elsewhere and adds whichever of the four markers it lacks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from hrmspec import progress
from hrmspec.errors import HrmspecError
from hrmspec.runtime.artifacts.data import BOX_END, DEFAULT_CONDITIONS, IM_END, IM_START, PAD, condition_token
from hrmspec.runtime.artifacts.files import atomic_write

MARKERS = (PAD, IM_START, IM_END, BOX_END)
N_BYTES = 256


def special_tokens(conditions: Sequence[str] = DEFAULT_CONDITIONS) -> list[str]:
    """All special tokens, markers first, then one per condition."""
    return list(MARKERS) + [condition_token(c) for c in conditions if condition_token(c) not in MARKERS]


def min_vocab_size(conditions: Sequence[str] = DEFAULT_CONDITIONS) -> int:
    """The smallest vocabulary that holds every byte and every special token."""
    return N_BYTES + len(special_tokens(conditions))


class TokenizerError(HrmspecError, ValueError):
    """A tokenizer that cannot be read or does not fit the model; the message names the file."""


MAX_TOKENIZER_BYTES = 512 * 2**20  # the largest tokenizer.json read (published ones are a few to ~30 MB)


def _rust_failure(e: BaseException) -> bool:
    """Whether `e` is the tokenizers library's own failure: a Python error or a Rust panic surfaced as
    pyo3's PanicException (a BaseException, so a bare `except Exception` misses it)."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the ids the runtime needs."""

    def __init__(self, hf: HFTokenizer):
        missing = [t for t in MARKERS if hf.token_to_id(t) is None]
        if missing:
            # A tokenizer made elsewhere (e.g. for another chat format): append our markers.
            hf.add_special_tokens(missing)
        self.hf = hf
        self.pad_id = self.token_id(PAD)
        self.eos_id = self.token_id(BOX_END)  # <|box_end|> ends every response
        self.im_start_id = self.token_id(IM_START)
        self.im_end_id = self.token_id(IM_END)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, name: str) -> int:
        """Id of a token given as '<|im_end|>', or as a bare name 'im_end' / 'direct'."""
        token = name if name.startswith("<|") else f"<|{name}|>"
        idx = self.hf.token_to_id(token)
        if idx is None:
            have = [t for t in self.hf.get_added_tokens_decoder().values() if t.special]
            raise TokenizerError(f"token {token!r} is not in the vocabulary; special tokens: "
                                 f"{', '.join(t.content for t in have)}. Conditions must be given "
                                 "when the tokenizer is trained (train_tokenizer(..., conditions=...))")
        return idx

    def add_conditions(self, conditions: Iterable[str]) -> None:
        """Add condition tokens that are missing (new ids at the end of the vocabulary)."""
        new = [condition_token(c) for c in conditions if self.hf.token_to_id(condition_token(c)) is None]
        if new:
            self.hf.add_special_tokens(new)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json into a folder (or to a path ending in .json); returns the file."""
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        # through a temp file renamed over it: a link in its place is replaced, never written through
        atomic_write(path, lambda tmp: self.hf.save(str(tmp)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json, or the tokenizer.json inside a folder."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json there; train one with train_tokenizer() "
                                 "and save it with Tokenizer.save(folder)")
        size = path.stat().st_size
        if size > MAX_TOKENIZER_BYTES:
            raise TokenizerError(f"{path}: {size} bytes; a tokenizer.json is read up to {MAX_TOKENIZER_BYTES} bytes")
        try:
            tok = cls(HFTokenizer.from_file(str(path)))
            tok.encode("a check: 1 + 2 = 3")  # a pre-tokenizer whose pattern fails does so here, not mid-run
        except BaseException as e:
            if not _rust_failure(e):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise TokenizerError(f"{path}: not a tokenizer.json the tokenizers library can use ({first})") from None
        return tok

    def check_fits(self, vocab: int, where: str) -> None:
        """Refuse a tokenizer whose ids reach past the model's `vocab` embedding rows."""
        if self.vocab_size > vocab:
            raise TokenizerError(f"{where}: the tokenizer has {self.vocab_size} tokens but the model's vocabulary "
                                 f"is {vocab}: ids from {vocab} on have no embedding; use the tokenizer the model "
                                 "was trained with, or raise model.vocab")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, eos_id={self.eos_id})"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    conditions: Sequence[str] = DEFAULT_CONDITIONS,
    split_digits: bool = True,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` up to ``vocab_size`` tokens (specials included).

    The vocabulary can end up smaller than asked when the texts offer too few merges.
    """
    need = min_vocab_size(conditions)
    if vocab_size < need:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: a byte-level tokenizer needs at least "
                             f"{need} tokens ({N_BYTES} bytes + {need - N_BYTES} special tokens)")
    hf = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                        if split_digits else byte_level)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens(conditions),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with progress.step(f"training a byte-level BPE tokenizer of up to {vocab_size:,} tokens"):
        hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)
