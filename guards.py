"""Reasons to stop a run early and cleanly: signals, a wall-time limit, a dollar budget.

Each guard only answers "should the loop stop now?"; the loop finishes its step, saves a
checkpoint and says why it stopped. The one exception is a signal before the first step has
finished: there is nothing to save yet, so it ends the process at once.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from config import SystemConfig, TrainingConfig
from errors import UserError


class StopSignals:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step.

    Until first_step_done(), a signal ends the process at once instead, with one line and
    the exit status 128 + the signal (as the shell reports it): the first step compiles, which
    took minutes on a GPU, and before it ends there is nothing to save, no checkpoint being
    written (a resumed run's stays as it was) and no file half-replaced. It exits with
    os._exit rather than raising: a handler's exception lands wherever the main thread is,
    also inside a weakref callback or __del__, where Python prints it and carries on (seen
    with dynamo's ExactWeakKeyDictionary), and torch.compile wraps what it catches.

    A second signal raises KeyboardInterrupt at once; the last checkpoint stays as it was,
    because checkpoints are only ever replaced whole. A copy arriving within RELAY_S of the
    first is not a second one: under torchrun a Ctrl+C or a `kill` of the process group
    reaches every worker directly and again through torchrun, which relays what it got.
    """

    RELAY_S = 2.0

    def __init__(self, announce: bool = True, exit_now: Callable[[int], None] = os._exit) -> None:
        """`announce`: say that the signal came; under torchrun rank 0 alone does, as every
        rank receives it. `exit_now(status)` ends the process before the first step's end."""
        self.announce, self.exit_now = announce, exit_now
        self.received: Optional[int] = None
        self._received_at = 0.0
        self.saves_first = False  # whether a signal waits for the step's end and a save
        self._previous: dict[int, object] = {}

    def first_step_done(self) -> None:
        """From now on a signal stops the run after the current step, with a save."""
        self.saves_first = True

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            if time.monotonic() - self._received_at < self.RELAY_S:
                return  # torchrun's relay of the first
            raise KeyboardInterrupt
        self.received, self._received_at = signum, time.monotonic()
        name = signal.Signals(signum).name
        if not self.saves_first:
            if self.announce:
                print(f"\n{name} received before the first step finished (compiling or warming up): "
                      "stopped at once; nothing was saved or changed", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            self.exit_now(128 + signum)
            return
        if not self.announce:
            return
        print(f"\n{name} received: stopping after this step to save a checkpoint "
              "(press Ctrl+C again to quit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def out_of_memory_error(t: TrainingConfig, block_size: int) -> UserError:
    """The one line a CUDA out-of-memory stop prints: which settings to lower, and how to keep
    the tokens per step."""
    return UserError(
        f"CUDA ran out of memory with batch_size {t.batch_size}, block_size {block_size}, "
        f"grad_accum_steps {t.grad_accum_steps}: lower --batch_size and raise training.grad_accum_steps "
        "as much (same tokens per step), or lower model.block_size")


def format_duration(seconds: float) -> str:
    """Return '1h30m', '45m10s', '12s', under ten seconds '3.4s' and under one '26ms' (a CPU step's
    time read '0.0s')."""
    if round(1000 * seconds) < 1000:  # 0.9996 s is 1.0s, not 1000ms
        return f"{round(1000 * seconds)}ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts) or "0s"


def counted(number: int, noun: str) -> str:
    """Return '1 evaluation', '4 evaluations'."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


@dataclass
class TimeLimit:
    """A wall-clock deadline, counted from the start of the process, and what set it."""

    deadline: float  # time.time() at which the run must have stopped and saved
    reason: str

    @classmethod
    def from_config(cls, t: TrainingConfig, s: SystemConfig, process_start: float) -> Optional["TimeLimit"]:
        """Return the tighter of --max_time and --budget / usd_per_hour, or None if neither is set."""
        limits = []
        if t.max_time_s is not None:
            limits.append((t.max_time_s, f"--max_time {format_duration(t.max_time_s)}"))
        if t.budget_usd is not None and s.usd_per_hour:
            seconds = t.budget_usd / s.usd_per_hour * 3600
            limits.append((seconds, f"--budget ${t.budget_usd:.2f} at ${s.usd_per_hour:.2f}/h "
                                    f"({format_duration(seconds)})"))
        if not limits:
            return None
        seconds, reason = min(limits)
        return cls(process_start + seconds, reason)

    def leaves_no_room(self, needed_s: float, now: Optional[float] = None) -> bool:
        """Return whether `needed_s` more seconds (a step, maybe an evaluation, a save) would pass it."""
        return (time.time() if now is None else now) + needed_s > self.deadline


SLOWEST_FADES = 0.999  # StepTimer.slowest_s: the share of it kept after each later step


class StepTimer:
    """A running estimate of how long a step, an evaluation and a save take.

    A save has two parts: the CPU snapshot the training waits for (save_s) and the write that
    follows in the background (write_s), which a run's last save waits for too.
    """

    def __init__(self, save_guess_s: float) -> None:
        self.first_step_s = 0.0  # compilation and warm-up included
        self.steps_s = 0.0  # every step's, the first included
        self.step_s = 0.0
        self.slowest_s = 0.0  # of the recent steps after the first: a maximum that fades 0.1% a step
        self.eval_s = 0.0
        self.save_s = 0.0
        self.write_s = save_guess_s  # until a write has been timed (by the writing thread)
        self._steps_seen = 0

    def record_step(self, seconds: float) -> None:
        """Fold in one step's duration; the first step (compilation, warm-up) is kept apart."""
        self._steps_seen += 1
        self.steps_s += seconds
        if self._steps_seen == 1:
            self.first_step_s = seconds
            return
        # an exponential average follows drift without jumping at every slow step
        self.step_s = seconds if self._steps_seen == 2 else 0.9 * self.step_s + 0.1 * seconds
        self.slowest_s = max(SLOWEST_FADES * self.slowest_s, seconds)  # one stall is forgotten in some thousands

    def needed_for_next(self, evaluates: bool, steps: int = 1) -> float:
        """Seconds the next `steps` steps need, with an evaluation, plus a whole save (the last
        one's write is waited for) and a safety step as slow as the slowest recent one: the step
        after an evaluation runs beside the plot's drawing, many times slower than the average."""
        return (steps * self.step_s + max(self.step_s, self.slowest_s) + (self.eval_s if evaluates else 0.0)
                + self.save_s + self.write_s)


class DeferredSkips:
    """The steps skipped for a non-finite loss or gradient, counted on the device so that no
    step waits for it, and brought to the host only when read (at progress reports).

    Under torchrun every rank skips the same steps (optim.accumulate_gradients), so every rank
    reads the same counts and stops at the same report.
    """

    def __init__(self, device: torch.device, step: int = 0):
        self._total = torch.zeros((), dtype=torch.int64, device=device)
        self._in_a_row = torch.zeros((), dtype=torch.int64, device=device)
        self.total = 0  # as of the last read
        self.in_a_row = 0
        self.read_at = step  # the last step the last read covered
        self.since = step + 1  # the first one it covered

    def add(self, applied: torch.Tensor) -> None:
        """Count one step; `applied`: whether it was (a device bool)."""
        skipped = (~applied).long()
        self._total += skipped
        self._in_a_row = (self._in_a_row + 1) * skipped

    def read(self, step: int, loss: Optional[torch.Tensor] = None) -> Optional[str]:
        """Bring the counts to the host (a host-device sync) after `step`; return the line that
        reports the steps skipped since the last read, or None if there were none. `loss`: the
        step's own, when read after every step (the line then says what was not finite)."""
        before, self.since, self.read_at = self.total, self.read_at + 1, step
        self.total, self.in_a_row = int(self._total), int(self._in_a_row)
        new = self.total - before
        if not new:
            return None
        if loss is None:
            return (f"steps {self.since}-{step}: {new} non-finite step(s) skipped "
                    f"({self.in_a_row} in a row at step {step})")
        value = loss.item()
        what = "gradient" if math.isfinite(value) else "loss"
        return f"step {step}: the {what} is not finite (loss {value:.4f}); update skipped ({self.in_a_row} in a row)"
