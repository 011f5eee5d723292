"""The training loop, written out by hand: schedule, steps, evaluation, checkpoints, stops."""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from checkpoint import LATEST, copy_checkpoint, keep_rolling_copy, save_checkpoint
from config import Config, config_to_dict, tokens_per_step
from data_loader import PreparedData, SequentialWindows, batch_at, get_batch, place_on_device, split_windows
from errors import UserError
from guards import DeferredSkips, StepTimer, StopSignals, TimeLimit
from model import GPT, counted_targets
from monitor import LogWindow, LossRecord, RunFacts, RunMonitor, RunResult
from optim import learning_rate, make_optimizer, set_learning_rates, total_steps
from report import environment
from utils import DeviceInfo, autocast_context

EVAL_SEED = 20240101  # every evaluation scores the same batches, so evaluations compare


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
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    grad_clip: float,
    loss: torch.Tensor,
    check_on_host: bool = True,
) -> torch.Tensor:
    """Clip the gradients, update the weights unless the loss or gradients are not finite,
    clear the gradients; return (on the device) whether the step was finite.

    check_on_host: skip a bad update exactly, at the price of one host-device sync per step.
    Otherwise a bad step's gradients are zeroed on the device and the update runs (the
    optimizer's momentum still moves the weights), so the host never waits for the GPU.
    """
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    # With fp16 the scaler itself skips steps whose gradients overflowed and lowers the scale;
    # otherwise a non-finite gradient norm means the update would poison the weights.
    finite = torch.isfinite(loss) & (torch.isfinite(grad_norm) | scaler.is_enabled())
    if check_on_host:
        if bool(finite):  # the step's one host-device sync
            scaler.step(optimizer)
    else:
        drop_gradients_unless(finite, model.parameters())
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return finite


def drop_gradients_unless(finite: torch.Tensor, params: Iterable[torch.nn.Parameter]) -> None:
    """Zero every gradient when `finite` (a device bool) is false, without reading it."""
    bad = ~finite
    for param in params:
        if param.grad is not None:
            param.grad.masked_fill_(bad, 0.0)


def weights_are_finite(model: torch.nn.Module) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


