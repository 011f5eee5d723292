"""torch.compile in training: one compilation, in the first step; none for evaluation; the
first step kept out of the speed figures; a signal while compiling ends the run at once."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import compilation
import train
from cli import run_cli
from guards import StopSignals
from tests.conftest import REPO_ROOT, TINY_SETTINGS
from utils import resolve_system


def write_config(workdir: Path, corpus: Path, **training) -> Path:
    settings = json.loads(json.dumps(TINY_SETTINGS))
    settings["data"] = {"dataset": str(corpus)}
    settings["training"].update(training)
    path = workdir / "compiled.json"
    path.write_text(json.dumps(settings))
    return path


def compiled_trainer(config_file: Path, *flags: str):
    args = train.build_parser().parse_args(["--config", str(config_file), "--system.compile", "true", *flags])
    cfg, _, _ = train.resolve_run_config(args)
    return train.build_trainer(args, cfg, None, None, resolve_system("cpu", "float32", True))


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (a recompilation is one more)."""
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_nothing_compiles_after_the_first_step(workdir, small_corpus_file, scope, monkeypatch):
    """Dropout, gradient accumulation, whole-split evaluations with a shorter last batch of
    views (stride block_size), random-batch evaluations of the train split, a final one:
    each used to recompile the forward at the first evaluation; now only step 1 compiles."""
    monkeypatch.setenv(compilation.CACHE_VARIABLE, str(workdir / "compile-cache"))  # restored after
    config = write_config(workdir, small_corpus_file, max_steps=5, eval_interval=2, grad_accum_steps=2,
                          eval_full_val=True, log_interval=2)
    trainer = compiled_trainer(config, "--model.dropout", "0.1", "--system.compile_scope", scope)
    block_size, batch_size = trainer.cfg.model.block_size, trainer.cfg.training.batch_size
    assert ((len(trainer.data.val) - 1) // block_size) % batch_size, "the whole split needs a tail batch"
    torch._dynamo.reset()  # what other tests compiled
    counters.clear()
    after_each_step, step = [], trainer.train_step

    def counted_step():
        loss = step()
        after_each_step.append(graphs_compiled())
        return loss

    trainer.train_step = counted_step
    result = trainer.train()

    assert trainer.compiled == scope and result.steps == 5 and result.losses.final_val < 10
    # one graph, for all the layers when the blocks are compiled (dynamo reuses it)
    assert after_each_step[0] == 1 and counters["frames"]["ok"] >= 1
    assert after_each_step == [1] * 5 and graphs_compiled() == 1, counters["stats"]


def test_compile_scope_auto_and_where_blocks_cannot_be_compiled(capsys):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))  # no `blocks`: a user's model
    assert compilation.compile_scope(model, "default", "blocks") == "model"
    assert "compiling the whole model instead" in capsys.readouterr().err
    with_blocks = torch.nn.Module()
    with_blocks.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    has_stance = hasattr(torch.compiler, "set_stance")
    assert compilation.compile_scope(with_blocks, "default", "auto") == ("blocks" if has_stance else "model")
    assert compilation.compile_scope(with_blocks, "reduce-overhead", "auto") == "model"  # one CUDA graph
    assert compilation.compile_scope(with_blocks, "default", "model") == "model"


def test_the_compile_cache_goes_beside_the_token_caches_unless_torch_is_told(tmp_path, monkeypatch):
    monkeypatch.setenv(compilation.CACHE_VARIABLE, "")  # so that the variable is restored after
    monkeypatch.delenv(compilation.CACHE_VARIABLE)
    assert compilation.keep_compile_cache(str(tmp_path / "cache")) == tmp_path / "cache" / "torch_compile"
    assert os.environ[compilation.CACHE_VARIABLE] == str(tmp_path / "cache" / "torch_compile")
    monkeypatch.setenv(compilation.CACHE_VARIABLE, str(tmp_path / "mine"))
    assert compilation.keep_compile_cache(str(tmp_path / "cache")) == tmp_path / "mine"


# ---------------------------------------------------------------- the first step's time


