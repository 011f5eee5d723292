"""The commands as a user runs them: train, resume, Ctrl+C, generate, and every bad input."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import gen
import train
from checkpoint import load_checkpoint
from cli import run_cli
from tests.conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny.json")
FAST = ["--device", "cpu", "--system.dtype", "float32", "--eval_iters", "2", "--log_interval", "5"]


def command(script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *args], capture_output=True,
                          text=True, timeout=300, **kwargs)


@pytest.mark.slow
def test_train_resume_and_generate_end_to_end(workdir, corpus_file):
    first = command("train.py", "--config", TINY, "--dataset", str(corpus_file), *FAST,
                    "--max_steps", "20", "--eval_interval", "10", cwd=workdir)
    assert first.returncode == 0, first.stderr
    assert "step     10: train loss" in first.stdout and "trained to step 20" in first.stdout
    assert load_checkpoint(workdir / "models/tiny/ckpt.pt")["step"] == 20

    resumed = command("train.py", "--config", TINY, "--dataset", str(corpus_file), *FAST,
                      "--max_steps", "30", "--eval_interval", "10", "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resuming from +models/tiny/ckpt.pt at step 20\n", resumed.stdout)
    assert "step     25/30" in resumed.stdout and "step     10/" not in resumed.stdout
    assert load_checkpoint(workdir / "models/tiny/ckpt.pt")["step"] == 30

    sample = command("gen.py", "models/tiny/ckpt.pt", "--prompt", "ROMEO:", "--max_new_tokens", "40",
                     "--device", "cpu", cwd=workdir)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("ROMEO:") and len(sample.stdout) >= len("ROMEO:") + 40


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_goes_on_from_it(workdir, small_corpus_file):
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train.py"), "--config", TINY, "--dataset", str(small_corpus_file),
         *FAST, "--log_interval", "1", "--max_steps", "100000"],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("step      3/"):
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "SIGINT received" in err
    step = int(re.search(r"stopped by a signal at step (\d+) of 100,000; continue with --resume", out)[1])
    saved = load_checkpoint(workdir / "models/tiny/ckpt.pt")
    assert saved["step"] == step >= 3

    resumed = command("train.py", "--config", TINY, "--dataset", str(small_corpus_file), *FAST,
                      "--max_steps", str(step + 2), "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(rf"resuming from +models/tiny/ckpt.pt at step {step}\n", resumed.stdout)
    assert load_checkpoint(workdir / "models/tiny/ckpt.pt")["step"] == step + 2


@pytest.fixture
def trained_run(workdir, tiny_config_file) -> Path:
    """A finished tiny run in models/tiny_test, trained in-process."""
    assert train.main(["--config", str(tiny_config_file)]) == 0
    return workdir / "models" / "tiny_test"


def generate(capsys, *args: str) -> str:
    assert run_cli(gen.main, list(args)) == 0
    return capsys.readouterr().out


def test_gen_controls(trained_run, capsys):
    run_dir = str(trained_run)
    two = generate(capsys, run_dir, "--num_samples", "2", "--max_new_tokens", "15", "--seed", "5")
    assert two.count(gen.SAMPLE_SEPARATOR.strip()) == 1
    assert generate(capsys, run_dir, "--max_new_tokens", "15", "--seed", "5") == two.split(
        gen.SAMPLE_SEPARATOR)[0]
    assert generate(capsys, run_dir, "--seed", "6", "--max_new_tokens", "30") != generate(
        capsys, run_dir, "--seed", "7", "--max_new_tokens", "30")
    greedy = [generate(capsys, run_dir, "--temperature", "0", "--seed", str(s), "--max_new_tokens", "10")
              for s in (1, 2)]
    assert greedy[0] == greedy[1]
    assert generate(capsys, run_dir, "--top_k", "1", "--max_new_tokens", "10") == greedy[0]
    text = generate(capsys, str(trained_run / "ckpt.pt"), "--prompt", "KING:", "--max_new_tokens", "12",
                    "--device", "cpu")
    # 12 new tokens and a newline, or fewer where the model ended the document (a barely trained
    # model may pick a ChatML token, printed by its name)
    tokens = re.sub(r"<\|im_(start|end)\|>", "#", text)
    assert text.startswith("KING:") and len(tokens) <= len("KING:") + 12 + 1 and "<|endoftext|>" not in text


@pytest.mark.slow
def test_debug_shows_the_traceback(workdir):
    plain = command("train.py", "--config", "missing.json", cwd=workdir)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = command("train.py", "--config", "missing.json", "--debug", cwd=workdir)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UserError" in debug.stderr


@pytest.mark.slow
def test_a_reader_that_leaves_early_ends_gen_quietly(trained_run):
    """`python gen.py ... | head -c 20`: exit 141 (SIGPIPE's convention) with no traceback."""
    args = [sys.executable, str(REPO_ROOT / "gen.py"), str(trained_run), "--max_new_tokens", "3000",
            "--num_samples", "20"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.read(20)
    process.stdout.close()  # the reader goes away while gen.py is still writing
    assert process.wait(timeout=120) == 141
    assert b"Traceback" not in process.stderr.read()
