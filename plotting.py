"""Loss curves from metrics.csv rows: one run in detail, or several runs side by side."""
from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Optional, Sequence

from background import BackgroundWorker
from metrics import as_float
from utils import notice, write_file_atomic


def smooth(values: Sequence[float]) -> list[float]:
    """Return an exponential moving average over about a twentieth of the points,
    bias-corrected so it starts at the first value."""
    span = max(1, len(values) // 20)
    weight = 1 - 2 / (span + 1)
    smoothed, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**i))
    return smoothed


def _series(rows: list[dict], kind: str, column: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), as_float(r[column])) for r in rows if r["kind"] == kind]
    points = [(step, value) for step, value in points if value is not None]
    return [s for s, _ in points], [v for _, v in points]


def draw_loss_plot(runs: list[tuple[str, list[dict]]], path: Path, title: Optional[str] = None) -> None:
    """Draw train and validation loss against steps into `path` (PNG).

    For one run: raw and smoothed train loss, validation loss with markers, the best
    validation loss marked, and the learning rate on a second axis. For several runs: the
    smoothed train loss and the validation loss of each, one colour per run.

    Drawn with Figure alone, never pyplot (its global figure registry is not thread-safe), so a
    run can draw on a thread of its own; the file is replaced atomically, so an image viewer
    never shows half of it.
    """
    from matplotlib.figure import Figure  # imported here: a second or more, only when plotting

    figure = Figure(figsize=(9, 5.5))
    axis = figure.subplots()
    single = len(runs) == 1
    for index, (label, rows) in enumerate(runs):
        color = f"C{index}"
        train_steps, train_loss = _series(rows, "train", "train_loss")
        val_steps, val_loss = _series(rows, "eval", "val_loss")
        prefix = "" if single else f"{label}: "
        if single and train_loss:
            axis.plot(train_steps, train_loss, color=color, alpha=0.25, linewidth=0.8, label="train loss")
        if train_loss:
            axis.plot(train_steps, smooth(train_loss), color=color, linewidth=1.6,
                      label=f"{prefix}train loss (smoothed)")
        if val_loss:
            val_color = "C1" if single else color
            axis.plot(val_steps, val_loss, color=val_color, marker="o", markersize=4, linestyle="--",
                      label=f"{prefix}val loss")
            best = min(range(len(val_loss)), key=val_loss.__getitem__)
            axis.scatter([val_steps[best]], [val_loss[best]], marker="*", s=180, color=val_color,
                         zorder=5, label=f"{prefix}best val {val_loss[best]:.4f} @ {val_steps[best]}")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    if single:
        lr_steps, lr = _series(runs[0][1], "train", "lr")
        if lr:
            lr_axis = axis.twinx()
            lr_axis.plot(lr_steps, lr, color="C2", linewidth=1, alpha=0.6, label="learning rate")
            lr_axis.set_ylabel("learning rate")
            lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
            lines, labels = axis.get_legend_handles_labels()
            more_lines, more_labels = lr_axis.get_legend_handles_labels()
            axis.legend(lines + more_lines, labels + more_labels, loc="upper right")
        else:
            axis.legend(loc="upper right")
    else:
        axis.legend(loc="upper right")
    axis.set_title(title or (runs[0][0] if single else "comparison"))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, lambda file: figure.savefig(file, format="png", dpi=110))



class LossPlotter:
    """Keeps a run's loss.png current: redrawn on a thread of its own at each evaluation, so
    training does not wait the 0.2-0.6 s matplotlib takes, and once more at the end.

    One drawing at a time (a redraw waits for the one before). A failure (no fonts, a full
    disk) is a notice once, after which the run goes on without plots; never an error.
    """

    def __init__(self, path: Path, title: str):
        self.path, self.title = path, title
        self.worker = BackgroundWorker("plotter")
        self.failed = False
        self.rows_drawn = 0  # how many metrics rows the newest loss.png shows

    def redraw(self, rows: list[dict], milestone: Optional[Path] = None) -> None:
        """Start drawing `rows` (metrics.csv's, read by the caller, who appends to it) and
        copying the image to `milestone`; return at once."""
        if not self.failed:
            self.worker.start(functools.partial(self._draw, rows, milestone))

    def _draw(self, rows: list[dict], milestone: Optional[Path]) -> None:
        try:
            draw_loss_plot([(self.title, rows)], self.path)
            if milestone is not None:
                milestone.parent.mkdir(exist_ok=True)
                shutil.copyfile(self.path, milestone)
            self.rows_drawn = len(rows)
        except Exception as error:  # a plot is never worth a run
            self.failed = True
            notice(f"could not draw {self.path} ({type(error).__name__}: {error}); training goes on "
                   "without plots; `python plot.py` can draw them from metrics.csv later")

    def finish(self, rows: list[dict]) -> None:
        """Wait for the drawing in progress, then draw `rows` here if they are more than it
        showed (a run stopped between evaluations): loss.png is whole and current on return."""
        self.worker.wait()
        if not self.failed and len(rows) != self.rows_drawn:
            self._draw(rows, None)
