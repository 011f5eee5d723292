"""gpu_check.py: items under their own limits, failures recorded rather than raised, the JSON
lines and the table, and the --smoke and --sweep plumbing end to end on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import check_runner
import gpu_check
import gpu_items
from check_runner import Finished, Outcome, failure, markdown_table, run_command
from cli import run_cli
from config import resolve_config
from gpu_items import Context, Item
from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "gpu_check.sh"


def finished(stdout: str = "", stderr: str = "", returncode=0) -> Finished:
    return Finished(["cmd"], returncode, stdout, stderr, 1.5)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def fine(ctx, done):
    return "ok", {"printed": done[-1].stdout.strip()}, "fine"


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_items_are_named_once_and_wait_only_for_earlier_ones():
    names = [item.name for item in gpu_items.ITEMS]
    assert len(set(names)) == len(names)
    for index, item in enumerate(gpu_items.ITEMS):
        assert gpu_check.MIN_START_S < item.budget_s <= gpu_check.TOTAL_S / 3, item.name  # no item eats the rest
        if item.after is not None:
            assert item.after in names[:index], item.name
    # the levers each have an item of their own
    assert {"124m_cuda_graphs", "124m_cudnn_attention", "124m_chunked_head", "124m_sync_per_step",
            "124m_max_batch", "124m_at_max_batch", "speedrun_cold", "speedrun_warm", "default_cold",
            "default_warm", "decode", "decode_batch", "torchrun", "cuda_tests"} <= set(names)


def test_the_whole_sweep_fits_in_one_gpu_check_budget():
    points = len(gpu_items.SWEEP_GRID.steps) * len(gpu_items.SWEEP_GRID.lr_scales)
    assert points * gpu_items.SWEEP_BUDGET_S <= gpu_check.TOTAL_S
    recipe = resolve_config(str(REPO_ROOT / gpu_items.SPEEDRUN_CONFIG), {})
    steps = gpu_items.SWEEP_GRID.steps
    assert min(steps) < recipe.training.max_steps < max(steps)  # the grid brackets the recipe
    assert 1.0 in gpu_items.SWEEP_GRID.lr_scales


def test_sweep_points_scale_every_learning_rate_together():
    items = gpu_items.sweep_items(gpu_items.SweepGrid(steps=(300,), lr_scales=(2.0,)))
    recipe = resolve_config(str(REPO_ROOT / gpu_items.SPEEDRUN_CONFIG), {}).training
    ctx = Context(smoke=False, scratch=Path("/scratch"), dataset="data.txt", target=1.47)
    argv = items[0].commands(ctx)[0]
    value = {flag: argv[i + 1] for i, flag in enumerate(argv) if flag.startswith("--")}
    assert items[0].name == "sweep_300_steps_lr_x2" and value["--max_steps"] == "300"
    assert float(value["--training.lr"]) == pytest.approx(2 * recipe.lr)
    assert float(value["--training.min_lr"]) == pytest.approx(2 * recipe.min_lr)
    assert float(value["--training.muon_lr"]) == pytest.approx(2 * recipe.muon_lr)
    assert value["--target_val_loss"] == "1.47" and value["--dataset"] == "data.txt"


@pytest.mark.parametrize("summary, status, counts", [
    ("7 passed, 3 skipped in 41.20s", "ok", {"passed": 7, "skipped": 3}),
    ("10 skipped in 0.16s", "skipped", {"skipped": 10}),
    ("==== 2 passed, 1 deselected, 1 error in 3.00s ====", "ok", {"passed": 2, "deselected": 1, "error": 1}),
])
def test_pytest_summaries_become_an_outcome(summary, status, counts):
    got_status, figures, headline = gpu_items.read_pytest(None, [finished(stdout=f"..s.\n{summary}\n")])
    assert (got_status, figures) == (status, counts)
    assert headline.endswith(summary.strip("= "))
    assert headline.startswith("no CUDA") == (status == "skipped")


def test_a_failed_command_keeps_its_last_line_and_a_stopped_one_says_so():
    assert failure("x", 10, [finished()]) is None
    failed = failure("x", 10, [finished(stderr="notice: fine\nerror: unknown flag --system.attention_backend\n",
                                        returncode=2)])
    assert failed.status == "failed" and failed.reason == "error: unknown flag --system.attention_backend"
    assert "notice: fine" in failed.stderr_tail
    stopped = failure("x", 10, [finished(), finished(stderr="compiling...", returncode=None)])
    assert stopped.status == "timeout" and stopped.reason == "stopped at its limit of 10 s"
    assert stopped.seconds == 3.0 and stopped.stderr_tail == "compiling..."


def test_the_table_has_a_row_per_item_and_escapes_pipes():
    outcomes = [Outcome("a", "ok", 1.25, 30, "3 | 4"), Outcome("b", "skipped", 0.0, 30, "no CUDA")]
    table = markdown_table("GPU check: CPU", outcomes, "2 items")
    assert table.splitlines()[:2] == ["# GPU check: CPU", ""]
    assert "| a | ok | 1.2 (30) | 3 \\| 4 |" in table and "| b | skipped | 0.0 (30) | no CUDA |" in table
    assert table.rstrip().endswith("2 items")
    assert json.loads(outcomes[0].json_line())["result"] == "3 | 4"


def test_items_that_cannot_run_are_skipped_with_the_reason(tmp_path):
    ctx = Context(smoke=True, scratch=tmp_path, dataset="x.txt", target=4.0)
    never = Item("never", 30, lambda ctx: pytest.fail("started"), fine)
    reasons = {
        "cuda": gpu_check.run_item(ctx, Item("c", 30, never.commands, fine, needs_cuda=True), 100, 300, tmp_path),
        "first": gpu_check.run_item(ctx, Item("w", 30, never.commands, fine, after="cold"), 100, 300, tmp_path),
        "time": gpu_check.run_item(ctx, Item("late", 30, never.commands, fine), 2, 300, tmp_path),
        "warm": gpu_check.run_item(ctx, Item("w", 30, never.commands, fine, after="cold", warm=True), 100, 300,
                                   tmp_path),
    }
    ctx.outcomes["cold"] = Outcome("cold", "timeout", 30, 30, "stopped")
    reasons["failed"] = gpu_check.run_item(ctx, Item("w", 30, never.commands, fine, after="cold"), 100, 300, tmp_path)
    assert all(o.status == "skipped" and o.reason == o.result for o in reasons.values())
    assert reasons["cuda"].reason == "no CUDA: the smoke check runs on the CPU"
    assert reasons["first"].reason == "needs cold before it in the same run (--only cold w)"
    assert reasons["time"].reason == "the 300 s total was spent; run it alone with --only late"
    assert reasons["failed"].reason == "needs cold, which ran out of time"
    assert reasons["warm"].reason == "cold again on its compile cache, and the smoke check compiles nothing"
    with pytest.raises(ValueError, match="item w is warm: it needs the cold item it follows"):
        Item("w", 30, never.commands, fine, warm=True)


def test_bad_arguments_are_one_line(capsys, monkeypatch):
    assert run_cli(gpu_check.main, ["--only", "124m_bass"]) == 2
    assert "unknown item 124m_bass; the items: cuda_tests, token_cache" in capsys.readouterr().err
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert run_cli(gpu_check.main, []) == 2
    assert capsys.readouterr().err.strip() == ("error: no CUDA device here: the GPU check measures a GPU; "
                                               "--smoke runs its plumbing on the CPU")


def test_list_prints_every_item_and_its_limit(capsys):
    assert run_cli(gpu_check.main, ["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(gpu_items.ITEMS) + 1
    assert lines[0].split()[:3] == ["cuda_tests", "150", "s"] and lines[-1].split()[:2] == ["total", "480"]


@pytest.mark.slow
def test_a_limit_stops_the_whole_process_group(tmp_path):
    child_pid = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(child_pid)!r}, 'w').write(str(child.pid)); time.sleep(120)")
    started = time.monotonic()
    done = run_command(python(code), 2.0, tmp_path, dict(os.environ))
    assert done.timed_out and time.monotonic() - started < 2.0 + 3 * check_runner.KILL_GRACE_S
    time.sleep(0.5)
    assert not running(int(child_pid.read_text()))  # the grandchild went with it


def running(pid: int) -> bool:
    """Whether the process runs (a zombie that its new parent has not reaped yet does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.is_file() or stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.slow
def test_a_failing_or_hanging_item_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch, capsys):
    items = (
        Item("unknown_flag", 30, gpu_items.bench(gpu_items.GPT2_CONFIG, "--system.no_such_lever", "on",
                                                  synthetic=True), gpu_items.read_throughput),
        Item("hangs", 30, lambda ctx: [python("import time; time.sleep(60)")], fine),
        Item("prints_nothing", 30, lambda ctx: [python("pass")], gpu_items.read_throughput),
        Item("works", 30, lambda ctx: [python("import sys; print(42); sys.stderr.write('Recompiling function "
                                             "forward\\n' * 2)")], fine),
    )
    monkeypatch.setattr(gpu_items, "ITEMS", items)
    monkeypatch.setattr(gpu_check, "SMOKE_LIMIT_S", 20.0)
    monkeypatch.setattr(check_runner, "KILL_GRACE_S", 0.5)
    monkeypatch.setattr(gpu_check, "run_command",
                        lambda argv, limit_s, cwd, env: run_command(argv, 2.0 if "sleep" in argv[-1] else limit_s,
                                                                    cwd, env))
    assert run_cli(gpu_check.main, ["--smoke", "--out_dir", str(tmp_path)]) == 1  # some item failed
    lines = {line["item"]: line for line in read_lines(tmp_path / "gpu_check_smoke.jsonl")}
    assert list(lines) == [item.name for item in items]
    assert lines["unknown_flag"]["status"] == "failed"
    assert lines["unknown_flag"]["reason"].startswith("error: unknown flag --system.no_such_lever")
    assert lines["hangs"]["status"] == "timeout"
    assert lines["prints_nothing"]["status"] == "failed"
    assert lines["prints_nothing"]["reason"].startswith("ran, but its figures could not be read")
    assert lines["works"]["status"] == "ok" and lines["works"]["figures"] == {"printed": "42", "recompilations": 2}
    assert lines["works"]["result"] == "fine; 2 recompilations (logs/ say why)"
    table = (tmp_path / "gpu_check_smoke.md").read_text()
    assert table in capsys.readouterr().out and "| works | ok |" in table
    assert "## stdout\n42\n" in (tmp_path / "logs" / "gpu_check_smoke" / "works.log").read_text()


