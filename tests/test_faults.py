"""Faults a long run meets: kills, damaged files, a full disk, NaNs, OOM, time limits, signals."""
from __future__ import annotations

import copy
import math
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import train
from checkpoint import load_checkpoint, load_latest_valid
from cli import run_cli
from config import SystemConfig, TrainingConfig
from config_fields import parse_duration
from errors import UserError
from guards import DeferredSkips, StepTimer, TimeLimit, format_duration
from metrics import read_metrics
from tests.conftest import REPO_ROOT
from utils import resolve_system

TINY = str(REPO_ROOT / "configs" / "tiny.json")


def run(config_file: Path, *flags: str) -> int:
    return run_cli(train.main, ["--config", str(config_file), *flags])


def build_trainer(config_file: Path, *flags: str):
    args = train.build_parser().parse_args(["--config", str(config_file), *flags])
    cfg, checkpoint_, path = train.resolve_run_config(args)
    return train.build_trainer(args, cfg, checkpoint_, path, resolve_system("cpu", "auto", None))


@pytest.mark.slow
def test_rolling_checkpoints_keep_the_newest(workdir, tiny_config_file):
    assert run(tiny_config_file, "--eval_interval", "1", "--training.keep_last", "2") == 0
    names = sorted(p.name for p in (workdir / "models/tiny_test").glob("*.pt"))
    assert names == ["best.pt", "ckpt-5.pt", "ckpt-6.pt", "ckpt.pt"]
    assert load_checkpoint(workdir / "models/tiny_test/ckpt-5.pt")["step"] == 5
    assert run(tiny_config_file, "--eval_interval", "1", "--training.keep_last", "0", "--overwrite") == 0
    assert sorted(p.name for p in (workdir / "models/tiny_test").glob("*.pt")) == ["best.pt", "ckpt.pt"]


def tamper(path: Path) -> None:
    """Change one weight but keep the file loadable: only the checksum can tell."""
    raw = torch.load(path, weights_only=True)
    raw["model"]["wte.weight"][0, 0] += 1.0
    torch.save(raw, path)


@pytest.mark.slow
def test_resume_skips_damaged_checkpoints_and_says_so(workdir, tiny_config_file, capsys):
    assert run(tiny_config_file, "--eval_interval", "1") == 0
    run_dir = workdir / "models/tiny_test"
    # ckpt-6.pt is another name of ckpt.pt's file (a hard link): damage in place reaches both
    (run_dir / "ckpt.pt").write_bytes((run_dir / "ckpt.pt").read_bytes()[:2000])
    tamper(run_dir / "ckpt-5.pt")
    capsys.readouterr()
    assert run(tiny_config_file, "--resume", "--max_steps", "8", "--eval_interval", "1") == 0
    out, err = capsys.readouterr()
    assert "skipping a checkpoint that does not verify: models/tiny_test/ckpt.pt is corrupt" in err
    assert "skipping a checkpoint that does not verify: models/tiny_test/ckpt-6.pt is corrupt" in err
    assert "ckpt-5.pt is damaged: its tensors do not match their checksum" in err
    assert re.search(r"resuming from +models/tiny_test/ckpt-4.pt at step 4\n", out)
    assert load_checkpoint(run_dir / "ckpt.pt")["step"] == 8


class PoisonedLoss(torch.nn.Module):
    """Wraps the model so that the loss is NaN at chosen (1-based) training steps."""

    def __init__(self, trainer, bad_steps: set[int]):
        super().__init__()
        self.model, self.trainer, self.bad_steps = trainer.model, trainer, bad_steps

    def forward(self, x, y):
        logits, loss = self.model(x, y)
        if self.model.training and self.trainer.step + 1 in self.bad_steps:
            loss = loss * float("nan")
        return logits, loss


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_nan_loss_skips_the_update_exactly_and_is_counted(workdir, tiny_config_file, optimizer):
    """The skip happens on the device: weights, moments, momentum and step counts stay as they were."""
    trainer = build_trainer(tiny_config_file, "--training.max_bad_steps", "3", "--training.optimizer", optimizer)
    trainer.forward_model = PoisonedLoss(trainer, bad_steps={2})
    changed, state_changed = [], []
    for _ in range(3):
        before = [p.detach().clone() for p in trainer.model.parameters()]
        state = copy.deepcopy(trainer.optimizer.state_dict()["state"])
        loss, applied = trainer.train_step()
        trainer.step += 1
        assert bool(applied) == math.isfinite(loss.item())
        changed.append(any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters())))
        after = trainer.optimizer.state_dict()["state"]
        state_changed.append(bool(state) and any(not torch.equal(value, after[index][key])
                                                 for index, moments in state.items() for key, value in moments.items()))
    assert changed == [True, False, True] and state_changed == [False, False, True]  # step 1: created
    assert trainer.skips.read(trainer.step) == "steps 1-3: 1 non-finite step(s) skipped (0 in a row at step 3)"
    assert trainer.skips.total == 1 and trainer.skips.in_a_row == 0