def test_the_first_step_is_left_out_of_the_estimate_and_the_throughput(workdir, tiny_config_file, capsys,
                                                                        monkeypatch):
    """A clock of our own: the first step takes 10 s (compiling), the others 0.1 s each."""
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    args = train.build_parser().parse_args(["--config", str(tiny_config_file), "--log_interval", "3",
                                            "--max_steps", "7", "--eval_interval", "100"])
    cfg, _, _ = train.resolve_run_config(args)
    trainer = train.build_trainer(args, cfg, None, None, resolve_system("cpu", "float32", None))
    step = trainer.train_step

    def timed_step():
        clock[0] += 10.0 if trainer.step == 0 else 0.1
        return step()

    trainer.train_step = timed_step
    result = trainer.train()
    out = capsys.readouterr().out
    assert trainer.monitor.window_seconds == pytest.approx([0.1, 0.1, 0.1])  # steps 2-3, 4-6, 7
    assert re.search(r"step +3/7 .* 100\.0 ms/step  640 tok/s", out)
    assert re.search(r"estimated time to step 7: about \d{3}ms \(100\.0 ms/step", out)  # 4 steps left
    assert result.first_step_s == pytest.approx(10.0) and result.train_seconds == pytest.approx(10.6)
    assert re.search(r"throughput +640 tokens/s", out)  # 64 tokens per 0.1 s step
    assert re.search(r"first step +10s \(warm-up; not in the throughput\)", out)


def test_a_first_step_reported_alone_waits_for_the_next_report_to_estimate(workdir, tiny_config_file, capsys):
    assert run_cli(train.main, ["--config", str(tiny_config_file), "--max_steps", "3"]) == 0  # a report each step
    lines = capsys.readouterr().out.splitlines()
    estimate = next(i for i, line in enumerate(lines) if line.startswith("estimated time"))
    assert lines[estimate - 1].startswith("step      2/3")


# ---------------------------------------------------------------- signals before the first step ends


def test_a_signal_before_the_first_step_ends_the_process_at_once(capsys):
    statuses = []
    with StopSignals(exit_now=statuses.append) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert statuses == [143]  # 128 + SIGTERM, as the shell reports a process it ended
        assert "SIGTERM received before the first step finished" in capsys.readouterr().err
        stop.first_step_done()
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's relay of the first: neither exit nor save
    assert statuses == [143]


def test_after_the_first_step_a_signal_waits_for_the_save():
    statuses = []
    with StopSignals(exit_now=statuses.append) as stop:
        stop.first_step_done()
        os.kill(os.getpid(), signal.SIGTERM)
    assert statuses == [] and stop.received == signal.SIGTERM


def start_compiling(workdir: Path, config: Path, *flags: str) -> tuple[subprocess.Popen, list[str]]:
    """Start train.py with compile on, with an empty compile cache; return once its first
    step has begun (the summary before training is out), with what it printed until then."""
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train.py"), "--config", str(config), "--system.compile", "true",
         "--max_steps", "100000", *flags],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, compilation.CACHE_VARIABLE: str(workdir / f"compile-cache-{time.time_ns()}")})
    printed = []
    for line in process.stdout:
        printed.append(line)
        if line.startswith("  output "):  # the last line before the loop starts
            break
    time.sleep(0.5)  # inside torch.compile now: the tiny model's compilation takes seconds
    return process, printed


def stop_as_timeout_does(process: subprocess.Popen) -> tuple[str, str]:
    """SIGTERM to the whole process group (as `timeout` sends it: inductor's compile workers
    get it too); return stdout and stderr once the process has ended."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        out, err = process.communicate(timeout=60)  # it hung for minutes before (issue 17)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return out, err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_sigterm_while_compiling_ends_the_run_at_once_and_keeps_the_resumed_checkpoint(workdir,
                                                                                      small_corpus_file):
    config = write_config(workdir, small_corpus_file)
    process, printed = start_compiling(workdir, config, "--out_dir", "fresh")
    out, err = stop_as_timeout_does(process)
    assert process.returncode == 143, err
    assert "SIGTERM received before the first step finished" in err and "Traceback" not in err
    assert "compilation included" not in "".join(printed) + out  # it was still compiling
    assert not list((workdir / "fresh").glob("*.pt"))

    assert run_cli(train.main, ["--config", str(config), "--out_dir", "resumed", "--max_steps", "2"]) == 0
    before = {path.name: digest(path) for path in (workdir / "resumed").glob("*.pt")}
    process, _ = start_compiling(workdir, config, "--out_dir", "resumed", "--resume")
    out, err = stop_as_timeout_does(process)
    assert process.returncode == 143 and "nothing was saved" in err, err
    assert {path.name: digest(path) for path in (workdir / "resumed").glob("*.pt")} == before
