"""The commands as a user runs them: train, resume, Ctrl+C, generate, and every bad input."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import gen
import train
from checkpoint import load_checkpoint
from errors import run_cli
from tests.conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny.json")
FAST = ["--device", "cpu", "--eval_iters", "2", "--log_interval", "5"]


def command(script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *args], capture_output=True,
                          text=True, timeout=300, **kwargs)


def test_train_resume_and_generate_end_to_end(workdir, corpus_file):
    first = command("train.py", "--config", TINY, "--dataset", str(corpus_file), *FAST,
                    "--max_steps", "20", "--eval_interval", "10", cwd=workdir)
    assert first.returncode == 0, first.stderr
    assert "step     10: train loss" in first.stdout and "trained to step 20" in first.stdout
    assert load_checkpoint(workdir / "models/tiny/ckpt.pt")["step"] == 20

    resumed = command("train.py", "--config", TINY, "--dataset", str(corpus_file), *FAST,
                      "--max_steps", "30", "--eval_interval", "10", "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from models/tiny/ckpt.pt at step 20" in resumed.stdout
    assert "step     25/30" in resumed.stdout and "step     10/" not in resumed.stdout
    assert load_checkpoint(workdir / "models/tiny/ckpt.pt")["step"] == 30

    sample = command("gen.py", "models/tiny/ckpt.pt", "--prompt", "ROMEO:", "--max_new_tokens", "40",
                     "--device", "cpu", cwd=workdir)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("ROMEO:") and len(sample.stdout) >= len("ROMEO:") + 40


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
    stopped_line = next(line for line in out.splitlines() if line.startswith("stopped at step"))
    step = int(stopped_line.split()[3].rstrip(";"))
    saved = load_checkpoint(workdir / "models/tiny/ckpt.pt")
    assert saved["step"] == step >= 3

    resumed = command("train.py", "--config", TINY, "--dataset", str(small_corpus_file), *FAST,
                      "--max_steps", str(step + 2), "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from models/tiny/ckpt.pt at step {step}" in resumed.stdout
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
    assert text.startswith("KING:") and len(text) == len("KING:") + 12 + 1


def user_error(capsys, main, *args: str) -> str:
    """Run a command expecting a user error; return its one line."""
    assert run_cli(main, list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_config_files(workdir, capsys):
    assert "does not exist" in user_error(capsys, train.main, "--config", "nope.json")
    Path("broken.json").write_text('{"model": {"n_layer": 4,}}')
    assert "not valid JSON" in user_error(capsys, train.main, "--config", "broken.json")
    Path("typo.json").write_text(json.dumps({"training": {"learning_rate": 0.1}}))
    assert "unknown key 'training.learning_rate'" in user_error(capsys, train.main, "--config", "typo.json")


def test_bad_flags(workdir, capsys):
    assert "did you mean --lr?" in user_error(capsys, train.main, "--config", TINY, "--lrr", "0.1")
    assert "--training.lr expects a number, got 'fast'" in user_error(capsys, train.main, "--config", TINY,
                                                             "--lr", "fast")
    assert "training.batch_size must be positive" in user_error(capsys, train.main, "--config", TINY,
                                                                "--batch_size", "0")
    assert "system.device must be one of auto, cpu, cuda, mps" in user_error(capsys, train.main,
                                                                             "--device", "tpu")


def test_bad_data(workdir, capsys, tmp_path):
    assert "unknown dataset 'shakspeare'" in user_error(capsys, train.main, "--config", TINY,
                                                         "--dataset", "shakspeare")
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in user_error(capsys, train.main, "--config", TINY,
                                    "--dataset", str(tmp_path / "empty.txt"))
    (tmp_path / "short.txt").write_text("To be, or not to be." * 10)
    assert "fewer than block_size + 1" in user_error(capsys, train.main, "--config", TINY,
                                                     "--dataset", str(tmp_path / "short.txt"))


def test_nothing_to_resume(workdir, capsys, tiny_config_file):
    message = user_error(capsys, train.main, "--config", str(tiny_config_file), "--resume")
    assert "nothing to resume: models/tiny_test/ckpt.pt does not exist" in message
    assert "does not exist" in user_error(capsys, train.main, "--resume", "models/elsewhere/ckpt.pt")


def test_unwritable_out_dir(workdir, capsys, tiny_config_file):
    Path("a_file").write_text("")
    message = user_error(capsys, train.main, "--config", str(tiny_config_file), "--out_dir", "a_file/run")
    assert "cannot write to out_dir a_file/run" in message


def test_errors_never_touch_a_good_checkpoint(trained_run, capsys, tiny_config_file):
    ckpt = trained_run / "ckpt.pt"
    before = ckpt.read_bytes()
    config = ["--config", str(tiny_config_file)]
    message = user_error(capsys, train.main, *config)  # a new run over an old one
    assert "already holds a checkpoint" in message and "--resume" in message
    message = user_error(capsys, train.main, *config, "--resume", "--model.n_layer", "3")
    assert "another architecture: it has model.n_layer=2 but the config says 3" in message
    message = user_error(capsys, train.main, *config, "--resume", "--dataset", TINY)
    assert "another vocabulary" in message
    assert ckpt.read_bytes() == before


def test_corrupt_and_foreign_checkpoints(trained_run, capsys, tiny_config_file):
    damaged = trained_run / "damaged.pt"
    damaged.write_bytes((trained_run / "ckpt.pt").read_bytes()[:5000])
    for main, args in ((train.main, ["--config", str(tiny_config_file), "--resume", str(damaged)]),
                       (gen.main, [str(damaged)])):
        assert "is corrupt or not a checkpoint" in user_error(capsys, main, *args)
    foreign = trained_run / "foreign.pt"
    import torch
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert "not a checkpoint written by this trainer" in user_error(capsys, gen.main, str(foreign))


def test_gen_bad_input(trained_run, capsys):
    assert "does not exist" in user_error(capsys, gen.main, "models/none.pt")
    assert "no checkpoint (best.pt or ckpt.pt)" in user_error(capsys, gen.main, ".")
    assert "not in this model's vocabulary" in user_error(capsys, gen.main, str(trained_run),
                                                          "--prompt", "ü")
    assert "--temperature must be zero or more" in user_error(capsys, gen.main, str(trained_run),
                                                              "--temperature", "-1")
    assert "--num_samples must be at least 1" in user_error(capsys, gen.main, str(trained_run),
                                                            "--num_samples", "0")


def test_debug_shows_the_traceback(workdir):
    plain = command("train.py", "--config", "missing.json", cwd=workdir)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = command("train.py", "--config", "missing.json", "--debug", cwd=workdir)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UserError" in debug.stderr
