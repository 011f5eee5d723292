"""What a run is, told before it starts (and by --show_config): its model, data, schedule and
device, from the config and the facts computed once about it.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from config import Config, TrainingConfig, cooldown_start, tokens_per_step
from guards import counted
from utils import DeviceInfo


@dataclass
class Style:
    """Colours for emphasis on a terminal; plain text when NO_COLOR is set or output is redirected."""

    enabled: bool = field(default_factory=lambda: sys.stdout.isatty() and "NO_COLOR" not in os.environ
                          and os.environ.get("TERM") != "dumb")

    def _wrap(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.enabled else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def good(self, text: str) -> str:
        return self._wrap("32", text)

    def warn(self, text: str) -> str:
        return self._wrap("33", text)


@dataclass
class RunFacts:
    """Figures about a run that the summaries and metrics need, computed once."""

    params: int
    params_without_embeddings: int
    vocab_size: int
    train_tokens: int
    val_tokens: int
    max_steps: int
    flops_per_token: int = 0
    tokenizer: str = "char"  # the kind the run encodes with (a starting checkpoint's, whatever data.tokenizer says)
    environment: dict[str, str] = field(default_factory=dict)
    time_limit: Optional[str] = None  # what sets the run's deadline, if anything does

    @property
    def char_level(self) -> bool:
        return self.tokenizer == "char"


def describe_schedule(t: TrainingConfig, max_steps: int) -> str:
    decay_end = t.lr_decay_steps or max_steps
    warmup = f"warmup {t.warmup_steps} steps to {t.lr:g}"
    if t.warmup_steps >= max_steps:  # the run ends before the peak (optim.learning_rate's warmup)
        return (f"{warmup}, longer than the run: it climbs to {t.lr * max_steps / t.warmup_steps:.3g} by the "
                f"last step and never decays")
    if t.schedule == "wsd":
        return (f"{warmup}, stable until step {math.floor(cooldown_start(t, max_steps)):,}, linear cooldown "
                f"to {t.min_lr:g} at step {decay_end:,}")
    return f"{warmup}, cosine to {t.min_lr:g} at step {decay_end:,}"


def describe_run(cfg: Config, system: DeviceInfo,
                 facts: Optional[RunFacts]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Return the run's facts grouped as [(section, [(name, value), ...]), ...].

    `facts` is None when the data is not on disk yet (--show_config before the first download).
    """
    m, t = cfg.model, cfg.training
    step_tokens = tokens_per_step(cfg, system.processes)
    params = (f"{facts.params:,} ({facts.params_without_embeddings:,} without embeddings)" if facts
              else "known once the dataset is downloaded (vocabulary size)")
    model = [("class", m.impl or "GPT (model.py)"),
             ("shape", f"{m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}"),
             ("parameters", params)]
    data = [("source", cfg.data.dataset), ("tokenizer", facts.tokenizer if facts else cfg.data.tokenizer)]
    if facts:
        data += [("vocabulary", f"{facts.vocab_size:,}"),
                 ("tokens", f"{facts.train_tokens:,} train / {facts.val_tokens:,} val"),
                 ("batches per epoch", f"{facts.train_tokens / step_tokens:,.1f}")]
    max_steps = facts.max_steps if facts else t.max_steps
    steps = f"{max_steps:,}" + (f" ({t.epochs} epochs)" if t.epochs is not None else "")
    processes = f"{system.processes} processes x " if system.processes > 1 else ""
    training = [
        ("steps", steps),
        ("tokens per step", f"{step_tokens:,} = {processes}batch {t.batch_size} x accumulation "
                            f"{t.grad_accum_steps} x context {m.block_size}"),
        ("total tokens", f"{max_steps * step_tokens:,}"),
        ("lr schedule", describe_schedule(t, max_steps)),
    ]
    threads = f", {counted(torch.get_num_threads(), 'CPU thread')}" if system.device.type == "cpu" else ""
    tf32 = f", TF32 {'on' if cfg.system.allow_tf32 else 'off'}" if system.device.type == "cuda" else ""
    device = [("device", system.describe() + tf32 + threads)]
    if system.dtype_reason:
        device.append(("dtype", system.dtype_reason))
    return [("model", model), ("data", data), ("training", training), ("system", device)]


def format_sections(sections: list[tuple[str, list[tuple[str, str]]]], style: Style) -> str:
    width = max(len(name) for _, rows in sections for name, _ in rows)
    lines = []
    for title, rows in sections:
        lines.append(style.bold(f"[{title}]"))
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
