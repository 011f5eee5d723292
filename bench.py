"""Measure a real training run and print one JSON line of figures.

    python bench.py --config configs/cpu_shakespeare_char.json --target_val_loss 1.88
    python bench.py --config configs/gpt2_124m.json --synthetic --steps 50
    python bench.py --config configs/gpt2_124m.json --synthetic --max_batch
    python bench.py --config configs/gpt2_124m.json --synthetic --steps 60 --at_max_batch
    python bench.py --config configs/shakespeare_bpe.json --dataset big.txt --tokenize

Validation loss here is the mean over the whole validation split, so figures compare across
runs and configs; on --synthetic tokens, where it means nothing, over a few batches. The run's
summaries go to stderr; stdout carries only the JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

try:
    import resource  # peak memory figures; Unix only
except ImportError:
    resource = None

import torch

from cli import CliParser, add_config_flags, overrides_from_args, run_cli
from config import Config, deep_merge, fill_vocab_size, resolve_config, train_eval_iters
from contract import build_model
from corpus import worker_count
from data_loader import check_enough_tokens, dataset_files, prepare_data, synthetic_data
from errors import UserError
from forward_context import forward_context
from monitor import RunMonitor
from optim import accumulate_gradients, make_optimizer, optimizer_step
from precision import choose_cpu_dtype
from trainer import Trainer
from utils import (
    DeviceInfo,
    autocast_context,
    configure_torch,
    memory_stats,
    process_start_time,
    resolve_system,
)

WARMUP_WINDOWS = 2  # report windows left out of the step time: compilation and warm-up
SYNTHETIC_EVAL_ITERS = 3  # batches per split in an evaluation of random tokens


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(description="Benchmark a training config.", allow_abbrev=False)
    parser.add_argument("--config", required=True, help="JSON config file")
    parser.add_argument("--steps", type=int, help="train this many steps (default: the config's)")
    parser.add_argument("--synthetic", action="store_true",
                        help="random tokens instead of the dataset (needs model.vocab_size)")
    parser.add_argument("--max_batch", action="store_true",
                        help="find the largest micro-batch that fits in GPU memory, and stop")
    parser.add_argument("--at_max_batch", action="store_true",
                        help="find the largest micro-batch as --max_batch does, then benchmark at it")
    parser.add_argument("--tokenize", action="store_true",
                        help="time tokenizing the dataset into a fresh cache (MB/s, peak memory), and stop")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (default: deleted)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    add_config_flags(parser)
    return parser


def bench_config(args: argparse.Namespace, out_dir: Path) -> Config:
    """Return the config with the benchmark's settings: its own out_dir, and whole-split
    evaluation, but for synthetic tokens, whose loss means nothing: a few batches show that
    evaluation runs without spending minutes on it."""
    fixed = {"training": {"eval_full_val": not args.synthetic, "out_dir": str(out_dir)}}
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps must be at least 1, got {args.steps}")
        fixed["training"]["max_steps"] = args.steps
    cfg = resolve_config(args.config, deep_merge(overrides_from_args(args), fixed))
    if args.synthetic:
        if cfg.model.vocab_size is None:
            raise UserError("--synthetic needs model.vocab_size (e.g. --model.vocab_size 50304)")
        cfg.training.eval_iters = min(cfg.training.eval_iters, SYNTHETIC_EVAL_ITERS)
        cfg.training.eval_train_iters = min(train_eval_iters(cfg.training), SYNTHETIC_EVAL_ITERS)
    return cfg


def val_loss_over(cfg: Config) -> str:
    """What the record's validation losses are the mean over."""
    if cfg.training.eval_full_val:
        return "the whole validation split"
    batches = cfg.training.eval_iters
    return f"{batches} random batch{'es' if batches != 1 else ''} of synthetic tokens"


