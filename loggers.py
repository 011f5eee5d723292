"""Experiment loggers: TensorBoard and Weights & Biases get what metrics.csv gets, with the
resolved config and the environment record.

metrics.csv itself (metrics.py) is always written, since the plots, report.md and a resume read
it: "csv" in training.loggers names it. The others are opened by rank 0's RunMonitor when
training starts; a logger that cannot start stops the run before its first step (one line), and
one that fails later is dropped with a notice while training goes on: a dashboard is never worth
a run. W&B runs offline unless the user has logged in or chosen a mode (WANDB_MODE), so a node
without a network never waits for one.
"""
from __future__ import annotations

import importlib
import json
import math
import netrc
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol

from config import WandbConfig
from errors import UserError
from run_files import TENSORBOARD

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> the package it imports
WANDB_HOST = "api.wandb.ai"
WANDB_INIT_TIMEOUT_S = 60.0  # an online start that takes longer falls back to offline

# metrics.csv's columns as scalar names, by kind of row: a report's training loss is the mean
# of its steps, an evaluation's is scored on fixed batches, so the two get different names
TRAIN_SCALARS = {
    "train_loss": "train/loss", "lr": "train/lr", "skipped_steps": "train/skipped_steps",
    "tokens": "progress/tokens", "elapsed_s": "progress/elapsed_s",
    "tokens_per_s": "speed/tokens_per_s", "mfu": "speed/mfu", "tflops": "speed/tflops",
    "rss_mb": "memory/rss_mb", "system_used_mb": "memory/system_used_mb",
    "cuda_allocated_mb": "memory/cuda_allocated_mb", "cuda_peak_mb": "memory/cuda_peak_mb",
}
EVAL_SCALARS = {
    "train_loss": "eval/train_loss", "val_loss": "eval/val_loss",
    "val_perplexity": "eval/val_perplexity", "val_bits_per_char": "eval/val_bits_per_char",
}


def scalars(row: Mapping[str, object]) -> dict[str, float]:
    """Return a metrics.csv row's figures by scalar name (empty cells left out). An evaluation's
    memory and time are its report's, at the same step: they are not logged twice."""
    names = TRAIN_SCALARS if row["kind"] == "train" else EVAL_SCALARS
    return {names[column]: float(value) for column, value in row.items()
            if column in names and value is not None}


def require_packages(loggers: list[str]) -> None:
    """Raise UserError, naming the pip command, if a logger's package is not installed."""
    for logger in loggers:
        package = PACKAGES.get(logger)
        if package is None:
            continue
        try:
            importlib.import_module(package)
        except ImportError:
            raise UserError(f"training.loggers has {logger}, but the {package} package is not "
                            f"installed: pip install {package}") from None


def new_run_id() -> str:
    """Return a fresh W&B-style run id (8 lowercase letters and digits), kept in checkpoints."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def flat_config(config: dict) -> dict[str, object]:
    """Return {"section.field": value} with lists and nulls as JSON text (what hparams take)."""
    return {f"{section}.{name}": value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
            for section, values in config.items() for name, value in values.items()}


class MetricLogger(Protocol):
    """What the run's loggers do; each is called by rank 0 only."""

    name: str

    def log_metrics(self, step: int, values: dict[str, float]) -> None: ...
    def log_config(self, config: dict, environment: dict[str, str]) -> None: ...
    def close(self) -> None: ...
    def where(self) -> str:
        """Return where the logged run lies and how to look at it (the summaries print it)."""


@dataclass
class RunIdentity:
    """Which run the loggers continue: its directory, the step it resumed from, its W&B id."""

    out_dir: Path
    resume_step: Optional[int]  # None: a new run
    run_id: str


