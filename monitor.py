"""What a person watching a run sees: the summaries (the one before training is
run_description.py's), the progress bar or lines, metrics.csv, loss.png and report.md, and
the experiment loggers (loggers.py) every metrics row also goes to. Nothing here changes what
is trained.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from checkpoint import LATEST, TokenCount
from config import Config, config_to_dict, tokens_per_step
from guards import counted, format_duration
from loggers import Loggers, RunIdentity
from metrics import MetricsLog, read_metrics
from plotting import LossPlotter
from report import write_report
from run_description import RunFacts, Style, describe_run, format_sections
from run_files import METRICS, PLOT, REPORT, milestone_path
from timing import eval_batches, run_seconds
from utils import DeviceInfo, MemoryStats, memory_stats, peak_flops


@dataclass
class LossRecord:
    """Evaluated losses of the run: the last, the best and the worst, carried across resumes."""

    best_train: float = math.inf
    worst_train: float = -math.inf
    best_val: float = math.inf
    worst_val: float = -math.inf
    best_val_step: int = 0
    final_train: float = math.nan
    final_val: float = math.nan

    def update(self, step: int, train_loss: float, val_loss: float) -> bool:
        """Record an evaluation; return whether the validation loss is a new best."""
        self.final_train, self.final_val = train_loss, val_loss
        self.best_train = min(self.best_train, train_loss)
        self.worst_train = max(self.worst_train, train_loss)
        self.worst_val = max(self.worst_val, val_loss)
        if val_loss < self.best_val:
            self.best_val, self.best_val_step = val_loss, step
            return True
        return False


@dataclass
class RunResult:
    start_step: int
    steps: int
    seconds: float  # this invocation's training time, evaluations and saves included
    train_seconds: float  # the part spent in training steps, the first included
    losses: LossRecord
    stop_reason: str  # "finished", "signal", "target" or "time"
    stopped_by_signal: Optional[int] = None
    skipped_steps: int = 0
    first_step_s: float = 0.0  # compilation and warm-up: left out of the throughput
    compiled: Optional[str] = None  # what torch.compile compiled ("blocks", "model"), if anything

    def steady_tokens_per_s(self, tokens_per_step: int) -> Optional[float]:
        """Tokens per second of the steps after the first (the first alone, in a one-step run)."""
        steps, seconds = self.steps - self.start_step, self.train_seconds
        if steps > 1:
            steps, seconds = steps - 1, seconds - self.first_step_s
        return steps * tokens_per_step / seconds if steps and seconds > 0 else None


class LogWindow:
    """The steps since the last progress report: their wall time and mean training loss.

    Losses are summed on the device, so no step waits for the GPU just to be reported; under
    torchrun each rank sums its own, and the report adds up the ranks' sums.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.steps = 0
        self.loss_sum: Optional[torch.Tensor] = None
        self.counted: Optional[torch.Tensor] = None  # how many of the steps were applied

    def add(self, loss: torch.Tensor, applied: torch.Tensor) -> None:
        """Count a step; its loss joins the mean if it was `applied` (a device bool, alike on all ranks)."""
        self.steps += 1
        kept = torch.where(applied, loss.float(), 0.0)
        if self.loss_sum is None:
            self.loss_sum, self.counted = kept, applied.long()
        else:
            self.loss_sum, self.counted = self.loss_sum + kept, self.counted + applied

    def mean_loss(self, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums) -> float:
        """Return the applied steps' mean loss (a host read); of all ranks' with `sum_over_ranks`."""
        if self.loss_sum is None:
            return math.nan
        loss_sum, counted = sum_over_ranks(torch.stack([self.loss_sum, self.counted.float()]))
        count = counted.item()
        return loss_sum.item() / count if count else math.nan

    def seconds_per_step(self) -> float:
        return (time.perf_counter() - self.started) / max(1, self.steps)

    def restart_clock(self) -> None:
        self.started, self.steps = time.perf_counter(), 0


