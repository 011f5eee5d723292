"""Synthetic task chats: deterministic per seed, train and held-out disjoint, every answer right,
read by the trainer as chats, and bad input as one line."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tasks
import train
from checkpoint import load_checkpoint
from cli import run_cli
from config import DataConfig
from data_loader import prepare_data
from tests.conftest import REPO_ROOT, TINY_SETTINGS, generated_corpus
from tokenizer import IM_END

SMALL = ["--per_kind", "60", "--held_out", "20"]


@pytest.fixture
def words_file(tmp_path) -> Path:
    """A text with a few hundred distinct words (made up here: the tests run anywhere)."""
    made_up = " ".join(f"{a}{b}{c}" for a in ("str", "pl", "qu", "b", "gr", "fl") for b in "aeiou"
                       for c in ("nd", "mp", "ck", "ss"))
    path = tmp_path / "words.txt"
    path.write_text(generated_corpus(5_000) + "\n" + made_up + " ROMEO don't a be\n")
    return path


def generate(words_file: Path, out: Path, *extra: str) -> tuple[list[dict], list[dict]]:
    assert tasks.main(["--words", str(words_file), "--out", str(out), *SMALL, *extra]) == 0
    return tuple([json.loads(line) for line in (out / name).read_text().splitlines()]
                 for name in ("train.jsonl", "held_out.jsonl"))


def test_the_words_are_the_distinct_lowercase_alphabetic_ones_of_3_to_10_letters(tmp_path):
    fillers = [f"z{'a' * n}p" for n in range(1, 9)] + [f"b{'u' * n}t" for n in range(1, 9)]  # 3 to 10 letters
    path = tmp_path / "w.txt"
    path.write_text("KING Richard: the king and men, don't go! a an ox the thee sweetest verylongword\n"
                    f"{' '.join(fillers)} zaaaaaaaaap the king\n")
    assert tasks.corpus_words(path) == sorted({"the", "king", "and", "men", "thee", "sweetest", *fillers})


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(words_file, tmp_path):
    generate(words_file, tmp_path / "a", "--seed", "3")
    generate(words_file, tmp_path / "b", "--seed", "3")
    generate(words_file, tmp_path / "c", "--seed", "4")
    for name in ("train.jsonl", "held_out.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def word_of(record: dict) -> str | None:
    found = re.search(r"'([a-z]+)'[.?]$", record["messages"][0]["content"])
    return found[1] if found and record["task"] != "arithmetic" else None


def test_train_and_held_out_share_no_question_and_no_word_across_seeds(words_file, tmp_path):
    train_records, _ = generate(words_file, tmp_path / "a", "--seed", "0")
    _, held_records = generate(words_file, tmp_path / "b", "--seed", "1")  # held-out of another seed
    questions = {r["messages"][0]["content"] for r in train_records}
    assert not questions & {r["messages"][0]["content"] for r in held_records}
    train_words = {word_of(r) for r in train_records if r["task"] in tasks.WORD_KINDS}
    held_words = {word_of(r) for r in held_records if r["task"] in tasks.WORD_KINDS}
    assert train_words and held_words and not train_words & held_words
    # every kind is on both sides, the sizes asked for (identity's held-out: one phrasing per pair)
    for kind in tasks.KIND_NAMES:
        assert sum(r["task"] == kind for r in train_records) == 60
        assert sum(r["task"] == kind for r in held_records) == (6 if kind == "identity" else 20)
    held_questions = [r["messages"][0]["content"] for r in held_records]
    assert len(held_questions) == len(set(held_questions))


def expected_reply(record: dict) -> str:
    """The reply, worked out here independently of tasks.py."""
    question = record["messages"][0]["content"]
    if record["task"] == "arithmetic":
        a, operator, b = re.fullmatch(r"What is (\d\d) ([+-]) (\d\d)\?", question).groups()
        return str(int(a) + int(b) if operator == "+" else int(a) - int(b))
    if record["task"] == "count":
        letter, word = re.fullmatch(r"How many '([a-z])' are in '([a-z]+)'\?", question).groups()
        return " ".join(word).replace(" ", "-") + ": " + str(sum(ch == letter for ch in word))
    word = word_of(record)
    return {"spell": "-".join(list(word)), "reverse": "".join(reversed(word))}[record["task"]]


def test_every_answer_is_right_and_is_the_assistant_reply(words_file, tmp_path):
    train_records, held_records = generate(words_file, tmp_path / "out")
    identity = json.loads(tasks.DEFAULT_IDENTITY.read_text())
    identity_answers = {p["answer"].replace("{name}", identity["name"]).replace("{about}", identity["about"])
                        for p in identity["pairs"]}
    counts = set()
    for record in train_records + held_records:
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant") and assistant["content"] == record["answer"]
        if record["task"] == "identity":
            assert record["answer"] in identity_answers and "{" not in record["answer"]
        else:
            assert record["answer"] == expected_reply(record), record
        if record["task"] == "arithmetic":
            assert all(10 <= int(n) <= 99 for n in re.findall(r"\d+", user["content"]))
            assert int(record["answer"]) >= 0
        if record["task"] == "count":
            counts.add(int(record["answer"].rsplit(": ", 1)[1]))
    assert 0 in counts and max(counts) >= 2  # absent letters are asked for too, and repeated ones


def test_the_trainer_reads_the_chats_with_the_loss_on_the_replies_only(words_file, tmp_path, workdir):
    generate(words_file, tmp_path / "out", "--kinds", "arithmetic,reverse")
    data = prepare_data(DataConfig(dataset=str(tmp_path / "out" / "held_out.jsonl"), val_fraction=0.05))
    tokens = np.concatenate([data.train, data.val])
    mask = np.concatenate([data.train_mask, data.val_mask])
    held = [json.loads(line) for line in (tmp_path / "out" / "held_out.jsonl").read_text().splitlines()]
    assert data.tokenizer.decode(tokens[mask == 1].tolist()) == "".join(r["answer"] + IM_END for r in held)
    assert "What is" in data.tokenizer.decode(tokens[mask == 0].tolist())


def test_a_tiny_model_trains_on_the_generated_chats(words_file, tmp_path, workdir):
    generate(words_file, tmp_path / "out")
    settings = json.loads(json.dumps(TINY_SETTINGS))
    settings["data"] = {"dataset": str(tmp_path / "out" / "train.jsonl")}
    config = workdir / "tasks_tiny.json"
    config.write_text(json.dumps(settings))
    assert run_cli(train.main, ["--config", str(config), "--out_dir", "models/tasks", "--max_steps", "3"]) == 0
    checkpoint = load_checkpoint(workdir / "models/tasks/ckpt.pt")
    assert checkpoint["step"] == 3 and checkpoint["config"]["data"]["dataset"].endswith("train.jsonl")


def test_sizes_per_kind_and_a_small_identity_pool_repeats_in_training_only(words_file, tmp_path):
    train_records, held_records = generate(words_file, tmp_path / "out", "--kinds", "identity,spell",
                                           "--sizes", "identity=40,spell=7")
    assert sum(r["task"] == "spell" for r in train_records) == 7
    identity_train = [r["messages"][0]["content"] for r in train_records if r["task"] == "identity"]
    assert len(identity_train) == 40 and len(set(identity_train)) == 18  # 6 pairs x 3 training phrasings
    assert {r["task"] for r in train_records + held_records} == {"identity", "spell"}


def test_an_edited_identity_file_is_used(words_file, tmp_path):
    path = tmp_path / "me.json"
    path.write_text(json.dumps({"name": "Pip", "about": "a test model", "pairs": [
        {"questions": ["Who are you?", "What are you?", "Name?"], "answer": "I am {name}, {about}."}]}))
    train_records, held_records = generate(words_file, tmp_path / "out", "--kinds", "identity", "--identity", str(path))
    assert {r["answer"] for r in train_records + held_records} == {"I am Pip, a test model."}
    assert len(held_records) == 1 and held_records[0]["messages"][0]["content"] not in {
        r["messages"][0]["content"] for r in train_records}


@pytest.mark.parametrize("flags, message", [
    (["--kinds", "arithmetic,poetry"], "--kinds: unknown kind 'poetry'; choose from arithmetic,spell,count,reverse,"),
    (["--sizes", "spell=many"], "--sizes: expected KIND=COUNT, got 'spell=many'"),
    (["--sizes", "poetry=3"], "--sizes: 'poetry' is not one of the kinds generated"),
    (["--per_kind", "-1"], "--per_kind and --held_out must be 0 or more"),
    (["--words", "FEW"], "has 7 distinct lowercase words of 3 to 10 letters; give a text with at least 20"),
    (["--words", "MISSING"], "no such file"),
    (["--words", "", "--kinds", "arithmetic,spell"], "--words FILE is needed for spell: any text"),
    (["--identity", "BROKEN"], "is not valid JSON"),
    (["--identity", "ONE_PHRASING"], "pair 1 needs 'questions' (at least two phrasings, one held out)"),
    (["--identity", "NO_NAME"], "needs an object with a 'name' and an 'about' string"),
])
def test_bad_input_is_one_line_and_exit_2(words_file, tmp_path, capsys, flags, message):
    files = {"FEW": "the king and his men went home", "BROKEN": '{"name": "Pip",',
             "ONE_PHRASING": json.dumps({"name": "P", "about": "a",
                                         "pairs": [{"questions": ["Hi?"], "answer": "Hi."}]}),
             "NO_NAME": json.dumps({"about": "a", "pairs": []})}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    flags = [str(tmp_path / f) if f in (*files, "MISSING") else f for f in flags]
    argv = ["--words", str(words_file), "--out", str(tmp_path / "out"), *flags]
    assert run_cli(tasks.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_command_writes_both_files_and_refuses_an_unknown_kind_with_exit_2(words_file, tmp_path):
    def command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO_ROOT / "tasks.py"), "--words", str(words_file),
                               "--out", str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=120)

    done = command("--per_kind", "10", "--held_out", "5")
    assert done.returncode == 0, done.stderr
    assert re.search(r"arithmetic +train +10 +held out +5\n", done.stdout)
    assert len((tmp_path / "out" / "train.jsonl").read_text().splitlines()) == 50
    refused = command("--kinds", "poetry")
    assert refused.returncode == 2 and refused.stderr.startswith("error: --kinds: unknown kind 'poetry'")
    assert "Traceback" not in refused.stderr