class Trainer:
    """Owns the model, optimizer and data sampling of one run, and the loop that drives them."""

    def __init__(self, cfg: Config, data: PreparedData, system: DeviceInfo, process_start: float):
        self.cfg, self.system = cfg, system
        self.data = place_on_device(data, system.device, cfg.system.data_on_device)
        self.out_dir = Path(cfg.training.out_dir)
        t = cfg.training
        self.model = GPT(cfg.model).to(system.device)
        self.forward_model = (torch.compile(self.model, mode=cfg.system.compile_mode) if system.compile
                              else self.model)
        self.optimizer = make_optimizer(self.model, t, system.device, system.dtype)
        # the config, not a checkpoint, decides hyperparameters: kept to re-apply after a resume
        self.group_settings = [{k: v for k, v in g.items() if k != "params"}
                               for g in self.optimizer.param_groups]
        fp16 = system.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(system.device.type, enabled=fp16)
        self.autocast = autocast_context(system.device, system.dtype)
        self.data_rng = torch.Generator().manual_seed(cfg.system.seed)
        self.sequential = (SequentialWindows(len(self.data.train), cfg.model.block_size, cfg.system.seed)
                           if cfg.data.sampling == "sequential" else None)
        self.windows_drawn = 0  # training windows taken so far (the sequential order's position)
        self.tokens_per_step = tokens_per_step(cfg)
        self.max_steps = total_steps(t, len(data.train), self.tokens_per_step)
        self.time_limit = TimeLimit.from_config(t, cfg.system, process_start)
        # a first guess at the save time: weights and two Adam moments at about 100 MB/s
        self.timer = StepTimer(save_guess_s=0.1 + 12 * self.model.num_params() / 100e6)
        self.step = 0
        self.lr = t.lr  # the schedule's current learning rate (Muon's moves in proportion)
        self.saved_step = -1  # the step ckpt.pt holds, so a stop right after a save skips a copy
        self.losses = LossRecord()
        self.bad_steps_in_a_row = 0
        self.skipped_steps = 0
        self.deferred_skips = DeferredSkips(system.device)  # for nonfinite_check "log"
        self.skips_read_at = 0  # the step up to which deferred_skips were read
        self.target_reached = False
        self.elapsed_before_s = 0.0  # training time of earlier sessions of this run
        self._session_start: Optional[float] = None
        self.resumed_from: Optional[Path] = None
        self.environment = environment(system.device)
        self.monitor = RunMonitor(cfg, system, self._facts(), self.out_dir)

    def _facts(self) -> RunFacts:
        return RunFacts(
            params=self.model.num_params(),
            params_without_embeddings=self.model.num_params(include_embeddings=False),
            vocab_size=self.data.tokenizer.vocab_size,
            train_tokens=len(self.data.train),
            val_tokens=len(self.data.val),
            max_steps=self.max_steps,
            flops_per_token=self.model.flops_per_token(),
            char_level=self.data.tokenizer.kind == "char",
            environment=self.environment,
            time_limit=self.time_limit.reason if self.time_limit else None,
        )

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Return everything needed to continue this run exactly, as plain data."""
        rng = {"torch": torch.get_rng_state(), "data": self.data_rng.get_state(),
               "windows_drawn": self.windows_drawn}
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
            "elapsed_s": self.elapsed_s(),
            "environment": self.environment,
        }

    def elapsed_s(self) -> float:
        """Return the run's training time so far, earlier sessions included."""
        session = time.perf_counter() - self._session_start if self._session_start else 0.0
        return self.elapsed_before_s + session

    def load_weights(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])

    def resume(self, checkpoint: dict, path: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, step, losses and random states."""
        self.resumed_from = path
        self.elapsed_before_s = checkpoint["elapsed_s"]
        self.load_weights(checkpoint)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self._apply_config_hyperparameters()
        if checkpoint["scaler"]:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = self.saved_step = checkpoint["step"]
        self.losses = LossRecord(**checkpoint["losses"])
        rng = checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        self.data_rng.set_state(rng["data"])
        self.windows_drawn = rng.get("windows_drawn", 0)
        if "cuda" in rng and self.system.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _apply_config_hyperparameters(self) -> None:
        """Let the current config, not the checkpoint, decide learning rates, betas and decay."""
        for group, settings in zip(self.optimizer.param_groups, self.group_settings):
            group.update(settings)

    def _last_checkpoint(self) -> str:
        if self.saved_step < 0:
            return "no checkpoint was saved yet"
        return f"resume from {self.out_dir / LATEST} (step {self.saved_step})"

    def save_latest(self) -> Path:
        """Write ckpt.pt (what --resume continues from) and its rolling ckpt-<step>.pt copy."""
        if not weights_are_finite(self.model):
            raise UserError(f"the weights are no longer finite at step {self.step}, so they were not "
                            f"saved; {self._last_checkpoint()}; try a lower --lr")
        started = time.perf_counter()
        path = save_checkpoint(self.state_dict(), self.out_dir / LATEST)
        keep_rolling_copy(path, self.step, self.cfg.training.keep_last)
        self.timer.save_s = time.perf_counter() - started
        self.saved_step = self.step
        return path

    # ------------------------------------------------------------ steps and evaluation

    def _batch(self, split: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.data
        tokens, mask = (data.train, data.train_mask) if split == "train" else (data.val, data.val_mask)
        return get_batch(tokens, self.cfg.training.batch_size, self.cfg.model.block_size,
                         generator, self.system.device, mask)

    def _train_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch: random windows, or the next ones of the sequential order."""
        if self.sequential is None:
            return self._batch("train", self.data_rng)
        batch_size = self.cfg.training.batch_size
        starts = self.sequential.starts(self.windows_drawn, batch_size)
        self.windows_drawn += batch_size
        return batch_at(self.data.train, starts, self.cfg.model.block_size, self.system.device,
                        self.data.train_mask)

    def train_step(self) -> Optional[torch.Tensor]:
        """Run one optimizer step over grad_accum_steps micro-batches; return the mean loss,
        or None when a non-finite loss or gradient made it skip the update (too many in a row
        stop the run)."""
        t = self.cfg.training
        self.lr = learning_rate(self.step, t, self.max_steps)
        set_learning_rates(self.optimizer, self.lr / t.lr)
        micro_batches = (self._train_batch() for _ in range(t.grad_accum_steps))
        loss = accumulate_gradients(self.forward_model, micro_batches, t.grad_accum_steps,
                                    self.autocast, self.scaler)
        check_on_host = t.nonfinite_check == "step"
        finite = optimizer_step(self.model, self.optimizer, self.scaler, t.grad_clip, loss, check_on_host)
        if not check_on_host:
            self.deferred_skips.add(finite)
            return loss  # a non-finite one is left out of the reported mean, on the device
        if bool(finite):
            self.bad_steps_in_a_row = 0
            return loss
        self.bad_steps_in_a_row += 1
        self.skipped_steps += 1
        loss_value = loss.item()
        what = "gradient" if math.isfinite(loss_value) else "loss"
        self.monitor.message(f"step {self.step + 1}: the {what} is not finite (loss {loss_value:.4f}); "
                             f"update skipped ({self.bad_steps_in_a_row} in a row)")
        self._stop_if_too_many_bad_steps(self.step + 1)
        return None

    def _read_deferred_skips(self) -> None:
        """For nonfinite_check "log": report the non-finite steps since the last reading, and
        stop the run as the per-step check would (up to log_interval steps later)."""
        total, in_a_row = self.deferred_skips.read()
        new = total - self.skipped_steps
        self.skipped_steps, self.bad_steps_in_a_row = total, in_a_row
        if new:
            self.monitor.message(f"steps {self.skips_read_at + 1}-{self.step}: {new} non-finite step(s); "
                                 f"their gradients were dropped ({in_a_row} in a row at step {self.step})")
        self.skips_read_at = self.step
        self._stop_if_too_many_bad_steps(self.step)

    def _stop_if_too_many_bad_steps(self, step: int) -> None:
        t = self.cfg.training
        if self.bad_steps_in_a_row >= t.max_bad_steps:
            raise UserError(
                f"the loss or its gradient was not finite for {self.bad_steps_in_a_row} steps in a "
                f"row (to step {step}), so the run stopped; {self._last_checkpoint()}; try a lower "
                f"--lr (now {t.lr:g}) or another --precision (now "
                f"{str(self.system.dtype).removeprefix('torch.')})")

    def _eval_batches(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches an evaluation scores: the same random ones every time, or, for the
        validation split with eval_full_val, every token of it once."""
        t = self.cfg.training
        if split == "val" and t.eval_full_val:
            yield from split_windows(self.data.val, t.batch_size, self.cfg.model.block_size,
                                     self.system.device, self.data.val_mask)
            return
        generator = torch.Generator().manual_seed(EVAL_SEED)
        for _ in range(t.eval_iters):
            yield self._batch(split, generator)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Return the mean loss per token on each split, over the batches of _eval_batches."""
        self.forward_model.eval()
        losses = {}
        for split in ("train", "val"):
            total = torch.zeros((), device=self.system.device)
            targets = torch.zeros((), dtype=torch.int64, device=self.system.device)
            for x, y in self._eval_batches(split):
                with self.autocast:
                    _, loss = self.forward_model(x, y)
                counted = counted_targets(y)  # all B x T of them, but for masked chat data
                total += loss.float() * counted
                targets += counted
            losses[split] = total.item() / targets.item()
        self.forward_model.train()
        return losses

    # ------------------------------------------------------------ the loop

    def _evaluates_at(self, step: int) -> bool:
        return step % self.cfg.training.eval_interval == 0 or step == self.max_steps

    def _out_of_time(self) -> bool:
        if self.time_limit is None:
            return False
        needed = self.timer.needed_for_next(self._evaluates_at(self.step + 1))
        return self.time_limit.leaves_no_room(needed)

    def train(self) -> RunResult:
        """Train from the current step until max_steps, a target, a time limit or a signal."""
        try:
            return self._train()
        except torch.cuda.OutOfMemoryError:
            t = self.cfg.training
            raise UserError(
                f"CUDA ran out of memory with batch_size {t.batch_size}, block_size "
                f"{self.cfg.model.block_size}, grad_accum_steps {t.grad_accum_steps}: lower "
                "--batch_size and raise training.grad_accum_steps as much (same tokens per step), "
                "or lower model.block_size") from None

    def _train(self) -> RunResult:
        t = self.cfg.training
        self._session_start = started = time.perf_counter()
        start_step, train_seconds = self.step, 0.0
        self.skips_read_at = self.step
        window = LogWindow()
        reason = "finished"
        self.monitor.start(self.step, self.resumed_from)
        self.forward_model.train()
        with StopSignals() as stop:
            while self.step < self.max_steps:
                if stop.received is not None:
                    reason = "signal"
                elif self.target_reached:
                    reason = "target"
                elif self._out_of_time():
                    reason = "time"
                if reason != "finished":
                    break
                step_start = time.perf_counter()
                loss = self.train_step()
                self.step += 1
                step_seconds = time.perf_counter() - step_start
                self.timer.record_step(step_seconds)
                train_seconds += step_seconds
                window.add(loss)
                self.monitor.advance()
                if self.step % t.log_interval == 0 or self.step == self.max_steps:
                    if t.nonfinite_check == "log":
                        self._read_deferred_skips()
                    self.monitor.log(self.step, window.mean_loss(), self.lr,
                                     window.seconds_per_step(), self.elapsed_s())
                    window = LogWindow()
                if self._evaluates_at(self.step):
                    self._evaluate_and_save()
                    window.restart_clock()  # evaluation time is not training speed
                elif t.checkpoint_interval and self.step % t.checkpoint_interval == 0:
                    self.save_latest()
            if t.nonfinite_check == "log":
                self._read_deferred_skips()
            if self.saved_step != self.step:
                self.save_latest()
        result = RunResult(start_step, self.step, time.perf_counter() - started, train_seconds, self.losses,
                           reason, stop.received, self.skipped_steps)
        self.monitor.finish(result, self.elapsed_s())
        return result

    def _evaluate_and_save(self) -> None:
        started = time.perf_counter()
        losses = self.evaluate()
        self.timer.eval_s = time.perf_counter() - started
        improved = self.losses.update(self.step, losses["train"], losses["val"])
        elapsed_s = self.elapsed_s()  # before the save, so a resumed run's clock never goes back
        saved = [self.save_latest()]
        if improved:  # the same bytes: copy the file rather than serialize the state again
            saved.append(copy_checkpoint(saved[0], self.out_dir / "best.pt"))
        self.monitor.evaluation(self.step, losses, improved, saved, elapsed_s)
        target = self.cfg.training.target_val_loss
        self.target_reached = target is not None and losses["val"] <= target
