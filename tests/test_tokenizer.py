import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from hrmspec.runtime.artifacts.data import Sample, encode_samples, format_sample
from hrmspec.runtime.artifacts.tokenizer import (
    MARKERS,
    Tokenizer,
    TokenizerError,
    min_vocab_size,
    train_tokenizer,
)

TEXTS = [
    "Calculate 12 + 345.", "Spell this word backward: banana", "The quick brown fox jumps over the lazy dog.",
    "How many times does the letter \"a\" appear in the text: \"a banana\"?", "Find the GCD of 24, 36.",
] * 50


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=320, conditions=["direct", "cot"])


def test_special_ids_and_vocab(tok):
    assert [tok.token_id(t) for t in MARKERS] == [0, 1, 2, 3]
    assert tok.pad_id == 0 and tok.eos_id == tok.token_id("<|box_end|>") == 3
    assert tok.token_id("direct") == tok.token_id("<|direct|>") == 4
    assert min_vocab_size(["direct", "cot"]) <= tok.vocab_size <= 320
    with pytest.raises(TokenizerError, match="think"):
        tok.token_id("think")


def test_markers_are_single_tokens(tok):
    prompt, response = format_sample(Sample("Calculate 2 + 3.", "5", condition="direct"))
    ids = tok.encode(prompt)
    assert ids[:2] == [tok.token_id("im_start"), tok.token_id("direct")] and ids[-1] == tok.token_id("im_end")
    assert tok.encode(response)[-1] == tok.eos_id
    assert tok.decode(ids) == prompt
    assert tok.decode(ids, skip_special=True) == "Calculate 2 + 3."
    [(p, r)] = encode_samples([Sample("Calculate 2 + 3.", "5", condition="direct")], tok)
    assert p == ids and tok.decode(r) == response


def test_digits_are_split(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5 and tok.decode(ids) == "12345"


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_round_trip_any_text(tok, text):
    # byte-level: every string, including emoji and control characters, comes back unchanged
    assert tok.decode(tok.encode(text)) == text


def test_save_load(tok, tmp_path):
    path = tok.save(tmp_path / "tk")
    assert path.name == "tokenizer.json"
    for where in (tmp_path / "tk", path):
        back = Tokenizer.load(where)
        assert back.vocab_size == tok.vocab_size and back.eos_id == tok.eos_id
        assert back.encode(TEXTS[3]) == tok.encode(TEXTS[3])
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "nowhere")


def test_vocab_too_small():
    need = min_vocab_size(["direct"])
    assert need == 256 + 5
    with pytest.raises(TokenizerError, match=str(need)):
        train_tokenizer(TEXTS, vocab_size=need - 1, conditions=["direct"])
    assert train_tokenizer(TEXTS, vocab_size=need, conditions=["direct"]).vocab_size == need


def test_load_foreign_tokenizer(tmp_path):
    # a tokenizer.json made elsewhere, without our markers: they are appended on load
    hf = HFTokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert tok.vocab_size == 3 + len(MARKERS)
    assert tok.encode("hello world") == [0, 1]
    assert tok.pad_id >= 3 and tok.eos_id >= 3
    tok.add_conditions(["direct"])
    assert tok.token_id("direct") == tok.vocab_size - 1
