"""How long a training step and a whole run take on a CPU, known before the run starts.

A step of the run's own model is timed on random tokens (a throwaway copy: the run starts as
if nothing had been timed) and the seconds are cached per machine and shape in
`<cache_dir>/step_time.json`, so each shape is timed once. precision.py's `dtype auto` reads
the same cache, and `--show_config` turns it into the time of the whole run. On a GPU the
first steps compile, so only the run itself can time them: its progress lines say how long
the rest will take once they are past (monitor.py), with the same formula, run_seconds().
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

import torch

from config import Config, TrainingConfig, train_eval_iters
from contract import build_model
from errors import UserError
from guards import counted, format_duration
from optim import accumulate_gradients, make_optimizer, optimizer_step
from utils import DeviceInfo, autocast_context, cpu_name, write_file_atomic

ENVIRONMENT_VARIABLE = "GPT_TRAINER_STEP_TIME_S"  # seconds per step to assume instead of timing one
CACHE_FILE = "step_time.json"
PROBE_TOKENS = 2048  # tokens per timed micro-batch: enough rows for matmuls to run at full speed
SLOW_STEP_S = 2.0  # past this, one timed step per dtype is enough (their ratio is stable)
WARMUP_ROUNDS, TIMED_ROUNDS = 2, 3  # a process's first few steps run slower than the rest
# an evaluation batch is a forward pass only: a third of a training micro-step by its FLOPs, for
# the progress lines; before a CPU run, the probe times one instead (cpu_25m: a fifth of a step)
EVAL_COST = 1 / 3


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def probe_batch_size(cfg: Config) -> int:
    """Return the rows of the timed micro-batch: the run's, or fewer when that is over PROBE_TOKENS."""
    return max(1, min(cfg.training.batch_size, PROBE_TOKENS // cfg.model.block_size))


def probe_key(cfg: Config) -> str:
    """Return what the timing depends on: the machine, torch, threads, the model and the step."""
    t = cfg.training
    model = json.dumps(dataclasses.asdict(cfg.model), sort_keys=True)
    return (f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {model} | "
            f"batch {t.batch_size} x {t.grad_accum_steps} | {t.optimizer}")


@dataclasses.dataclass(frozen=True)
class ProbeTimes:
    """One dtype's seconds: a full training step, and one evaluation batch of the run's rows."""

    step_s: float
    eval_batch_s: Optional[float] = None  # None: not timed


def time_steps(cfg: Config, dtypes: tuple[torch.dtype, ...]) -> dict[torch.dtype, ProbeTimes]:
    """Return the estimated seconds of one full training step of the run in each dtype, and of
    one evaluation batch.

    A throwaway copy of the model trains on random tokens: forward and backward of a probe
    micro-batch, scaled to the run's micro-batches, plus one optimizer step, then a forward
    pass without gradients as an evaluation scores it. The dtypes
    alternate, so a busy moment of the machine slows both alike, and each gives its median
    repeat. The random state is restored: the run starts as if nothing had been timed.
    """
    cpu = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.model).to(cpu).train()
        batch = probe_batch_size(cfg)
        generator = torch.Generator().manual_seed(0)
        x, y = (torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.block_size), generator=generator)
                for _ in range(2))
        steps = {dtype: TimedStep(model, cfg, dtype, x, y) for dtype in dtypes}
        first_s = _alternate(steps.values(), 1) / len(dtypes)  # first steps allocate and pick kernels
        slow = first_s > 2 * SLOW_STEP_S
        _alternate(steps.values(), 0 if slow else WARMUP_ROUNDS - 1)
        for step in steps.values():
            step.forget()  # only the steps after the warm-up count
        _alternate(steps.values(), 1 if slow else TIMED_ROUNDS)
    rows = cfg.training.batch_size / batch
    return {dtype: step.estimate(rows, cfg.training.grad_accum_steps) for dtype, step in steps.items()}


def _alternate(steps: Iterable["TimedStep"], rounds: int) -> float:
    """Run each dtype's step in turn, `rounds` times; return the seconds it took."""
    started = time.perf_counter()
    for _ in range(rounds):
        for step in steps:
            step.run()
    return time.perf_counter() - started


