"""Datasets: sources, the download, the token cache and batches."""
from __future__ import annotations

import hashlib
import io
import json
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

import data_loader
from config import DataConfig
from data_loader import check_enough_tokens, dataset_files, prepare_data
from errors import UserError
from tests.conftest import random_batch
from tokenizer import CharTokenizer


def test_a_text_file_is_tokenized_split_and_cached(workdir, small_corpus_file):
    text = small_corpus_file.read_text()
    data = prepare_data(DataConfig(dataset=str(small_corpus_file)))
    assert data.tokenizer.chars == "".join(sorted(set(text)))
    n_tokens = len(text) + 1  # and <|endoftext|> at the end of the document
    assert len(data.train) == int(n_tokens * 0.9) and len(data.train) + len(data.val) == n_tokens
    assert data.val[-1] == data.tokenizer.special_ids["<|endoftext|>"]
    assert data.train_mask is None  # plain text: the loss covers every token
    assert data.train.dtype == np.uint16
    assert data.tokenizer.decode(data.val[:50].tolist()) == text[int(n_tokens * 0.9):][:50]
    meta = json.loads((data.cache_dir / "meta.json").read_text())
    assert meta["train_tokens"] == len(data.train)
    assert data.cache_dir.resolve().parent == workdir / "cache"


def test_the_cache_is_reused_and_its_key_follows_text_and_split(workdir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world " * 100)
    first = prepare_data(DataConfig(dataset=str(corpus)))
    stamp = (first.cache_dir / "tokens.bin").stat().st_mtime_ns
    again = prepare_data(DataConfig(dataset=str(corpus)))
    assert again.cache_dir == first.cache_dir
    assert (again.cache_dir / "tokens.bin").stat().st_mtime_ns == stamp  # not rebuilt
    other_split = prepare_data(DataConfig(dataset=str(corpus), val_fraction=0.2))
    assert other_split.cache_dir != first.cache_dir
    corpus.write_text("goodbye world " * 100)
    edited = prepare_data(DataConfig(dataset=str(corpus)))
    assert edited.cache_dir != first.cache_dir
    assert "g" in edited.tokenizer.chars and "h" not in edited.tokenizer.chars
    corpus.write_text("goodbye world " * 99 + "goodbye worle ")  # same size, new content
    assert prepare_data(DataConfig(dataset=str(corpus))).cache_dir != edited.cache_dir
    os.utime(corpus, ns=(1, 1))  # same content, another time
    assert prepare_data(DataConfig(dataset=str(corpus))).cache_dir != edited.cache_dir


def test_no_cache_rebuilds_and_an_unfinished_cache_is_rebuilt(workdir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc " * 200)
    data = prepare_data(DataConfig(dataset=str(corpus)))
    (data.cache_dir / "tokens.bin").write_bytes(b"garbage")
    rebuilt = prepare_data(DataConfig(dataset=str(corpus)), rebuild=True)
    assert rebuilt.tokenizer.decode(rebuilt.train[:8].tolist()) == "abc abc "
    (rebuilt.cache_dir / "meta.json").unlink()  # as if killed before meta.json was written
    assert len(prepare_data(DataConfig(dataset=str(corpus))).train) == len(rebuilt.train)


def test_a_folder_of_text_files_is_one_dataset(workdir, tmp_path):
    folder = tmp_path / "books"
    (folder / "part").mkdir(parents=True)
    (folder / "a.txt").write_text("first book " * 20)
    (folder / "part" / "b.txt").write_text("second book " * 20)
    (folder / "notes.bin").write_bytes(b"\x00\x01")
    name, files = dataset_files(DataConfig(dataset=str(folder)))
    assert name == "books" and [f.name for f in files] == ["a.txt", "b.txt"]
    # a glob names its cache by its folder, or by the one file it matches (it made a folder named '*')
    assert dataset_files(DataConfig(dataset=str(folder / "**" / "*.txt")))[0] == "books"
    assert dataset_files(DataConfig(dataset=str(folder / "a*.txt")))[0] == "a"
    single = folder / "part" / "b c.txt"
    single.write_text("third book " * 20)
    assert dataset_files(DataConfig(dataset=str(single)))[0] == "b_c"
    single.unlink()
    data = prepare_data(DataConfig(dataset=str(folder), val_fraction=0.01))
    text = data.tokenizer.decode(np.concatenate([data.train, data.val]).tolist())
    assert text == "first book " * 20 + "<|endoftext|>" + "second book " * 20 + "<|endoftext|>"


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("   \n", "is empty"),
])
def test_empty_data_is_refused(tmp_path, content, message):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        prepare_data(DataConfig(dataset=str(path), cache_dir=str(tmp_path / "cache")))  # not the repo's cache/


