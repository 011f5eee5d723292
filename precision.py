"""What `dtype auto` means for a training run on a CPU: float32 or bfloat16, whichever is faster here.

A CPU with AVX-512 BF16 or AMX multiplies bf16 matrices in hardware, yet whether a whole
training step is faster in bf16 depends on the CPU and the model: the CPU recipe ran 109 ms
per step in bf16 on an EPYC with AVX-512 BF16 but 154 ms in bf16 against 112 in float32 on a
Xeon with AMX (BENCHMARKS.md). No rule read off the CPU's flags holds on both, so a run
times a few steps of its own model in both dtypes and keeps the faster; the figures are
cached per machine and shape in `<cache_dir>/step_time.json` (timing.py, which times the
step), so each shape is timed once.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

import timing
from config import Config
from errors import UserError
from utils import DeviceInfo, cpu_has_native_bf16

ENVIRONMENT_VARIABLE = "GPT_TRAINER_CPU_DTYPE"  # what auto means on a CPU, without timing
CPU_DTYPES = ("float32", "bfloat16")  # what auto chooses between on a CPU
MIN_SPEEDUP = 1.1  # bf16 costs precision, so it has to be clearly faster to be picked


def faster_dtype(float32_s: float, bfloat16_s: float) -> tuple[torch.dtype, str]:
    """Return the dtype whose step was faster and a sentence saying why, for the summary before training."""
    speedup = float32_s / bfloat16_s
    if speedup >= MIN_SPEEDUP:
        return torch.bfloat16, f"bfloat16: measured {speedup:.2f}x faster than float32 here"
    if round(speedup, 2) == 1:
        return torch.float32, "float32: measured as fast as bfloat16 here, and more precise"
    if speedup > 1:
        return torch.float32, (f"float32: bfloat16 measured only {speedup:.2f}x faster here, "
                               f"not worth its lower precision (it needs {MIN_SPEEDUP}x)")
    return torch.float32, f"float32: measured {1 / speedup:.2f}x faster than bfloat16 here"


def choose_cpu_dtype(cfg: Config, system: DeviceInfo, continuing: Optional[str] = None,
                     can_time: bool = True) -> DeviceInfo:
    """Return `system` with the dtype a CPU run with `dtype auto` trains in, and why.

    Other devices and explicit dtypes pass through unchanged. `continuing`: the dtype of the
    run a resume continues, kept so that the run goes on as it began. `can_time` False
    (--show_config before the dataset is on disk: no vocabulary, so no model to time): where
    only a timed step could choose, the dtype is left to the run, and the reason says so.
    """
    if system.device.type != "cpu" or cfg.system.dtype != "auto":
        return system
    choice = _cpu_choice(cfg, system, continuing, can_time)
    if choice is None:
        return dataclasses.replace(system, dtype_pending=True, dtype_reason=(
            "float32 or bfloat16, whichever a step of this model runs faster in here; timed once the "
            "dataset is downloaded (the model's size depends on its vocabulary)"))
    dtype, reason = choice
    return dataclasses.replace(system, dtype=dtype, dtype_reason=reason)


def _cpu_choice(cfg: Config, system: DeviceInfo, continuing: Optional[str],
                can_time: bool) -> Optional[tuple[torch.dtype, str]]:
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
    if not can_time:
        return None
    cached = timing.cached_times(cfg).times
    if all(name in cached for name in CPU_DTYPES):
        float32_s, bfloat16_s = cached["float32"].step_s, cached["bfloat16"].step_s
    else:
        probed = time_training_step(cfg)
        timing.remember(cfg, probed)
        float32_s, bfloat16_s = probed[torch.float32].step_s, probed[torch.bfloat16].step_s
    dtype, reason = faster_dtype(float32_s, bfloat16_s)
    return dtype, f"{reason} (a step: float32 {1000 * float32_s:.0f} ms, bfloat16 {1000 * bfloat16_s:.0f} ms)"


def time_training_step(cfg: Config) -> dict[torch.dtype, timing.ProbeTimes]:
    """Return the estimated times of one training step (and evaluation batch) in float32 and in
    bfloat16 autocast."""
    return timing.time_steps(cfg, (torch.float32, torch.bfloat16))
