"""What `dtype auto` means for a training run on a CPU: float32 or bfloat16, whichever is faster here.

A CPU with AVX-512 BF16 or AMX multiplies bf16 matrices in hardware, yet whether a whole
training step is faster in bf16 depends on the CPU and the model: the CPU recipe ran 109 ms
per step in bf16 on an EPYC with AVX-512 BF16 but 154 ms in bf16 against 112 in float32 on a
Xeon with AMX (BENCHMARKS.md). No rule read off the CPU's flags holds on both, so a run
times a few steps of its own model in both dtypes and keeps the faster; the figures are
cached per machine and shape in `<cache_dir>/cpu_dtype.json`, so each shape is timed once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Iterable, Optional

import torch

from config import Config
from contract import build_model
from errors import UserError
from optim import accumulate_gradients, make_optimizer, optimizer_step
from utils import DeviceInfo, autocast_context, cpu_has_native_bf16, cpu_name, write_file_atomic

ENVIRONMENT_VARIABLE = "GPT_TRAINER_CPU_DTYPE"  # what auto means on a CPU, without timing
CPU_DTYPES = ("float32", "bfloat16")  # what auto chooses between on a CPU
CACHE_FILE = "cpu_dtype.json"
PROBE_TOKENS = 2048  # tokens per timed micro-batch: enough rows for matmuls to run at full speed
MIN_SPEEDUP = 1.1  # bf16 costs precision, so it has to be clearly faster to be picked
SLOW_STEP_S = 2.0  # past this, one timed step per dtype is enough (their ratio is stable)
WARMUP_ROUNDS, TIMED_ROUNDS = 2, 3  # a process's first few steps run slower than the rest


@dataclasses.dataclass
class StepTimes:
    """Estimated seconds of one full training step of the run in each dtype."""

    float32_s: float
    bfloat16_s: float

    def choice(self) -> tuple[torch.dtype, str]:
        """Return the faster dtype and a sentence saying why, for the summary before training."""
        speedup = self.float32_s / self.bfloat16_s
        if speedup >= MIN_SPEEDUP:
            return torch.bfloat16, f"bfloat16: measured {speedup:.2f}x faster than float32 here"
        if round(speedup, 2) == 1:
            return torch.float32, "float32: measured as fast as bfloat16 here, and more precise"
        if speedup > 1:
            return torch.float32, (f"float32: bfloat16 measured only {speedup:.2f}x faster here, "
                                   f"not worth its lower precision (it needs {MIN_SPEEDUP}x)")
        return torch.float32, f"float32: measured {1 / speedup:.2f}x faster than bfloat16 here"


def choose_cpu_dtype(cfg: Config, system: DeviceInfo, measure: bool = True,
                     continuing: Optional[str] = None) -> DeviceInfo:
    """Return `system` with the dtype a CPU run with `dtype auto` trains in, and why.

    Other devices and explicit dtypes pass through unchanged. `measure=False` reads the
    cache only (for --show_config, which should not spend seconds timing). `continuing`: the
    dtype of the run a resume continues, kept so that the run goes on as it began.
    """
    if system.device.type != "cpu" or cfg.system.dtype != "auto":
        return system
    dtype, reason = _cpu_choice(cfg, system, measure, continuing)
    return dataclasses.replace(system, dtype=dtype, dtype_reason=reason)


def _cpu_choice(cfg: Config, system: DeviceInfo, measure: bool,
                continuing: Optional[str]) -> tuple[torch.dtype, str]:
    forced = os.environ.get(ENVIRONMENT_VARIABLE)
    if forced:
        if forced not in CPU_DTYPES:
            raise UserError(f"{ENVIRONMENT_VARIABLE}={forced} is not a CPU dtype; set it to float32 or "
                            "bfloat16, or unset it to let auto measure")
        return getattr(torch, forced), f"{forced}: set by {ENVIRONMENT_VARIABLE}"
    if not cpu_has_native_bf16():
        return torch.float32, "float32: bfloat16 is emulated on this CPU (no AVX-512 BF16 or AMX)"
    if continuing in CPU_DTYPES:
        return getattr(torch, continuing), f"{continuing}: as the run this continues was trained"
    if system.processes > 1:
        return torch.float32, ("float32: not measured under torchrun, where the processes would time "
                               "each other; pass --system.dtype bfloat16 to compare")
    cache = Path(cfg.data.cache_dir) / CACHE_FILE
    key = probe_key(cfg)
    times = _read_cached(cache, key)
    if times is None and not measure:
        return torch.float32, "float32 until measured: auto times float32 against bfloat16 when training starts"
    if times is None:
        times = time_training_step(cfg)
        _write_cached(cache, key, times)
    dtype, reason = times.choice()
    return dtype, f"{reason} ({1000 * times.float32_s:.0f} against {1000 * times.bfloat16_s:.0f} ms/step)"


def probe_batch_size(cfg: Config) -> int:
    """Return the rows of the timed micro-batch: the run's, or fewer when that is over PROBE_TOKENS."""
    return max(1, min(cfg.training.batch_size, PROBE_TOKENS // cfg.model.block_size))


def probe_key(cfg: Config) -> str:
    """Return what the timing depends on: the machine, torch, threads, the model and the step."""
    t = cfg.training
    model = json.dumps(dataclasses.asdict(cfg.model), sort_keys=True)
    return (f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {model} | "
            f"batch {t.batch_size} x {t.grad_accum_steps} | {t.optimizer}")


def time_training_step(cfg: Config) -> StepTimes:
    """Return the estimated time of one training step in float32 and in bfloat16 autocast.

    A throwaway copy of the model trains on random tokens: forward and backward of a probe
    micro-batch, scaled to the run's micro-batches, plus one optimizer step. The two dtypes
    alternate, and each keeps its fastest repeat, so a busy moment of the machine does not
    decide. The random state is restored: the run starts as if nothing had been timed.
    """
    cpu = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.model).to(cpu).train()
        batch = probe_batch_size(cfg)
        generator = torch.Generator().manual_seed(0)
        x, y = (torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.block_size), generator=generator)
                for _ in range(2))
        steps = {dtype: _TimedStep(model, cfg, dtype, x, y) for dtype in (torch.float32, torch.bfloat16)}
        slow = _alternate(steps.values(), 1) > 2 * SLOW_STEP_S  # first steps allocate and pick kernels
        _alternate(steps.values(), 0 if slow else WARMUP_ROUNDS - 1)
        for step in steps.values():
            step.forget()  # only the steps after the warm-up count
        _alternate(steps.values(), 1 if slow else TIMED_ROUNDS)
    scale = cfg.training.batch_size / batch * cfg.training.grad_accum_steps
    f32, bf16 = (steps[d].estimate(scale) for d in (torch.float32, torch.bfloat16))
    return StepTimes(f32, bf16)


