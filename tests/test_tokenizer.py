"""Tokenizers: round trips, special tokens, the checkpoint form, and their errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import tiktoken

import tokenizer as tokenizers
from corpus import training_sentences
from errors import UserError
from tokenizer import (
    END_OF_TEXT,
    IM_END,
    IM_START,
    SPECIAL_TOKENS,
    CharTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    padded_vocab_size,
    tokenizer_from_dict,
)

UNICODE = "Hello, wörld! ¿Qué tal? 日本語 🙂🚀\n\n\tindented  two spaces\r\nend <|endoftext|>|"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture
def fake_gpt2(monkeypatch):
    """A small byte-level BPE standing in for tiktoken's gpt2 (whose files would be downloaded):
    every byte, three merges, and <|endoftext|> after a gap, as in the real one."""
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b"th": 256, b"he": 257, b"the": 258})
    encoding = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={END_OF_TEXT: 300})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: encoding)
    return encoding


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory) -> Path:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    if shared.is_file():
        return shared
    generated = tmp_path_factory.mktemp("sp") / "corpus.txt"  # a corpus of the same flavour
    generated.write_text("".join(f"Line {i}: the quick brown fox, thou art {i % 7} times fair.\n"
                                 for i in range(3000)))
    return generated


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(corpus_path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.train(training_sentences([corpus_path], 300_000), vocab_size=640)


def all_tokenizers(sentencepiece_tokenizer):
    return [CharTokenizer.train([UNICODE]), sentencepiece_tokenizer, TiktokenTokenizer("gpt2")]


def test_every_tokenizer_round_trips_unicode_and_has_the_special_tokens(fake_gpt2, sentencepiece_tokenizer):
    for tok in all_tokenizers(sentencepiece_tokenizer):
        ids = tok.encode(UNICODE)
        assert tok.decode(ids) == UNICODE, tok.kind
        assert tok.encode_array(UNICODE).tolist() == ids
        assert set(tok.special_ids) == set(SPECIAL_TOKENS)
        specials = set(tok.special_ids.values())
        assert len(specials) == 3 and max(specials) < tok.vocab_size and not specials & set(ids)
        # UNICODE holds the text "<|endoftext|>": in a document it is plain text, never the id
        assert tok.decode([*ids[:2], tok.special_ids[IM_START]]) == tok.decode(ids[:2]) + IM_START


def test_the_checkpoint_form_rebuilds_the_same_tokenizer(fake_gpt2, sentencepiece_tokenizer):
    for tok in all_tokenizers(sentencepiece_tokenizer):
        restored = tokenizer_from_dict(tok.to_dict())
        assert restored == tok and restored.encode(UNICODE) == tok.encode(UNICODE)
        assert restored.special_ids == tok.special_ids and restored.vocab_size == tok.vocab_size


def test_sentencepiece_learns_subwords_of_the_corpus(sentencepiece_tokenizer, corpus_path):
    text = corpus_path.read_text()[:50_000]
    # encoded line by line for speed, it must equal SentencePiece's encoding of the whole text
    assert sentencepiece_tokenizer.encode(text) == sentencepiece_tokenizer._processor.encode(text)
    assert len(sentencepiece_tokenizer.encode(text)) < 0.6 * len(text)  # subwords, not characters
    assert sentencepiece_tokenizer.vocab_size == 640
    assert sentencepiece_tokenizer.special_ids[END_OF_TEXT] == 637


def test_tiktoken_keeps_its_end_of_text_and_adds_chatml_after_its_vocabulary(fake_gpt2):
    tok = TiktokenTokenizer("gpt2")
    assert tok.special_ids == {END_OF_TEXT: 300, IM_START: 301, IM_END: 302}
    assert tok.vocab_size == 303 and tok.encode("the") == [258]


def test_tiktoken_offline_names_the_cache_setting(monkeypatch, tmp_path):
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(UserError) as error:
        TiktokenTokenizer("cl100k_base")
    message = str(error.value)
    assert "cl100k_base" in message and "TIKTOKEN_CACHE_DIR" in message and str(tmp_path) in message
    with pytest.raises(UserError, match="unknown tiktoken encoding 'p50k'"):
        TiktokenTokenizer("p50k")


def test_a_vocabulary_the_corpus_cannot_fill_is_refused(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("tiny corpus\n" * 20)
    with pytest.raises(UserError, match=r"cannot train a vocabulary of 5000 on this text: it supports at "
                                        r"most \d+; set data.vocab_size to \d+ or less"):
        SentencePieceTokenizer.train(training_sentences([corpus], 10_000), vocab_size=5000)


def test_char_tokenizer_names_an_unknown_character_and_old_checkpoints_load():
    tok = CharTokenizer("abc")
    for encode in (tok.encode, tok.encode_array):
        with pytest.raises(UserError, match="the character 'z' is not in this model's vocabulary of 3"):
            encode("abz")
    with pytest.raises(UserError, match="the character '🙂' is not"):
        tok.encode_array("a🙂")  # beyond the table's code points
    old = tokenizer_from_dict({"kind": "char", "chars": "abc"})  # written before special tokens
    assert old.vocab_size == 3 and old.special_ids == {} and old != tok
    with pytest.raises(UserError, match="unknown tokenizer kind 'bpe'"):
        tokenizer_from_dict({"kind": "bpe"})


def test_vocabulary_padding():
    assert [padded_vocab_size(n, 64) for n in (1, 64, 65, 50257)] == [64, 64, 128, 50304]
    assert padded_vocab_size(68, 1) == 68
    assert tokenizers.TIKTOKEN_ENCODINGS == ("gpt2", "r50k_base", "cl100k_base", "o200k_base")


def test_a_tokenizer_file_is_what_the_run_encodes_with(tiny_config_file, small_corpus_file, workdir):
    """data.tokenizer_file (pipeline.py's tokenizer phase) replaces fitting: the run's tokenizer
    is the file's, here one with a digit the corpus lacks, and a broken file is one line."""
    import train
    from checkpoint import load_checkpoint
    from cli import run_cli

    chars = "".join(sorted(set(small_corpus_file.read_text()) | {"7"}))
    path = workdir / "tokenizer.json"
    tokenizers.write_tokenizer_file(CharTokenizer(chars), path)
    assert tokenizers.read_tokenizer_file(path) == CharTokenizer(chars)
    assert train.main(["--config", str(tiny_config_file), "--data.tokenizer_file", str(path),
                       "--out_dir", "run"]) == 0
    assert tokenizer_from_dict(load_checkpoint(workdir / "run" / "ckpt.pt")["tokenizer"]) == CharTokenizer(chars)

    path.write_text('{"kind": "char"}')
    with pytest.raises(UserError, match="not a whole tokenizer JSON"):
        tokenizers.read_tokenizer_file(path)
    path.write_text("not json")
    assert run_cli(train.main, ["--config", str(tiny_config_file), "--data.tokenizer_file", str(path),
                                "--out_dir", "other"]) == 2
    assert not (workdir / "other").exists()
    with pytest.raises(UserError, match="no such file"):
        tokenizers.read_tokenizer_file(workdir / "missing.json")
