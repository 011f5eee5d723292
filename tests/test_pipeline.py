"""pipeline.py: phases hand over and skip, --from/--only, resume after a signal, the report card,
bad input; task_eval's exact match and the pipeline's multiple-choice questions."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pipeline as pipeline_cli
import task_eval
from checkpoint import load_checkpoint
from cli import run_cli
from errors import UserError
from pipeline_data import multiple_choice_records
from tasks import TaskChat
from tests.conftest import REPO_ROOT, generated_corpus
from tokenizer import CharTokenizer

PHASE_SETTINGS = {
    "extends": str(REPO_ROOT / "configs" / "pipeline" / "laptop_base.json"),
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64},
    "training": {"batch_size": 4, "max_steps": 6, "eval_interval": 6, "eval_iters": 2, "eval_train_iters": 2,
                 "log_interval": 2, "warmup_steps": 2, "checkpoint_interval": 2},
    "system": {"device": "cpu", "dtype": "float32", "compile": False},
}
FLAGS = ["--tasks.per_kind", "40", "--tasks.held_out", "4",
         # mid runs long enough (a second or more) for the resume test to stop it part-way
         "--mid.max_steps", "300", "--mid.checkpoint_interval", "50", "--mid.eval_interval", "150"]


def write_pipeline(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "phase.json").write_text(json.dumps(PHASE_SETTINGS))
    text = folder / "text.txt"
    text.write_text(generated_corpus(30_000))
    settings = {"run_dir": str(folder / "run"), "dataset": str(text), "tokenizer": {"kind": "char"},
                "tasks": {"seed": 0, "kinds": ["spell", "reverse", "identity"]},
                "base": {"config": "phase.json", "data": ["base"]},
                "mid": {"config": "phase.json", "data": ["base", "tasks"]},
                "sft": {"config": "phase.json", "data": ["tasks"]},
                "eval": {"multiple_choice": ["tasks"]},
                "report": {"prompts": ["Spell the word 'king'.", "Who are you?"]}}
    settings.update(changes)
    path = folder / "pipeline.json"
    path.write_text(json.dumps(settings))
    return path


def pipeline(config: Path, *flags: str, wait: bool = True):
    command = [sys.executable, str(REPO_ROOT / "pipeline.py"), "--config", str(config), *FLAGS, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, cwd=config.parent, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=config.parent, env=env, capture_output=True, text=True, timeout=300)


def weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One whole pipeline run of a tiny model, shared by the tests that only read it."""
    config = write_pipeline(tmp_path_factory.mktemp("pipeline"))
    done = pipeline(config)
    assert done.returncode == 0, done.stderr[-2000:]
    return config


def run_dir(config: Path) -> Path:
    return config.parent / "run"


@pytest.mark.slow
def test_phases_hand_over_and_a_second_run_skips_them_all(finished):
    run = run_dir(finished)
    for phase in ("tokenizer", "base", "mid", "sft", "eval", "report"):
        assert json.loads((run / phase / "phase.json").read_text())["status"] == "done", phase
    assert "starting from the weights of" in (run / "mid" / "log.txt").read_text()
    assert str(run / "base" / "best.pt") in (run / "mid" / "log.txt").read_text()
    fitted = json.loads((run / "tokenizer" / "tokenizer.json").read_text())
    assert all(load_checkpoint(run / stage / "ckpt.pt")["tokenizer"] == fitted for stage in ("base", "mid", "sft"))
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    again = pipeline(finished)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped") == 6
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == stamps


@pytest.mark.slow
def test_only_and_from_run_again_just_those_phases(finished):
    run = run_dir(finished)
    base = (run / "base" / "ckpt.pt").stat().st_mtime_ns
    sft = (run / "sft" / "ckpt.pt").stat().st_mtime_ns
    evaluated = (run / "eval" / "sft.json").stat().st_mtime_ns
    only = pipeline(finished, "--only", "eval")
    assert only.returncode == 0, only.stderr
    assert (run / "eval" / "sft.json").stat().st_mtime_ns != evaluated
    assert (run / "sft" / "ckpt.pt").stat().st_mtime_ns == sft
    again = pipeline(finished, "--from", "sft")
    assert again.returncode == 0, again.stderr
    assert (run / "sft" / "ckpt.pt").stat().st_mtime_ns != sft
    assert (run / "base" / "ckpt.pt").stat().st_mtime_ns == base
    assert "[pipeline] mid: starting" not in again.stdout


