"""Datasets: find the text, tokenize it once into a binary cache, and draw random batches.

The cache lives in `cache/<name>-<key>/` as train.bin, val.bin (numpy uint16 or uint32) and
meta.json. The key hashes the text, the tokenizer and the split, so an edited text or a new
setting gets a new cache instead of a stale one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from config import DataConfig
from errors import UserError
from tokenizer import CharTokenizer, tokenizer_from_dict, train_tokenizer
from utils import write_file_atomic

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CACHE_FORMAT = 1  # bump when the layout of the cache changes
RESIDENT_LIMIT_BYTES = 2 * 2**30  # data_on_device null: splits up to this size move to the GPU
Tokens = Union[np.ndarray, torch.Tensor]  # a memory-mapped split, or one resident on the device
TEXT_SUFFIXES = (".txt",)


@dataclass
class PreparedData:
    """Token ids of both splits (memory-mapped, or on the device) and the tokenizer that made them."""

    train: Tokens
    val: Tokens
    tokenizer: CharTokenizer
    source: str
    cache_dir: Path


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


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise UserError(f"folder {path} holds no {'/'.join(TEXT_SUFFIXES)} files to train on")
    return files


def _read_text(files: list[Path]) -> str:
    parts = []
    for file in files:
        try:
            parts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{file} is not UTF-8 text; convert it or leave it out") from None
    return "\n\n".join(parts)  # documents kept apart by a blank line


def load_source_text(dataset: str, cache_dir: str | Path) -> tuple[str, str]:
    """Return (name, text) for a dataset name or a path to a text file or folder."""
    if dataset == "shakespeare_char":
        return "shakespeare_char", _read_text([download_shakespeare(cache_dir)])
    path = Path(dataset).expanduser()
    if not path.exists():
        raise UserError(
            f"unknown dataset '{dataset}': it is neither 'shakespeare_char' nor an existing "
            "path to a .txt file or a folder of them"
        )
    text = _read_text(_text_files(path))
    if not text.strip():
        raise UserError(f"dataset {path} is empty; give it some text to train on")
    return path.stem or path.name, text


# ---------------------------------------------------------------- the token cache


def cache_key(text: str, data_cfg: DataConfig) -> str:
    """Return a short hash that changes whenever the text, tokenizer or split changes."""
    recipe = f"{CACHE_FORMAT}|{data_cfg.tokenizer}|{data_cfg.val_fraction!r}|{_sha256(text.encode())}"
    return _sha256(recipe.encode())[:12]


def _build_cache(text: str, data_cfg: DataConfig, directory: Path, source: str) -> None:
    tokenizer = train_tokenizer(data_cfg.tokenizer, text)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    ids = np.array(tokenizer.encode(text), dtype=dtype)
    n_train = int(len(ids) * (1 - data_cfg.val_fraction))
    directory.mkdir(parents=True, exist_ok=True)
    write_file_atomic(directory / "train.bin", lambda f: f.write(ids[:n_train].tobytes()))
    write_file_atomic(directory / "val.bin", lambda f: f.write(ids[n_train:].tobytes()))
    meta = {
        "source": source,
        "tokenizer": tokenizer.to_dict(),
        "dtype": np.dtype(dtype).name,
        "train_tokens": n_train,
        "val_tokens": len(ids) - n_train,
    }
    # meta.json goes last: a cache without it is unfinished and gets rebuilt.
    write_file_atomic(directory / "meta.json", lambda f: f.write(json.dumps(meta).encode()))


def _memmap(path: Path, dtype: str, length: int) -> np.ndarray:
    if length == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(length,))


def prepare_data(data_cfg: DataConfig, rebuild: bool = False) -> PreparedData:
    """Return the dataset's tokens, building the cache on first use (or when `rebuild`)."""
    name, text = load_source_text(data_cfg.dataset, data_cfg.cache_dir)
    directory = Path(data_cfg.cache_dir) / f"{name}-{cache_key(text, data_cfg)}"
    meta_path = directory / "meta.json"
    if rebuild and directory.exists():
        shutil.rmtree(directory)
    if not meta_path.is_file():
        try:
            _build_cache(text, data_cfg, directory, data_cfg.dataset)
        except OSError as error:
            raise UserError(f"cannot write the token cache in {directory}: {error.strerror}") from None
    meta = json.loads(meta_path.read_text())
    return PreparedData(
        train=_memmap(directory / "train.bin", meta["dtype"], meta["train_tokens"]),
        val=_memmap(directory / "val.bin", meta["dtype"], meta["val_tokens"]),
        tokenizer=tokenizer_from_dict(meta["tokenizer"]),
        source=data_cfg.dataset,
        cache_dir=directory,
    )


def synthetic_data(vocab_size: int, n_tokens: int = 2_000_000, seed: int = 0) -> PreparedData:
    """Return random token ids in memory (90/10 split), for throughput benchmarks that need
    no corpus; the tokenizer maps each id to its own character so checkpoints stay valid."""
    generator = np.random.default_rng(seed)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    ids = generator.integers(0, vocab_size, n_tokens, dtype=dtype)
    n_train = int(n_tokens * 0.9)
    tokenizer = CharTokenizer("".join(chr(i) for i in range(vocab_size)))
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
    train, val = (torch.from_numpy(np.asarray(split, dtype=np.int32)).to(device)
                  for split in (data.train, data.val))
    return dataclasses.replace(data, train=train, val=val)


# ---------------------------------------------------------------- batches


def get_batch(
    tokens: Tokens,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return inputs and next-token targets (B, T) from random windows of `tokens`.

    The window starts come from `generator` on the host either way, so a run draws the same
    batches whether its tokens live on the device or not, and resumes draw them again.
    """
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    if isinstance(tokens, torch.Tensor):
        return _gather_windows(tokens, starts, block_size)
    windows = np.stack([tokens[s : s + block_size + 1] for s in starts.tolist()]).astype(np.int64)
    batch = torch.from_numpy(windows)
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    if device.type == "cuda":  # pinned host memory lets the copy overlap with compute
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


def _gather_windows(
    tokens: torch.Tensor, starts: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the windows at `starts` out of a split resident on its device, by one gather."""
    if tokens.device.type == "cuda":
        starts = starts.pin_memory().to(tokens.device, non_blocking=True)
    positions = starts.to(tokens.device)[:, None] + torch.arange(block_size + 1, device=tokens.device)
    windows = tokens[positions].long()  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]


def split_windows(
    tokens: Tokens, batch_size: int, block_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield batches of non-overlapping windows covering the split once (the tail shorter
    than a window is left out), for a loss over the whole split rather than a sample."""
    n_windows = (len(tokens) - 1) // block_size
    for first in range(0, n_windows, batch_size):
        count = min(batch_size, n_windows - first)
        span = tokens[first * block_size : (first + count) * block_size + 1]
        flat = span.long() if isinstance(span, torch.Tensor) else torch.from_numpy(span.astype(np.int64))
        x = flat[:-1].view(count, block_size)
        y = flat[1:].view(count, block_size)
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
