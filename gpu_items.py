"""The GPU check's items: what each one runs, its time limit, and how its figures are read.

gpu_check.py runs them in the order of ITEMS (or of the sweep's grid); each item is one or
more of the project's commands, run as subprocesses, and a reader that turns their output into
figures and a one-line headline for the table.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from check_runner import Finished, Outcome
from config import resolve_config
from metrics import as_float, read_metrics

REPO_ROOT = Path(__file__).resolve().parent
PYTHON = sys.executable
TARGET_VAL_LOSS = 1.47  # whole validation split, the target for both Shakespeare recipes
SMOKE_TARGET_VAL_LOSS = 4.0  # a tiny model passes it within a few steps: the reached path runs too
DEFAULT_CONFIG = "configs/shakespeare_char.json"
SPEEDRUN_CONFIG = "configs/shakespeare_char_speedrun.json"
GPT2_CONFIG = "configs/gpt2_124m.json"
THROUGHPUT_STEPS = 50  # 5 report windows, the first 2 (compilation, warm-up) left out
SMOKE_FLAGS = ["--system.device", "cpu", "--system.dtype", "float32", "--system.compile", "false",
               "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32",
               "--batch_size", "32", "--max_steps", "20", "--training.warmup_steps", "2", "--eval_interval", "10",
               "--eval_iters", "2", "--log_interval", "5"]  # batch 32: the whole val split in 109 batches
SMOKE_THROUGHPUT_FLAGS = ["--steps", "10", "--batch_size", "4"]  # the 50k-word head is most of the work
DECODE_BATCH = 8  # serve.py's --batch default
RECOMPILE_LINE = "Recompiling function"  # what TORCH_LOGS=recompiles prints for each recompilation


@dataclass(frozen=True)
class SweepGrid:
    steps: tuple[int, ...]
    lr_scales: tuple[float, ...]  # multiply the recipe's lr, min_lr and muon_lr together


# brackets the recipe's 700 steps (its H200 cousin reached 1.4653 at step 800 without a cooldown)
SWEEP_GRID = SweepGrid(steps=(500, 700, 900), lr_scales=(0.7, 1.0, 1.4))
SMOKE_SWEEP_GRID = SweepGrid(steps=(10,), lr_scales=(0.5, 1.5))
SWEEP_BUDGET_S = 45.0  # each point: nine of them, warm after the first, fit in the 8 minutes of a run


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
        """The environment of an item: its compile-cache group's folders, unbuffered output, and
        dynamo's recompilations logged (counted in every item's figures)."""
        caches = self.scratch / "compile-cache" / cache
        return {"TORCH_LOGS": "recompiles", **os.environ, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
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
    warm: bool = False  # `after`'s commands again, on its compile cache (skipped by the smoke check: no compile)

    def __post_init__(self) -> None:
        if self.warm and self.after is None:
            raise ValueError(f"item {self.name} is warm: it needs the cold item it follows (after=...)")


# ---------------------------------------------------------------- commands


def bench(config: str, *flags: str, target: bool = False, synthetic: bool = False) -> Commands:
    """A bench.py run of config: to the target loss, or a short synthetic-token throughput run."""
    def commands(ctx: Context) -> list[list[str]]:
        argv = [PYTHON, "bench.py", "--config", config, *ctx.data_flags(), *ctx.size_flags()]
        if target:
            argv += ["--target_val_loss", str(ctx.target)]
        if synthetic:
            argv += ["--synthetic", *(SMOKE_THROUGHPUT_FLAGS if ctx.smoke else ["--steps", str(THROUGHPUT_STEPS)])]
        return [argv + list(flags)]
    return commands


def at_max_batch(ctx: Context) -> list[list[str]]:
    found = ctx.outcomes["124m_max_batch"].figures["max_batch"]
    return bench(GPT2_CONFIG, "--batch_size", str(found), synthetic=True)(ctx)


def cuda_tests(ctx: Context) -> list[list[str]]:
    """Every test marked gpu: tests/test_gpu.py and the CUDA checks of other files."""
    return [[PYTHON, "-m", "pytest", "-q", "-m", "gpu"]]


def token_cache(ctx: Context) -> list[list[str]]:
    """Tokenize the corpus once, so no timed item pays for it."""
    return [[PYTHON, "train.py", "--config", DEFAULT_CONFIG, *ctx.data_flags(), "--data_stats"]]


def _gen_smoke_flags(ctx: Context) -> list[str]:
    """gen.py's flags for the smoke check: the CPU, float32, a short sample."""
    return ["--device", "cpu", "--dtype", "float32", "--max_new_tokens", "50"] if ctx.smoke else []


