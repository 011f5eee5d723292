"""Tokenizers: text <-> token ids, and a plain-dict form that travels inside checkpoints."""
from __future__ import annotations

from errors import UserError


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters in the text."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self._ids = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[ch] for ch in text]
        except KeyError as error:
            raise UserError(
                f"the character {error.args[0]!r} is not in this model's vocabulary of "
                f"{self.vocab_size} characters; remove it from the text"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars


TOKENIZERS = {"char": CharTokenizer}


def train_tokenizer(kind: str, text: str) -> CharTokenizer:
    """Return a tokenizer of the given kind fitted to `text`."""
    return TOKENIZERS[kind].train(text)


def tokenizer_from_dict(data: dict) -> CharTokenizer:
    """Rebuild a tokenizer from its to_dict() form (as stored in a checkpoint or cache)."""
    kind = data.get("kind")
    if kind not in TOKENIZERS:
        raise UserError(f"unknown tokenizer kind {kind!r}; this version knows {', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind](data["chars"])
