"""Corpora: sources, ChatML and its loss mask, packing, streaming and parallel tokenization."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

import corpus
from checkpoint import load_checkpoint
from config import DataConfig
from data_loader import prepare_data, split_windows
from errors import UserError
from model import GPT, IGNORE_INDEX
from tests.conftest import random_batch, tiny_model_config
from tests.test_tokenizer import GPT2_PATTERN
from tokenizer import END_OF_TEXT, IM_END, IM_START, CharTokenizer, tokenizer_from_dict

CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                  {"role": "assistant", "content": "Hello."}]},
    {"conversation": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."},
                      {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6!"}]},
    {"input": "Name a colour.", "output": "Blue."},
]



def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tokens_and_mask(data) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.concatenate([data.train, data.val])
    if data.train_mask is None:
        return tokens, np.ones(len(tokens), dtype=np.uint8)
    return tokens, np.concatenate([data.train_mask, data.val_mask])


def test_chats_are_rendered_in_chatml_and_only_replies_are_trained(workdir, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    data = prepare_data(DataConfig(dataset=str(path), val_fraction=0.05))
    tokens, mask = tokens_and_mask(data)
    decode = data.tokenizer.decode
    assert decode(tokens.tolist()).startswith(
        f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nHi?{IM_END}\n"
        f"{IM_START}assistant\nHello.{IM_END}\n{END_OF_TEXT}{IM_START}user\n2+2?")
    trained = decode(tokens[mask == 1].tolist())
    assert trained == f"Hello.{IM_END}4.{IM_END}6!{IM_END}Blue.{IM_END}"  # exactly the assistant spans
    assert decode(tokens.tolist()).count(END_OF_TEXT) == 3


def test_masked_targets_are_left_out_of_batches_and_the_loss(workdir, tmp_path):
    data = prepare_data(DataConfig(dataset=str(write_jsonl(tmp_path / "chat.jsonl", CHATS * 20))))
    cpu = torch.device("cpu")
    x, y = random_batch(data.train, 16, 12, torch.Generator().manual_seed(0), cpu, data.train_mask)
    assert (y == IGNORE_INDEX).any() and (y != IGNORE_INDEX).any()
    windows = list(split_windows(data.val, 4, 12, torch.device("cpu"), data.val_mask))
    assert any((wy == IGNORE_INDEX).any() for _, wy in windows)
    model = GPT(tiny_model_config(vocab_size=64, block_size=12))
    logits, loss = model(x, y)
    kept = y != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[kept], y[kept])
    assert torch.allclose(loss, expected, atol=1e-6)
    nothing = torch.full_like(y, IGNORE_INDEX)  # a window of user turns only: loss 0, not 0/0
    assert model(x, nothing)[1].item() == 0.0


@pytest.mark.parametrize("kind", ["char", "sentencepiece", "tiktoken"])
def test_pieces_and_workers_encode_exactly_as_the_whole_text(workdir, monkeypatch, kind, corpus_file):
    if kind == "tiktoken":  # no download in tests: a byte-level stand-in for gpt2
        encoding = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, special_tokens={END_OF_TEXT: 256},
                                     mergeable_ranks={bytes([i]): i for i in range(256)})
        monkeypatch.setattr(tiktoken, "get_encoding", lambda name: encoding)
    text = corpus_file.read_text()
    cfg = DataConfig(dataset=str(corpus_file), tokenizer=kind, vocab_size=512)
    whole = prepare_data(cfg)
    expected = [*whole.tokenizer.encode(text), whole.tokenizer.special_ids[END_OF_TEXT]]
    assert tokens_and_mask(whole)[0].tolist() == expected
    # pieces of ~5,000 characters, sent to two worker processes in tasks of ~20,000
    monkeypatch.setattr(corpus, "PIECE_CHARS", 5_000)
    monkeypatch.setattr(corpus, "BATCH_CHARS", 20_000)
    monkeypatch.setattr(corpus, "POOL_MIN_BYTES", 0)
    pieces = list(corpus.read_pieces([corpus_file]))
    assert len(pieces) > 10 and "".join(s.text for p in pieces for s in p if not s.special) == text
    two_workers = DataConfig(dataset=str(corpus_file), tokenizer=kind, vocab_size=512, num_workers=2)
    parallel = prepare_data(two_workers, rebuild=True)
    assert tokens_and_mask(parallel)[0].tolist() == expected


def test_a_glob_of_mixed_sources_packs_documents_end_to_end(workdir, tmp_path):
    (tmp_path / "a.md").write_text("# Title\nSome markdown.\n")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "one document"}, {"text": "another"}, CHATS[2]])
    (tmp_path / "c.txt").write_text("plain text\n")
    data = prepare_data(DataConfig(dataset=str(tmp_path / "*"), val_fraction=0.02))
    tokens, mask = tokens_and_mask(data)
    text = data.tokenizer.decode(tokens.tolist())
    assert text == (f"# Title\nSome markdown.\n{END_OF_TEXT}one document{END_OF_TEXT}another{END_OF_TEXT}"
                    f"{IM_START}user\nName a colour.{IM_END}\n{IM_START}assistant\nBlue.{IM_END}\n"
                    f"{END_OF_TEXT}plain text\n{END_OF_TEXT}")
    assert data.tokenizer.decode(tokens[mask == 0].tolist()).startswith(f"{IM_START}user")


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n{"text": broken}\n', r"b.jsonl line 2 is not valid JSON"),
    (b'{"text": "fine"}\n\n{"txt": "typo"}\n', r"b.jsonl line 3: needs 'text', a non-empty 'messages'"),
    (b'{"messages": [{"role": "bot", "content": "hi"}]}\n', r"line 1: role \"bot\" is not one of system, "),
    (b'{"messages": [{"role": "user"}]}\n', r"line 1: each turn must be an object with a 'role' and a "),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n', r"b.jsonl line 1 has no assistant turn: "),
    (b'{"text": ""}\n', r"line 1: 'text' is empty"),
    (b'[1, 2]\n', r"line 1: expected a JSON object, got list"),
    (b'{"text": "caf\xe9"}\n', r"b.jsonl line 1 is not UTF-8 text"),
    (b'\n\n', r"b.jsonl holds no JSON lines"),
])
def test_bad_jsonl_names_the_file_and_line(workdir, tmp_path, content, message):
    path = tmp_path / "b.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare_data(DataConfig(dataset=str(path)))


def test_bad_text_files_are_named(workdir, tmp_path):
    (tmp_path / "good.txt").write_text("fine text\n")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match=r"bad.txt is not UTF-8 text"):
        prepare_data(DataConfig(dataset=str(tmp_path)))
    (tmp_path / "bad.txt").write_text("  \n")
    with pytest.raises(UserError, match=r"bad.txt is empty"):
        prepare_data(DataConfig(dataset=str(tmp_path)))


def test_a_checkpoints_tokenizer_encodes_new_data(workdir, tmp_path):
    """Fine-tuning keeps the model's tokenizer; a tokenizer without ChatML cannot take chats."""
    (tmp_path / "new.txt").write_text("abcabc")
    own = CharTokenizer("abcdef")
    data = prepare_data(DataConfig(dataset=str(tmp_path / "new.txt")), tokenizer=own)
    assert data.tokenizer == own and tokens_and_mask(data)[0].tolist() == [0, 1, 2, 0, 1, 2, 6]
    old = CharTokenizer("abcdefghijklmnopqrstuvwxyz.?ABHNelo ", with_specials=False)
    with pytest.raises(UserError, match=r"no <\|im_start\|> token"):
        prepare_data(DataConfig(dataset=str(write_jsonl(tmp_path / "c.jsonl", CHATS))), tokenizer=old)