def decode(ctx: Context) -> list[list[str]]:
    """Train the 10.7M model of configs/shakespeare_char.json one step (its weights do not change
    the speed), then time gen.py's prefill and decoding on it, eager and then with the default
    step (a CUDA graph on CUDA; issue 20's target: 3,000 tokens/s)."""
    run = ctx.run_dir("decode")
    train = [PYTHON, "train.py", "--config", DEFAULT_CONFIG, *ctx.data_flags(), *ctx.size_flags(),
             "--no_compile", "--max_steps", "1", "--out_dir", str(run)]
    gen = [PYTHON, "gen.py", str(run), "--benchmark", *_gen_smoke_flags(ctx)]
    return [train, [*gen, "--decode_step", "eager"], gen]


def decode_batch(ctx: Context) -> list[list[str]]:
    """gen.py decoding DECODE_BATCH samples of decode's model as one batch (one forward per token
    for all, with the default step: a CUDA graph of DECODE_BATCH rows on CUDA), the work a
    server with every row of `--batch DECODE_BATCH` busy does each token."""
    return [[PYTHON, "gen.py", str(ctx.run_dir("decode")), "--benchmark", "--num_samples", str(DECODE_BATCH),
             *_gen_smoke_flags(ctx)]]


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
    eager, f = _bench_json(finished[:-1]), _bench_json(finished)
    f = {**f, "eager_decode_tokens_per_s": eager["decode_tokens_per_s"]}
    return "ok", f, (f"decode {f['decode_step']} {f['decode_tokens_per_s']} tokens/s (median; eager "
                     f"{eager['decode_tokens_per_s']}; prepared in {f['first_step_s']} s), first token "
                     f"{f['first_token_s']} s, prefill {f['prefill_tokens_per_s']} tokens/s "
                     f"({f['params']:,} parameters, {f['device']})")


def read_decode_batch(ctx: Context, finished: list[Finished]) -> tuple[str, dict, str]:
    f = _bench_json(finished)
    alone = ctx.outcomes["decode"].figures["decode_tokens_per_s"]
    f = {**f, "alone_decode_tokens_per_s": alone}
    return "ok", f, (f"{f['samples']} samples together: {f['decode_tokens_per_s']} tokens/s in all (median, "
                     f"{f['decode_step']}; one sample alone {alone}), prefill {f['prefill_tokens_per_s']} tokens/s")


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
    """A 124M throughput run with one lever set; 124m_base keeps the config's defaults (compile_mode
    auto: CUDA graphs on one GPU, so 124m_compile_default is that lever off)."""
    return Item(name, budget_s, bench(GPT2_CONFIG, *flags, synthetic=True), read_throughput, cache="124m",
                needs_cuda=needs_cuda)


ITEMS = (
    Item("cuda_tests", 150, cuda_tests, read_pytest, cache="tests"),
    Item("token_cache", 20, token_cache, read_token_cache),
    Item("speedrun_cold", 45, bench(SPEEDRUN_CONFIG, target=True), read_time_to_target, cache="speedrun"),
    Item("speedrun_warm", 30, bench(SPEEDRUN_CONFIG, target=True), read_time_to_target, cache="speedrun",
         after="speedrun_cold", warm=True),
    Item("default_cold", 75, bench(DEFAULT_CONFIG, target=True), read_time_to_target, cache="default"),
    Item("default_warm", 55, bench(DEFAULT_CONFIG, target=True), read_time_to_target, cache="default",
         after="default_cold", warm=True),
    Item("decode", 40, decode, read_decode),
    Item("decode_batch", 25, decode_batch, read_decode_batch, after="decode"),
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
