"""The character tokenizer: any Unicode text round-trips; unknown characters are named."""

from __future__ import annotations

import pytest

from micropgpt.tokenizer import CharTokenizer

MIXED = "Привет, мир! 你好世界 🎭🗡️ café\tnaïve\n"


def test_round_trip_non_ascii():
    tokenizer = CharTokenizer.from_text(MIXED)
    ids = tokenizer.encode(MIXED)
    assert len(ids) == len(MIXED)
    assert tokenizer.decode(ids) == MIXED
    assert sorted(tokenizer.vocab) == tokenizer.vocab
    assert len(tokenizer) == len(set(MIXED))


def test_vocab_is_plain_list_of_strings_and_rebuilds_the_same_tokenizer():
    tokenizer = CharTokenizer.from_text(MIXED)
    assert type(tokenizer.vocab) is list
    assert all(type(c) is str and len(c) == 1 for c in tokenizer.vocab)
    rebuilt = CharTokenizer(list(tokenizer.vocab))
    assert rebuilt.encode(MIXED) == tokenizer.encode(MIXED)


def test_unknown_characters_raise_value_error_naming_them():
    tokenizer = CharTokenizer.from_text("abc ")
    with pytest.raises(ValueError) as excinfo:
        tokenizer.encode("a cab 🎭 ж")
    message = str(excinfo.value)
    assert "'🎭'" in message and "U+1F3AD" in message
    assert "'ж'" in message and "U+0436" in message
    assert "'a'" not in message


def test_vocabulary_must_be_distinct_single_characters():
    with pytest.raises(ValueError, match="distinct single characters"):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="distinct single characters"):
        CharTokenizer(["ab"])
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer([])
