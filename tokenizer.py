"""Tokenizers: text <-> token ids, and a plain-dict form that travels inside checkpoints.

Three kinds share one interface (encode, decode, vocab_size, special_ids, to_dict):
characters, a SentencePiece model trained on the corpus, and a named tiktoken encoding.
Each has the same three special tokens, which `encode` never produces from text: they are
placed by the data pipeline (between documents, around chat turns) by id.
"""
from __future__ import annotations

import abc
import base64
import itertools
import json
import os
import re
import tempfile
from typing import Iterable, Iterator, Protocol

import numpy as np

from errors import UserError

END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)  # documents, then ChatML turns
TIKTOKEN_ENCODINGS = ("gpt2", "r50k_base", "cl100k_base", "o200k_base")


class Tokenizer(Protocol):
    kind: str
    special_ids: dict[str, int]

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_dict(self) -> dict: ...


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Round up to a multiple (64 by default): matmuls with round shapes run faster on GPUs."""
    return -(-vocab_size // multiple) * multiple


class _ListEncoder:
    """encode_array from encode, for tokenizers whose library hands back lists."""

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)


class _AppendedSpecials(abc.ABC):
    """Special tokens numbered after a base vocabulary of `base_size` ids (char, SentencePiece)."""

    def _init_specials(self, base_size: int, with_specials: bool) -> None:
        names = SPECIAL_TOKENS if with_specials else ()
        self.special_ids = {name: base_size + i for i, name in enumerate(names)}
        self._special_names = {i: name for name, i in self.special_ids.items()}
        self._base_size = base_size

    @property
    def vocab_size(self) -> int:
        return self._base_size + len(self.special_ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode runs of ordinary ids with the base vocabulary, special ids as their names."""
        parts, run = [], []
        for i in ids:
            if i in self._special_names:
                parts += [self._decode_base(run), self._special_names[i]]
                run = []
            else:
                run.append(i)
        return "".join(parts) + self._decode_base(run)

    @abc.abstractmethod
    def _decode_base(self, ids: list[int]) -> str:
        """Decode ids of the base vocabulary (no special ones)."""


