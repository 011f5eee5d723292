"""multiple_choice.py and eval.py --tasks: choices scored by log-likelihood, checked by hand."""
from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

import eval as eval_cli
import train
from checkpoint import save_checkpoint
from cli import run_cli
from config import Config, config_to_dict
from model import GPT
from multiple_choice import (PROMPT_FORMAT, Question, choice_log_likelihoods, encode_question, predicted_choice,
                             score_file)
from tests.conftest import TINY_SETTINGS, generated_corpus, tiny_model_config
from tokenizer import CharTokenizer

ALPHABET = "Question: abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789?.,\n"
BLOCK_SIZE = 32


@pytest.fixture
def model_and_tokenizer(workdir):
    """A random tiny model over ALPHABET's characters, saved as model.pt in the working folder."""
    tokenizer = CharTokenizer.train([ALPHABET])
    torch.manual_seed(0)
    model_cfg = tiny_model_config(vocab_size=tokenizer.vocab_size, block_size=BLOCK_SIZE, bias=False)
    model = GPT(model_cfg).eval()
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(Config(model=model_cfg)), "step": 0,
                     "tokenizer": tokenizer.to_dict()}, workdir / "model.pt")
    return model, tokenizer


def log_likelihood_by_hand(model: GPT, tokenizer: CharTokenizer, question: str, choice: str) -> float:
    """The summed log-probability of " " + choice's characters after the prompt, one forward per choice."""
    prompt = tokenizer.encode(PROMPT_FORMAT.format(question=question))
    continuation = tokenizer.encode(" " + choice)
    ids = torch.tensor(prompt + continuation)
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])
    log_probs = F.log_softmax(logits[0], dim=-1)
    return sum(float(log_probs[len(prompt) - 1 + i, token]) for i, token in enumerate(continuation))


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path.name  # the tests run in the folder that holds it


def test_scores_accuracy_and_chance_match_a_computation_by_hand(model_and_tokenizer, workdir):
    model, tokenizer = model_and_tokenizer
    question, choices = "a b?", ["yes", "no"]
    by_hand = [log_likelihood_by_hand(model, tokenizer, question, c) for c in choices]
    encoded = encode_question(Question(1, question, choices, 0), tokenizer, BLOCK_SIZE, "here")
    assert choice_log_likelihoods(model, encoded) == pytest.approx(by_hand, rel=1e-5)
    assert encoded.characters == [4, 3] and not encoded.truncated  # " yes", " no"
    per_character = [by_hand[0] / 4, by_hand[1] / 3]
    chosen = per_character.index(max(per_character))
    records = [{"question": question, "choices": choices, "answer": chosen},  # right
               {"question": question, "choices": choices, "answer": 1 - chosen},  # wrong
               {"question": "c?", "choices": ["a", "b", "c", "d"], "answer": 0}]
    result = score_file(model, tokenizer, BLOCK_SIZE, write_jsonl(workdir / "mc.jsonl", records))
    expected_correct = 1 + (predicted_choice(
        [log_likelihood_by_hand(model, tokenizer, "c?", c) for c in "abcd"], [2] * 4) == 0)
    assert result.questions == 3 and result.correct == expected_correct
    assert result.accuracy == pytest.approx(expected_correct / 3)
    assert result.chance == pytest.approx((1 / 2 + 1 / 2 + 1 / 4) / 3)
    assert result.centred == pytest.approx((result.accuracy - result.chance) / (1 - result.chance))


def test_the_answer_is_the_likeliest_choice_per_character_not_in_total(model_and_tokenizer, workdir):
    model, tokenizer = model_and_tokenizer
    question = "x?"
    pair = None
    for short in "abcdefgh":  # find choices whose totals and per-character means disagree
        for long in ("the end", "zzzzzzz", "0123456", "a.b.c.d", "QQQQQQQ"):
            totals = [log_likelihood_by_hand(model, tokenizer, question, c) for c in (short, long)]
            if (totals[0] > totals[1]) != (totals[0] / 2 > totals[1] / 8):
                pair = [short, long], totals
                break
        if pair:
            break
    assert pair is not None, "no pair of choices where length normalisation matters"
    choices, totals = pair
    by_total = 0 if totals[0] > totals[1] else 1
    path = write_jsonl(workdir / "mc.jsonl", [{"question": question, "choices": choices, "answer": 1 - by_total}])
    assert score_file(model, tokenizer, BLOCK_SIZE, path).correct == 1


def test_predicted_choice_divides_by_characters():
    assert predicted_choice([-2.0, -3.0], [2, 6]) == 1  # -1.0 per character against -0.5
    assert predicted_choice([-2.0, -3.0], [2, 2]) == 0


