"""Datasets: find the files, tokenize them once into a binary cache, and draw batches.

The cache lives in `cache/<name>-<key>/` as tokens.bin (numpy uint16 or uint32; the first
1 - val_fraction of it trains, the rest validates), mask.bin (chat data only: which tokens
the loss covers) and meta.json, written last. The key hashes the source files (names, sizes,
times, contents), the tokenizer settings and the split, so any change gets a new cache
instead of a stale one. corpus.py does the reading and tokenizing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from config import DataConfig
from corpus import PARQUET_SUFFIX, build_cache, source_files, tokenizer_settings
from errors import UserError
from model import IGNORE_INDEX
from tokenizer import CharTokenizer, Tokenizer, tokenizer_from_dict
from utils import write_file_atomic

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CACHE_FORMAT = 3  # bump when the layout of the cache changes
RESIDENT_LIMIT_BYTES = 2 * 2**30  # data_on_device null: splits up to this size move to the GPU
Tokens = Union[np.ndarray, torch.Tensor]  # a memory-mapped split, or one resident on the device


@dataclass
class PreparedData:
    """Token ids of both splits (memory-mapped, or on the device) and the tokenizer that made them."""

    train: Tokens
    val: Tokens
    tokenizer: Tokenizer
    source: str
    cache_dir: Path
    # per token, whether the loss trains on it (chat data: the assistant's replies); None: all
    train_mask: Optional[Tokens] = None
    val_mask: Optional[Tokens] = None


# ---------------------------------------------------------------- finding the text


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _shakespeare_path(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "shakespeare_char" / "input.txt"


def shakespeare_is_local(cache_dir: str | Path) -> bool:
    """Return whether Tiny Shakespeare is already in the cache (so no download is needed)."""
    return _shakespeare_path(cache_dir).is_file()


def download_shakespeare(cache_dir: str | Path) -> Path:
    """Return the path of Tiny Shakespeare in the cache, downloading and checking it if needed."""
    target = _shakespeare_path(cache_dir)
    if target.is_file():
        return target
    by_hand = (f"without network, save the file by hand as {target} (sha256 {SHAKESPEARE_SHA256[:12]}...) "
               "or pass --dataset path/to/input.txt")
    print(f"downloading Tiny Shakespeare from {SHAKESPEARE_URL}", flush=True)
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise UserError(f"could not download Tiny Shakespeare ({reason}); {by_hand}") from None
    if _sha256(payload) != SHAKESPEARE_SHA256:
        raise UserError(f"the downloaded Tiny Shakespeare has the wrong checksum; {by_hand}")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(target, lambda f: f.write(payload))
    return target


def dataset_files(data_cfg: DataConfig) -> tuple[str, list[Path]]:
    """Return a short name for the dataset and its source files."""
    if data_cfg.dataset == "shakespeare_char":
        return "shakespeare_char", [download_shakespeare(data_cfg.cache_dir)]
    files = source_files(data_cfg.dataset)
    path = Path(data_cfg.dataset)
    # the file's name, the folder's, or the folder a glob starts in ('texts/*.txt' made a cache folder named '*')
    literal = list(itertools.takewhile(lambda part: not any(ch in part for ch in "*?["), path.parts))
    name = files[0].stem if len(files) == 1 else path.name if path.is_dir() else Path(*literal or ["files"]).name
    return re.sub(r"[^\w.-]", "_", name) or "dataset", files


# ---------------------------------------------------------------- the token cache


def _file_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as file:
            while block := file.read(1 << 23):
                digest.update(block)
    return digest.hexdigest()


def cache_key(files: list[Path], data_cfg: DataConfig, tokenizer: Optional[Tokenizer] = None) -> str:
    """Return a short hash that changes whenever a source file (name, size, time or content),
    the tokenizer settings, the split or (for parquet files) the columns read change."""
    recipe = {
        "format": CACHE_FORMAT,
        "files": [(str(p.resolve()), stat.st_size, stat.st_mtime_ns) for p in files for stat in [p.stat()]],
        "content": _file_hash(files),
        "tokenizer": tokenizer_settings(data_cfg, tokenizer),
        "val_fraction": data_cfg.val_fraction,
    }
    if any(p.suffix == PARQUET_SUFFIX for p in files):  # only there: other data keeps its caches
        recipe["columns"] = [data_cfg.text_column, data_cfg.messages_column]
    return _sha256(json.dumps(recipe).encode())[:12]


def _memmap(path: Path, dtype: str, length: int) -> np.ndarray:
    if length == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(length,))


def prepare_data(data_cfg: DataConfig, rebuild: bool = False,
                 tokenizer: Optional[Tokenizer] = None) -> PreparedData:
    """Return the dataset's tokens, building the cache on first use (or when `rebuild`).

    `tokenizer`: encode with it (a checkpoint's, to continue or fine-tune a model) instead of
    the one the data settings would fit to this corpus.
    """
    name, files = dataset_files(data_cfg)
    directory = Path(data_cfg.cache_dir) / f"{name}-{cache_key(files, data_cfg, tokenizer)}"
    meta_path = directory / "meta.json"
    if rebuild or not meta_path.is_file():  # no meta.json: never built, or killed while building
        try:
            build_cache(files, data_cfg, directory, tokenizer)
        except OSError as error:
            raise UserError(f"cannot write the token cache in {directory}: {error.strerror}") from None
    meta = json.loads(meta_path.read_text())
    tokens = _memmap(directory / "tokens.bin", meta["dtype"], meta["tokens"])
    mask = _memmap(directory / "mask.bin", "uint8", meta["tokens"]) if meta["masked"] else None
    n_train = meta["train_tokens"]
    return PreparedData(
        train=tokens[:n_train],
        val=tokens[n_train:],
        tokenizer=tokenizer_from_dict(meta["tokenizer"]),
        source=data_cfg.dataset,
        cache_dir=directory,
        train_mask=None if mask is None else mask[:n_train],
        val_mask=None if mask is None else mask[n_train:],
    )


def describe_data(data: PreparedData) -> list[tuple[str, str]]:
    """Return the dataset's statistics as (name, value) rows, for --data_stats."""
    meta = json.loads((data.cache_dir / "meta.json").read_text())
    stats, tokens = meta["stats"], len(data.train) + len(data.val)
    counts = np.zeros(data.tokenizer.vocab_size, dtype=np.int64)
    for split in (data.train, data.val):
        for start in range(0, len(split), 1 << 24):  # in slices: bounded memory for any corpus
            counts += np.bincount(split[start : start + (1 << 24)], minlength=len(counts))
    rows = [
        ("source", f"{data.source} ({len(meta['files'])} file{'s' * (len(meta['files']) != 1)})"),
        ("tokenizer", f"{data.tokenizer.kind}, {data.tokenizer.vocab_size:,} ids"),
        ("documents", f"{stats['documents']:,}"),
        ("characters", f"{stats['characters']:,}"),
        ("tokens", f"{len(data.train):,} train / {len(data.val):,} val"),
        ("characters per token", f"{stats['characters'] / max(1, tokens):.2f}"),
        ("vocabulary used", f"{np.count_nonzero(counts):,} of {len(counts):,} ids "
                            f"({np.count_nonzero(counts) / len(counts):.1%})"),
        ("longest document", f"{stats['longest_document']:,} characters"),
    ]
    if data.train_mask is not None:
        trained = sum(int(np.count_nonzero(m)) for m in (data.train_mask, data.val_mask))
        rows.append(("trained tokens", f"{trained:,} of {tokens:,} ({trained / tokens:.1%}; chat replies)"))
    return rows + [("cache", str(data.cache_dir))]


def synthetic_data(vocab_size: int, n_tokens: int = 2_000_000, seed: int = 0) -> PreparedData:
    """Return random token ids in memory (90/10 split), for throughput benchmarks that need
    no corpus; the tokenizer maps each id to its own character so checkpoints stay valid."""
    generator = np.random.default_rng(seed)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    ids = generator.integers(0, vocab_size, n_tokens, dtype=dtype)
    n_train = int(n_tokens * 0.9)
    tokenizer = CharTokenizer("".join(chr(i) for i in range(vocab_size)), with_specials=False)
    return PreparedData(ids[:n_train], ids[n_train:], tokenizer, f"synthetic ({vocab_size} symbols)",
                        Path("."))


def check_enough_tokens(data: PreparedData, block_size: int) -> None:
    """Raise UserError unless both splits hold at least one window of block_size + 1 tokens."""
    for split, tokens in (("train", data.train), ("validation", data.val)):
        if len(tokens) < block_size + 1:
            raise UserError(
                f"the {split} split of {data.source} has {len(tokens)} tokens, fewer than "
                f"block_size + 1 = {block_size + 1}; use more text, another data.val_fraction "
                "or a smaller model.block_size"
            )


def place_on_device(data: PreparedData, device: torch.device, on_device: Optional[bool]) -> PreparedData:
    """Return the data with both splits copied into device memory (as int32) when `on_device`
    is true, or when it is None and the device is a GPU with room to spare: batches are then
    cut on the device, with no host work or copy per step."""
    size = 4 * (len(data.train) + len(data.val))
    if on_device is None:
        on_device = device.type == "cuda" and size <= RESIDENT_LIMIT_BYTES
    if not on_device or isinstance(data.train, torch.Tensor):
        return data

    def resident(array: Optional[np.ndarray], dtype: type) -> Optional[torch.Tensor]:
        return None if array is None else torch.from_numpy(np.asarray(array, dtype=dtype)).to(device)

    return dataclasses.replace(data, train=resident(data.train, np.int32), val=resident(data.val, np.int32),
                               train_mask=resident(data.train_mask, np.uint8),
                               val_mask=resident(data.val_mask, np.uint8))


# ---------------------------------------------------------------- batches


def random_starts(n_tokens: int, count: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """Return `count` random offsets of windows of block_size + 1 tokens. They are drawn on the
    host whether the tokens live on the device or not, so a run draws the same batches either
    way, and a resume draws them again."""
    return torch.randint(n_tokens - block_size, (count,), generator=generator)


def batch_at(
    tokens: Tokens, starts: torch.Tensor, block_size: int, device: torch.device, mask: Optional[Tokens] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return inputs and next-token targets (B, T) for the windows of block_size + 1 tokens at
    `starts`; targets the mask leaves out are IGNORE_INDEX."""
    if isinstance(tokens, torch.Tensor):
        if tokens.device.type == "cuda":
            starts = starts.pin_memory().to(tokens.device, non_blocking=True)
        positions = starts.to(tokens.device)[:, None] + torch.arange(block_size + 1, device=tokens.device)
        windows = tokens[positions]  # one gather on the device: (B, T + 1)
        trained = None if mask is None else mask[positions]
    else:
        spans = [slice(s, s + block_size + 1) for s in starts.tolist()]
        windows = _to_device(np.stack([tokens[span] for span in spans]), device)
        trained = None if mask is None else _to_device(np.stack([mask[span] for span in spans]), device)
    return _inputs_and_targets(windows, trained)


class SequentialWindows:
    """Every non-overlapping window of a split once per epoch, in an order shuffled afresh each
    epoch. The order follows from the seed and the epoch, so a position is all a resume needs."""

    def __init__(self, n_tokens: int, block_size: int, seed: int):
        self.block_size = block_size
        self.n_windows = (n_tokens - 1) // block_size
        self.seed = seed
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.int64)

    def starts(self, position: int, count: int) -> torch.Tensor:
        """Return the token offsets of windows position .. position + count - 1 (across epochs)."""
        picked = []
        for index in range(position, position + count):
            epoch, within = divmod(index, self.n_windows)
            if epoch != self._epoch:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                self._epoch, self._order = epoch, torch.randperm(self.n_windows, generator=generator)
            picked.append(self._order[within])
        return torch.stack(picked) * self.block_size


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array.astype(np.int64))
    if device.type == "cuda":  # pinned host memory lets the copy overlap with compute
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _inputs_and_targets(
    windows: torch.Tensor, trained: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split (B, T + 1) windows into inputs and next-token targets, leaving out of the loss
    the targets whose trained flag is 0."""
    windows = windows.long()
    x, y = windows[:, :-1], windows[:, 1:]
    if trained is not None:
        y = y.masked_fill(trained[:, 1:] == 0, IGNORE_INDEX)
    return x, y


def split_windows(
    tokens: Tokens, batch_size: int, block_size: int, device: torch.device, mask: Optional[Tokens] = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield batches of non-overlapping windows covering the split once (the tail shorter
    than a window is left out), for a loss over the whole split rather than a sample."""
    n_windows = (len(tokens) - 1) // block_size
    for first in range(0, n_windows, batch_size):
        count = min(batch_size, n_windows - first)
        span = slice(first * block_size, (first + count) * block_size + 1)
        flat, trained = (None if array is None else _flat(array[span], device) for array in (tokens, mask))
        windows = flat.unfold(0, block_size + 1, block_size)  # (count, T + 1), overlapping by one
        yield _inputs_and_targets(windows, None if trained is None else trained.unfold(0, block_size + 1,
                                                                                       block_size))


def _flat(span: Tokens, device: torch.device) -> torch.Tensor:
    if isinstance(span, torch.Tensor):
        return span.to(device)
    return torch.from_numpy(np.asarray(span).astype(np.int64)).to(device, non_blocking=True)
