"""The files a run writes in its directory, and clearing an earlier run's before a new run starts.

A new run in a directory must not leave the earlier run's metrics, plots or report beside its
own, where they would read as this run's. Only files by the names a run writes are removed:
anything else in the folder (a user's notes, their own plots) stays.
"""
from __future__ import annotations

import re
from pathlib import Path

from checkpoint import BEST, LATEST, rolling_checkpoints

METRICS = "metrics.csv"
PLOT = "loss.png"
REPORT = "report.md"
MILESTONES = "plots"  # copies of the plot, plots/loss_step<N>.png
MILESTONE = re.compile(r"loss_step\d+\.png")
TENSORBOARD = "tensorboard"  # loggers.py's TensorBoard events; W&B's runs (wandb/) stay, unsynced ones too
EVENTS = re.compile(r"events\.out\.tfevents\..+")
# the folders of an earlier run's files beside the top level: (folder, what its files are called)
FOLDERS = ((MILESTONES, MILESTONE, "plot"), (TENSORBOARD, EVENTS, "TensorBoard event file"))


def milestone_path(out_dir: Path, step: int) -> Path:
    return out_dir / MILESTONES / f"loss_step{step}.png"


def checkpoints_in(out_dir: Path) -> list[Path]:
    """The checkpoints a run wrote in out_dir: ckpt.pt, best.pt and the rolling ckpt-<step>.pt."""
    return [p for p in (out_dir / LATEST, out_dir / BEST) if p.is_file()] + rolling_checkpoints(out_dir)


def outputs_in(out_dir: Path) -> list[Path]:
    """The other files a run wrote in out_dir: metrics, the plot and its milestones, the report,
    the TensorBoard events."""
    found = [p for p in (out_dir / METRICS, out_dir / PLOT, out_dir / REPORT) if p.is_file()]
    for folder, pattern, _ in FOLDERS:
        if (out_dir / folder).is_dir():
            found += sorted(p for p in (out_dir / folder).iterdir()
                            if p.is_file() and pattern.fullmatch(p.name))
    return found


def clear_earlier_run(out_dir: Path, files: list[Path]) -> str:
    """Delete an earlier run's `files` (their folders too, once empty); return the line that says so."""
    for path in files:
        path.unlink()
    names = [p.name for p in files if p.parent == out_dir]
    for folder, _, what in FOLDERS:
        inside = [p for p in files if p.parent == out_dir / folder]
        if inside and not any((out_dir / folder).iterdir()):
            (out_dir / folder).rmdir()
        if inside:
            names.append(f"{len(inside)} {what}{'s' if len(inside) > 1 else ''} in {folder}/")
    listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    return f"removed the earlier run's {listed} from {out_dir}; other files there stay"
