"""Corpora: find the source files, read them as documents, and encode them into tokens.

A document is a list of segments: a piece of text or a special token, and whether the model
is trained to predict it. Plain text is one trained segment; a chat is its turns in ChatML,
trained only on the assistant's replies. Every document ends with <|endoftext|>, and
documents are packed end to end: no padding anywhere.

Large text files are read in pieces of about a megabyte, cut only before a line that starts
with a non-space character, a point where every tokenizer here encodes the same whether the
text is whole or cut. Parquet files are read a row group at a time (parquet_source.py). This
module imports neither torch nor pyarrow, so tokenizing workers start fast.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
from tqdm import tqdm

from config import DataConfig
from errors import UserError
from tokenizer import (
    END_OF_TEXT,
    IM_END,
    IM_START,
    CharTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    tokenizer_from_dict,
)

TEXT_SUFFIXES = (".txt", ".md")
PARQUET_SUFFIX = ".parquet"
SOURCE_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", PARQUET_SUFFIX)
PIECE_CHARS = 1 << 20  # text files are read and encoded in pieces of about this many characters
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool = True  # whether the loss covers these tokens
    special: bool = False  # `text` names a special token, placed by id


Piece = list[Segment]  # a document, or a part of a long text file


# ---------------------------------------------------------------- finding the files


def source_files(dataset: str) -> list[Path]:
    """Return the files a dataset names: one file, every source file under a folder, or a glob."""
    if any(ch in dataset for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(dataset, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"the pattern {dataset} matches no files")
        return files
    path = Path(dataset).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)
        if not files:
            raise UserError(f"folder {path} holds no {'/'.join(SOURCE_SUFFIXES)} files to train on")
        return files
    raise UserError(f"unknown dataset '{dataset}': it is neither 'shakespeare_char' nor an existing "
                    f"file, folder or glob pattern of {', '.join(SOURCE_SUFFIXES)} files")


# ---------------------------------------------------------------- reading documents


def last_cut(text: str) -> int:
    """Return the index just after the last newline that a non-space character follows
    (where every tokenizer here may cut the text), or 0 when there is none."""
    newline = text.rfind("\n", 0, len(text) - 1)
    while newline >= 0 and text[newline + 1].isspace():
        newline = text.rfind("\n", 0, newline)
    return newline + 1


def _text_pieces(path: Path) -> Iterator[Piece]:
    """Yield a text file as pieces of about PIECE_CHARS characters; <|endoftext|> after the last.
    (A file with no place to cut, one endless line, is held whole.)"""
    rest, empty = "", True
    try:
        with open(path, encoding="utf-8", newline="") as file:
            while block := file.read(PIECE_CHARS):
                empty = empty and block.isspace()
                text = rest + block
                cut = last_cut(text)
                if cut:
                    yield [Segment(text[:cut])]
                rest = text[cut:]
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; convert it or leave it out") from None
    if empty:
        raise UserError(f"{path} is empty; give it some text or leave it out")
    yield [Segment(rest), Segment(END_OF_TEXT, special=True)]


def text_document(text: str) -> Piece:
    """One document of plain text, all of it trained."""
    return [Segment(text), Segment(END_OF_TEXT, special=True)]


def chat_document(turns: list, where: str) -> Piece:
    """Render chat turns in ChatML; only the assistant's replies (and their end) are trained,
    so a chat without one is refused: it would train on nothing."""
    segments: Piece = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise UserError(f"{where}: each turn must be an object with a 'role' and a 'content' string")
        role = turn.get("role")
        if role not in ROLES:
            raise UserError(f"{where}: role {json.dumps(role)} is not one of {', '.join(ROLES)}")
        replies = role == "assistant"
        segments += [
            Segment(IM_START, trained=False, special=True), Segment(f"{role}\n", trained=False),
            Segment(turn["content"], trained=replies), Segment(IM_END, trained=replies, special=True),
            Segment("\n", trained=False),
        ]
    if not any(turn["role"] == "assistant" for turn in turns):
        raise UserError(f"{where} has no assistant turn: nothing to train on; add the reply "
                        "or leave the chat out")
    return segments + [Segment(END_OF_TEXT, trained=False, special=True)]


def json_document(record: object, where: str) -> Piece:
    """Turn one JSONL record into a document: {"text"}, {"messages"} or {"conversation"}, or an
    {"input", "output"} pair (one user and one assistant turn)."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise UserError(f"{where}: 'text' is empty or not a string")
        return text_document(record["text"])
    turns = record.get("messages", record.get("conversation"))
    if turns is None and isinstance(record.get("input"), str) and isinstance(record.get("output"), str):
        turns = [{"role": "user", "content": record["input"]},
                 {"role": "assistant", "content": record["output"]}]
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: needs 'text', a non-empty 'messages' (or 'conversation') list, "
                        "or 'input' and 'output'")
    return chat_document(turns, where)


