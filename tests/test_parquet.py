"""Parquet sources: the same tokens as JSONL, shards in order, streaming memory, column names
and one-line errors for a file that does not fit."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import corpus
import train
from checkpoint import load_checkpoint
from config import DataConfig
from data_loader import prepare_data
from errors import UserError
from tests.conftest import REPO_ROOT, generated_corpus
from tests.test_corpus import CHATS, tokens_and_mask, write_jsonl
from tokenizer import END_OF_TEXT, tokenizer_from_dict

ROW_GROUP_ROWS, ROW_GROUPS, DOC_CHARS = 256, 40, 4096  # 40 row groups of 1 MiB of text
PEAK_LIMIT = 8 * ROW_GROUP_ROWS * DOC_CHARS  # 8 row groups: 5x the file's 40 would fail
STREAM_SCRIPT = """
import json, sys, tracemalloc
from pathlib import Path
import corpus
imported = "pyarrow" in sys.modules
import pyarrow
tracemalloc.start()
chars = sum(len(piece[0].text) for piece in corpus.read_pieces([Path(sys.argv[1])]))
print(json.dumps({"pyarrow_at_import": imported, "chars": chars,
                  "arrow_peak": pyarrow.default_memory_pool().max_memory(),
                  "python_peak": tracemalloc.get_traced_memory()[1]}))