def _alternate(steps: Iterable["_TimedStep"], rounds: int) -> float:
    """Run each dtype's step in turn, `rounds` times; return the seconds it took."""
    started = time.perf_counter()
    for _ in range(rounds):
        for step in steps:
            step.run()
    return time.perf_counter() - started


class _TimedStep:
    """One dtype's training step on the probe batch, keeping the fastest time of each half."""

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
        self.backward_s = self.update_s = math.inf

    def run(self) -> None:
        """Time one step: forward and backward, then the update."""
        started = time.perf_counter()
        accumulate_gradients(self.model, [self.batch], 1, self.autocast, self.scaler)
        backward_done = time.perf_counter()
        optimizer_step(self.model, self.optimizer, self.scaler, self.grad_clip)
        update_done = time.perf_counter()
        backward_s, update_s = backward_done - started, update_done - backward_done
        self.backward_s, self.update_s = min(self.backward_s, backward_s), min(self.update_s, update_s)

    def estimate(self, micro_batches: float) -> float:
        """Return a full step's seconds: this many probe micro-batches and one update."""
        return self.backward_s * micro_batches + self.update_s


def _read_cached(path: Path, key: str) -> Optional[StepTimes]:
    """Return the cached step times for `key`, or None (no file, no entry, or a damaged file)."""
    try:
        entry = json.loads(path.read_text())[key]
        times = StepTimes(float(entry["float32_s"]), float(entry["bfloat16_s"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    plausible = all(math.isfinite(s) and s > 0 for s in (times.float32_s, times.bfloat16_s))
    return times if plausible else None  # an edited or damaged entry is timed again


def _write_cached(path: Path, key: str, times: StepTimes) -> None:
    """Add `times` under `key` to the cache file; a cache that cannot be written is skipped."""
    try:
        entries = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        entries = {}  # a damaged cache is rebuilt
    entries[key] = {**dataclasses.asdict(times), "measured": time.strftime("%Y-%m-%d %H:%M")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, lambda file: file.write(json.dumps(entries, indent=1).encode()))
    except OSError:
        pass  # a read-only cache only means timing again next run