def _jsonl_documents(path: Path) -> Iterator[Piece]:
    count = 0
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where} is not UTF-8 text; convert the file") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{where} is not valid JSON: {error.msg}") from None
            count += 1
            yield json_document(record, where)
    if not count:
        raise UserError(f"{path} holds no JSON lines")


def read_pieces(files: Iterable[Path], data_cfg: Optional[DataConfig] = None) -> Iterator[Piece]:
    """Yield every document of every file in order, long text files in pieces; parquet files
    by the columns data_cfg names (None: the default names)."""
    data_cfg = data_cfg or DataConfig()
    for path in files:
        if path.suffix == PARQUET_SUFFIX:
            from parquet_source import parquet_documents  # pyarrow only for parquet data

            yield from parquet_documents(path, data_cfg.text_column, data_cfg.messages_column)
        else:
            yield from (_jsonl_documents(path) if path.suffix == ".jsonl" else _text_pieces(path))


def source_bytes(files: list[Path]) -> int:
    """Return about how much text the files hold: their sizes, a parquet file's uncompressed."""
    if not any(path.suffix == PARQUET_SUFFIX for path in files):
        return sum(path.stat().st_size for path in files)
    from parquet_source import parquet_bytes

    return sum(parquet_bytes(p) if p.suffix == PARQUET_SUFFIX else p.stat().st_size for p in files)


def training_sentences(files: list[Path], max_chars: int,
                       data_cfg: Optional[DataConfig] = None) -> Iterator[str]:
    """Yield the corpus's lines (without newlines) up to max_chars, to train a subword model on."""
    seen = 0
    for piece in read_pieces(files, data_cfg):
        for segment in piece:
            if segment.special:
                continue
            for line in segment.text.splitlines():
                if seen >= max_chars:
                    return
                if line.strip():
                    seen += len(line)
                    yield line


def corpus_characters(files: list[Path], data_cfg: Optional[DataConfig] = None) -> Iterator[str]:
    """Yield every text segment of the corpus (for the character vocabulary)."""
    for piece in read_pieces(files, data_cfg):
        yield from (segment.text for segment in piece if not segment.special)


# ---------------------------------------------------------------- encoding


def encode_piece(tokenizer: Tokenizer, piece: Piece) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Return a piece's token ids and, per token, whether the loss is trained on it (uint8),
    as arrays per segment."""
    ids, trained = [], []
    for segment in piece:
        if segment.special and segment.text not in tokenizer.special_ids:
            if segment.text == END_OF_TEXT:  # a tokenizer from before special tokens: documents abut
                continue
            raise UserError(f"this tokenizer has no {segment.text} token, so it cannot encode chat data; "
                            "train a new model on it instead of continuing an old one")
        if segment.special:
            new = np.array([tokenizer.special_ids[segment.text]], dtype=np.int64)
        else:
            new = tokenizer.encode_array(segment.text)
        ids.append(new)
        trained.append(np.full(len(new), segment.trained, dtype=np.uint8))
    return ids, trained


@functools.lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str) -> Tokenizer:
    """Rebuild a tokenizer once per process (a worker gets the same one with every batch)."""
    return tokenizer_from_dict(json.loads(tokenizer_json))


def encode_batch(pieces: list[Piece], tokenizer_json: str, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Encode pieces (in a worker process): token ids and trained flags (uint8), concatenated."""
    tokenizer = _tokenizer(tokenizer_json)
    ids: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    trained: list[np.ndarray] = [np.zeros(0, dtype=np.uint8)]
    for piece in pieces:
        piece_ids, piece_trained = encode_piece(tokenizer, piece)
        ids += piece_ids
        trained += piece_trained
    return np.concatenate(ids).astype(dtype), np.concatenate(trained)


# ---------------------------------------------------------------- building the cache

SENTENCEPIECE_SAMPLE_CHARS = 50_000_000  # SentencePiece trains on at most this much text
POOL_MIN_BYTES = 8 << 20  # smaller corpora are tokenized in-process (no workers to start)
BATCH_CHARS = 4 << 20  # text per task sent to a worker; memory holds about 2 tasks per worker


def tokenizer_settings(data_cfg: DataConfig, given: Optional[Tokenizer] = None) -> dict:
    """The settings that decide the tokenizer (part of the cache key)."""
    if given is not None:
        return {"given": hashlib.sha256(json.dumps(given.to_dict()).encode()).hexdigest()}
    if data_cfg.tokenizer == "sentencepiece":
        return {"kind": "sentencepiece", "vocab_size": data_cfg.vocab_size,
                "model": data_cfg.sentencepiece_model}
    if data_cfg.tokenizer == "tiktoken":
        return {"kind": "tiktoken", "encoding": data_cfg.tiktoken_encoding}
    return {"kind": "char"}


