"""Every GPU check and measurement in one command, each item under a time limit of its own.

    scripts/gpu_check.sh                 # one H100/H200: at most TOTAL_S (8 minutes) in all
    scripts/gpu_check.sh --smoke         # the same plumbing on a CPU with tiny settings (CI)
    scripts/gpu_check.sh --sweep         # a run of its own: the speedrun recipe's lr x steps grid
    scripts/gpu_check.sh --only 124m_base 124m_cuda_graphs
    scripts/gpu_check.sh --list          # the items and their time limits

Each item runs the project's own commands (pytest, bench.py, gen.py, train.py, torchrun) as
subprocesses, stopped at the item's limit, so one hang costs its own budget and no more. Each
outcome is one JSON line (gpu_check.jsonl) and a row of a markdown table (printed, and written
to gpu_check.md), in --out_dir: $OUT where it is set, as on the lent GPU machines, else
gpu_check/. Compile caches and run directories live in a scratch folder removed at the end:
an item marked cold starts with an empty compile cache, its warm twin reuses that cache.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from check_runner import Finished, Outcome, failure, markdown_table, run_command, write_log
from cli import CliParser, run_cli
from config import resolve_config
from errors import UserError
from metrics import as_float, read_metrics

REPO_ROOT = Path(__file__).resolve().parent
PYTHON = sys.executable
TOTAL_S = 480.0  # the whole check (or sweep) on one H100/H200
SMOKE_TOTAL_S = 900.0  # a cap for a loaded machine; the smoke check takes under a minute on 2 idle cores
SMOKE_LIMIT_S = 120.0  # each item of the smoke check (a few seconds each on an idle machine)
MIN_START_S = 5.0  # an item is not started with less time than this left of the total
TARGET_VAL_LOSS = 1.47  # whole validation split, the target for both Shakespeare recipes
SMOKE_TARGET_VAL_LOSS = 4.0  # a tiny model passes it within a few steps: the reached path runs too
DEFAULT_CONFIG = "configs/shakespeare_char.json"
SPEEDRUN_CONFIG = "configs/shakespeare_char_speedrun.json"
GPT2_CONFIG = "configs/gpt2_124m.json"
THROUGHPUT_STEPS, SMOKE_THROUGHPUT_STEPS = 50, 10  # 5 report windows, the first 2 left out
LOCAL_CORPORA = (REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
                 REPO_ROOT / "shared" / "data" / "tinyshakespeare.txt",
                 REPO_ROOT / "cache" / "shakespeare_char" / "input.txt")
SMOKE_FALLBACK_CORPUS = str(REPO_ROOT / "*.md")  # the repository's own prose, where no Shakespeare is
SMOKE_FLAGS = ["--system.device", "cpu", "--system.dtype", "float32", "--system.compile", "false",
               "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32",
               "--batch_size", "32", "--max_steps", "20", "--training.warmup_steps", "2", "--eval_interval", "10",
               "--eval_iters", "2", "--log_interval", "5"]  # batch 32: the whole val split in 109 batches


@dataclass(frozen=True)
class SweepGrid:
    steps: tuple[int, ...]
    lr_scales: tuple[float, ...]  # multiply the recipe's lr, min_lr and muon_lr together


# brackets the recipe's 700 steps (its H200 cousin reached 1.4653 at step 800 without a cooldown)
SWEEP_GRID = SweepGrid(steps=(500, 700, 900), lr_scales=(0.7, 1.0, 1.4))
SMOKE_SWEEP_GRID = SweepGrid(steps=(10,), lr_scales=(0.5, 1.5))
SWEEP_BUDGET_S = 45.0  # each point; nine of them, warm after the first, fit in TOTAL_S


@dataclass
class Context:
    """What every item's commands share: the mode, the scratch folder, the data, the results so far."""

    smoke: bool
    scratch: Path
    dataset: str
    target: float
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def data_flags(self) -> list[str]:
        return ["--dataset", self.dataset, "--data.cache_dir", str(self.scratch / "data")]

    def size_flags(self) -> list[str]:
        return SMOKE_FLAGS if self.smoke else []

    def run_dir(self, name: str) -> Path:
        return self.scratch / "runs" / name

    def env(self, cache: str) -> dict:
        """The environment of an item: its compile-cache group's folders, unbuffered output."""
        caches = self.scratch / "compile-cache" / cache
        return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
                "TRITON_CACHE_DIR": str(caches / "triton"), "PYTHONUNBUFFERED": "1"}