def summary_table(report: str) -> dict[str, list[str]]:
    section = report.split("## Summary")[1].split("\n## ")[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


@pytest.mark.slow
def test_the_report_has_every_section_and_the_evals_numbers(finished):
    run = run_dir(finished)
    report = (run / "report.md").read_text()
    for section in ("## Environment", "## Phases", "## Summary", "## Sample chats", "## Total"):
        assert section in report
    assert "git_commit" in report and "torch" in report
    written_by = re.search(r"by `(pipeline\.py --config \S+ .*)`\.\n", report)  # as typed, flags included
    assert written_by and f"--config {finished} --tasks.per_kind 40 " in written_by[1]
    assert json.loads((run / "report" / "phase.json").read_text())["command"] == written_by[1]
    table = summary_table(report)
    evals = [json.loads((run / "eval" / f"{stage}.json").read_text()) for stage in ("base", "mid", "sft")]
    assert table["bits per byte (base text, val)"] == [f"{e['bits_per_byte']:.4f}" for e in evals]
    for index, result in enumerate(evals[0]["exact_match"]):
        assert table[f"{result['task']}: exact match"] == [
            f"{100 * e['exact_match'][index]['accuracy']:.1f}%" for e in evals]
    choices = evals[0]["multiple_choice"][0]
    row = f"choices.jsonl: multiple choice (chance {100 * choices['chance']:.1f}%)"
    assert table[row] == [f"{100 * e['multiple_choice'][0]['accuracy']:.1f}%" for e in evals]
    centred = [(sum(r["accuracy"] for r in e["exact_match"]) + e["multiple_choice"][0]["centred"])
               / (len(e["exact_match"]) + 1) for e in evals]
    assert table["centred mean (ChatCORE-style)"] == [f"{c:.4f}" for c in centred]
    assert report.count("- **you:**") == 2


@pytest.mark.slow
def test_a_pipeline_stopped_by_sigterm_resumes_to_the_same_weights(finished, tmp_path):
    config = write_pipeline(tmp_path / "stopped")
    config.parent.joinpath("text.txt").write_text(finished.parent.joinpath("text.txt").read_text())
    process = pipeline(config, wait=False)
    deadline = time.monotonic() + 120
    saved = run_dir(config) / "mid" / "ckpt.pt"  # from step 50 of 300 on
    while not saved.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert "[pipeline] mid stopped by a signal" in err and "run the same command again to resume it from" in err
    resumed = pipeline(config)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "mid: resuming from its newest valid checkpoint" in resumed.stdout
    assert "base: done earlier with these settings and verified; skipped" in resumed.stdout
    expected, got = weights(run_dir(finished) / "sft" / "ckpt.pt"), weights(run_dir(config) / "sft" / "ckpt.pt")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    # a phase flag changed: sft starts over from mid's weights (it used to resume its old checkpoint)
    changed = pipeline(config, "--sft.lr", "0.002")
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "mid: done earlier with these settings and verified; skipped" in changed.stdout
    assert "sft: resuming" not in changed.stdout and "starting from the weights of" in changed.stdout
    assert load_checkpoint(run_dir(config) / "sft" / "ckpt.pt")["config"]["training"]["lr"] == 0.002


@pytest.mark.slow
def test_a_signal_during_eval_ends_with_the_line_a_training_phase_gets(finished, monkeypatch, capsys):
    """eval runs in the pipeline's own process (between its eval.py children): a SIGTERM there
    ended the pipeline without a word and left eval "running"."""
    def signalled(pipeline, log_path):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        pytest.fail("SIGTERM did not stop the phase")

    def unheard(number, frame):  # in place of the default, which would end pytest too
        raise AssertionError("the pipeline left SIGTERM to its default: the process ends without a word")

    monkeypatch.setattr(pipeline_cli, "evaluate_stages", signalled)
    monkeypatch.chdir(finished.parent)
    before = signal.signal(signal.SIGTERM, unheard)
    try:
        assert run_cli(pipeline_cli.main, ["--config", str(finished), *FLAGS, "--only", "eval"]) == 143
        assert signal.getsignal(signal.SIGTERM) is unheard  # the pipeline's handlers are gone with it
    finally:
        signal.signal(signal.SIGTERM, before)
    assert capsys.readouterr().err.endswith(
        f"[pipeline] eval stopped by a signal (exit 143); its log is {run_dir(finished) / 'eval' / 'log.txt'}; "
        "run the command again without --from/--only (with them the phase starts over) to run it again\n")
    assert json.loads((run_dir(finished) / "eval" / "phase.json").read_text())["status"] == "stopped"
    assert pipeline(finished, "--only", "eval").returncode == 0  # and the phase runs again
    monkeypatch.setattr(pipeline_cli.Pipeline, "run", lambda self, phases, forced: pipeline_cli.raise_stopped(
        signal.SIGINT, None))  # Ctrl+C between two phases
    assert run_cli(pipeline_cli.main, ["--config", str(finished), *FLAGS]) == 130
    assert capsys.readouterr().err == ("[pipeline] stopped by SIGINT between phases; run the same command again "
                                       "to go on\n")


@pytest.mark.parametrize("case, flags, message", [
    ("missing phase config", [], "phase mid's config"),
    ("unknown phase", ["--only", "nonsense"], "invalid choice"),
    ("bad phase flag", ["--base.training.nonsense", "3"], "unknown flag --base.training.nonsense"),
    ("unknown key", [], "unknown key 'basis'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case, flags, message):
    changes = {"mid": {"config": "missing.json", "data": ["base"]}} if case == "missing phase config" else {}
    config = write_pipeline(tmp_path, **changes)
    if case == "unknown key":
        settings = json.loads(config.read_text())
        settings["basis"] = settings.pop("base")
        config.write_text(json.dumps(settings))
    done = pipeline(config, *flags)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--base.max_stepz", "10"], "unknown flag --base.max_stepz; did you mean --base.max_steps?"),
    (["--mid.max_steps", "abc"], "--mid.max_steps (--training.max_steps) expects a whole number, got 'abc'"),
    (["--max_stepz", "10"], "unknown flag --max_stepz; did you mean --max_steps?"),  # every phase's: as typed
    (["--tasks.per_kindd", "5"], "unknown key 'tasks.per_kindd' in the flags; did you mean 'tasks.per_kind'?"),
    (["--tokenizer.kind", "bpe"], "tokenizer.kind in the flags must be one of char, sentencepiece, tiktoken"),
])
def test_a_bad_flag_is_named_as_typed(tmp_path, capsys, flags, message):
    """They named train.py's form (--max_stepz for --base.max_stepz), or blamed the config file."""
    config = write_pipeline(tmp_path)
    assert run_cli(pipeline_cli.main, ["--config", str(config), *flags]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_exact_match_counts_replies_equal_to_the_answer(tmp_path, monkeypatch):
    chats = [TaskChat("spell", "Spell the word 'ab'.", "a-b"), TaskChat("spell", "Spell the word 'cd'.", "c-d"),
             TaskChat("reverse", "Reverse the word 'ab'.", "ba"), TaskChat("reverse", "Reverse the word 'abc'.", "cba")]
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps(chat.record()) + "\n" for chat in chats))
    tokenizer = CharTokenizer("".join(sorted(set("".join(c.question + c.answer for c in chats) + "usertantsix\n"))))
    replies = {"Spell the word 'ab'.": "a-b", "Spell the word 'cd'.": "c-x",
               "Reverse the word 'ab'.": " ba ", "Reverse the word 'abc'.": "cb"}
    by_prompt = {tuple(task_eval.prompt_tokens(tokenizer, task_eval.parse_task_chat(c.record(), ""))): c.question
                 for c in chats}

    def fake_batch(model, prompts, max_new, stop_ids, vocab_limit, dtype):
        return [tokenizer.encode(replies[by_prompt[tuple(p)]]) for p in prompts]

    monkeypatch.setattr(task_eval, "greedy_batch", fake_batch)
    results = {r.task: r for r in task_eval.score_task_chats(torch.nn.Linear(1, 1), tokenizer, 64, str(path))}
    assert (results["spell"].correct, results["spell"].questions) == (1, 2)
    assert (results["reverse"].correct, results["reverse"].accuracy) == (1, 0.5)
    assert task_eval.is_task_chat_file(str(path))
    batches = task_eval.same_length_batches([[1], [2, 3], [4], [5, 6], [7]], 2)
    assert sorted(map(sorted, batches)) == [[0, 2], [1, 3], [4]]
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "task": "x", "answer": "y"}) + "\n")
    with pytest.raises(UserError, match="must end with the assistant's reply"):
        task_eval.read_task_chats(str(path))


def test_multiple_choice_questions_hold_the_answer_among_distinct_choices():
    words = ("king", "queen", "crown", "sword", "hat")
    held = [TaskChat("spell", f"Spell the word '{w}'.", "-".join(w)) for w in words]
    records = multiple_choice_records(held, seed=3)
    assert records == multiple_choice_records(held, seed=3)
    assert len(records) == len(held)
    for record, chat in zip(records, held):
        assert record["question"] == chat.question and record["choices"][record["answer"]] == chat.answer
        assert len(set(record["choices"])) == 4 and all(re.fullmatch(r"[a-z](-[a-z])*", c) for c in record["choices"])
