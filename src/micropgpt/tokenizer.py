"""Characters <-> integer ids. Pure Python: the vocabulary is a plain list of strings."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from micropgpt.errors import UserError


def describe_characters(chars: Iterable[str]) -> str:
    """`'☃' (U+2603), '\\t' (U+0009)`: readable even for invisible or exotic characters."""
    return ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars)


class CharTokenizer:
    """One id per distinct character, ids in sorted character order."""

    def __init__(self, vocab: Sequence[str]):
        if not vocab:
            raise UserError("the vocabulary is empty: the corpus has no characters")
        if any(len(c) != 1 for c in vocab) or len(set(vocab)) != len(vocab):
            raise UserError("a vocabulary must be a list of distinct single characters")
        self.vocab: list[str] = list(vocab)
        self._id_of = {c: i for i, c in enumerate(self.vocab)}

    @classmethod
    def from_text(cls, text: Iterable[str]) -> CharTokenizer:
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.vocab)

    def unknown_characters(self, text: str) -> list[str]:
        return sorted(set(text) - self._id_of.keys())

    def encode(self, text: str) -> list[int]:
        try:
            return [self._id_of[c] for c in text]
        except KeyError:
            unknown = self.unknown_characters(text)
            raise UserError(
                f"characters not in the vocabulary: {describe_characters(unknown)}; "
                "use only characters that occur in the training corpus"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[i] for i in ids)