@pytest.mark.slow
def test_chat_fine_tuning_example_and_data_stats(workdir, corpus_file, capsys):
    """configs/chat_finetune.json continues a shakespeare_bpe.json model on a chat JSONL."""
    import train

    configs = Path(__file__).resolve().parents[1] / "configs"
    (workdir / "data").mkdir()
    chats = [{"messages": [{"role": "user", "content": f"Say {i} in words."},
                           {"role": "assistant", "content": f"It is {i}, good sir."}]} for i in range(300)]
    write_jsonl(workdir / "data/chat_example.jsonl", chats)
    short = ["--max_steps", "2", "--eval_interval", "2", "--batch_size", "4", "--system.dtype", "float32"]
    assert train.main(["--config", str(configs / "shakespeare_bpe.json"), "--dataset", str(corpus_file),
                       "--out_dir", "models/base", *short]) == 0
    assert train.main(["--config", str(configs / "chat_finetune.json"), "--load_model_only", "models/base",
                       "--out_dir", "models/chat", *short]) == 0
    base, chat = (load_checkpoint(workdir / f"models/{name}/ckpt.pt") for name in ("base", "chat"))
    assert chat["tokenizer"] == base["tokenizer"] and chat["tokenizer"]["kind"] == "sentencepiece"
    # the tokenizer rebuilt from the checkpoint encodes exactly as the one that made the cache
    text = corpus_file.read_text()[:20_000]
    fitted = prepare_data(DataConfig(dataset=str(corpus_file), tokenizer="sentencepiece")).tokenizer
    assert tokenizer_from_dict(base["tokenizer"]).encode(text) == fitted.encode(text)
    capsys.readouterr()
    assert train.main(["--config", str(configs / "chat_finetune.json"), "--data_stats",
                       "--load_model_only", "models/base"]) == 0
    stats = capsys.readouterr().out
    assert re.search(r"documents +300\n", stats) and "trained tokens" in stats and "chat replies" in stats