def test_too_many_nan_losses_in_a_row_stop_the_run(workdir, tiny_config_file, capsys):
    trainer = build_trainer(tiny_config_file, "--training.max_bad_steps", "3", "--max_steps", "20",
                            "--training.nonfinite_check", "step", "--log_interval", "5")
    trainer.forward_model = PoisonedLoss(trainer, bad_steps={2, 7, 8, 9})
    with pytest.raises(UserError, match=r"not finite for 3 steps in a row \(to step 9\).*resume from "
                                        r"models/tiny_test/ckpt.pt \(step 6\).*lower --lr"):
        trainer.train()
    assert "step 2: the loss is not finite (loss nan); update skipped (1 in a row)" in capsys.readouterr().out
    assert load_checkpoint(workdir / "models/tiny_test/ckpt.pt")["step"] == 6
    assert trainer.skips.total == 4


def test_skipped_steps_are_read_only_at_reports(workdir, tiny_config_file, capsys, monkeypatch):
    """nonfinite_check log (the default): no host read per step; the bad step is counted at the next report."""
    trainer = build_trainer(tiny_config_file, "--max_steps", "12", "--log_interval", "5", "--eval_interval", "100")
    trainer.forward_model = PoisonedLoss(trainer, bad_steps={3})
    reads = []
    original = DeferredSkips.read
    monkeypatch.setattr(DeferredSkips, "read", lambda skips, step, loss=None: reads.append(step) or
                        original(skips, step, loss))
    result = trainer.train()
    assert reads == [5, 10, 12, 12]  # each report, and once at the end; never per step
    assert "steps 1-5: 1 non-finite step(s) skipped (0 in a row at step 5)" in capsys.readouterr().out
    assert result.skipped_steps == trainer.skips.total == 1
    rows = read_metrics(workdir / "models/tiny_test/metrics.csv")  # and metrics.csv counts it in its report
    assert [(r["step"], r["skipped_steps"]) for r in rows if r["kind"] == "train"] == [("5", "1"), ("10", "0"),
                                                                                       ("12", "0")]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert math.isfinite(result.losses.final_val)


def test_deferred_check_stops_after_too_many_bad_steps_in_a_row(workdir, tiny_config_file):
    trainer = build_trainer(tiny_config_file, "--max_steps", "20", "--training.max_bad_steps", "3",
                            "--log_interval", "4", "--eval_interval", "100")
    trainer.forward_model = PoisonedLoss(trainer, bad_steps={6, 7, 8})
    with pytest.raises(UserError, match=r"not finite for 3 steps in a row \(to step 8\).*no checkpoint"):
        trainer.train()
    assert trainer.step == 8 and trainer.skips.total == 3


def test_non_finite_weights_are_never_saved(workdir, tiny_config_file):
    trainer = build_trainer(tiny_config_file)
    trainer.save_latest()
    trainer.saver.wait()  # written in the background
    saved = (workdir / "models/tiny_test/ckpt.pt").read_bytes()
    with torch.no_grad():
        trainer.model.wte.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match="no longer finite at step 0, so they were not saved"):
        trainer.save_latest()
    assert (workdir / "models/tiny_test/ckpt.pt").read_bytes() == saved


def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(workdir, tiny_config_file, capsys,
                                                                  monkeypatch):
    real_save = torch.save
    saves = []

    def save_then_fill_the_disk(obj, file):
        saves.append(1)
        if len(saves) > 1:
            file.write(b"some of the bytes")
            raise OSError(28, "No space left on device")
        real_save(obj, file)

    monkeypatch.setattr(checkpoint.torch, "save", save_then_fill_the_disk)
    assert run(tiny_config_file, "--training.keep_last", "0") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: could not write checkpoint models/tiny_test/ckpt.pt (No space left on device); "
                   "the previous one is untouched")
    monkeypatch.undo()
    assert load_checkpoint(workdir / "models/tiny_test/ckpt.pt")["step"] == 3
    leftovers = sorted(p.name for p in (workdir / "models/tiny_test").iterdir() if ".pt" in p.name)
    assert leftovers == ["best.pt", "ckpt.pt"]  # no half-written file left behind