Commands = Callable[[Context], list[list[str]]]
Reader = Callable[[Context, list[Finished]], tuple[str, dict, str]]  # -> status, figures, headline


@dataclass(frozen=True)
class Item:
    name: str
    budget_s: float  # its time limit on one H100/H200
    commands: Commands  # run in order; the first that fails ends the item
    read: Reader
    cache: str = "shared"  # items of one group share a compile cache, the first one cold
    needs_cuda: bool = False  # skipped in the smoke check, which runs on the CPU
    after: Optional[str] = None  # an item that must have succeeded first (its cache or its figures)


# ---------------------------------------------------------------- commands


def bench(config: str, *flags: str, target: bool = False, synthetic: bool = False) -> Commands:
    """A bench.py run of config: to the target loss, or a short synthetic-token throughput run."""
    def commands(ctx: Context) -> list[list[str]]:
        argv = [PYTHON, "bench.py", "--config", config, *ctx.data_flags(), *ctx.size_flags()]
        if target:
            argv += ["--target_val_loss", str(ctx.target)]
        if synthetic:
            argv += ["--synthetic", "--steps", str(SMOKE_THROUGHPUT_STEPS if ctx.smoke else THROUGHPUT_STEPS)]
        return [argv + list(flags)]
    return commands


def at_max_batch(ctx: Context) -> list[list[str]]:
    found = ctx.outcomes["124m_max_batch"].figures["max_batch"]
    return bench(GPT2_CONFIG, "--batch_size", str(found), synthetic=True)(ctx)


