"""The training loop, written out by hand: schedule, steps, evaluation, checkpoints, stops."""
from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from checkpoint import copy_checkpoint, save_checkpoint
from config import Config, TrainingConfig, config_to_dict, tokens_per_step
from data_loader import PreparedData, get_batch
from model import GPT
from utils import DeviceInfo, autocast_context

EVAL_SEED = 20240101  # every evaluation scores the same batches, so evaluations compare


@dataclass
class LossRecord:
    """Best and worst evaluated losses of the run, carried across resumes."""

    best_train: float = math.inf
    worst_train: float = -math.inf
    best_val: float = math.inf
    worst_val: float = -math.inf
    best_val_step: int = 0

    def update(self, step: int, train_loss: float, val_loss: float) -> bool:
        """Record an evaluation; return whether the validation loss is a new best."""
        self.best_train = min(self.best_train, train_loss)
        self.worst_train = max(self.worst_train, train_loss)
        self.worst_val = max(self.worst_val, val_loss)
        if val_loss < self.best_val:
            self.best_val, self.best_val_step = val_loss, step
            return True
        return False


@dataclass
class RunResult:
    steps: int
    seconds: float
    losses: LossRecord
    stopped_by_signal: Optional[int] = None  # the signal number when interrupted


def learning_rate(step: int, t: TrainingConfig, max_steps: int) -> float:
    """Return the learning rate at `step`: linear warmup, then cosine decay to min_lr."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    decay_steps = t.lr_decay_steps or max_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, decay_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def total_steps(t: TrainingConfig, train_tokens: int, tokens_per_step: int) -> int:
    """Return the number of optimizer steps: from `epochs` when set, else `max_steps`."""
    if t.epochs is None:
        return t.max_steps
    return max(1, math.ceil(t.epochs * train_tokens / tokens_per_step))


def make_optimizer(model: torch.nn.Module, t: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """Return AdamW with weight decay on matrices only (not on biases and LayerNorm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"  # one kernel for all parameters instead of one per tensor
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    n_micro: int,
    autocast: AbstractContextManager,
    scaler: torch.amp.GradScaler,
) -> torch.Tensor:
    """Backpropagate the mean loss over `n_micro` micro-batches; return it (detached).

    Each micro-batch's loss is divided by n_micro, so the summed gradients equal those of
    one batch n_micro times larger.
    """
    losses = []
    for x, y in micro_batches:
        with autocast:
            _, loss = model(x, y)
        loss = loss / n_micro
        scaler.scale(loss).backward()
        losses.append(loss.detach())
    return torch.stack(losses).sum()


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float
) -> None:
    """Clip the gradients (if asked), apply the update and clear the gradients."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


class StopSignals:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step.

    A second signal raises KeyboardInterrupt at once; the last checkpoint stays as it was,
    because checkpoints are only ever replaced whole.
    """

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        name = signal.Signals(signum).name
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


