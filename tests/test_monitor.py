"""What a person sees of a run: summaries, progress, metrics.csv, plots, report, MFU."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import matplotlib.image
import pytest
import torch

import monitor
import plot
import plotting
import run_description
import train
from checkpoint import load_checkpoint
from cli import run_cli
from config import Config
from metrics import COLUMNS, MetricsLog, read_metrics
from model import GPT
from tests.conftest import REPO_ROOT
from utils import DeviceInfo, peak_flops

TINY = str(REPO_ROOT / "configs" / "tiny.json")


def run(config_file: Path, *flags: str) -> int:
    return run_cli(train.main, ["--config", str(config_file), *flags])


def counts(rows: list[dict]) -> tuple[int, int]:
    return (sum(r["kind"] == "train" for r in rows), sum(r["kind"] == "eval" for r in rows))


def test_metrics_rows_after_a_run_and_after_a_resume(workdir, tiny_config_file):
    assert run(tiny_config_file) == 0  # 6 steps, a report every step, evaluations at 3 and 6
    path = workdir / "models/tiny_test/metrics.csv"
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    straight = read_metrics(path)
    assert counts(straight) == (6, 2)
    assert [r["step"] for r in straight if r["kind"] == "eval"] == ["3", "6"]
    last = straight[-1]
    assert float(last["val_bits_per_char"]) == pytest.approx(float(last["val_loss"]) / 0.693147, rel=1e-4)
    assert run(tiny_config_file, "--out_dir", "split", "--max_steps", "3") == 0
    assert counts(read_metrics(workdir / "split/metrics.csv")) == (3, 1)
    assert run(tiny_config_file, "--out_dir", "split", "--max_steps", "6", "--resume") == 0
    resumed = read_metrics(workdir / "split/metrics.csv")
    assert counts(resumed) == (6, 2)
    assert [(r["kind"], r["step"]) for r in resumed] == [(r["kind"], r["step"]) for r in straight]
    elapsed = [float(r["elapsed_s"]) for r in resumed]
    assert elapsed == sorted(elapsed)  # time goes on across the resume


def test_resuming_an_older_checkpoint_drops_the_rows_after_it(workdir, tiny_config_file):
    assert run(tiny_config_file, "--eval_interval", "3", "--training.keep_last", "3") == 0
    run_dir = workdir / "models/tiny_test"
    assert run(tiny_config_file, "--resume", str(run_dir / "ckpt-3.pt")) == 0
    rows = read_metrics(run_dir / "metrics.csv")
    steps = [(r["kind"], int(r["step"])) for r in rows]
    assert len(steps) == len(set(steps)) == 8  # no row twice, none lost


def test_metrics_log_refuses_unknown_columns(tmp_path):
    log = MetricsLog(tmp_path / "m.csv", resume_step=None)
    with pytest.raises(ValueError, match="unknown metrics columns"):
        log.append({"step": 1, "loss": 2.0})


def test_plots_are_written_and_decodable(workdir, tiny_config_file):
    assert run(tiny_config_file, "--training.plot_milestone_interval", "3") == 0
    run_dir = workdir / "models/tiny_test"
    for path in (run_dir / "loss.png", run_dir / "plots/loss_step3.png", run_dir / "plots/loss_step6.png"):
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    assert run_cli(plot.main, [str(run_dir), str(run_dir), "--out", "both.png"]) == 0
    assert matplotlib.image.imread(workdir / "both.png").shape[0] > 100


def test_the_plot_is_drawn_off_the_training_thread_and_current_at_the_end(tmp_path, monkeypatch):
    rows = [{"kind": "train", "step": str(step), "train_loss": str(4.0 - step / 10), "val_loss": "",
             "lr": "0.001"} for step in range(1, 6)]
    rows.insert(3, {"kind": "eval", "step": "3", "train_loss": "3.7", "val_loss": "3.8", "lr": ""})
    drawn = []
    real_draw = plotting.draw_loss_plot

    def recording(runs, path, title=None):
        drawn.append((threading.current_thread().name, len(runs[0][1])))
        real_draw(runs, path, title)

    monkeypatch.setattr(plotting, "draw_loss_plot", recording)
    plotter = plotting.LossPlotter(tmp_path / "loss.png", "run")
    plotter.redraw(rows[:4], milestone=tmp_path / "plots/loss_step3.png")
    plotter.finish(rows[:4])  # nothing came since: no second drawing
    assert drawn == [("plotter", 4)]
    plotter.redraw(rows[:5])
    plotter.finish(rows)  # a run stopped between evaluations: the rows since are drawn too
    assert drawn == [("plotter", 4), ("plotter", 5), ("MainThread", 6)]
    for path in (tmp_path / "loss.png", tmp_path / "plots/loss_step3.png"):
        assert matplotlib.image.imread(path).shape[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "plots"]  # no temporary file left


def test_plot_command_errors(workdir, capsys):
    assert run_cli(plot.main, ["models/none"]) == 2
    assert "metrics.csv does not exist" in capsys.readouterr().err
    Path("odd.csv").write_text("a,b\n1,2\n")
    assert run_cli(plot.main, ["odd.csv"]) == 2
    assert "not a metrics.csv written by this trainer" in capsys.readouterr().err


def test_a_plotting_failure_never_stops_training(workdir, tiny_config_file, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plotting, "draw_loss_plot", broken)
    assert run(tiny_config_file) == 0
    err = capsys.readouterr().err
    assert err.count("could not draw") == 1 and "no fonts" in err
    assert load_checkpoint(workdir / "models/tiny_test/ckpt.pt")["step"] == 6


def test_report_holds_the_config_summary_environment_and_plot(workdir, tiny_config_file):
    assert run(tiny_config_file) == 0
    report = (workdir / "models/tiny_test/report.md").read_text()
    for part in ("## Summary", "finished: trained to step 6", "losses: best", "## Config",
                 '"n_embd": 32', '"seed": 1337', "## Environment", f"`{torch.__version__}`",
                 "git_commit", "![loss curves](loss.png)"):
        assert part in report, part
    environment = load_checkpoint(workdir / "models/tiny_test/ckpt.pt")["environment"]
    assert environment["torch"] == str(torch.__version__) and environment["command"]


def test_summaries_before_and_after(workdir, tiny_config_file, capsys):
    assert run(tiny_config_file) == 0
    out = capsys.readouterr().out
    before, after = out.split("estimated time")[0], out.split("[run]")[-1]
    for pattern in (r"shape +2 layers, 2 heads, 32 wide, context 16", r"vocabulary +\d+",
                    r"tokens per step +64 = batch 4 x accumulation 1 x context 16", r"total tokens +384",
                    r"device +cpu, float32, compile off, \d+ CPU threads?", r"output +models/tiny_test"):
        assert re.search(pattern, before), pattern
    for pattern in (r"tokens seen +384", r"throughput +[\d,]+ tokens/s, [\d.]+ TFLOP/s, MFU n/a",
                    r"best +train [\d.]+, val [\d.]+ \(step \d\)", r"peak process RSS +[\d,]+ MiB",
                    r"report +models/tiny_test/report.md"):
        assert re.search(pattern, after), pattern


@pytest.mark.parametrize("log_interval, estimate", [
    ("3", r"estimated time to step 6: about \S+ \([\d.]+ ms/step, 2 evaluations\)\n"),  # step 3's and 6's
    ("2", r"estimated time to step 6: about \S+ \([\d.]+ ms/step, 2 evaluations\)\n"),  # 3 and 6, after 2
    ("6", None)])  # the first report is the last step: nothing left to estimate (it said "about 0ms")
def test_the_estimate_counts_the_evaluations_left_and_comes_only_while_steps_are(
        workdir, tiny_config_file, capsys, log_interval, estimate):
    assert run(tiny_config_file, "--log_interval", log_interval) == 0  # 6 steps, evaluations at 3 and 6
    out = capsys.readouterr().out
    assert re.search(estimate, out) if estimate else "estimated time" not in out


@pytest.mark.slow
def test_redirected_output_has_no_escape_codes(workdir, small_corpus_file):
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "--config", TINY, "--dataset", str(small_corpus_file),
         "--device", "cpu", "--system.dtype", "float32", "--max_steps", "4", "--eval_interval", "2",
         "--eval_iters", "2", "--log_interval", "2"],
        cwd=workdir, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\r" not in done.stdout
    assert re.search(r"^step +2/4 +loss [\d.]+ +lr", done.stdout, re.M)


@pytest.mark.slow
def test_a_terminal_gets_a_progress_bar_and_colours(workdir, small_corpus_file):
    """Run under a pseudo-terminal, as a person's shell would."""
    args = [sys.executable, str(REPO_ROOT / "train.py"), "--config", TINY, "--dataset",
            str(small_corpus_file), "--device", "cpu", "--system.dtype", "float32", "--max_steps", "4",
            "--eval_interval", "2", "--eval_iters", "2", "--log_interval", "2"]
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm"}
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns
    process = subprocess.Popen(args, cwd=workdir, stdin=secondary, stdout=secondary, stderr=secondary,
                               env=env, close_fds=True)
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=120) == 0
    text = output.decode(errors="replace")
    assert "4/4" in text and ("step/s" in text or "s/step" in text)  # tqdm's bar
    assert "\x1b[1m[model]" in text  # bold headings on a terminal
    assert not re.search(r"^step +2/4 ", text, re.M)  # no plain lines under a bar