class Progress:
    """A tqdm bar when stdout is a terminal; otherwise a plain line every log_interval steps."""

    def __init__(self, total: int, initial: int, interactive: bool):
        self.bar = (tqdm(total=total, initial=initial, file=sys.stdout, unit="step", dynamic_ncols=True)
                    if interactive else None)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)  # host-side only; tqdm redraws at most ten times a second

    def report(self, postfix: str, line: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
        else:
            print(line, flush=True)

    def write(self, line: str) -> None:
        """Print a line above the bar (or just print it)."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunMonitor:
    """Reports a run as it goes and when it ends; the loop calls it at visible points only."""

    def __init__(self, cfg: Config, system: DeviceInfo, facts: RunFacts, out_dir: Path,
                 interactive: Optional[bool] = None):
        self.cfg, self.system, self.facts, self.out_dir = cfg, system, facts, out_dir
        self.tokens_per_step = tokens_per_step(cfg, system.processes)
        self.style = Style()
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        peak = peak_flops(system.device, system.dtype, cfg.system.allow_tf32, cfg.system.peak_tflops)
        self.peak = peak * system.processes if peak else None  # the run's tokens/s are all ranks'
        self.peak_rss_mb = 0.0
        self.estimated = False
        self.plotter = LossPlotter(out_dir / PLOT, out_dir.name)
        self.progress: Optional[Progress] = None
        self.loggers = Loggers([], self.message)
        self.skipped_reported = 0  # the session's skipped steps as of the last report
        self.start_step = 0
        self.tokens = TokenCount(0, 0, self.tokens_per_step)  # start() sets the run's
        self.last_milestone = 0
        # what bench.py reads after a run: seconds per step of each report window, and
        # (step, wall-clock time when done, val loss) of each evaluation
        self.window_seconds: list[float] = []
        self.evaluations: list[tuple[int, float, float]] = []

    # ------------------------------------------------------------ during the run

    def start(self, step: int, resumed_from: Optional[Path], run_id: str, tokens: TokenCount) -> None:
        """Open the loggers (W&B's run `run_id`) and metrics.csv (trimmed back to `step` on
        resume), and print the summary before training; `tokens` counts the tokens seen."""
        self.start_step, self.tokens = step, tokens
        interval = self.cfg.training.plot_milestone_interval
        self.last_milestone = step // interval if interval else 0
        resume_step = step if resumed_from else None
        self.loggers = Loggers.open(self.cfg.training.loggers, RunIdentity(self.out_dir, resume_step, run_id),
                                    self.cfg.wandb, self.message)
        self.loggers.log_config(config_to_dict(self.cfg), self.facts.environment)
        self.metrics = MetricsLog(self.out_dir / METRICS, resume_step)
        sections = describe_run(self.cfg, self.system, self.facts)
        run = [("output", str(self.out_dir)), *self.loggers.places()]
        if resumed_from is not None:
            run.append(("resuming from", f"{resumed_from} at step {step}"))
        print(format_sections(sections + [("run", run)], self.style), flush=True)
        self.progress = Progress(self.facts.max_steps, step, self.interactive)

    def advance(self) -> None:
        self.progress.advance()

    def message(self, line: str) -> None:
        """Print a line above the bar (or plainly, before the run has started)."""
        if self.progress is None:
            print(line, flush=True)
        else:
            self.progress.write(line)

    def throughput(self, tokens_per_s: float) -> tuple[Optional[float], float]:
        """Return (MFU as a fraction, or None where the device's peak is unknown; achieved TFLOP/s)."""
        flops_per_s = self.facts.flops_per_token * tokens_per_s
        return (flops_per_s / self.peak if self.peak else None), flops_per_s / 1e12

    def _sample_memory(self) -> MemoryStats:
        memory = memory_stats(self.system.device)
        self.peak_rss_mb = max(self.peak_rss_mb, memory.rss_mb)
        return memory

    def _memory_row(self) -> dict:
        memory = self._sample_memory()
        return {"rss_mb": memory.rss_mb, "system_used_mb": memory.system_used_mb,
                "cuda_allocated_mb": memory.cuda_allocated_mb, "cuda_peak_mb": memory.cuda_peak_mb}

    def _record(self, row: dict) -> None:
        """Append a row to metrics.csv and log it to the loggers."""
        self.metrics.append(row)
        self.loggers.log_row(row)

    def log(self, step: int, loss: float, lr: float, seconds_per_step: float, elapsed_s: float,
            skipped_steps: int = 0) -> None:
        """Report training progress (`loss`: the mean since the last report; `skipped_steps`:
        the session's so far) as bar or line, and as a metrics row."""
        self.window_seconds.append(seconds_per_step)
        tokens_per_s = self.tokens_per_step / seconds_per_step
        mfu, tflops = self.throughput(tokens_per_s)
        speed = f"MFU {mfu:.1%}" if mfu is not None else f"{tflops:.2f} TFLOP/s"
        postfix = f"loss {loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tok/s, {speed}"
        line = (f"step {step:>6}/{self.facts.max_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                f"{seconds_per_step * 1000:.1f} ms/step  {tokens_per_s:,.0f} tok/s  {speed}")
        self._record({"kind": "train", "step": step, "elapsed_s": elapsed_s,
                      "tokens": self.tokens.at(step), "train_loss": loss, "lr": lr,
                      "tokens_per_s": tokens_per_s, "mfu": mfu, "tflops": tflops,
                      "skipped_steps": skipped_steps - self.skipped_reported, **self._memory_row()})
        self.skipped_reported = skipped_steps
        self.progress.report(postfix, line)
        # once a window without the first step is timed, and while steps are left to estimate
        if not self.estimated and self.start_step + 1 < step < self.facts.max_steps:
            self.estimated = True
            self._print_estimate(step, seconds_per_step)

    def first_step(self, seconds: float, compiled: Optional[str]) -> None:
        """Say how long the session's first step took where it compiled (the speed figures
        leave it out)."""
        if compiled:
            self.message(f"step {self.start_step + 1}: {format_duration(seconds)}, compilation included "
                         f"(torch.compile of the {'transformer block' if compiled == 'blocks' else 'whole model'})")

    def _print_estimate(self, step: int, seconds_per_step: float) -> None:
        """Print the expected duration once steps after the first (compilation) are timed."""
        max_steps = self.facts.max_steps
        batches = eval_batches(self.cfg.training, self.cfg.model.block_size, self.facts.val_tokens)
        rest = run_seconds(self.cfg.training, step, max_steps, seconds_per_step, batches,
                           evaluation_due=step % self.cfg.training.eval_interval == 0)
        self.message(f"estimated time to step {max_steps:,}: about {format_duration(rest.total_s)} "
                     f"({seconds_per_step * 1000:.1f} ms/step, {counted(rest.evaluations, 'evaluation')})")

    def evaluation(self, step: int, losses: dict[str, float], improved: bool, saved: list[Path],
                   elapsed_s: float) -> None:
        """Report an evaluation above the bar, add its metrics row, start redrawing loss.png."""
        val = losses["val"]
        self.evaluations.append((step, time.time(), val))
        best = self.style.good(" (best)") if improved else ""
        self.message(f"step {step:>6}: train loss {losses['train']:.4f}, val loss {val:.4f}{best}; "
                     f"saving {', '.join(str(p) for p in saved)}")
        self._record({
            "kind": "eval", "step": step, "elapsed_s": elapsed_s,
            "tokens": self.tokens.at(step), "train_loss": losses["train"],
            "val_loss": val, "val_perplexity": math.exp(min(val, 50.0)),
            "val_bits_per_char": val / math.log(2) if self.facts.char_level else None,
            **self._memory_row()})
        self._plot(step)

    def _plot(self, step: int) -> None:
        """Start redrawing loss.png, with a milestone copy every plot_milestone_interval steps."""
        milestone = None
        interval = self.cfg.training.plot_milestone_interval
        if interval and step // interval > self.last_milestone:
            self.last_milestone = step // interval
            milestone = milestone_path(self.out_dir, step)
        self.plotter.redraw(read_metrics(self.metrics.path), milestone)

    # ------------------------------------------------------------ at the end

    def finish(self, result: RunResult, elapsed_total_s: float) -> None:
        """Close the bar, print the summary after training and write report.md."""
        self.progress.close()
        self.loggers.close()
        self.plotter.finish(read_metrics(self.metrics.path))
        memory = self._sample_memory()
        print(format_sections(self._summary_rows(result, elapsed_total_s, memory, self.style), self.style),
              flush=True)
        rows = self._summary_rows(result, elapsed_total_s, memory, Style(enabled=False))
        ending = rows[0][1][0][1]
        plot = PLOT if (self.out_dir / PLOT).is_file() else None
        flat = [(f"{section}: {name}", value) for section, items in rows for name, value in items]
        write_report(self.out_dir / REPORT, f"Run report: {self.out_dir.name} ({ending})", flat,
                     config_to_dict(self.cfg), self.facts.environment, plot)

    def _ending(self, result: RunResult, style: Style) -> str:
        t, max_steps = self.cfg.training, self.facts.max_steps
        if result.stop_reason == "target":
            return style.good(f"reached --target_val_loss {t.target_val_loss} at step {result.steps:,}")
        if result.stop_reason == "signal":
            return style.warn(f"stopped by a signal at step {result.steps:,} of {max_steps:,}; "
                              "continue with --resume")
        if result.stop_reason == "time":
            return style.warn(f"stopped at step {result.steps:,} of {max_steps:,} to stay within "
                              f"{self.facts.time_limit}; continue with --resume")
        return f"finished: trained to step {result.steps:,}"

    def _summary_rows(self, result: RunResult, elapsed_total_s: float, memory: MemoryStats,
                      style: Style) -> list:
        losses, t = result.losses, self.cfg.training
        steps_run = result.steps - result.start_step
        run = [("ending", self._ending(result, style)),
               ("time", f"{format_duration(result.seconds)} this session, "
                        f"{format_duration(elapsed_total_s)} in all sessions"),
               ("steps", f"{result.start_step:,} -> {result.steps:,} ({steps_run:,} this session)"),
               ("tokens seen", f"{self.tokens.at(result.steps):,}")]
        tokens_per_s = result.steady_tokens_per_s(self.tokens_per_step)
        if tokens_per_s:
            mfu, tflops = self.throughput(tokens_per_s)
            speed = f"MFU {mfu:.1%}" if mfu is not None else "MFU n/a (no peak known for this device)"
            run.append(("throughput", f"{tokens_per_s:,.0f} tokens/s, {tflops:.3f} TFLOP/s, {speed}"))
        if steps_run > 1:
            first = (("compilation", f"{format_duration(result.first_step_s)} (the first step, warm-up "
                                     "included; not in the throughput)") if result.compiled
                     else ("first step", f"{format_duration(result.first_step_s)} (warm-up; not in the "
                                         "throughput)"))
            run.append(first)
        if result.skipped_steps:
            run.append(("skipped steps", f"{result.skipped_steps} (non-finite loss or gradient)"))
        if t.target_val_loss is not None and losses.best_val > t.target_val_loss:
            run.append(("target", style.warn(f"not reached: --target_val_loss {t.target_val_loss}, "
                                                  f"best {losses.best_val:.4f}")))
        loss_rows = [("final", f"train {losses.final_train:.4f}, val {losses.final_val:.4f}"),
                     ("best", f"train {losses.best_train:.4f}, val {losses.best_val:.4f} "
                              f"(step {losses.best_val_step:,})"),
                     ("worst", f"train {losses.worst_train:.4f}, val {losses.worst_val:.4f}")]
        if not math.isfinite(losses.best_val):
            loss_rows = [("evaluations", "none yet")]
        memory_rows = [("peak process RSS", f"{self.peak_rss_mb:,.0f} MiB"),
                       ("system memory", f"{memory.system_used_mb:,.0f} of {memory.system_total_mb:,.0f} "
                                         "MiB in use")]
        if memory.cuda_peak_mb is not None:
            memory_rows.append(("peak CUDA allocated", f"{memory.cuda_peak_mb:,.0f} MiB"))
        files = [(name, str(self.out_dir / file)) for name, file in (
            ("checkpoint", LATEST), ("metrics", METRICS), ("plot", PLOT),
            ("report", REPORT)) if file != PLOT or (self.out_dir / file).is_file()]
        files += self.loggers.places()
        return [("run", run), ("losses", loss_rows), ("memory", memory_rows), ("files", files)]
