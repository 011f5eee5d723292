"""Checkpoints written in the background: the state of their step, whole on disk when the run
ends however it ends, and a failed write stopping the run with one line."""
from __future__ import annotations

import threading
import time

import pytest
import torch

import checkpoint
import saver
import train
from checkpoint import load_checkpoint, save_checkpoint, tensor_checksum
from cli import run_cli
from metrics import read_metrics
from utils import resolve_system

WAIT_S = 60.0  # a gate that never opens fails the test rather than hanging it


def build_trainer(config_file, *flags: str):
    args = train.build_parser().parse_args(["--config", str(config_file), *flags])
    cfg, _, _ = train.resolve_run_config(args)
    return train.build_trainer(args, cfg, None, None, resolve_system("cpu", "auto", None))


def writer_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "checkpoint writer"]


def test_a_background_save_holds_the_state_of_its_step(workdir, tiny_config_file, monkeypatch):
    """The step-3 write is held back until training has changed the weights twice more (on the
    CPU the state's tensors are the live ones); it must still hold step 3's state, as a
    synchronous save of that state does."""
    trainer = build_trainer(tiny_config_file, "--training.keep_last", "3")
    written_at = []

    def held_back_write(snapshot, path):
        deadline = time.monotonic() + WAIT_S
        while trainer.step < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        written_at.append(trainer.step)
        return checkpoint.write_checkpoint(snapshot, path)

    monkeypatch.setattr(saver, "write_checkpoint", held_back_write)
    state_dict = trainer.state_dict

    def state_also_saved_synchronously():
        state = state_dict()
        save_checkpoint(state, workdir / f"sync-{state['step']}.pt")
        return state

    trainer.state_dict = state_also_saved_synchronously
    result = trainer.train()
    assert result.steps == 6 and written_at[0] >= 5 and not writer_threads()
    run_dir = workdir / "models/tiny_test"
    for step in (3, 6):
        background, synchronous = load_checkpoint(run_dir / f"ckpt-{step}.pt"), load_checkpoint(
            workdir / f"sync-{step}.pt")
        assert background["step"] == synchronous["step"] == step
        assert tensor_checksum(background) == tensor_checksum(synchronous)
    at_3 = load_checkpoint(run_dir / "ckpt-3.pt")["model"]
    assert not torch.equal(at_3["wte.weight"], trainer.model.wte.weight)  # training went on meanwhile
    assert load_checkpoint(run_dir / "ckpt.pt")["step"] == 6  # whole on disk when train() returns


def test_a_run_resumes_from_a_background_save(workdir, tiny_config_file):
    schedule = ["--training.lr_decay_steps", "6", "--training.keep_last", "3"]
    straight = build_trainer(tiny_config_file, *schedule)
    straight.train()
    flags = ["--config", str(tiny_config_file), *schedule, "--out_dir", "again", "--resume",
             "models/tiny_test/ckpt-3.pt"]
    args = train.build_parser().parse_args(flags)
    cfg, loaded, path = train.resolve_run_config(args)
    resumed = train.build_trainer(args, cfg, loaded, path, resolve_system("cpu", "auto", None))
    assert resumed.step == 3
    resumed.train()
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_a_failed_background_write_stops_the_run_at_the_next_save(workdir, tiny_config_file, capsys,
                                                                  monkeypatch):
    real_save = torch.save
    saves = []

    def disk_full_once(obj, file):
        saves.append(1)
        if len(saves) == 1:
            file.write(b"some of the bytes")
            raise OSError(28, "No space left on device")
        real_save(obj, file)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full_once)
    code = run_cli(train.main, ["--config", str(tiny_config_file), "--max_steps", "9"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: could not write checkpoint models/tiny_test/ckpt.pt (No space left on device); "
        "the previous one is untouched")
    run_dir = workdir / "models/tiny_test"
    steps = [int(row["step"]) for row in read_metrics(run_dir / "metrics.csv")]
    assert max(steps) == 6  # it stopped at the next save
    assert len(saves) == 1 and not [p for p in run_dir.iterdir() if ".pt" in p.name]  # nothing half-written


def test_an_interrupt_lets_the_write_in_flight_finish(workdir, tiny_config_file, monkeypatch):
    """Ctrl+C twice (KeyboardInterrupt) while the step-3 checkpoint is still being written."""
    trainer = build_trainer(tiny_config_file)
    interrupted = threading.Event()

    def slow_write(snapshot, path):
        interrupted.wait(WAIT_S)
        time.sleep(0.2)  # still writing when the interrupt reaches the training thread
        return checkpoint.write_checkpoint(snapshot, path)

    monkeypatch.setattr(saver, "write_checkpoint", slow_write)
    train_step = trainer.train_step

    def interrupted_at_step_5():
        if trainer.step == 4:
            interrupted.set()
            raise KeyboardInterrupt
        return train_step()

    trainer.train_step = interrupted_at_step_5
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not writer_threads()
    assert load_checkpoint(workdir / "models/tiny_test/ckpt.pt")["step"] == 3
    assert load_checkpoint(workdir / "models/tiny_test/best.pt")["step"] == 3