"""


def documents(count: int, seed: int = 0) -> list[str]:
    """Short distinct documents of Shakespeare-flavoured text (a speaker and a line each)."""
    return [part.strip() + "\n" for part in generated_corpus(count * 80, seed).split("\n\n")][:count]


def chats(count: int) -> list[list[dict]]:
    lines = documents(2 * count)
    return [[{"role": "user", "content": lines[2 * i]}, {"role": "assistant", "content": lines[2 * i + 1]}]
            for i in range(count)]


def write_parquet(path: Path, columns: dict, **options) -> Path:
    pq.write_table(pa.table(columns), path, **options)
    return path


@pytest.mark.parametrize("tokenizer", ["char", "sentencepiece"])
@pytest.mark.parametrize("kind", ["text", "messages"])
def test_parquet_rows_give_the_tokens_of_the_same_jsonl_records(workdir, tmp_path, monkeypatch, kind,
                                                                tokenizer):
    rows = documents(300) if kind == "text" else chats(150)
    extra = {"id": list(range(len(rows)))}  # a column that is not read
    parquet = write_parquet(tmp_path / "rows.parquet", {kind: rows, **extra}, row_group_size=64)
    jsonl = write_jsonl(tmp_path / "rows.jsonl", [{kind: row} for row in rows])
    # a small split: the SentencePiece sample (the first 1 - val_fraction of the bytes) then
    # holds all the text, whether the size is JSONL's or parquet's uncompressed one
    settings = dict(tokenizer=tokenizer, vocab_size=320, val_fraction=0.02)
    from_parquet = prepare_data(DataConfig(dataset=str(parquet), **settings))
    from_jsonl = prepare_data(DataConfig(dataset=str(jsonl), **settings))
    assert from_parquet.tokenizer.to_dict() == from_jsonl.tokenizer.to_dict()
    tokens, mask = tokens_and_mask(from_parquet)
    expected_tokens, expected_mask = tokens_and_mask(from_jsonl)
    assert np.array_equal(tokens, expected_tokens) and np.array_equal(mask, expected_mask)
    assert (from_parquet.train_mask is None) == (kind == "text")
    assert from_parquet.tokenizer.decode(tokens.tolist()).count(END_OF_TEXT) == len(rows)
    # rows read in this process and encoded by two workers, in tasks of ~2,000 characters
    monkeypatch.setattr(corpus, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(corpus, "BATCH_CHARS", 2_000)
    parallel = prepare_data(DataConfig(dataset=str(parquet), num_workers=2, **settings), rebuild=True)
    assert np.array_equal(tokens_and_mask(parallel)[0], expected_tokens)


def test_shards_in_a_folder_or_a_glob_are_read_in_sorted_order(workdir, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("train-00002.parquet", "train-00000.parquet", "train-00001.parquet"):
        write_parquet(shards / name, {"text": [f"{name} first\n", f"{name} second\n"]})
    expected = "".join(f"train-0000{i}.parquet {which}\n{END_OF_TEXT}"
                       for i in range(3) for which in ("first", "second"))
    for dataset in (shards, shards / "train-*.parquet"):
        data = prepare_data(DataConfig(dataset=str(dataset), val_fraction=0.05))
        assert data.tokenizer.decode(tokens_and_mask(data)[0].tolist()) == expected


def test_a_large_file_streams_in_bounded_memory(tmp_path):
    """Arrow's peak and Python's stay under 8 row groups of a 40-row-group file; reading it
    with pq.read_table reached 60 MB, iter_batches 27 MB (arrow's), this code 4.6 MB."""
    text = generated_corpus(300_000)
    rng = random.Random(0)
    starts = [rng.randrange(len(text) - DOC_CHARS) for _ in range(ROW_GROUP_ROWS * ROW_GROUPS)]
    docs = [text[start : start + DOC_CHARS] for start in starts]
    path = write_parquet(tmp_path / "big.parquet", {"text": docs}, row_group_size=ROW_GROUP_ROWS)
    assert pq.ParquetFile(path).metadata.num_row_groups == ROW_GROUPS
    run = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, str(path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout)
    assert measured["chars"] == sum(len(doc) for doc in docs) == ROW_GROUPS * ROW_GROUP_ROWS * DOC_CHARS
    assert not measured["pyarrow_at_import"]  # corpus.py leaves pyarrow to the first parquet file
    assert measured["arrow_peak"] < PEAK_LIMIT, measured
    assert measured["python_peak"] < PEAK_LIMIT, measured


def test_column_names_are_settings_and_part_of_the_cache_key(workdir, tmp_path):
    path = write_parquet(tmp_path / "web.parquet", {
        "text": ["the summary\n"], "content": ["the whole page\n"],
        "conversation": [[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]],
    })
    read = {}
    for columns in ({}, {"text_column": "content"}, {"messages_column": "conversation"}):
        data = prepare_data(DataConfig(dataset=str(path), val_fraction=0.2, **columns))
        read[tuple(columns.values())] = data.tokenizer.decode(tokens_and_mask(data)[0].tolist())
    assert read[()] == f"the summary\n{END_OF_TEXT}"
    assert read[("content",)] == f"the whole page\n{END_OF_TEXT}"  # not the first run's cache
    assert read[("conversation",)].startswith("<|im_start|>user\nHi?<|im_end|>")


def test_null_and_blank_rows_are_left_out(workdir, tmp_path):
    path = write_parquet(tmp_path / "gaps.parquet", {"text": ["one\n", None, "", " \n", "two\n"]})
    assert [piece[0].text for piece in corpus.read_pieces([path])] == ["one\n", "two\n"]
    empty = write_parquet(tmp_path / "empty.parquet", {"text": pa.array([None, "  "], pa.string())})
    with pytest.raises(UserError, match=r"empty.parquet holds no rows with a value in column 'text'"):
        list(corpus.read_pieces([empty]))


WIDE = {f"field{i}": ["x"] for i in range(12)}
NO_REPLY = [[{"role": "user", "content": "Hi?"}], [{"role": "system", "content": "Be kind."}]]


@pytest.mark.parametrize("columns, settings, message", [
    ({"body": ["x"], "url": ["u"]}, {},
     r"^\S+/bad.parquet has no column 'text' or 'messages' \(it has body, url\); name yours with "
     r"--data.text_column NAME or --data.messages_column NAME$"),
    (WIDE, {"text_column": "content"}, r"has no column 'content' or 'messages' \(it has field0, field1, "
     r"field2, field3, field4, field5, field6, field7, field8, field9 and 2 more\)"),
    ({"text": [1, 2]}, {}, r"bad.parquet: column 'text' holds int64, not strings; name the text column "
     r"with --data.text_column NAME"),
    ({"messages": [["hi", "there"]]}, {}, r"column 'messages' holds list<\w+: string>, not a list of "
     r"\{role, content\} strings; name the chat column with --data.messages_column NAME"),
    ({"messages": [[{"role": "user", "content": 3}]]}, {},
     r"column 'messages' holds list<\w+: struct<role: string, content: int64>>, not a list of"),
    ({"messages": NO_REPLY}, {}, r"bad.parquet row 0 has no assistant turn: nothing to train on"),
    ({"messages": [CHATS[0]["messages"], [{"role": "bot", "content": "beep"}]]}, {},
     r"bad.parquet row 1: role \"bot\" is not one of system, user, assistant"),
    ({"messages": [[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": None}]]}, {},
     r"bad.parquet row 0: each turn must be an object with a 'role' and a 'content' string"),
])
def test_a_file_that_does_not_fit_is_one_line(workdir, tmp_path, columns, settings, message):
    path = write_parquet(tmp_path / "bad.parquet", columns)
    with pytest.raises(UserError, match=message) as error:
        prepare_data(DataConfig(dataset=str(path), **settings))
    assert "\n" not in str(error.value)


def test_a_damaged_file_and_a_missing_pyarrow_are_one_line(workdir, tmp_path, monkeypatch):
    good = write_parquet(tmp_path / "good.parquet", {"text": documents(50)})
    (tmp_path / "not.parquet").write_bytes(b"PAR1 but nothing else")
    with pytest.raises(UserError, match=r"not.parquet is not a readable parquet file \(.*\); write it again"):
        prepare_data(DataConfig(dataset=str(tmp_path / "not.parquet")))
    cut = tmp_path / "cut.parquet"
    content = good.read_bytes()
    cut.write_bytes(content[:8] + bytes(len(content) // 2) + content[8 + len(content) // 2 :])  # pages zeroed
    with pytest.raises(UserError, match=r"cut.parquet is damaged: reading column 'text' failed"):
        list(corpus.read_pieces([cut]))
    monkeypatch.delitem(sys.modules, "parquet_source", raising=False)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=r"^reading \.parquet files needs pyarrow: pip install pyarrow$"):
        list(corpus.read_pieces([good]))


def test_train_py_reads_a_parquet_column_named_on_the_command_line(tiny_config_file, tmp_path):
    docs = documents(800)
    path = write_parquet(tmp_path / "pages.parquet", {"url": ["§"] * 800, "content": docs})
    assert train.main(["--config", str(tiny_config_file), "--dataset", str(path), "--max_steps", "2",
                       "--data.text_column", "content"]) == 0
    saved = load_checkpoint(tiny_config_file.parent / "models/tiny_test/ckpt.pt")
    assert saved["config"]["data"]["text_column"] == "content"
    assert tokenizer_from_dict(saved["tokenizer"]).chars == "".join(sorted(set("".join(docs))))  # no §
