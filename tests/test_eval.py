"""eval.py: loss, perplexity and bits per character, checked against a computation by hand."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import eval as eval_cli
from checkpoint import save_checkpoint
from cli import run_cli
from config import Config, config_to_dict
from model import GPT
from tests.conftest import tiny_model_config
from tokenizer import CharTokenizer

TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer — é!\n"


@pytest.fixture
def model_and_file(workdir):
    """A random tiny model over TEXT's characters, saved as a checkpoint, and TEXT in a file."""
    tokenizer = CharTokenizer.train([TEXT])
    torch.manual_seed(0)
    model_cfg = tiny_model_config(vocab_size=tokenizer.vocab_size, block_size=16, bias=False)
    model = GPT(model_cfg).eval()
    cfg = Config(model=model_cfg)
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg), "step": 0,
                     "tokenizer": tokenizer.to_dict()}, workdir / "model.pt")
    (workdir / "text.txt").write_text(TEXT, encoding="utf-8")
    return model, tokenizer


def by_hand(model: GPT, ids: list[int], block_size: int) -> tuple[float, int]:
    """The summed cross-entropy of every next token, window by window, and how many."""
    nats, count = 0.0, 0
    for start in range(0, len(ids) - 1, block_size):
        window = torch.tensor(ids[start:start + block_size + 1])
        with torch.no_grad():
            logits, _ = model(window[None, :-1])
        nats += F.cross_entropy(logits[0], window[1:], reduction="sum").item()
        count += len(window) - 1
    return nats, count


def test_perplexity_is_exp_of_the_mean_loss_computed_by_hand(model_and_file, capsys):
    model, tokenizer = model_and_file
    assert run_cli(eval_cli.main, ["model.pt", "--text", "text.txt", "--json", "--batch_size", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    nats, count = by_hand(model, tokenizer.encode(TEXT), 16)
    assert result["tokens"] == count == len(TEXT) - 1  # every character after the first, the tail too
    assert result["loss"] == pytest.approx(nats / count, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-6)
    assert result["bits_per_character"] == pytest.approx(nats / math.log(2) / (len(TEXT) - 1), rel=1e-6)
    scored_text = TEXT[1:]
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(scored_text.encode()), rel=1e-6)
    assert result["bits_per_byte"] < result["bits_per_character"]  # 'é' and '—' take several bytes


def test_a_loss_mask_scores_only_the_tokens_it_keeps(model_and_file):
    model, tokenizer = model_and_file
    ids = np.array(tokenizer.encode(TEXT))
    mask = np.zeros(len(ids), dtype=np.uint8)
    mask[40:60] = 1  # targets 40..59 only
    scored = eval_cli.score(model, model.config.block_size, ids, tokenizer, mask, batch_size=3)
    assert scored.tokens == 20 and scored.characters == 20
    with torch.no_grad():
        logits, _ = model(torch.tensor(ids[32:49])[None, :-1])
        second, _ = model(torch.tensor(ids[48:65])[None, :-1])
    expected = (F.cross_entropy(logits[0, 7:], torch.tensor(ids[40:49]), reduction="sum")
                + F.cross_entropy(second[0, :11], torch.tensor(ids[49:60]), reduction="sum")).item()
    assert scored.nats == pytest.approx(expected, rel=1e-5)


def test_the_text_report_names_every_figure(model_and_file, capsys):
    assert run_cli(eval_cli.main, ["model.pt", "--text", "text.txt"]) == 0
    out = capsys.readouterr().out
    for words in ("tokens", "perplexity", "bits per token", "per character", "per byte"):
        assert words in out