class Trainer:
    """Owns the model, optimizer and data sampling of one run, and the loop that drives them."""

    def __init__(self, cfg: Config, data: PreparedData, system: DeviceInfo):
        self.cfg, self.data, self.system = cfg, data, system
        self.out_dir = Path(cfg.training.out_dir)
        t = cfg.training
        self.model = GPT(cfg.model).to(system.device)
        self.forward_model = torch.compile(self.model) if system.compile else self.model
        self.optimizer = make_optimizer(self.model, t, system.device)
        fp16 = system.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(system.device.type, enabled=fp16)
        self.autocast = autocast_context(system.device, system.dtype)
        self.data_rng = torch.Generator().manual_seed(cfg.system.seed)
        self.tokens_per_step = tokens_per_step(cfg)
        self.max_steps = total_steps(t, len(data.train), self.tokens_per_step)
        self.step = 0
        self.saved_step = -1  # the step ckpt.pt holds, so a stop right after a save skips a copy
        self.losses = LossRecord()

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Return everything needed to continue this run exactly, as plain data."""
        rng = {"torch": torch.get_rng_state(), "data": self.data_rng.get_state()}
        if self.system.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "config": config_to_dict(self.cfg),
            "tokenizer": self.data.tokenizer.to_dict(),
            "losses": dataclasses.asdict(self.losses),
            "rng": rng,
        }

    def load_weights(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])

    def resume(self, checkpoint: dict) -> None:
        """Continue from a checkpoint: weights, optimizer, step, losses and random states."""
        self.load_weights(checkpoint)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self._apply_config_hyperparameters()
        if checkpoint["scaler"]:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = checkpoint["step"]
        self.losses = LossRecord(**checkpoint["losses"])
        rng = checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        self.data_rng.set_state(rng["data"])
        if "cuda" in rng and self.system.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _apply_config_hyperparameters(self) -> None:
        """Let the current config, not the checkpoint, decide betas and weight decay."""
        t = self.cfg.training
        for group, decay in zip(self.optimizer.param_groups, (t.weight_decay, 0.0)):
            group["betas"], group["weight_decay"] = (t.beta1, t.beta2), decay

    def save_latest(self) -> Path:
        """Write ckpt.pt, the checkpoint a --resume continues from."""
        path = save_checkpoint(self.state_dict(), self.out_dir / "ckpt.pt")
        self.saved_step = self.step
        return path

    # ------------------------------------------------------------ steps and evaluation

    def _batch(self, split: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.data.train if split == "train" else self.data.val
        return get_batch(tokens, self.cfg.training.batch_size, self.cfg.model.block_size,
                         generator, self.system.device)

    def train_step(self) -> torch.Tensor:
        """Run one optimizer step over grad_accum_steps micro-batches; return the mean loss."""
        t = self.cfg.training
        lr = learning_rate(self.step, t, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = (self._batch("train", self.data_rng) for _ in range(t.grad_accum_steps))
        loss = accumulate_gradients(self.forward_model, micro_batches, t.grad_accum_steps,
                                    self.autocast, self.scaler)
        optimizer_step(self.model, self.optimizer, self.scaler, t.grad_clip)
        return loss

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Return the mean loss over eval_iters batches of each split (the same batches each time)."""
        self.forward_model.eval()
        losses = {}
        for split in ("train", "val"):
            generator = torch.Generator().manual_seed(EVAL_SEED)
            total = torch.zeros((), device=self.system.device)
            for _ in range(self.cfg.training.eval_iters):
                x, y = self._batch(split, generator)
                with self.autocast:
                    _, loss = self.forward_model(x, y)
                total += loss.float()
            losses[split] = total.item() / self.cfg.training.eval_iters
        self.forward_model.train()
        return losses

    # ------------------------------------------------------------ the loop

    def train(self) -> RunResult:
        """Train from the current step to max_steps, or until a stop signal; save as we go."""
        t = self.cfg.training
        started = time.perf_counter()
        window_start, window_steps = started, 0
        self.forward_model.train()
        with StopSignals() as stop:
            while self.step < self.max_steps and stop.received is None:
                loss = self.train_step()
                self.step += 1
                window_steps += 1
                if self.step % t.log_interval == 0 or self.step == self.max_steps:
                    elapsed = time.perf_counter() - window_start
                    self._log_step(loss.item(), elapsed / window_steps)
                    window_start, window_steps = time.perf_counter(), 0
                if self.step % t.eval_interval == 0 or self.step == self.max_steps:
                    self._evaluate_and_save()
                    window_start, window_steps = time.perf_counter(), 0
                elif t.checkpoint_interval and self.step % t.checkpoint_interval == 0:
                    self.save_latest()
            if stop.received is not None:
                if self.saved_step != self.step:
                    self.save_latest()
                print(f"stopped at step {self.step}; checkpoint saved to {self.out_dir / 'ckpt.pt'}; "
                      "continue with --resume", flush=True)
        return RunResult(self.step, time.perf_counter() - started, self.losses, stop.received)

    def _log_step(self, loss: float, seconds_per_step: float) -> None:
        tokens_per_s = self.tokens_per_step / seconds_per_step
        lr = self.optimizer.param_groups[0]["lr"]
        print(f"step {self.step:>6}/{self.max_steps}  loss {loss:.4f}  lr {lr:.2e}  "
              f"{seconds_per_step * 1000:.1f} ms/step  {tokens_per_s:,.0f} tok/s", flush=True)

    def _evaluate_and_save(self) -> None:
        losses = self.evaluate()
        improved = self.losses.update(self.step, losses["train"], losses["val"])
        path = self.save_latest()
        saved = [str(path)]
        if improved:  # the same bytes: copy the file rather than serialize the state again
            saved.append(str(copy_checkpoint(path, self.out_dir / "best.pt")))
        print(f"step {self.step:>6}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
              f"{' (best)' if improved else ''}; saved {', '.join(saved)}", flush=True)
