"""The training loop, written out by hand: schedule, steps, evaluation, checkpoints, stops.

What a run compiles (system.compile on), and when: in its first step, the training forward
and backward, of one transformer block reused by every layer (compile_scope blocks) or of the
whole model (and under torchrun with gradient accumulation, in the same step, again for the
micro-steps without DDP's gradient sync); after it, nothing: training batches keep one shape,
and evaluation runs the model uncompiled (compilation.py says why; tests/test_compile.py counts).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from checkpoint import TokenCount, tokens_per_step_of, tokens_seen, weights_mismatch
from compilation import training_forward
from config import Config, config_to_dict, tokens_per_step, train_eval_iters
from contract import build_model, flops_per_token, params_without_embeddings
from data_loader import (
    PreparedData,
    SequentialWindows,
    batch_at,
    place_on_device,
    random_starts,
    split_windows,
)
from distributed import Collectives, ParallelModel, QuietMonitor, Ranks, shard_evenly
from errors import UserError
from evaluation import mean_losses
from guards import DeferredSkips, StepTimer, StopSignals, TimeLimit, out_of_memory_error
from forward_context import forward_context
from loggers import new_run_id
from monitor import LogWindow, LossRecord, RunFacts, RunMonitor, RunResult
from optim import (
    accumulate_gradients,
    learning_rate,
    make_optimizer,
    optimizer_step,
    set_learning_rates,
    token_weights,
    total_steps,
)
from report import environment
from saver import CheckpointSaver
from utils import DeviceInfo, autocast_context, notice

EVAL_SEED = 20240101  # every evaluation scores the same batches, so evaluations compare
STOP_REASONS = ("finished", "target", "time", "signal")  # when ranks differ, the later one wins


class Trainer:
    """Owns the model, optimizer and data sampling of one run, and the loop that drives them.

    Under torchrun every rank runs this same loop on its own share of each step's batch;
    `collectives` keeps them at the same step, and rank 0 alone writes.

    Host-device syncs (the host waiting for the GPU): a training step causes none; a bad step
    is skipped on the device (optim.optimizer_step). A progress report reads the skipped steps'
    count and the window's loss (nonfinite_check "step": the count after every step); an
    evaluation its losses; a save whether the weights are finite, and the state. Under torchrun
    the ranks agree whether to stop (a host all-reduce) only at reports and evaluations; in a
    step they only all-reduce the gradients (DDP) and, with a loss mask, the target count.
    """

    def __init__(self, cfg: Config, data: PreparedData, system: DeviceInfo, process_start: float,
                 collectives: Optional[Collectives] = None):
        self.cfg, self.system = cfg, system
        self.collectives = collectives or Collectives(Ranks(), system.device)
        self.ranks = self.collectives.ranks
        self.data = place_on_device(data, system.device, cfg.system.data_on_device)
        self.out_dir = Path(cfg.training.out_dir)
        t = cfg.training
        self.model = build_model(cfg.model).to(system.device)  # the same seed gives every rank the same start
        self.parallel = ParallelModel(self.model, self.ranks, system.device, cfg.system.fsdp)
        # what a training step calls, and what of it is compiled ("blocks", "model" or None)
        self.forward_model, self.compiled = training_forward(self.model, self.parallel.wrapped, cfg, system)
        if self.ranks.rank:
            torch.manual_seed(cfg.system.seed + self.ranks.rank)  # its own dropout masks
        self.optimizer = make_optimizer(self.model, t, system.device, system.dtype)
        # the config, not a checkpoint, decides hyperparameters: kept to re-apply after a resume
        self.group_settings = [{k: v for k, v in g.items() if k != "params"}
                               for g in self.optimizer.param_groups]
        fp16 = system.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(system.device.type, enabled=fp16)
        self.autocast = forward_context(cfg, system, autocast_context(system.device, system.dtype))
        self.data_rng = torch.Generator().manual_seed(cfg.system.seed)
        self.sequential = (SequentialWindows(len(self.data.train), cfg.model.block_size, cfg.system.seed)
                           if cfg.data.sampling == "sequential" else None)
        self.windows_drawn = 0  # training windows taken so far (the sequential order's position)
        self.tokens_per_step = tokens_per_step(cfg, self.ranks.world_size)
        self.tokens = TokenCount(0, 0, self.tokens_per_step)
        self.max_steps = total_steps(t, len(data.train), self.tokens_per_step)
        self.time_limit = TimeLimit.from_config(t, cfg.system, process_start)
        # a first guess at the save time: weights and two Adam moments at about 100 MB/s
        self.timer = StepTimer(save_guess_s=0.1 + 12 * self.model.num_params() / 100e6)
        self.saver = CheckpointSaver(self.out_dir, t.keep_last, self.collectives, self.timer)
        self.step = 0
        self.lr = t.lr  # the schedule's current learning rate (Muon's moves in proportion)
        self.losses = LossRecord()
        self.skips = DeferredSkips(system.device)  # steps skipped for a non-finite loss or gradient
        self.target_reached = False
        self.elapsed_before_s = 0.0  # training time of earlier sessions of this run
        self._session_start: Optional[float] = None
        self.resumed_from: Optional[Path] = None
        self.wandb_run_id = new_run_id()  # the W&B run's, in checkpoints: a resume continues it
        self.environment = environment(system.device, cfg.model.impl) if self.ranks.is_main else {}
        self.monitor = (RunMonitor(cfg, system, self._facts(), self.out_dir) if self.ranks.is_main
                        else QuietMonitor())

    def _facts(self) -> RunFacts:
        return RunFacts(
            params=self.model.num_params(),
            params_without_embeddings=params_without_embeddings(self.model),
            vocab_size=self.data.tokenizer.vocab_size,
            train_tokens=len(self.data.train),
            val_tokens=len(self.data.val),
            max_steps=self.max_steps,
            flops_per_token=flops_per_token(self.model, self.cfg.model),
            tokenizer=self.data.tokenizer.kind,
            environment=self.environment,
            time_limit=self.time_limit.reason if self.time_limit else None,
        )

    # ------------------------------------------------------------ checkpoints

    def _rng_states(self) -> dict:
        """Return this process's random states; dropout's differ between ranks."""
        states = {"torch": torch.get_rng_state()}
        if self.system.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state_all()
        return states

    def state_dict(self) -> dict:
        """Return everything needed to continue this run exactly, as plain data (every rank
        must call it: under torchrun it gathers each rank's random states)."""
        per_rank = self.collectives.gather_objects(self._rng_states())
        rng = {**per_rank[0], "data": self.data_rng.get_state(), "windows_drawn": self.windows_drawn}
        if len(per_rank) > 1:
            rng["ranks"] = per_rank
        return {
            "model": self.parallel.model_state(),
            "optimizer": self.parallel.optimizer_state(self.optimizer),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "max_steps": self.max_steps,  # where this run ends: pipeline.py tells a finished phase by it
            "processes": self.ranks.world_size,  # batch_size is per process: the run's tokens need it
            "tokens": self.tokens.at(self.step),  # seen so far, over sessions of other batches or processes
            "config": config_to_dict(self.cfg),
            "tokenizer": self.data.tokenizer.to_dict(),
            "losses": dataclasses.asdict(self.losses),
            "rng": rng,
            "elapsed_s": self.elapsed_s(),
            "dtype": str(self.system.dtype).removeprefix("torch."),  # what auto chose: a resume keeps it
            "environment": self.environment,
            "wandb_run_id": self.wandb_run_id,
        }

    def elapsed_s(self) -> float:
        """Return the run's training time so far, earlier sessions included."""
        session = time.perf_counter() - self._session_start if self._session_start else 0.0
        return self.elapsed_before_s + session

    def load_weights(self, checkpoint: dict) -> None:
        mismatch = weights_mismatch(self.model.state_dict(), checkpoint["model"])  # another model.impl?
        if mismatch:
            raise UserError(f"the checkpoint's weights do not fit {type(self.model).__name__}: {mismatch}")
        self.parallel.load_model_state(checkpoint["model"])

    def resume(self, checkpoint: dict, path: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, step, losses and random states."""
        self.resumed_from = path
        self.wandb_run_id = checkpoint.get("wandb_run_id", self.wandb_run_id)  # older ones lack it
        self.elapsed_before_s = checkpoint["elapsed_s"]
        self.load_weights(checkpoint)
        self.parallel.load_optimizer_state(self.optimizer, checkpoint["optimizer"])
        self._apply_config_hyperparameters()
        if checkpoint["scaler"]:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = self.saver.saved_step = checkpoint["step"]
        self.tokens = TokenCount(self.step, tokens_seen(checkpoint), self.tokens_per_step)
        if (before := tokens_per_step_of(checkpoint)) != self.tokens_per_step and self.ranks.is_main:
            notice(f"this session trains on {self.tokens_per_step:,} tokens a step, the run's last one on "
                   f"{before:,}; tokens seen count on from {self.tokens.tokens:,}")
        self.losses = LossRecord(**checkpoint["losses"])
        rng = checkpoint["rng"]
        self.data_rng.set_state(rng["data"])  # the same on every rank: they share each draw
        self.windows_drawn = rng.get("windows_drawn", 0)
        mine = rng
        if self.ranks.launched:  # a rank missing from the checkpoint keeps its own seed
            saved = rng.get("ranks", [rng])
            mine = saved[self.ranks.rank] if self.ranks.rank < len(saved) else {}
        if "torch" in mine:
            torch.set_rng_state(mine["torch"])
        if "cuda" in mine and self.system.device.type == "cuda":
            torch.cuda.set_rng_state_all(mine["cuda"])

    def _apply_config_hyperparameters(self) -> None:
        """Let the current config, not the checkpoint, decide learning rates, betas and decay."""
        for group, settings in zip(self.optimizer.param_groups, self.group_settings):
            group.update(settings)

    def save_latest(self, best: bool = False) -> list[Path]:
        """Save ckpt.pt (what --resume continues from), its rolling ckpt-<step>.pt copy and,
        where `best`, best.pt; return their paths. The files are written in the background
        (see CheckpointSaver; saver.wait waits for them): training waits for a snapshot only."""
        return self.saver.save(self.model, self.state_dict, self.step, best)

    # ------------------------------------------------------------ steps and evaluation

    def _split(self, split: str) -> tuple:
        """Return the split's tokens and loss mask (None where every target counts)."""
        data = self.data
        return (data.train, data.train_mask) if split == "train" else (data.val, data.val_mask)

    def _train_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next training batch: its slice of the step's random windows, or of the
        next ones of the sequential order.

        Every rank draws the windows of all ranks from the same generator and keeps its own
        slice, so the ranks train on different windows and a step trains on the same ones
        whatever the number of processes: runs compare, and resume under another count.
        """
        if self.sequential is None:
            return self._random_batch("train", self.data_rng)
        count = self.cfg.training.batch_size * self.ranks.world_size
        starts = self.sequential.starts(self.windows_drawn, count)
        self.windows_drawn += count
        return self._my_batch("train", starts)

    def _random_batch(self, split: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of batch_size x world_size random windows of the split."""
        count = self.cfg.training.batch_size * self.ranks.world_size
        starts = random_starts(len(self._split(split)[0]), count, self.cfg.model.block_size, generator)
        return self._my_batch(split, starts)

    def _my_batch(self, split: str, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the batch of this rank's batch_size windows of those drawn for all ranks."""
        batch_size, rank = self.cfg.training.batch_size, self.ranks.rank
        tokens, mask = self._split(split)
        return batch_at(tokens, starts[rank * batch_size:(rank + 1) * batch_size], self.cfg.model.block_size,
                        self.system.device, mask)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one optimizer step over grad_accum_steps micro-batches; return, on the device,
        this rank's loss per counted target and whether the step was applied (a non-finite loss
        or gradient skips it, on every rank, and too many in a row stop the run when read)."""
        t = self.cfg.training
        self.lr = learning_rate(self.step, t, self.max_steps)
        set_learning_rates(self.optimizer, self.lr / t.lr)
        micro_batches = [self._train_batch() for _ in range(t.grad_accum_steps)]  # all weighed first
        weights = (token_weights([y for _, y in micro_batches], self.collectives)  # chat: unequal counts
                   if self.data.train_mask is not None else None)
        loss = accumulate_gradients(self.forward_model, micro_batches, t.grad_accum_steps, self.autocast,
                                    self.scaler, self.parallel.sync, weights)
        applied = optimizer_step(self.model, self.optimizer, self.scaler, t.grad_clip)
        self.skips.add(applied)
        return loss, applied

    def _read_skips(self, loss: Optional[torch.Tensor] = None) -> None:
        """Report the steps skipped since the last reading (a sync), and stop the run after
        max_bad_steps in a row; `loss`: the last step's, when read after every step."""
        line = self.skips.read(self.step, loss)
        if line:
            self.monitor.message(line)
        self._stop_if_too_many_bad_steps(self.step)

    def _stop_if_too_many_bad_steps(self, step: int) -> None:
        t = self.cfg.training
        if self.skips.in_a_row >= t.max_bad_steps:
            raise UserError(
                f"the loss or its gradient was not finite for {self.skips.in_a_row} steps in a "
                f"row (to step {step}), so the run stopped; {self.saver.last_checkpoint()}; try a lower "
                f"--lr (now {t.lr:g}) or another --precision (now "
                f"{str(self.system.dtype).removeprefix('torch.')})")

    def _eval_batches(self, split: str) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], bool]]:
        """The batches this rank scores in an evaluation, each with whether it counts: its
        slice of the same random windows every time, or, for the validation split with
        eval_full_val, its share of every window of the split (see shard_evenly)."""
        t, block_size = self.cfg.training, self.cfg.model.block_size
        tokens, mask = self._split(split)
        if split == "val" and t.eval_full_val:
            windows = split_windows(tokens, t.batch_size, block_size, self.system.device, mask)
            yield from shard_evenly(windows, self.ranks)
            return
        generator = torch.Generator().manual_seed(EVAL_SEED)
        for _ in range(t.eval_iters if split == "val" else train_eval_iters(t)):
            yield self._random_batch(split, generator), True

    def evaluate(self) -> dict[str, float]:
        """Return the mean loss per token on each split, over the batches of _eval_batches."""
        return mean_losses(self.model, self._eval_batches, self.autocast, self.collectives, self.system.device)

    # ------------------------------------------------------------ the loop

    def _evaluates_at(self, step: int) -> bool:
        return step % self.cfg.training.eval_interval == 0 or step == self.max_steps

    def _ranks_meet_at(self, step: int) -> bool:
        """Whether the ranks agree on stopping after `step`: after reports and evaluations (one
        process decides alone, after every step)."""
        t = self.cfg.training
        return not self.collectives.active or step % t.log_interval == 0 or step % t.eval_interval == 0

    def _out_of_time(self) -> bool:
        if self.time_limit is None:
            return False
        meeting = self.step + 1  # the steps that run before the next decision
        while not self._ranks_meet_at(meeting) and meeting < self.max_steps:
            meeting += 1
        needed = self.timer.needed_for_next(self._evaluates_at(meeting), steps=meeting - self.step)
        return self.time_limit.leaves_no_room(needed)

    def train(self) -> RunResult:
        """Train from the current step until max_steps, a target, a time limit or a signal."""
        try:
            return self._train()
        except BaseException as error:
            self.saver.close()  # the checkpoint being written is whole on disk before the run ends
            if isinstance(error, torch.cuda.OutOfMemoryError):
                raise out_of_memory_error(self.cfg.training, self.cfg.model.block_size) from None
            raise

    def _train(self) -> RunResult:
        t = self.cfg.training
        self._session_start = started = time.perf_counter()
        start_step = self.step
        self.skips = DeferredSkips(self.system.device, self.step)
        window = LogWindow()
        reason, signal = "finished", None
        self.monitor.start(self.step, self.resumed_from, self.wandb_run_id, self.tokens)
        self.forward_model.train()
        with StopSignals(announce=self.ranks.is_main) as stop:
            while self.step < self.max_steps:
                reason, signal = self._stop_reason(stop.received)
                if reason != "finished":
                    break
                step_start = time.perf_counter()
                loss, applied = self.train_step()
                self.step += 1
                self.timer.record_step(time.perf_counter() - step_start)
                window.add(loss, applied)
                if self.step == start_step + 1:
                    self._first_step_done(stop, window)
                self.monitor.advance()
                if t.nonfinite_check == "step":
                    self._read_skips(loss)
                if self.step % t.log_interval == 0 or self.step == self.max_steps:
                    self._read_skips()
                    self.monitor.log(self.step, window.mean_loss(self.collectives.sum_), self.lr,
                                     window.seconds_per_step(), self.elapsed_s(), self.skips.total)
                    window = LogWindow()
                if self._evaluates_at(self.step):
                    self._evaluate_and_save()
                    window.restart_clock()  # evaluation time is not training speed
                elif t.checkpoint_interval and self.step % t.checkpoint_interval == 0:
                    self.save_latest()
            self._read_skips()
            if self.saver.saved_step != self.step:
                self.save_latest()
            self.saver.wait()  # on disk before the summary says so (a signal now is held, too)
        result = RunResult(start_step, self.step, time.perf_counter() - started, self.timer.steps_s, self.losses,
                           reason, signal if reason == "signal" else None, self.skips.total,
                           self.timer.first_step_s, self.compiled)
        self.monitor.finish(result, self.elapsed_s())
        return result

    def _first_step_done(self, stop: StopSignals, window: LogWindow) -> None:
        """After the session's first step (compilation and warm-up): a signal now waits for a
        save, and the step is left out of the speed figures (unless it is a report's only one)."""
        stop.first_step_done()
        self.monitor.first_step(self.timer.first_step_s, self.compiled)
        if self.step % self.cfg.training.log_interval:
            window.restart_clock()

    def _stop_reason(self, signal: Optional[int]) -> tuple[str, Optional[int]]:
        """Return why the run stops before the next step ("finished": it does not) and the
        signal that stopped it. Under torchrun every rank gets the same answer, so all stop at
        one step (a signal reaching one rank first, a deadline on another's clock): they agree
        after reports and evaluations only, and a stop waits for the next of them (the time
        limit looks that far ahead)."""
        if not self._ranks_meet_at(self.step):
            return "finished", None
        reason = ("signal" if signal is not None else "target" if self.target_reached
                  else "time" if self._out_of_time() else "finished")
        code, signal_number = self.collectives.agree([STOP_REASONS.index(reason), signal or 0])
        return STOP_REASONS[code], signal_number or None

    def _evaluate_and_save(self) -> None:
        started = time.perf_counter()
        losses = self.evaluate()
        self.timer.eval_s = time.perf_counter() - started
        improved = self.losses.update(self.step, losses["train"], losses["val"])
        elapsed_s = self.elapsed_s()  # before the save, so a resumed run's clock never goes back
        saved = self.save_latest(best=improved)
        self.monitor.evaluation(self.step, losses, improved, saved, elapsed_s)
        target = self.cfg.training.target_val_loss
        self.target_reached = target is not None and losses["val"] <= target