class TimedStep:
    """One dtype's training step on the probe batch, keeping the times of each half.

    The estimate takes the median repeat, not the fastest: on a shared machine steps vary by
    a fifth, and a run's time is the sum of typical steps (the fastest of three ran 10% under
    the mean of 25 on 2 AVX-512 BF16 cores; BENCHMARKS.md, "CPU configs for bigger models").
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, dtype: torch.dtype,
                 x: torch.Tensor, y: torch.Tensor):
        cpu = torch.device("cpu")
        self.model, self.batch, self.grad_clip = model, (x, y), cfg.training.grad_clip
        with contextlib.redirect_stderr(io.StringIO()):  # its notices are the run's to give, once
            self.optimizer = make_optimizer(model, cfg.training, cpu, dtype)  # Newton-Schulz follows dtype
        self.autocast = autocast_context(cpu, dtype)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.forget()

    def forget(self) -> None:
        """Drop the times seen so far (those of the warm-up)."""
        self.backward_s: list[float] = []
        self.update_s: list[float] = []
        self.forward_s: list[float] = []

    def run(self) -> None:
        """Time one step: forward and backward, then the update."""
        started = time.perf_counter()
        accumulate_gradients(self.model, [self.batch], 1, self.autocast, self.scaler)
        backward_done = time.perf_counter()
        optimizer_step(self.model, self.optimizer, self.scaler, self.grad_clip)
        update_done = time.perf_counter()
        self.model.eval()  # as evaluation.mean_losses scores a batch
        with torch.no_grad(), self.autocast:
            self.model(*self.batch)
        self.model.train()
        self.backward_s.append(backward_done - started)
        self.update_s.append(update_done - backward_done)
        self.forward_s.append(time.perf_counter() - update_done)

    def estimate(self, rows: float, micro_batches: int) -> ProbeTimes:
        """Return the run's times, its micro-batches being `rows` times the probe's batch."""
        step_s = statistics.median(self.backward_s) * rows * micro_batches + statistics.median(self.update_s)
        return ProbeTimes(step_s, statistics.median(self.forward_s) * rows)


# ---------------------------------------------------------------- the cache


@dataclasses.dataclass(frozen=True)
class CachedTimes:
    """This machine and shape's entry of the cache: the times of each dtype timed, and when."""

    times: dict[str, ProbeTimes]  # by dtype name
    measured: str = "an unknown time"