def test_out_of_memory_names_the_settings_to_lower(workdir, tiny_config_file, capsys, monkeypatch):
    def no_memory(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train.Trainer, "train_step", no_memory)
    assert run(tiny_config_file) == 2
    err = capsys.readouterr().err
    assert "CUDA ran out of memory with batch_size 4, block_size 16, grad_accum_steps 1" in err
    assert "--batch_size" in err and "Traceback" not in err


def test_target_val_loss_stops_the_run_and_says_so(workdir, tiny_config_file, capsys):
    assert run(tiny_config_file, "--target_val_loss", "100", "--max_steps", "50") == 0
    out = capsys.readouterr().out
    assert re.search(r"ending +reached --target_val_loss 100.0 at step 3\n", out)
    assert load_checkpoint(workdir / "models/tiny_test/ckpt.pt")["step"] == 3
    assert run(tiny_config_file, "--target_val_loss", "0.01", "--out_dir", "other") == 0
    assert re.search(r"target +not reached: --target_val_loss 0.01, best \d", capsys.readouterr().out)


@pytest.mark.slow
def test_max_time_stops_with_a_checkpoint_before_the_deadline(workdir, tiny_config_file, capsys,
                                                               monkeypatch):
    # pretend the process started 994 s ago, so --max_time 1000 leaves 6 s for set-up (torch.optim
    # imports torch._dynamo: 2-3 s on a slow machine) and a few steps
    start = time.time() - 994.0
    monkeypatch.setattr(train, "process_start_time", lambda: start)
    assert run(tiny_config_file, "--max_time", "1000", "--max_steps", "100000", "--eval_interval", "40") == 0
    finished = time.time()
    out = capsys.readouterr().out
    # "step 1,143": a fast CPU runs over a thousand of these steps in the 6 s left
    assert re.search(r"stopped at step [\d,]+ of 100,000 to stay within --max_time 16m40s; continue with "
                     r"--resume", out), out
    saved = load_checkpoint(workdir / "models/tiny_test/ckpt.pt")
    assert 0 < saved["step"] < 100000
    assert finished < start + 1000 + 1.0  # it stopped and saved in time (with slack for the summary)


def test_time_limits_from_max_time_and_budget():
    process_start = 1000.0
    t = TrainingConfig(max_time_s=3600, budget_usd=2.0)
    limit = TimeLimit.from_config(t, SystemConfig(usd_per_hour=4.0), process_start)
    assert limit.deadline == 1000.0 + 1800 and "--budget $2.00 at $4.00/h (30m)" in limit.reason
    limit = TimeLimit.from_config(t, SystemConfig(usd_per_hour=1.0), process_start)
    assert limit.deadline == 1000.0 + 3600 and limit.reason == "--max_time 1h"
    assert TimeLimit.from_config(TrainingConfig(), SystemConfig(), process_start) is None
    assert limit.leaves_no_room(10, now=4595.0) and not limit.leaves_no_room(4, now=4595.0)


def test_durations_and_step_timing():
    assert [parse_duration(text) for text in ("5400", "90s", "45m", "1h30m", "2h", "1.5h")] == [
        5400, 90, 2700, 5400, 7200, 5400]
    for bad in ("", "soon", "1d", "h"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert [format_duration(s) for s in (5400, 2710, 12, 3.44, 1.0, 0.9996, 0.0257, 0)] == [
        "1h30m", "45m10s", "12s", "3.4s", "1.0s", "1.0s", "26ms", "0ms"]
    timer = StepTimer(save_guess_s=2.0)
    timer.record_step(60.0)  # compiling: left out
    timer.record_step(1.0)
    timer.record_step(2.0)
    assert timer.step_s == pytest.approx(1.1)
    timer.eval_s = 5.0
    assert timer.needed_for_next(evaluates=True) == pytest.approx(1.1 + 2.0 + 5.0 + 2.0)
    assert timer.needed_for_next(evaluates=False) == pytest.approx(1.1 + 2.0 + 2.0)
    timer.save_s, timer.write_s = 0.1, 1.5  # a timed save: the snapshot, then the background write
    assert timer.needed_for_next(evaluates=False) == pytest.approx(1.1 + 2.0 + 0.1 + 1.5)  # safety: the slowest
    timer.record_step(9.0)  # one slow step (beside the plot's drawing): it is the safety step from now on
    assert timer.step_s == pytest.approx(1.89) and timer.slowest_s == 9.0
    assert timer.needed_for_next(evaluates=False, steps=2) == pytest.approx(2 * 1.89 + 9.0 + 0.1 + 1.5)
    for _ in range(2500):  # 9 x 0.999^2500 < 1
        timer.record_step(1.0)
    assert timer.slowest_s == pytest.approx(1.0) and timer.needed_for_next(evaluates=False) == pytest.approx(3.6)


def start_training(workdir: Path, corpus: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train.py"), "--config", TINY, "--dataset", str(corpus),
         "--device", "cpu", "--system.dtype", "float32", "--eval_iters", "2", "--log_interval", "1",
         "--max_steps", "100000",
         "--training.lr_decay_steps", "2000", *flags],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(process: subprocess.Popen, prefix: str) -> str:
    for line in process.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"the run ended before printing {prefix!r}: {process.stderr.read()}")