def fit_tokenizer(files: list[Path], data_cfg: DataConfig, total_bytes: int) -> Tokenizer:
    """Return the configured tokenizer, trained on the corpus where it needs training: the
    character set of all of it, or SentencePiece on the start of the training part."""
    if data_cfg.tokenizer == "sentencepiece":
        budget = min(SENTENCEPIECE_SAMPLE_CHARS, int(total_bytes * (1 - data_cfg.val_fraction)))
        return SentencePieceTokenizer.train(training_sentences(files, budget, data_cfg),
                                            data_cfg.vocab_size, data_cfg.sentencepiece_model)
    if data_cfg.tokenizer == "tiktoken":
        return TiktokenTokenizer(data_cfg.tiktoken_encoding)
    return CharTokenizer.train(corpus_characters(files, data_cfg))


@dataclass
class CorpusStats:
    """Documents and characters of a corpus, counted while it streams past."""

    documents: int = 0
    characters: int = 0
    longest_document: int = 0  # in characters
    _current: int = 0

    def count(self, pieces: Iterator[Piece]) -> Iterator[Piece]:
        for piece in pieces:
            for segment in piece:
                if not segment.special:
                    self.characters += len(segment.text)
                    self._current += len(segment.text)
                elif segment.text == END_OF_TEXT:
                    self.documents += 1
                    self.longest_document = max(self.longest_document, self._current)
                    self._current = 0
            yield piece

    def to_dict(self) -> dict:
        return {"documents": self.documents, "characters": self.characters,
                "longest_document": self.longest_document}


def _batches(pieces: Iterator[Piece]) -> Iterator[tuple[list[Piece], int]]:
    """Group pieces into tasks of about BATCH_CHARS characters: (pieces, characters)."""
    batch: list[Piece] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += sum(len(s.text) for s in piece if not s.special)
        if chars >= BATCH_CHARS:
            yield batch, chars
            batch, chars = [], 0
    if batch:
        yield batch, chars


def encoded_batches(pieces: Iterator[Piece], tokenizer: Tokenizer, dtype: str,
                    workers: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yield (ids, trained flags, characters) for the pieces in order, encoded by `workers`
    processes with at most two tasks each in flight, so memory stays bounded."""
    tokenizer_json = json.dumps(tokenizer.to_dict())
    tasks = _batches(pieces)
    if workers <= 1:
        for batch, chars in tasks:
            yield (*encode_batch(batch, tokenizer_json, dtype), chars)
        return
    # fork where there is one: workers need only this module, not a re-imported train.py
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        pending: deque = deque()
        for batch, chars in tasks:
            pending.append((pool.apply_async(encode_batch, (batch, tokenizer_json, dtype)), chars))
            if len(pending) >= 2 * workers:
                result, done = pending.popleft()
                yield (*result.get(), done)
        while pending:
            result, done = pending.popleft()
            yield (*result.get(), done)


def worker_count(data_cfg: DataConfig, total_bytes: int) -> int:
    """Processes that tokenize a corpus: one per core (or data.num_workers) from 8 MB up."""
    return (data_cfg.num_workers or os.cpu_count() or 1) if total_bytes >= POOL_MIN_BYTES else 1


def build_cache(files: list[Path], data_cfg: DataConfig, directory: Path,
                tokenizer: Optional[Tokenizer] = None) -> None:
    """Tokenize the corpus into directory/tokens.bin (and mask.bin for chat data), streaming,
    then write meta.json last: a directory without it is unfinished and gets rebuilt.
    `tokenizer`: encode with this one (a checkpoint's) instead of fitting one to the corpus."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    total_bytes = source_bytes(files)
    tokenizer = tokenizer or fit_tokenizer(files, data_cfg, total_bytes)
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    big = total_bytes >= POOL_MIN_BYTES
    workers = worker_count(data_cfg, total_bytes)
    count, masked, stats = 0, False, CorpusStats()
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
               disable=None if big else True)  # None: shown on a terminal only
    tokens_file, mask_file = open(directory / "tokens.bin", "wb"), open(directory / "mask.bin", "wb")
    with tokens_file, mask_file, bar:
        pieces = stats.count(read_pieces(files, data_cfg))
        for ids, trained, chars in encoded_batches(pieces, tokenizer, dtype, workers):
            ids.tofile(tokens_file)
            trained.tofile(mask_file)
            count += len(ids)
            masked = masked or not trained.all()
            bar.update(chars)
            bar.set_postfix_str(f"{count:,} tokens")
    if not masked:
        (directory / "mask.bin").unlink()
    meta = {
        "files": [str(p) for p in files],
        "tokenizer": tokenizer.to_dict(),
        "dtype": dtype,
        "tokens": count,
        "train_tokens": int(count * (1 - data_cfg.val_fraction)),
        "masked": masked,
        "stats": stats.to_dict(),
    }
    unfinished = directory / "meta.json.partial"
    unfinished.write_text(json.dumps(meta))
    os.replace(unfinished, directory / "meta.json")