def cached_times(cfg: Config) -> CachedTimes:
    """Return this machine and shape's cached times (none if nothing is cached).

    A damaged file counts as empty, and a figure that is no time (edited, zero, not finite) as
    absent, so it is timed again."""
    try:
        entry = json.loads(_cache_path(cfg).read_text())[probe_key(cfg)]
        times = {name: ProbeTimes(step_s, _seconds(entry.get(f"{name}_eval_batch_s")))
                 for name in ("float32", "bfloat16") if (step_s := _seconds(entry.get(f"{name}_s"))) is not None}
        return CachedTimes(times, str(entry.get("measured", CachedTimes.measured)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return CachedTimes({})


def _seconds(value: object) -> Optional[float]:
    """Return `value` as a positive, finite number of seconds, else None."""
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def remember(cfg: Config, times: dict[torch.dtype, ProbeTimes]) -> None:
    """Add step times to this shape's cache entry; a cache that cannot be written is skipped."""
    path, key = _cache_path(cfg), probe_key(cfg)
    try:
        entries = json.loads(path.read_text()) if path.is_file() else {}
        entry = entries.get(key) if isinstance(entries.get(key), dict) else {}
    except (OSError, ValueError, AttributeError):
        entries, entry = {}, {}  # a damaged cache is rebuilt
    for dtype, figures in times.items():
        entry[f"{dtype_name(dtype)}_s"] = figures.step_s
        if figures.eval_batch_s is not None:
            entry[f"{dtype_name(dtype)}_eval_batch_s"] = figures.eval_batch_s
    entry["measured"] = time.strftime("%Y-%m-%d %H:%M")
    entries[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, lambda file: file.write(json.dumps(entries, indent=1).encode()))
    except OSError:
        pass  # a read-only cache only means timing again next run


def _cache_path(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir) / CACHE_FILE


# ---------------------------------------------------------------- the whole run


@dataclasses.dataclass
class StepEstimate:
    """Seconds per optimizer step and where the figure comes from, for the summary; and of an
    evaluation batch, where it was timed."""

    seconds: float
    source: str
    eval_batch_s: Optional[float] = None


def cpu_step_estimate(cfg: Config, dtype: torch.dtype) -> StepEstimate:
    """Return the seconds of one training step of `cfg` on this CPU in `dtype`: from the
    environment variable, the cache, or timed now (and cached)."""
    forced = os.environ.get(ENVIRONMENT_VARIABLE)
    if forced:
        seconds = _seconds(forced)
        if seconds is None:
            raise UserError(f"{ENVIRONMENT_VARIABLE}={forced} is no number of seconds; set it to one "
                            "such as 0.25, or unset it to time a step")
        return StepEstimate(seconds, f"set by {ENVIRONMENT_VARIABLE}")
    name, cached = dtype_name(dtype), cached_times(cfg)
    if name in cached.times:  # the time says whether it is this command's dtype probe or an old figure
        times = cached.times[name]
        return StepEstimate(times.step_s, f"{name}, timed on this machine at {cached.measured}, "
                                          f"kept in {cfg.data.cache_dir}/{CACHE_FILE}", times.eval_batch_s)
    print(f"timing a training step of this model in {name} for the estimate...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    times = time_steps(cfg, (dtype,))[dtype]
    remember(cfg, {dtype: times})
    return StepEstimate(times.step_s, f"{name}, timed here just now in "
                                      f"{format_duration(time.perf_counter() - started)}, kept in "
                                      f"{cfg.data.cache_dir}/{CACHE_FILE}", times.eval_batch_s)


def eval_batches(t: TrainingConfig, block_size: int, val_tokens: Optional[int]) -> int:
    """Return the batches one evaluation scores: validation, then the train loss's."""
    val = t.eval_iters
    if t.eval_full_val and val_tokens is not None:
        windows = max(1, (val_tokens - 1) // block_size)
        val = -(-windows // t.batch_size)
    return val + train_eval_iters(t)


@dataclasses.dataclass
class RunTime:
    """The expected seconds from a step to the end of the run: steps, then evaluations."""

    steps: int
    step_s: float
    evaluations: int
    evaluation_s: float

    @property
    def total_s(self) -> float:
        return self.steps * self.step_s + self.evaluations * self.evaluation_s

    def describe(self) -> str:
        return (f"about {format_duration(self.total_s)}: {self.steps:,} steps x {format_duration(self.step_s)}"
                f" + {counted(self.evaluations, 'evaluation')} x {format_duration(self.evaluation_s)}")


def run_seconds(t: TrainingConfig, start_step: int, max_steps: int, step_s: float, batches: int,
                eval_batch_s: Optional[float] = None, evaluation_due: bool = False) -> RunTime:
    """Return the time from `start_step` to `max_steps` at `step_s` a step, evaluating every
    eval_interval steps and at the end, `batches` forward passes each (of `eval_batch_s`
    where timed, else EVAL_COST of a micro-step). `evaluation_due`: start_step's own
    evaluation is still to run (a progress report comes before it)."""
    evaluations = sum(1 for step in range(start_step + 1, max_steps + 1) if step % t.eval_interval == 0)
    evaluations += evaluation_due
    evaluations += max_steps % t.eval_interval != 0 and max_steps > start_step
    evaluation_s = batches * (eval_batch_s if eval_batch_s else EVAL_COST * step_s / t.grad_accum_steps)
    return RunTime(max_steps - start_step, step_s, evaluations, evaluation_s)


def describe_estimate(cfg: Config, system: DeviceInfo, max_steps: int,
                      val_tokens: Optional[int]) -> list[tuple[str, str]]:
    """Return --show_config's rows for the time of the whole run (`cfg` with its vocabulary)."""
    if system.device.type != "cpu":
        return [("whole run", "timed by the run itself: its progress lines estimate the rest once the "
                              "first steps (and any compilation) are past")]
    if system.processes > 1:
        return [("whole run", "not timed under torchrun, where the processes would time each other")]
    step = cpu_step_estimate(cfg, system.dtype)
    batches = eval_batches(cfg.training, cfg.model.block_size, val_tokens)
    run = run_seconds(cfg.training, 0, max_steps, step.seconds, batches, step.eval_batch_s)
    rows = [("step", f"{1000 * step.seconds:,.0f} ms ({step.source})")]
    if step.eval_batch_s:
        rows.append(("evaluation batch", f"{1000 * step.eval_batch_s:,.0f} ms (forward only, timed with the step)"))
    return rows + [("whole run", run.describe())]