@pytest.mark.slow
def test_sigterm_saves_and_exits_143(workdir, small_corpus_file):
    process = start_training(workdir, small_corpus_file)
    wait_for_line(process, "step      2/")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "SIGTERM received" in err and "by a signal" in out
    assert load_checkpoint(workdir / "models/tiny/ckpt.pt")["step"] >= 2


@pytest.mark.slow
def test_a_second_ctrl_c_quits_at_once_and_keeps_the_last_good_checkpoint(workdir, small_corpus_file):
    process = start_training(workdir, small_corpus_file, "--checkpoint_interval", "1")
    wait_for_line(process, "step      3/")
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    checkpoint_, path = load_latest_valid(workdir / "models/tiny")
    assert checkpoint_["step"] >= 2


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_the_run(workdir, small_corpus_file):
    """Kill -9 seven times, four of them aimed at the middle of a save; every resume must work."""
    rng = random.Random(2026)
    run_dir = workdir / "models/tiny"
    last_step, killed_while_saving = 0, 0
    for trial in range(7):
        resume = ["--resume"] if trial else []
        leftovers = set(run_dir.glob(".*.partial-*"))  # the trainer clears these when it starts
        process = start_training(workdir, small_corpus_file, "--checkpoint_interval", "1",
                                 "--eval_interval", "1000", "--training.keep_last", "2", *resume)
        if resume:  # it must start from a valid checkpoint no older than the last one seen
            step = int(wait_for_line(process, "  resuming from").rsplit(" ", 1)[1])
            assert step >= last_step
        wait_for_line(process, "step ")
        wait_for_line(process, "step ")  # so the save after the first step is complete

        def saving() -> bool:
            return bool(set(run_dir.glob(".*.partial-*")) - leftovers)

        if trial % 2 == 0:  # kill while a checkpoint is being written
            deadline = time.time() + 60
            while not saving() and time.time() < deadline:
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        during_save = saving()
        killed_while_saving += during_save
        process.kill()
        _, err = process.communicate(timeout=60)
        assert "Traceback" not in err, err
        last_step = load_latest_valid(run_dir)[0]["step"]  # there is always one that verifies
        print(f"trial {trial}: SIGKILL {'during a save' if during_save else 'between saves'}; "
              f"newest valid checkpoint: step {last_step}")  # shown with pytest -s
    assert killed_while_saving >= 3
    final = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "--config", TINY, "--dataset", str(small_corpus_file),
         "--device", "cpu", "--system.dtype", "float32", "--eval_iters", "2", "--max_steps", str(last_step + 3),
         "--training.lr_decay_steps", "2000", "--resume"],
        cwd=workdir, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    assert load_checkpoint(run_dir / "ckpt.pt")["step"] == last_step + 3


def test_a_diverging_run_skips_non_finite_gradients(workdir, tiny_config_file, capsys):
    """A learning rate far too high: the weights blow up and the gradients stop being finite."""
    trainer = build_trainer(tiny_config_file, "--lr", "1e5", "--training.min_lr", "0",
                            "--training.warmup_steps", "0")
    for _ in range(4):
        loss, _ = trainer.train_step()
        trainer.step += 1
        trainer._read_skips(loss)  # as nonfinite_check step does after every step
    assert trainer.skips.total >= 1
    assert "the gradient is not finite" in capsys.readouterr().out
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
