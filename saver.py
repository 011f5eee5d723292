"""Checkpoints written off the training thread: a save stops training only for a CPU snapshot."""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from background import BackgroundWorker
from checkpoint import BEST, LATEST, checkpoint_snapshot, keep_rolling_copy, link_checkpoint, write_checkpoint
from distributed import Collectives
from errors import UserError
from guards import StepTimer
from optim import weights_are_finite
from utils import notice


class CheckpointSaver:
    """Saves a run's checkpoints: ckpt.pt, its rolling ckpt-<step>.pt and best.pt.

    The training thread waits only for a copy of the state on the CPU; checksumming,
    serializing and fsyncing it happen on a thread of its own while training goes on. One
    write at a time: a save first waits for the one before it, so one snapshot at most is
    held beside the live state. A write that fails (a full disk) leaves
    ckpt.pt as it was (write_file_atomic) and its one-line UserError stops the run at the next
    save or at `wait`. Under torchrun rank 0 alone writes, and `wait` is where the ranks agree.
    """

    def __init__(self, run_dir: Path, keep_last: int, collectives: Collectives, timer: StepTimer):
        self.run_dir, self.keep_last = run_dir, keep_last
        self.collectives, self.timer = collectives, timer
        self.writes = collectives.ranks.is_main
        self.worker = BackgroundWorker("checkpoint writer")
        self.saved_step = -1  # the step ckpt.pt holds, so a stop right after a save skips a copy

    def last_checkpoint(self) -> str:
        """Say what a user can resume from (for the errors that stop a run)."""
        if self.saved_step < 0:
            return "no checkpoint was saved yet"
        return f"resume from {self.run_dir / LATEST} (step {self.saved_step})"

    def save(self, model: torch.nn.Module, state: Callable[[], dict], step: int, best: bool) -> list[Path]:
        """Start writing the run's `state()` at `step` as ckpt.pt, its rolling copy and, where
        `best`, best.pt; return the paths it goes to. Every rank calls it (the state is gathered
        and the checks agreed on); the weights must be finite on all of them."""
        self.wait()  # the save before: if its write failed, the run stops here
        if self.collectives.agree([int(not weights_are_finite(model))])[0]:  # any rank's slice
            raise UserError(f"the weights are no longer finite at step {step}, so they were not "
                            f"saved; {self.last_checkpoint()}; try a lower --lr")
        started = time.perf_counter()
        run_state = state()
        if self.writes:
            snapshot = checkpoint_snapshot(run_state)
            self.worker.start(functools.partial(self._write, snapshot, best))
        self.timer.save_s = time.perf_counter() - started  # what training waited for: not the write
        self.saved_step = step
        return [self.run_dir / LATEST] + ([self.run_dir / BEST] if best else [])

    def _write(self, snapshot: dict, best: bool) -> None:
        """Write ckpt.pt, then give the same file its other names (no bytes copied)."""
        started = time.perf_counter()
        latest = write_checkpoint(snapshot, self.run_dir / LATEST)
        keep_rolling_copy(latest, snapshot["step"], self.keep_last)
        if best:
            link_checkpoint(latest, self.run_dir / BEST)
        self.timer.write_s = time.perf_counter() - started  # one float, read by the training thread

    def _failure(self) -> Optional[UserError]:
        """Wait for the write in flight; return its UserError if it failed."""
        try:
            self.worker.wait()
        except UserError as error:
            return error
        return None

    def wait(self) -> None:
        """Return once every checkpoint started is on disk; raise the write's UserError on every
        rank, so under torchrun none goes on, or exits for torchrun to start again from
        ckpt.pt, before rank 0 has written it."""
        failure = self._failure()
        if self.collectives.agree([int(failure is not None)])[0]:
            raise failure or UserError("rank 0 could not write the checkpoint; its error is above")

    def close(self) -> None:
        """Let the write in flight finish while another error ends the run (no collective: the
        other ranks may not be here); a failed write is then a notice beside that error."""
        failure = self._failure()
        if failure is not None:
            notice(str(failure))