def test_colours_only_on_a_terminal_without_no_color(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert run_description.Style().bold("x") == "\x1b[1mx\x1b[0m"
    monkeypatch.setenv("NO_COLOR", "1")
    assert run_description.Style().bold("x") == "x"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    monkeypatch.delenv("NO_COLOR")
    assert run_description.Style().bold("x") == "x"


def test_mfu_matches_a_hand_computation():
    cfg = Config()
    cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size = 2, 2, 32, 16
    cfg.model.vocab_size, cfg.system.peak_tflops = 50, 1.0
    model = GPT(cfg.model)
    # by hand: 12*C^2 + 2*C per block, a final LayerNorm, token and position embeddings
    params = 2 * (12 * 32 * 32 + 2 * 32) + 32 + 50 * 32 + 16 * 32
    assert model.num_params() == params
    flops_per_token = 6 * (params - 16 * 32) + 12 * 2 * 32 * 16
    assert model.flops_per_token() == flops_per_token == 6 * 26_336 + 12_288
    cpu = DeviceInfo(torch.device("cpu"), torch.float32, False)

    def facts(flops_per_token: int) -> monitor.RunFacts:
        return monitor.RunFacts(params, 0, 50, 1000, 100, 10, flops_per_token=flops_per_token)

    watcher = monitor.RunMonitor(cfg, cpu, facts(model.flops_per_token()), Path("."))
    mfu, tflops = watcher.throughput(tokens_per_s=2_000_000)
    assert tflops == pytest.approx(flops_per_token * 2e6 / 1e12)
    assert mfu == pytest.approx(flops_per_token * 2e6 / 1e12)  # peak 1 TFLOP/s
    cfg.system.peak_tflops = None
    assert monitor.RunMonitor(cfg, cpu, facts(1), Path(".")).throughput(1e6)[0] is None


@pytest.mark.parametrize("name, dtype, tf32, expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, True, 989.4e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, True, 756.5e12),
    ("NVIDIA H200", torch.float16, True, 989.4e12),
    ("NVIDIA A100-SXM4-80GB", torch.float32, True, 156e12),
    ("NVIDIA A100-SXM4-80GB", torch.float32, False, 19.5e12),
    ("NVIDIA A10", torch.bfloat16, True, 125e12),
    ("NVIDIA L40S", torch.bfloat16, True, 362.1e12),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, True, 165.2e12),
    ("Some Future GPU", torch.bfloat16, True, None),
])
def test_peak_flops_table(monkeypatch, name, dtype, tf32, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), dtype, tf32) == expected
    assert peak_flops(torch.device("cpu"), dtype, tf32) is None
    assert peak_flops(torch.device("cpu"), dtype, tf32, override_tflops=2.0) == 2e12


def test_deterministic_switch(workdir, tiny_config_file):
    try:
        assert run(tiny_config_file, "--system.deterministic", "true", "--max_steps", "2") == 0
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_summary_names_the_schedule_in_use():
    t = Config().training
    t.warmup_steps, t.lr, t.min_lr = 30, 3e-3, 3e-4
    assert run_description.describe_schedule(t, 300) == "warmup 30 steps to 0.003, cosine to 0.0003 at step 300"
    t.schedule, t.cooldown_fraction = "wsd", 0.3
    assert run_description.describe_schedule(t, 300) == (
        "warmup 30 steps to 0.003, stable until step 219, linear cooldown to 0.0003 at step 300")  # 30% of 270
    assert run_description.describe_schedule(t, 20) == (  # it said "cooldown to 0.0003 at step 20" here
        "warmup 30 steps to 0.003, longer than the run: it climbs to 0.002 by the last step and never decays")