def run_script(*flags: str, out_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run([str(SCRIPT), *flags, "--out_dir", str(out_dir)], env=env, capture_output=True,
                          text=True, timeout=1800)


@pytest.mark.slow
def test_the_smoke_check_runs_every_item_on_the_cpu(tmp_path):
    done = run_script("--smoke", out_dir=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = {line["item"]: line for line in read_lines(tmp_path / "gpu_check_smoke.jsonl")}
    assert list(lines) == [item.name for item in gpu_items.ITEMS]
    for name, line in lines.items():
        assert line["status"] in ("ok", "skipped"), (name, line["reason"], line["stderr_tail"])
        assert line["status"] == "ok" or line["reason"], name
        assert line["status"] == "skipped" or line["figures"]["recompilations"] == 0, name  # compile is off
    skipped = {name for name, line in lines.items() if line["status"] == "skipped"}
    assert skipped == {"cuda_tests", "124m_compile_default", "124m_cuda_graphs", "124m_cudnn_attention",
                       "124m_max_batch", "124m_at_max_batch", "speedrun_warm", "default_warm"}
    assert lines["cuda_tests"]["reason"].startswith("no CUDA: ") and lines["cuda_tests"]["figures"]["skipped"] > 0
    for name in ("speedrun_cold", "default_cold"):
        figures = lines[name]["figures"]
        assert figures["val_loss_over"] == "the whole validation split" and figures["best_val_loss"] > 0
        assert "seconds_to_target" in figures and figures["device"] == "cpu"
    assert lines["124m_base"]["figures"]["tokens_per_s"] > 0
    assert lines["124m_chunked_head"]["command"].endswith("--model.loss_chunk_size 8192")
    assert lines["decode"]["figures"]["decode_tokens_per_s"] > 0
    assert lines["decode"]["figures"]["eager_decode_tokens_per_s"] > 0
    batch = lines["decode_batch"]["figures"]
    assert batch["samples"] == gpu_items.DECODE_BATCH and batch["decode_tokens_per_s"] > 0
    assert batch["alone_decode_tokens_per_s"] == lines["decode"]["figures"]["decode_tokens_per_s"]
    assert lines["torchrun"]["figures"]["steps"] == 20 and lines["torchrun"]["figures"]["val_loss"] > 0
    table = (tmp_path / "gpu_check_smoke.md").read_text()
    assert table.startswith("# GPU check --smoke: CPU, torch ") and table in done.stdout
    assert all(f"| {name} | {line['status']} |" in table for name, line in lines.items())


@pytest.mark.slow
def test_the_smoke_sweep_writes_one_line_per_grid_point(tmp_path):
    done = run_script("--smoke", "--sweep", out_dir=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = read_lines(tmp_path / "gpu_sweep_smoke.jsonl")
    grid = gpu_items.SMOKE_SWEEP_GRID
    assert [(line["figures"]["max_steps"], line["status"]) for line in lines] == \
        [(steps, "ok") for steps in grid.steps for _ in grid.lr_scales]
    rates = [line["figures"]["muon_lr"] for line in lines]
    assert rates[1] == pytest.approx(rates[0] * grid.lr_scales[1] / grid.lr_scales[0])
    assert all(" steps, lr " in line["result"] and "(best " in line["result"] for line in lines)
    assert (tmp_path / "gpu_sweep_smoke.md").read_text().count("| sweep_") == len(lines)