def test_a_long_question_is_cut_from_the_left_and_every_choice_kept_whole(model_and_tokenizer, workdir):
    model, tokenizer = model_and_tokenizer
    question = "abcdefghijklmnopqrstuvwxyz " * 2
    encoded = encode_question(Question(1, question, ["no", "maybe"], 0), tokenizer, BLOCK_SIZE, "here")
    full_prompt = tokenizer.encode(PROMPT_FORMAT.format(question=question))
    assert encoded.truncated
    assert encoded.prompt == full_prompt[-(BLOCK_SIZE + 1 - len(" maybe")):]  # rows of block_size + 1
    assert encoded.choices == [tokenizer.encode(" no"), tokenizer.encode(" maybe")]
    assert len(choice_log_likelihoods(model, encoded)) == 2  # fits the model: no error
    too_long = "y" * BLOCK_SIZE  # " " + it: block_size + 1 tokens, no room for context
    assert encode_question(Question(1, "a", ["n", too_long], 0), tokenizer, BLOCK_SIZE, "here") is None
    path = write_jsonl(workdir / "mc.jsonl", [{"question": question, "choices": ["no", "maybe"], "answer": 0},
                                              {"question": "a", "choices": ["n", too_long], "answer": 0},
                                              {"question": "a", "choices": ["n", "o"], "answer": 1}])
    result = score_file(model, tokenizer, BLOCK_SIZE, path)
    assert (result.questions, result.truncated, result.skipped) == (2, 1, 1)
    assert "1 with the question cut from the left" in result.summary() and "1 skipped" in result.summary()


GOOD = {"question": "a?", "choices": ["b", "c"], "answer": 1}


@pytest.mark.parametrize("line, message", [
    (json.dumps({"question": "a?", "choices": ["b", "c"]}), "the field 'answer'"),
    (json.dumps({"choices": ["b", "c"], "answer": 0}), "the field 'question'"),
    (json.dumps({"question": "a?", "choices": ["b", "c"], "answer": 2}), "answer index 2 is out of range"),
    (json.dumps({"question": "a?", "choices": ["b"], "answer": 0}), "1 choice(s); a question needs at least 2"),
    ('{"question": "a?", "choices": ["b", ', "not JSON"),
    (json.dumps({"question": "a?", "choices": ["b", "c"], "answer": "1"}), "must be an integer index"),
    (json.dumps({"question": "\u00e9?", "choices": ["b", "c"], "answer": 0}), "not in this model's vocabulary"),
])
def test_a_bad_record_is_one_line_naming_file_and_line(model_and_tokenizer, workdir, capsys, line, message):
    (workdir / "bad.jsonl").write_text(json.dumps(GOOD) + "\n" + line + "\n", encoding="utf-8")
    assert run_cli(eval_cli.main, ["model.pt", "--tasks", "bad.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl line 2" in err and message in err


def test_eval_tasks_reports_each_file_in_text_and_json(model_and_tokenizer, workdir, capsys):
    model, tokenizer = model_and_tokenizer
    mmlu = write_jsonl(workdir / "mmlu.jsonl", [GOOD, {"question": "b?", "choices": ["x", "y", "z"], "answer": 0}])
    arc = write_jsonl(workdir / "arc.jsonl", [
        {"question": "a?", "choices": {"text": ["b", "c"], "label": ["A", "B"]}, "answerKey": "B"}])
    assert run_cli(eval_cli.main, ["model.pt", "--tasks", "mmlu.jsonl", "arc.jsonl", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert "loss" not in record  # --tasks alone scores no text
    expected = [score_file(model, tokenizer, BLOCK_SIZE, p).to_dict() for p in (mmlu, arc)]
    assert record["multiple_choice"] == expected
    assert expected[1]["correct"] == score_file(model, tokenizer, BLOCK_SIZE, write_jsonl(
        workdir / "same.jsonl", [GOOD])).correct  # the ARC form reads as the same question
    assert run_cli(eval_cli.main, ["model.pt", "--tasks", "mmlu.jsonl"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("mmlu.jsonl: accuracy ") and "per character" in out[0]
    (workdir / "text.txt").write_text("abc abc abc abc\n", encoding="utf-8")
    assert run_cli(eval_cli.main, ["model.pt", "--tasks", "mmlu.jsonl", "--text", "text.txt", "--json"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["tokens"] == 15 and len(both["multiple_choice"]) == 1


def test_eval_tasks_on_a_checkpoint_the_trainer_wrote(workdir, capsys):
    (workdir / "corpus.txt").write_text(generated_corpus(20_000) + ALPHABET, encoding="utf-8")
    settings = {**TINY_SETTINGS, "data": {"dataset": "corpus.txt"}}
    (workdir / "tiny.json").write_text(json.dumps(settings), encoding="utf-8")
    assert run_cli(train.main, ["--config", "tiny.json", "--out_dir", "run", "--max_steps", "3"]) == 0
    write_jsonl(workdir / "mc.jsonl", [GOOD, {"question": "the king?", "choices": ["lord", "fool", "war"],
                                              "answer": 1}])
    capsys.readouterr()
    assert run_cli(eval_cli.main, ["run", "--tasks", "mc.jsonl", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["multiple_choice"][0]
    assert result["questions"] == 2 and result["skipped"] == 0
    assert result["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert result["accuracy"] == result["correct"] / 2
