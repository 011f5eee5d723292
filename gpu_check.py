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
an item marked cold starts with an empty compile cache, its warm twin reuses that cache. The
items, their commands and time limits are the table ITEMS in gpu_items.py.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

import gpu_items
from check_runner import Finished, Outcome, failure, markdown_table, run_command, write_log
from cli import CliParser, run_cli
from errors import UserError
from gpu_items import (
    RECOMPILE_LINE,
    REPO_ROOT,
    SMOKE_SWEEP_GRID,
    SMOKE_TARGET_VAL_LOSS,
    SWEEP_GRID,
    TARGET_VAL_LOSS,
    Context,
    Item,
    sweep_items,
)

TOTAL_S = 480.0  # the whole check (or sweep) on one H100/H200
SMOKE_TOTAL_S = 900.0  # a cap for a loaded machine; the smoke check takes under a minute on 2 idle cores
SMOKE_LIMIT_S = 120.0  # each item of the smoke check (a few seconds each on an idle machine)
MIN_START_S = 5.0  # an item is not started with less time than this left of the total
LOCAL_CORPORA = (REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
                 REPO_ROOT / "shared" / "data" / "tinyshakespeare.txt",
                 REPO_ROOT / "cache" / "shakespeare_char" / "input.txt")
SMOKE_FALLBACK_CORPUS = str(REPO_ROOT / "*.md")  # the repository's own prose, where no Shakespeare is
BEFORE_ENDED = {"failed": "failed", "timeout": "ran out of time", "skipped": "was skipped"}


def _skip_reason(ctx: Context, item: Item, limit_s: float, total_s: float) -> Optional[str]:
    if item.needs_cuda and ctx.smoke:
        return "no CUDA: the smoke check runs on the CPU"
    if item.warm and ctx.smoke:
        return f"{item.after} again on its compile cache, and the smoke check compiles nothing"
    if item.after is not None:
        before = ctx.outcomes.get(item.after)
        if before is None:
            return f"needs {item.after} before it in the same run (--only {item.after} {item.name})"
        if before.status != "ok":
            return f"needs {item.after}, which {BEFORE_ENDED[before.status]}"
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
    recompiled = sum(done.stderr.count(RECOMPILE_LINE) for done in finished)
    if recompiled:
        headline += f"; {recompiled} recompilation{'s' if recompiled != 1 else ''} (logs/ say why)"
    return Outcome(item.name, status, seconds, limit_s, headline, {**figures, "recompilations": recompiled},
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


def _output_of(argv: list[str]) -> str:
    """A helper command's first line of output, or '' where it is missing or fails."""
    try:
        done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else ""


def describe_machine(smoke: bool) -> str:
    """The table's heading: the device (from nvidia-smi, so this process never holds GPU memory
    the items need), torch's version, the time, the commit."""
    device = "CPU" if smoke else _output_of(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) or "CUDA"
    commit = _output_of(["git", "rev-parse", "--short", "HEAD"]) or "unknown commit"
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
    items = sweep_items(SMOKE_SWEEP_GRID if args.smoke else SWEEP_GRID) if args.sweep else list(gpu_items.ITEMS)
    if not args.only:
        return items
    names = [item.name for item in items]
    unknown = [name for name in args.only if name not in names]
    if unknown:
        raise UserError(f"unknown item {unknown[0]}; the items: {', '.join(names)}")
    return [item for item in items if item.name in args.only]


def run_all(ctx: Context, items: list[Item], total_s: float, title: str, out_dir: Path, stem: str) -> str:
    """Run the items in order, writing each one's JSON line and the table so far as it ends
    (what is done survives a machine taken back mid-run); return the table."""
    log_dir = out_dir / "logs" / stem
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        jsonl = open(out_dir / f"{stem}.jsonl", "w", encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot write to --out_dir {out_dir}: {error.strerror}") from None
    started = time.monotonic()
    table = ""
    with jsonl:
        for item in items:
            outcome = run_item(ctx, item, total_s - (time.monotonic() - started), total_s, log_dir)
            ctx.outcomes[item.name] = outcome
            jsonl.write(outcome.json_line() + "\n")
            jsonl.flush()
            print(f"{outcome.item}: {outcome.status}: {outcome.result}", file=sys.stderr, flush=True)
            done = list(ctx.outcomes.values())
            table = markdown_table(title, done, f"{len(done)} of {len(items)} items in "
                                   f"{time.monotonic() - started:.0f} s (limit {total_s:.0f} s); one JSON "
                                   f"line each in {stem}.jsonl, each item's output in logs/{stem}/")
            (out_dir / f"{stem}.md").write_text(table, encoding="utf-8")
    return table


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
    out_dir = Path(args.out_dir or os.environ.get("OUT") or "gpu_check").resolve()
    stem = ("gpu_sweep" if args.sweep else "gpu_check") + ("_smoke" if args.smoke else "")
    title = f"{'GPU sweep' if args.sweep else 'GPU check'}{' --smoke' if args.smoke else ''}: " \
            f"{describe_machine(args.smoke)}"
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))  # compile caches and run directories
    ctx = Context(args.smoke, scratch, find_dataset(args.dataset, args.smoke),
                  args.target or (SMOKE_TARGET_VAL_LOSS if args.smoke else TARGET_VAL_LOSS))
    try:
        print(run_all(ctx, items, args.total_s or (SMOKE_TOTAL_S if args.smoke else TOTAL_S), title, out_dir,
                      stem))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if any(o.status in ("failed", "timeout") for o in ctx.outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