def figures(trainer: Trainer, monitor: RunMonitor, process_start: float) -> dict:
    """Return the benchmark's JSON record from a finished run."""
    windows = monitor.window_seconds
    steady = windows[WARMUP_WINDOWS:] or windows[1:] or windows
    seconds_per_step = statistics.median(steady) if steady else None
    tokens_per_s = trainer.tokens_per_step / seconds_per_step if seconds_per_step else None
    mfu, tflops = monitor.throughput(tokens_per_s) if tokens_per_s else (None, None)
    target = trainer.cfg.training.target_val_loss
    reached = [when for _, when, val in monitor.evaluations if target is not None and val <= target]
    memory = memory_stats(trainer.system.device)
    peak_mb = memory.cuda_peak_mb if memory.cuda_peak_mb is not None else monitor.peak_rss_mb
    return {
        "device": monitor.facts.environment["device"],
        "dtype": str(trainer.system.dtype).removeprefix("torch."),
        "compile": trainer.system.compile,
        "compile_mode": trainer.system.compile_mode if trainer.system.compile else None,
        "attention_backend": trainer.cfg.system.attention_backend,
        "loss_chunk_size": trainer.cfg.model.loss_chunk_size,
        "data_on_device": isinstance(trainer.data.train, torch.Tensor),
        "params": trainer.model.num_params(),
        "batch_size": trainer.cfg.training.batch_size,
        "tokens_per_step": trainer.tokens_per_step,
        "steps": trainer.step,
        "first_step_s": round(trainer.timer.first_step_s, 4),  # compilation (where on) and warm-up
        "compiled": trainer.compiled,
        "median_ms_per_step": round(seconds_per_step * 1000, 2) if seconds_per_step else None,
        "tokens_per_s": round(tokens_per_s) if tokens_per_s else None,
        "mfu": round(mfu, 4) if mfu is not None else None,
        "tflops": round(tflops, 3) if tflops is not None else None,
        "peak_memory_mb": round(peak_mb),
        "target_val_loss": target,
        "seconds_to_target": round(reached[0] - process_start, 2) if reached else None,
        "final_val_loss": round(monitor.evaluations[-1][2], 4) if monitor.evaluations else None,
        "best_val_loss": round(min(v for _, _, v in monitor.evaluations), 4) if monitor.evaluations else None,
        "val_loss_over": val_loss_over(trainer.cfg),
    }


def find_max_batch(fits: Callable[[int], bool], limit: int = 1 << 16) -> int:
    """Return the largest batch size b <= limit with fits(b), assuming fits is monotone:
    double until a failure, then bisect between the last success and the first failure."""
    if not fits(1):
        return 0
    good, bad = 1, None
    while bad is None and good < limit:
        trial = min(good * 2, limit)
        if fits(trial):
            good = trial
        else:
            bad = trial
    if bad is None:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def searched_gpu(cfg: Config) -> DeviceInfo:
    """Return the CUDA device whose memory --max_batch and --at_max_batch search; elsewhere, a UserError."""
    system = resolve_system(cfg.system.device, cfg.system.dtype, False)
    if system.device.type != "cuda":
        raise UserError("--max_batch and --at_max_batch search GPU memory; run them with a CUDA device")
    return system


def max_batch(cfg: Config, data_vocab: int) -> dict:
    """Search the largest micro-batch for which a full training step fits in GPU memory."""
    system = searched_gpu(cfg)
    model = build_model(fill_vocab_size(cfg, data_vocab).model).to(system.device)
    optimizer = make_optimizer(model, cfg.training, system.device, system.dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=system.dtype == torch.float16)
    autocast = forward_context(cfg, system, autocast_context(system.device, system.dtype))  # its attention kernel
    T = cfg.model.block_size

    def fits(batch: int) -> bool:
        x = torch.randint(0, data_vocab, (batch, T), device=system.device)
        try:
            accumulate_gradients(model, [(x, x)], 1, autocast, scaler)
            optimizer_step(model, optimizer, scaler, cfg.training.grad_clip)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    best = find_max_batch(fits)
    torch.cuda.reset_peak_memory_stats()
    fits(best)
    return {"device": torch.cuda.get_device_name(system.device), "block_size": T, "max_batch": best,
            "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20),
            "total_memory_mb": round(torch.cuda.get_device_properties(system.device).total_memory / 2**20)}