def test_unknown_dataset_and_empty_folder_are_refused(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'shakespeare'"):
        dataset_files(DataConfig(dataset="shakespeare"))
    with pytest.raises(UserError, match="holds no .txt/.md/.jsonl/.parquet files"):
        dataset_files(DataConfig(dataset=str(tmp_path)))
    with pytest.raises(UserError, match="matches no files"):
        dataset_files(DataConfig(dataset=str(tmp_path / "*.txt")))


def test_too_short_data_is_refused(workdir, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 300)
    data = prepare_data(DataConfig(dataset=str(path)))
    with pytest.raises(UserError, match="validation split .* has 31 tokens, fewer than block_size"):
        check_enough_tokens(data, block_size=64)
    check_enough_tokens(data, block_size=16)


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_shakespeare_download_is_checked_and_saved(workdir, monkeypatch):
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40
    monkeypatch.setattr(data_loader, "SHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
    calls = []
    monkeypatch.setattr(data_loader.urllib.request, "urlopen",
                        lambda url, timeout: calls.append(url) or FakeResponse(payload))
    name, files = dataset_files(DataConfig(dataset="shakespeare_char"))
    assert name == "shakespeare_char" and files[0].read_bytes() == payload
    assert calls == [data_loader.SHAKESPEARE_URL]
    assert (workdir / "cache/shakespeare_char/input.txt").read_bytes() == payload
    dataset_files(DataConfig(dataset="shakespeare_char"))
    assert len(calls) == 1  # the second time it comes from the cache


def test_download_with_a_wrong_checksum_is_refused(workdir, monkeypatch):
    monkeypatch.setattr(data_loader.urllib.request, "urlopen",
                        lambda url, timeout: FakeResponse(b"<html>captive portal</html>"))
    with pytest.raises(UserError, match="wrong checksum.*cache/shakespeare_char/input.txt"):
        dataset_files(DataConfig(dataset="shakespeare_char"))
    assert not (workdir / "cache/shakespeare_char/input.txt").exists()


def test_without_network_the_error_says_where_to_put_the_file(workdir, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data_loader.urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as error:
        dataset_files(DataConfig(dataset="shakespeare_char"))
    message = str(error.value)
    assert "Name or service not known" in message
    assert "cache/shakespeare_char/input.txt" in message and "--dataset" in message
    assert "\n" not in message


def test_batches_are_windows_with_shifted_targets():
    tokens = np.arange(1000, dtype=np.uint16)
    generator = torch.Generator().manual_seed(0)
    x, y = random_batch(tokens, 5, 16, generator, torch.device("cpu"))
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    again = random_batch(tokens, 5, 16, torch.Generator().manual_seed(0), torch.device("cpu"))[0]
    assert torch.equal(x, again)
    # every window fits: the last start is len - block_size - 1
    assert int(x.max()) + 1 < 1000


def test_tokens_on_the_device_give_the_same_batches():
    tokens = np.arange(1000, dtype=np.uint16)
    data = data_loader.PreparedData(tokens, tokens[:200], CharTokenizer("ab"), "test", Path("."))
    cpu = torch.device("cpu")
    assert data_loader.place_on_device(data, cpu, None) is data  # by default only CUDA keeps tokens
    resident = data_loader.place_on_device(data, cpu, True)
    assert isinstance(resident.train, torch.Tensor) and resident.train.dtype == torch.int32
    assert len(resident.val) == 200
    for batch_size, block_size in ((5, 16), (1, 1)):
        host = random_batch(tokens, batch_size, block_size, torch.Generator().manual_seed(3), cpu)
        device = random_batch(resident.train, batch_size, block_size, torch.Generator().manual_seed(3), cpu)
        for a, b in zip(host, device):
            assert torch.equal(a, b) and b.dtype == torch.int64
    host_windows = list(data_loader.split_windows(tokens[:200], 4, 10, cpu))
    device_windows = list(data_loader.split_windows(resident.val, 4, 10, cpu))
    assert all(torch.equal(a, b) for pair in zip(host_windows, device_windows) for a, b in zip(*pair))


@pytest.mark.parametrize("resident", [False, True])
def test_split_windows_cover_the_split_once(resident):
    tokens = np.arange(103, dtype=np.uint16)
    if resident:
        tokens = torch.from_numpy(tokens.astype(np.int32))
    batches = list(data_loader.split_windows(tokens, batch_size=4, block_size=10, device=torch.device("cpu")))
    assert [len(x) for x, _ in batches] == [4, 4, 2]  # (103 - 1) // 10 = 10 windows
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(x.flatten(), torch.arange(100))
    assert torch.equal(y.flatten(), torch.arange(1, 101))


def test_sequential_windows_cover_every_window_once_per_epoch():
    windows = data_loader.SequentialWindows(n_tokens=101, block_size=10, seed=3)  # 10 windows
    first, second = windows.starts(0, 10), windows.starts(10, 10)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(0, 100, 10))
    assert first.tolist() != second.tolist()  # a fresh order each epoch
    across = windows.starts(7, 6)  # the end of one epoch and the start of the next
    assert across.tolist() == first[7:].tolist() + second[:3].tolist()
    again = data_loader.SequentialWindows(n_tokens=101, block_size=10, seed=3)
    assert torch.equal(again.starts(10, 10), second)  # a position is all a resume needs
    tokens = np.arange(101, dtype=np.uint16)
    x, y = data_loader.batch_at(tokens, first[:2], 10, torch.device("cpu"))
    assert torch.equal(x[:, 0], first[:2]) and torch.equal(y, x + 1)