class CharTokenizer(_AppendedSpecials):
    """One token per character; the vocabulary is the sorted set of characters in the text."""

    kind = "char"

    def __init__(self, chars: str, with_specials: bool = True):
        self.chars = chars
        self._ids = {ch: i for i, ch in enumerate(chars)}
        self._init_specials(len(chars), with_specials)
        # code point -> id (-1: not in the vocabulary), for encoding whole arrays at once
        self._table = np.full(max(map(ord, chars), default=0) + 1, -1, dtype=np.int64)
        self._table[[ord(ch) for ch in chars]] = np.arange(len(chars))

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls("".join(sorted(chars)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[ch] for ch in text]
        except KeyError as error:
            raise UserError(
                f"the character {error.args[0]!r} is not in this model's vocabulary of "
                f"{len(self.chars)} characters; remove it from the text"
            ) from None

    def encode_array(self, text: str) -> np.ndarray:
        """Encode at numpy speed: the text's code points looked up in a table."""
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = self._table[np.minimum(points, len(self._table) - 1)]
        unknown = (ids < 0) | (points >= len(self._table))
        if unknown.any():
            self.encode(text[int(np.argmax(unknown))])  # raises, naming the character
        return ids

    def _decode_base(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        # checkpoints written before special tokens existed have no "specials" key
        return {"kind": self.kind, "chars": self.chars, "specials": bool(self.special_ids)}

    @classmethod
    def from_dict(cls, data: dict) -> "CharTokenizer":
        return cls(data["chars"], data.get("specials", False))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.to_dict() == self.to_dict()


class SentencePieceTokenizer(_ListEncoder, _AppendedSpecials):
    """A BPE or unigram model trained on the corpus, with byte fallback: any text encodes.

    Whitespace and newlines are kept exactly (identity normalisation, no dummy prefix), so
    decode(encode(text)) == text and text cut at line starts encodes the same in pieces.
    """

    kind = "sentencepiece"

    def __init__(self, model: bytes):
        import sentencepiece

        self.model = model
        self._processor = sentencepiece.SentencePieceProcessor(model_proto=model)
        self._init_specials(self._processor.get_piece_size(), True)

    @classmethod
    def train(cls, sentences: Iterator[str], vocab_size: int,
              model_type: str = "bpe") -> "SentencePieceTokenizer":
        import io

        import sentencepiece

        base_size = vocab_size - len(SPECIAL_TOKENS)  # the specials come on top
        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=sentences, model_writer=model, vocab_size=base_size,
                model_type=model_type, byte_fallback=True, character_coverage=0.9995,
                normalization_rule_name="identity", add_dummy_prefix=False,
                remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                split_digits=True, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0,
                max_sentence_length=1 << 16, input_sentence_size=2_000_000,
                shuffle_input_sentence=True, num_threads=os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as error:
            most = re.search(r"<= (\d+)", str(error))
            if most:
                supported = int(most.group(1)) + len(SPECIAL_TOKENS)
                raise UserError(f"SentencePiece cannot train a vocabulary of {vocab_size} on this text: it "
                                f"supports at most {supported}; set data.vocab_size to {supported} or less, "
                                "or give it more text") from None
            raise UserError(f"SentencePiece cannot train a vocabulary of {vocab_size} on this text "
                            f"({str(error).strip()}); choose another data.vocab_size") from None
        return cls(model.getvalue())

    def encode(self, text: str) -> list[int]:
        """Encode line by line: no piece holds a line break (the model never saw one), so this
        equals encoding the text whole, and it ran 3x faster on Tiny Shakespeare (BPE slows
        on long inputs). One thread: parallel tokenization runs one process per core."""
        lines = self._processor.encode(text.splitlines(keepends=True), num_threads=1)
        return list(itertools.chain.from_iterable(lines))

    def _decode_base(self, ids: list[int]) -> str:
        return self._processor.decode(ids)

    def pieces(self) -> list[tuple[str, float, bool]]:
        """Return every piece of the base vocabulary in id order: (text, score, whether it is
        an ordinary piece rather than <unk> or a byte)."""
        sp = self._processor
        special = (sp.is_unknown, sp.is_byte, sp.is_control)
        return [(sp.id_to_piece(i), sp.get_score(i), not any(test(i) for test in special))
                for i in range(sp.get_piece_size())]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "model": base64.b64encode(self.model).decode("ascii")}

    @classmethod
    def from_dict(cls, data: dict) -> "SentencePieceTokenizer":
        return cls(base64.b64decode(data["model"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SentencePieceTokenizer) and other.model == self.model


def _offline_message(name: str, error: Exception) -> str:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return (f"cannot load the tiktoken encoding '{name}' ({type(error).__name__}): its files are "
            f"downloaded on first use and are not in {cache}; run once with network, or copy them "
            "there and point the TIKTOKEN_CACHE_DIR environment variable at that folder")


class TiktokenTokenizer(_ListEncoder):
    """A named tiktoken encoding (GPT-2's BPE and OpenAI's later ones), with the ChatML tokens
    numbered after its vocabulary where it lacks them."""

    kind = "tiktoken"

    def __init__(self, name: str):
        import tiktoken

        if name not in TIKTOKEN_ENCODINGS:
            raise UserError(f"unknown tiktoken encoding '{name}'; "
                            f"choose one of {', '.join(TIKTOKEN_ENCODINGS)}")
        try:
            base = tiktoken.get_encoding(name)
        except Exception as error:  # network, file or cache errors: tiktoken wraps no single type
            raise UserError(_offline_message(name, error)) from None
        specials, next_id = dict(base._special_tokens), base.n_vocab
        for token in SPECIAL_TOKENS:  # gpt2 has <|endoftext|>; the ChatML pair comes after
            if token not in specials:
                specials[token], next_id = next_id, next_id + 1
        self.name = name
        self.ranks, self.pattern = base._mergeable_ranks, base._pat_str  # the BPE, for export.py
        self.special_ids = {token: specials[token] for token in SPECIAL_TOKENS}
        self.all_special_ids = specials  # the encoding's own (gpt2: <|endoftext|>) and ChatML's
        self._encoding = tiktoken.Encoding(f"{name}+chatml", pat_str=base._pat_str,
                                           mergeable_ranks=base._mergeable_ranks, special_tokens=specials)

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)  # special-token text stays plain text

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode(list(ids), errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name}

    @classmethod
    def from_dict(cls, data: dict) -> "TiktokenTokenizer":
        return cls(data["name"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TiktokenTokenizer) and other.name == self.name


TOKENIZERS = {"char": CharTokenizer, "sentencepiece": SentencePieceTokenizer, "tiktoken": TiktokenTokenizer}


def tokenizer_from_dict(data: dict) -> Tokenizer:
    """Rebuild a tokenizer from its to_dict() form (as stored in a checkpoint or cache)."""
    kind = data.get("kind")
    if kind not in TOKENIZERS:
        raise UserError(f"unknown tokenizer kind {kind!r}; this version knows {', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind].from_dict(data)


def write_tokenizer_file(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Save a tokenizer as JSON, for data.tokenizer_file (what pipeline.py's tokenizer phase writes)."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump(tokenizer.to_dict(), file)


def read_tokenizer_file(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer that write_tokenizer_file saved; a missing or broken file is one line."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError:
        raise UserError(f"data.tokenizer_file {path}: no such file; run pipeline.py's tokenizer phase, "
                        "or leave the field out to fit a tokenizer to the corpus") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"data.tokenizer_file {path} is not a tokenizer JSON ({error}); write it again "
                        "with pipeline.py --only tokenizer") from None
    if not isinstance(data, dict):
        raise UserError(f"data.tokenizer_file {path} is not a tokenizer JSON (expected an object)")
    try:
        return tokenizer_from_dict(data)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"data.tokenizer_file {path} is not a whole tokenizer JSON ({error!r} is wrong "
                        "or missing); write it again with pipeline.py --only tokenizer") from None
