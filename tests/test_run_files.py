"""A new run in a directory starts clean of what an earlier run wrote there, and of nothing else."""
from __future__ import annotations

from pathlib import Path

import train
from cli import run_cli
from metrics import read_metrics

EARLIER_RUN = ["ckpt.pt", "best.pt", "ckpt-3.pt", "metrics.csv", "loss.png", "report.md",
               "plots/loss_step3.png", "plots/loss_step6.png", "tensorboard/events.out.tfevents.1.vm.7.0"]
# files no run writes, and W&B's offline runs (another run id, perhaps not synced yet)
THE_USERS = ["notes.txt", "plots/mine.png", "ckpt-final.pt", "tensorboard/mine.txt",
             "wandb/offline-run-20260101_000000-abcd1234/run-abcd1234.wandb"]


def files_in(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def make_files(run_dir: Path, names: list[str]) -> None:
    for name in names:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(name)


def test_overwrite_leaves_nothing_of_the_earlier_run(workdir, tiny_config_file, capsys):
    run = ["--config", str(tiny_config_file), "--system.dtype", "float32"]
    assert run_cli(train.main, [*run, "--training.plot_milestone_interval", "3"]) == 0
    run_dir = workdir / "models" / "tiny_test"
    make_files(run_dir, THE_USERS)
    assert {"plots/loss_step3.png", "plots/loss_step6.png", "report.md"} <= files_in(run_dir)
    capsys.readouterr()
    assert run_cli(train.main, [*run, "--overwrite", "--max_steps", "2", "--eval_interval", "2"]) == 0
    assert files_in(run_dir) == {"ckpt.pt", "best.pt", "ckpt-2.pt", "metrics.csv", "loss.png", "report.md",
                                 *THE_USERS}
    assert max(int(row["step"]) for row in read_metrics(run_dir / "metrics.csv")) == 2
    said = [line for line in capsys.readouterr().out.splitlines() if "earlier run" in line]
    assert len(said) == 1 and "removed" in said[0] and "plots/" in said[0], said


def test_a_new_run_clears_what_an_earlier_one_left_but_a_resumed_one_keeps_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    make_files(run_dir, [*EARLIER_RUN, *THE_USERS])
    train.prepare_out_dir(run_dir, run_dir / "ckpt.pt", overwrite=False)  # --resume, here
    assert files_in(run_dir) == {*EARLIER_RUN, *THE_USERS} and capsys.readouterr().out == ""

    for name in ("ckpt.pt", "best.pt", "ckpt-3.pt"):  # a run killed before its first checkpoint
        (run_dir / name).unlink()
    train.prepare_out_dir(run_dir, None, overwrite=False)
    assert files_in(run_dir) == set(THE_USERS)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and ("metrics.csv, loss.png, report.md, 2 plots in plots/ and 1 TensorBoard "
                                     "event file in tensorboard/") in out