def cuda_tests(ctx: Context) -> list[list[str]]:
    return [[PYTHON, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"]]


def token_cache(ctx: Context) -> list[list[str]]:
    """Tokenize the corpus once, so no timed item pays for it."""
    return [[PYTHON, "train.py", "--config", DEFAULT_CONFIG, *ctx.data_flags(), "--data_stats"]]


def decode(ctx: Context) -> list[list[str]]:
    """Train configs/tiny.json's model one step (its weights do not change the speed), then time
    gen.py's prefill and decoding on it."""
    run = ctx.run_dir("decode")
    train = [PYTHON, "train.py", "--config", "configs/tiny.json", *ctx.data_flags(), *ctx.size_flags(),
             "--no_compile", "--max_steps", "1", "--out_dir", str(run)]
    smoke = ["--device", "cpu", "--dtype", "float32", "--max_new_tokens", "50"] if ctx.smoke else []
    return [train, [PYTHON, "gen.py", str(run), "--benchmark", *smoke]]


def torchrun(ctx: Context) -> list[list[str]]:
    """The default recipe in one process under torchrun (NCCL on a GPU, Gloo on a CPU)."""
    steps = [] if ctx.smoke else ["--max_steps", "300", "--eval_interval", "300", "--eval_iters", "20"]
    return [[PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py",
             "--config", DEFAULT_CONFIG, *ctx.data_flags(), *ctx.size_flags(), *steps,
             "--out_dir", str(ctx.run_dir("torchrun"))]]


# ---------------------------------------------------------------- readers


def _bench_json(finished: list[Finished]) -> dict:
    lines = [line for line in finished[-1].stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("it printed no JSON line")
    return json.loads(lines[-1])


def _target_phrase(figures: dict, target: float) -> str:
    reached = figures.get("seconds_to_target")
    at = f"val <= {target:g} at {reached:.1f} s" if reached is not None else f"val {target:g} not reached"
    return f"{at} (best {figures.get('best_val_loss')}, {figures.get('steps')} steps)"


def read_time_to_target(ctx: Context, finished: list[Finished]) -> tuple[str, dict, str]:
    figures = _bench_json(finished)
    return "ok", figures, f"{_target_phrase(figures, ctx.target)}, {figures.get('median_ms_per_step')} ms/step"


def read_throughput(ctx: Context, finished: list[Finished]) -> tuple[str, dict, str]:
    f = _bench_json(finished)
    mfu = f"MFU {f['mfu']:.1%}" if f.get("mfu") is not None else "MFU n/a"
    return "ok", f, (f"{f['tokens_per_s']:,} tokens/s, {f['median_ms_per_step']} ms/step, {mfu}, "
                     f"{f['tokens_per_step']:,} tokens/step")


def read_max_batch(ctx: Context, finished: list[Finished]) -> tuple[str, dict, str]:
    f = _bench_json(finished)
    return "ok", f, (f"max micro-batch {f['max_batch']} at block_size {f['block_size']} (peak "
                     f"{f['peak_memory_mb']:,} of {f['total_memory_mb']:,} MiB)")


def read_decode(ctx: Context, finished: list[Finished]) -> tuple[str, dict, str]:
    f = _bench_json(finished)
    return "ok", f, (f"decode {f['decode_tokens_per_s']} tokens/s, prefill {f['prefill_tokens_per_s']} "
                     f"tokens/s ({f['params']:,} parameters, {f['device']})")


def read_token_cache(ctx: Context, finished: list[Finished]) -> tuple[str, dict, str]:
    return "ok", {"dataset": ctx.dataset}, f"token cache of {ctx.dataset} ready"


PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def read_pytest(ctx: Context, finished: list[Finished]) -> tuple[str, dict, str]:
    """Passed tests make it ok; a run where every test was skipped (no CUDA) is skipped."""
    lines = [line for line in finished[-1].stdout.splitlines() if PYTEST_COUNT.search(line)]
    if not lines:
        raise ValueError("pytest printed no summary line")
    summary = lines[-1].strip("= ")
    counts = {word.rstrip("s") if word.startswith("error") else word: int(n)
              for n, word in PYTEST_COUNT.findall(summary)}
    if not counts.get("passed") and counts.get("skipped"):
        return "skipped", counts, f"no CUDA: {summary}"
    return "ok", counts, summary


def read_torchrun(ctx: Context, finished: list[Finished]) -> tuple[str, dict, str]:
    rows = read_metrics(ctx.run_dir("torchrun") / "metrics.csv")
    speeds = [as_float(r["tokens_per_s"]) for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    steady = speeds[2:] or speeds
    figures = {"steps": int(rows[-1]["step"]), "val_loss": as_float(evals[-1]["val_loss"]) if evals else None,
               "tokens_per_s": round(statistics.median(steady)) if steady else None}
    return "ok", figures, (f"1 process: {figures['steps']} steps, {figures['tokens_per_s']:,} tokens/s, "
                           f"val {figures['val_loss']:.4f}")


def sweep_reader(steps: int, lr: float, muon_lr: float) -> Reader:
    def read(ctx: Context, finished: list[Finished]) -> tuple[str, dict, str]:
        figures = {"max_steps": steps, "lr": lr, "muon_lr": muon_lr, **_bench_json(finished)}
        return "ok", figures, f"{steps} steps, lr {lr:g}, muon_lr {muon_lr:g}: {_target_phrase(figures, ctx.target)}"
    return read


# ---------------------------------------------------------------- the items, in the order they run

def _lever(name: str, budget_s: float, *flags: str, needs_cuda: bool = False) -> Item:
    """A 124M throughput run with one lever set (the config's defaults are 124m_base)."""
    return Item(name, budget_s, bench(GPT2_CONFIG, *flags, synthetic=True), read_throughput, cache="124m",
                needs_cuda=needs_cuda)


ITEMS = (
    Item("cuda_tests", 120, cuda_tests, read_pytest, cache="tests"),
    Item("token_cache", 20, token_cache, read_token_cache),
    Item("speedrun_cold", 45, bench(SPEEDRUN_CONFIG, target=True), read_time_to_target, cache="speedrun"),
    Item("speedrun_warm", 30, bench(SPEEDRUN_CONFIG, target=True), read_time_to_target, cache="speedrun",
         after="speedrun_cold"),
    Item("default_cold", 75, bench(DEFAULT_CONFIG, target=True), read_time_to_target, cache="default"),
    Item("default_warm", 55, bench(DEFAULT_CONFIG, target=True), read_time_to_target, cache="default",
         after="default_cold"),
    Item("decode", 30, decode, read_decode),
    Item("torchrun", 45, torchrun, read_torchrun),
    _lever("124m_base", 60),
    _lever("124m_compile_default", 35, "--system.compile_mode", "default", needs_cuda=True),
    _lever("124m_cuda_graphs", 40, "--system.compile_mode", "reduce-overhead", needs_cuda=True),
    _lever("124m_cudnn_attention", 35, "--system.attention_backend", "cudnn", needs_cuda=True),
    _lever("124m_chunked_head", 35, "--model.loss_chunk_size", "8192"),
    _lever("124m_sync_per_step", 35, "--training.nonfinite_check", "step"),
    Item("124m_max_batch", 40, bench(GPT2_CONFIG, "--max_batch", synthetic=True), read_max_batch,
         needs_cuda=True),
    Item("124m_at_max_batch", 40, at_max_batch, read_throughput, cache="124m", after="124m_max_batch"),
)


def sweep_items(grid: SweepGrid) -> list[Item]:
    """One time-to-target run of the speedrun recipe per (steps, lr scale) of the grid."""
    recipe = resolve_config(str(REPO_ROOT / SPEEDRUN_CONFIG), {}).training
    items = []
    for steps in grid.steps:
        for scale in grid.lr_scales:
            lr, min_lr, muon_lr = (float(f"{v * scale:.3g}") for v in (recipe.lr, recipe.min_lr, recipe.muon_lr))
            flags = ["--max_steps", str(steps), "--training.lr", str(lr), "--training.min_lr", str(min_lr),
                     "--training.muon_lr", str(muon_lr)]
            items.append(Item(f"sweep_{steps}_steps_lr_x{scale:g}", SWEEP_BUDGET_S,
                              bench(SPEEDRUN_CONFIG, *flags, target=True), sweep_reader(steps, lr, muon_lr),
                              cache="speedrun"))
    return items


# ---------------------------------------------------------------- running them


def _skip_reason(ctx: Context, item: Item, limit_s: float, total_s: float) -> Optional[str]:
    if item.needs_cuda and ctx.smoke:
        return "no CUDA: the smoke check runs on the CPU"
    if item.after is not None:
        before = ctx.outcomes.get(item.after)
        if before is None:
            return f"needs {item.after} before it in the same run (--only {item.after} {item.name})"
        if before.status != "ok":
            return f"needs {item.after}, which {'was ' if before.status == 'skipped' else ''}{before.status}"
    if limit_s < MIN_START_S:
        return f"the {total_s:.0f} s total was spent; run it alone with --only {item.name}"
    return None


def run_item(ctx: Context, item: Item, time_left_s: float, total_s: float, log_dir: Path) -> Outcome:
    """Run the item's commands within its limit (and what is left of the total); read its figures."""
    limit_s = min(SMOKE_LIMIT_S if ctx.smoke else item.budget_s, max(time_left_s, 0.0))
    reason = _skip_reason(ctx, item, limit_s, total_s)
    if reason is not None:
        return Outcome(item.name, "skipped", 0.0, limit_s, reason, reason=reason)
    finished: list[Finished] = []
    for argv in item.commands(ctx):
        done = run_command(argv, limit_s - sum(d.seconds for d in finished), REPO_ROOT, ctx.env(item.cache))
        finished.append(done)
        if done.timed_out or done.returncode != 0:
            break
    write_log(log_dir / f"{item.name}.log", finished)
    bad = failure(item.name, limit_s, finished)
    if bad is not None:
        return bad
    seconds, command = sum(d.seconds for d in finished), " ".join(finished[-1].argv)
    try:
        status, figures, headline = item.read(ctx, finished)
    except (ValueError, KeyError, IndexError, TypeError, OSError) as error:
        reason = f"ran, but its figures could not be read ({type(error).__name__}: {error})"
        return Outcome(item.name, "failed", seconds, limit_s, reason, reason=reason,
                       stderr_tail=finished[-1].stderr[-2000:], command=command)
    return Outcome(item.name, status, seconds, limit_s, headline, figures,
                   reason=headline if status == "skipped" else "", command=command)


def find_dataset(given: Optional[str], smoke: bool) -> str:
    """--dataset, else a Shakespeare on disk (the GPU machines cannot download), else the
    configs' own (downloaded) or, for the smoke check, the repository's markdown files."""
    if given:
        return given
    local = next((p for p in LOCAL_CORPORA if p.is_file()), None)
    if local is not None:
        return str(local)
    return SMOKE_FALLBACK_CORPUS if smoke else "shakespeare_char"


def describe_machine(smoke: bool) -> str:
    device = "CPU" if smoke or not torch.cuda.is_available() else torch.cuda.get_device_name()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{device}, torch {torch.__version__}, {now}, commit {commit}"


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(description="Run every GPU check and measurement, each under its own time limit.",
                       allow_abbrev=False)
    parser.add_argument("--smoke", action="store_true", help="the same plumbing on the CPU, tiny settings")
    parser.add_argument("--sweep", action="store_true",
                        help="instead of the check: time the speedrun recipe over a grid of steps and lrs")
    parser.add_argument("--only", nargs="+", metavar="ITEM", help="run these items alone (see --list)")
    parser.add_argument("--list", action="store_true", help="print the items and their time limits, and stop")
    parser.add_argument("--out_dir", help="where the .jsonl, .md and logs go (default: $OUT, else gpu_check/)")
    parser.add_argument("--dataset", help="the Shakespeare text (default: ../shared/data/tinyshakespeare.txt "
                        "or the configs' own)")
    parser.add_argument("--target", type=float, help=f"the val loss to time (default {TARGET_VAL_LOSS})")
    parser.add_argument("--total_s", type=float, help=f"the limit for all items (default {TOTAL_S:.0f})")
    return parser


def chosen_items(args: argparse.Namespace) -> list[Item]:
    items = sweep_items(SMOKE_SWEEP_GRID if args.smoke else SWEEP_GRID) if args.sweep else list(ITEMS)
    if not args.only:
        return items
    names = [item.name for item in items]
    unknown = [name for name in args.only if name not in names]
    if unknown:
        raise UserError(f"unknown item {unknown[0]}; the items: {', '.join(names)}")
    return [item for item in items if item.name in args.only]


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    items = chosen_items(args)
    if args.list:
        for item in items:
            print(f"{item.name:<24} {item.budget_s:>5.0f} s{'  (CUDA only)' if item.needs_cuda else ''}")
        print(f"{'total':<24} {TOTAL_S:>5.0f} s at most")
        return 0
    if not args.smoke and not torch.cuda.is_available():
        raise UserError("no CUDA device here: the GPU check measures a GPU; --smoke runs its plumbing on the CPU")
    total_s = args.total_s or (SMOKE_TOTAL_S if args.smoke else TOTAL_S)
    out_dir = Path(args.out_dir or os.environ.get("OUT") or "gpu_check").resolve()
    stem = ("gpu_sweep" if args.sweep else "gpu_check") + ("_smoke" if args.smoke else "")
    log_dir = out_dir / "logs" / stem
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        jsonl = open(out_dir / f"{stem}.jsonl", "w", encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot write to --out_dir {out_dir}: {error.strerror}") from None
    title = f"{'GPU sweep' if args.sweep else 'GPU check'}{' --smoke' if args.smoke else ''}: " \
            f"{describe_machine(args.smoke)}"
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    ctx = Context(args.smoke, scratch, find_dataset(args.dataset, args.smoke),
                  args.target or (SMOKE_TARGET_VAL_LOSS if args.smoke else TARGET_VAL_LOSS))
    started = time.monotonic()
    try:
        with jsonl:
            for item in items:
                outcome = run_item(ctx, item, total_s - (time.monotonic() - started), total_s, log_dir)
                ctx.outcomes[item.name] = outcome
                jsonl.write(outcome.json_line() + "\n")
                jsonl.flush()  # what is done survives a machine taken back mid-run
                print(f"{outcome.item}: {outcome.status}: {outcome.result}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    outcomes = list(ctx.outcomes.values())
    footer = (f"{len(outcomes)} items in {time.monotonic() - started:.0f} s (limit {total_s:.0f} s); "
              f"one JSON line each in {stem}.jsonl, each item's output in logs/{stem}/")
    table = markdown_table(title, outcomes, footer)
    (out_dir / f"{stem}.md").write_text(table, encoding="utf-8")
    print(table)
    return 1 if any(o.status in ("failed", "timeout") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