def largest_batch(cfg: Config, data_vocab: int) -> int:
    """Return the micro-batch --at_max_batch benchmarks at: the largest that fits, said on stderr."""
    found = max_batch(cfg, data_vocab)
    if found["max_batch"] < 1:
        raise UserError(f"not even one sequence of {found['block_size']} tokens fits a training step in "
                        f"{found['device']}'s memory; try a smaller model or --model.loss_chunk_size")
    print(f"largest micro-batch that fits: {found['max_batch']} (peak {found['peak_memory_mb']} MiB of "
          f"{found['total_memory_mb']}); benchmarking at it", file=sys.stderr)
    return found["max_batch"]


def tokenize_figures(cfg: Config, cache_dir: Path) -> dict:
    """Build the dataset's token cache from scratch in cache_dir; return its speed and memory."""
    data_cfg = dataclasses.replace(cfg.data, cache_dir=str(cache_dir))
    _, files = dataset_files(data_cfg)
    size = sum(p.stat().st_size for p in files)
    started = time.perf_counter()
    data = prepare_data(data_cfg, rebuild=True)
    seconds = time.perf_counter() - started
    return {"files": len(files), "megabytes": round(size / 1e6, 1), "tokenizer": data.tokenizer.kind,
            "tokens": len(data.train) + len(data.val), "workers": worker_count(data_cfg, size),
            "seconds": round(seconds, 2), "megabytes_per_s": round(size / 1e6 / seconds, 2),
            "peak_rss_mb": _peak_rss_mb("RUSAGE_SELF"), "peak_worker_rss_mb": _peak_rss_mb("RUSAGE_CHILDREN")}


def _peak_rss_mb(who: str) -> Optional[int]:
    """The peak resident memory of this process or of its largest child, where the OS says."""
    if resource is None:
        return None
    kilobytes = 1024 if sys.platform != "darwin" else 1  # ru_maxrss: kB on Linux, bytes on macOS
    return round(resource.getrusage(getattr(resource, who)).ru_maxrss * kilobytes / 2**20)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    process_start = process_start_time()
    out_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        cfg = bench_config(args, out_dir)
        configure_torch(cfg.system)
        if args.tokenize:
            print(json.dumps(tokenize_figures(cfg, out_dir / "cache")))
            return 0
        if args.max_batch or args.at_max_batch:
            searched_gpu(cfg)  # before the data, which may be a download
        data = synthetic_data(cfg.model.vocab_size) if args.synthetic else prepare_data(cfg.data)
        if args.max_batch:
            print(json.dumps(max_batch(cfg, data.tokenizer.vocab_size)))
            return 0
        if args.at_max_batch:
            cfg.training.batch_size = largest_batch(cfg, data.tokenizer.vocab_size)
        check_enough_tokens(data, cfg.model.block_size)
        cfg = fill_vocab_size(cfg, data.tokenizer.vocab_size)
        system = choose_cpu_dtype(cfg, resolve_system(cfg.system.device, cfg.system.dtype, cfg.system.compile,
                                                      compile_mode=cfg.system.compile_mode,
                                                      grad_accum_steps=cfg.training.grad_accum_steps))
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON line alone
            trainer = Trainer(cfg, data, system, process_start)
            trainer.train()
            if not args.keep:  # the summary above lists the run's files
                print(f"(those files go with {out_dir} when bench.py ends; --keep keeps them)")
        print(json.dumps(figures(trainer, trainer.monitor, process_start)))
    finally:
        if args.keep:
            print(f"run directory kept: {out_dir}", file=sys.stderr)
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