class TensorBoardLogger:
    """Events in <out_dir>/tensorboard; a resumed run continues them, hiding (purge_step) what
    the interrupted session logged after its checkpoint, so no step appears twice."""

    name = "tensorboard"

    def __init__(self, run: RunIdentity):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run.out_dir / TENSORBOARD
        purge_step = None if run.resume_step is None else run.resume_step + 1
        try:
            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
        except OSError as error:
            raise UserError(f"cannot write TensorBoard events to {self.log_dir} ({error.strerror or error}); "
                            "pick another --out_dir") from None

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a few events every log_interval steps: visible at once, cheap

    def log_config(self, config: dict, environment: dict[str, str]) -> None:
        """The config as text and as hyperparameters (the HPARAMS tab), the environment as text.

        Written into this run's own event file: SummaryWriter.add_hparams would start another run."""
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("config", f"```json\n{json.dumps(config, indent=2)}\n```")
        table = "\n".join(["| | |", "| --- | --- |", *(f"| {k} | `{v}` |" for k, v in environment.items())])
        self.writer.add_text("environment", table)
        for summary in hparams(flat_config(config), {"eval/val_loss": math.nan}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def where(self) -> str:
        return f"{self.log_dir} (view: tensorboard --logdir {self.log_dir})"


def wandb_mode(environ: Mapping[str, str], netrc_path: Optional[Path] = None) -> str:
    """Return the W&B mode to ask for: WANDB_MODE's where set, online where the user has logged
    in (WANDB_API_KEY, or `wandb login`'s netrc entry), else offline."""
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    if environ.get("WANDB_API_KEY"):
        return "online"
    path = netrc_path or Path(environ.get("NETRC") or Path(environ.get("HOME", "~")).expanduser() / ".netrc")
    try:
        logged_in = netrc.netrc(str(path)).authenticators(WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


class WandbLogger:
    """A W&B run in <out_dir>/wandb, with the id the checkpoint keeps, so --resume continues it.

    Offline, a session's run lies in its own offline-run-<time>-<id> folder (wandb appends "-1"
    when a resumed session starts within the same second); `wandb sync` of all of them (the
    summary prints the command) uploads them as one run.
    """

    name = "wandb"

    def __init__(self, run: RunIdentity, settings: WandbConfig, notify: Callable[[str], None]):
        import wandb

        self.wandb, self.run_id = wandb, run.run_id
        self.wandb_dir = run.out_dir / "wandb"
        mode = wandb_mode(os.environ)
        options = dict(project=settings.project, name=settings.name or run.out_dir.name,
                       tags=settings.tags or None, group=settings.group, dir=str(run.out_dir),
                       id=run.run_id, resume="allow", reinit="finish_previous")
        try:
            self.run = self._init(options, mode)
        except Exception as error:  # wandb's errors have no common base
            if mode in ("offline", "dryrun", "disabled"):
                raise UserError(f"W&B ({mode}) could not start a run in {self.wandb_dir}: {error}") from None
            notify(f"W&B could not start online ({str(error).splitlines()[0]}); logging offline instead")
            self.run = self._init(options, "offline")

    def _init(self, options: dict, mode: str):
        # console off: the progress bar stays ours; silent: the summaries say where the run is
        settings = self.wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, console="off", silent=True)
        self.wandb_dir.mkdir(parents=True, exist_ok=True)
        return self.wandb.init(mode=mode, settings=settings, **options)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_config(self, config: dict, environment: dict[str, str]) -> None:
        self.run.config.update({**config, "environment": environment}, allow_val_change=True)

    def close(self) -> None:
        self.run.finish()

    def where(self) -> str:
        mode = self.run.settings.mode
        if mode == "disabled":
            return "disabled (WANDB_MODE=disabled): nothing was logged"
        if mode not in ("offline", "dryrun"):
            return f"{self.run.url} (id {self.run_id})"
        sessions = self.wandb_dir / f"offline-run-*-{self.run_id}*"
        return f"offline in {self.run.settings.sync_dir} (upload: wandb sync {sessions})"


class Loggers:
    """The run's loggers beyond metrics.csv; one that fails while the run goes on is dropped."""

    def __init__(self, loggers: list[MetricLogger], notify: Callable[[str], None]):
        self.active, self.notify = loggers, notify

    @classmethod
    def open(cls, names: list[str], run: RunIdentity, settings: WandbConfig,
             notify: Callable[[str], None]) -> "Loggers":
        """Start the loggers `names` asks for (raising UserError if one cannot start)."""
        opened: list[MetricLogger] = []
        try:
            if "tensorboard" in names:
                opened.append(TensorBoardLogger(run))
            if "wandb" in names:
                opened.append(WandbLogger(run, settings, notify))
        except BaseException:
            for logger in opened:
                logger.close()
            raise
        return cls(opened, notify)

    def _each(self, call: Callable[[MetricLogger], None]) -> None:
        for logger in list(self.active):
            try:
                call(logger)
            except Exception as error:
                self.active.remove(logger)
                self.notify(f"{logger.name} logging failed ({type(error).__name__}: {error}); the run "
                            "goes on without it (metrics.csv has every figure)")

    def log_row(self, row: Mapping[str, object]) -> None:
        """Log a metrics.csv row (as it is appended) to every logger."""
        values = scalars(row)
        step = int(row["step"])
        self._each(lambda logger: logger.log_metrics(step, values))

    def log_config(self, config: dict, environment: dict[str, str]) -> None:
        self._each(lambda logger: logger.log_config(config, environment))

    def close(self) -> None:
        self._each(lambda logger: logger.close())

    def places(self) -> list[tuple[str, str]]:
        """Return (logger, where its run lies and how to look at it), for the summaries."""
        return [(logger.name, logger.where()) for logger in self.active]
