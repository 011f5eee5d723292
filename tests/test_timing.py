"""The time of a run, known before it starts: a timed step, its cache, the whole-run formula,
and --show_config's [time] section; system.threads."""
from __future__ import annotations

import json

import pytest
import torch

import timing
import train
from config import Config, DataConfig, ModelConfig, SystemConfig, TrainingConfig
from errors import UserError
from tests.conftest import CPU_THREADS


def test_the_whole_run_is_its_steps_and_its_evaluations():
    t = TrainingConfig(eval_interval=250, eval_iters=20, eval_train_iters=10, grad_accum_steps=2)
    run = timing.run_seconds(t, 0, 2000, step_s=3.0, batches=30)
    assert (run.steps, run.evaluations) == (2000, 8)
    assert run.evaluation_s == pytest.approx(30 / 3 * 3.0 / 2)  # forward passes of micro-batches
    assert run.total_s == pytest.approx(2000 * 3.0 + 8 * 15.0)
    rest = timing.run_seconds(t, 300, 1010, step_s=1.0, batches=30)  # resumed at 300; ends off the interval
    assert (rest.steps, rest.evaluations) == (710, 4)  # 500, 750, 1000 and the last step
    assert timing.run_seconds(t, 1010, 1010, 1.0, 30).total_s == 0
    timed = timing.run_seconds(t, 0, 2000, step_s=3.0, batches=30, eval_batch_s=0.4)  # the probe's figure
    assert timed.evaluation_s == pytest.approx(30 * 0.4)


def test_an_evaluation_scores_its_batches_or_the_whole_validation_split():
    t = TrainingConfig(batch_size=8, eval_iters=20, eval_train_iters=5)
    assert timing.eval_batches(t, block_size=256, val_tokens=31_339) == 25
    t.eval_full_val = True  # 122 windows of 256 tokens, in batches of 8, then the train batches
    assert timing.eval_batches(t, block_size=256, val_tokens=31_339) == 16 + 5


def tiny_cpu_config(tmp_path) -> Config:
    return Config(model=ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32),
                  data=DataConfig(cache_dir=str(tmp_path / "cache")), training=TrainingConfig(batch_size=4),
                  system=SystemConfig(device="cpu", dtype="float32"))


def test_a_step_is_timed_once_per_shape_then_read_from_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(timing.ENVIRONMENT_VARIABLE)
    cfg = tiny_cpu_config(tmp_path)
    first = timing.cpu_step_estimate(cfg, torch.float32)
    assert 0 < first.seconds < 5 and "timed here just now" in first.source
    assert "timing a training step of this model in float32" in capsys.readouterr().err
    entry = json.loads((tmp_path / "cache" / timing.CACHE_FILE).read_text())[timing.probe_key(cfg)]
    assert entry["float32_s"] == first.seconds and "bfloat16_s" not in entry
    assert entry["float32_eval_batch_s"] == first.eval_batch_s and 0 < first.eval_batch_s < first.seconds

    monkeypatch.setattr(timing, "time_steps", lambda *args: pytest.fail("timed again"))
    again = timing.cpu_step_estimate(cfg, torch.float32)
    assert (again.seconds, again.eval_batch_s) == (first.seconds, first.eval_batch_s)
    assert f"timed on this machine at {entry['measured']}" in again.source
    timing.remember(cfg, {torch.bfloat16: timing.ProbeTimes(0.25, 0.05)})  # the dtype probe's, in the same entry
    both = timing.cached_times(cfg)
    assert both.times == {"float32": timing.ProbeTimes(first.seconds, first.eval_batch_s),
                          "bfloat16": timing.ProbeTimes(0.25, 0.05)}
    entry = json.loads((tmp_path / "cache" / timing.CACHE_FILE).read_text())[timing.probe_key(cfg)]
    assert both.measured == entry["measured"]


@pytest.mark.parametrize("entry, expected", [
    ({"float32_s": "fast", "bfloat16_s": 0, "measured": "noon"}, {}),  # edited into no time: timed again
    ({"float32_s": 0.2, "float32_eval_batch_s": float("nan")}, {"float32": timing.ProbeTimes(0.2, None)}),
    (["not", "an", "entry"], {}),
])
def test_a_cached_figure_that_is_no_time_counts_as_absent(tmp_path, entry, expected):
    cfg = tiny_cpu_config(tmp_path)
    cache = tmp_path / "cache" / timing.CACHE_FILE
    cache.parent.mkdir()
    cache.write_text(json.dumps({timing.probe_key(cfg): entry}))
    assert timing.cached_times(cfg).times == expected


@pytest.mark.parametrize("value", ["0.25", "fast", "0", "-1", "nan"])
def test_the_environment_variable_stands_in_for_the_timing(tmp_path, monkeypatch, value):
    monkeypatch.setenv(timing.ENVIRONMENT_VARIABLE, value)
    monkeypatch.setattr(timing, "time_steps", lambda *args: pytest.fail("timed"))
    if value != "0.25":
        with pytest.raises(UserError, match=f"GPT_TRAINER_STEP_TIME_S={value} is no number of seconds"):
            timing.cpu_step_estimate(tiny_cpu_config(tmp_path), torch.float32)
        return
    estimate = timing.cpu_step_estimate(tiny_cpu_config(tmp_path), torch.float32)
    assert (estimate.seconds, estimate.source) == (0.25, "set by GPT_TRAINER_STEP_TIME_S")


def show_config(capsys, *flags: str) -> str:
    try:
        assert train.main([*flags, "--show_config"]) == 0
    finally:
        torch.set_num_threads(CPU_THREADS)  # --system.threads is applied for real
    return capsys.readouterr().out


def test_show_config_gives_the_time_of_the_whole_run(capsys, tiny_config_file):
    """0.5 s a step (conftest's stand-in): 100 steps, then 2 evaluations of 10 + 5 batches at a
    third of a step each."""
    out = show_config(capsys, "--config", str(tiny_config_file), "--max_steps", "100",
                      "--eval_interval", "50", "--eval_iters", "10", "--training.eval_train_iters", "5")
    rows = [" ".join(line.split()) for line in out.split("[time: derived]")[1].splitlines()]
    assert rows[1:] == ["step 500 ms (set by GPT_TRAINER_STEP_TIME_S)",
                        "whole run about 55s: 100 steps x 500ms + 2 evaluations x 2.5s"]


def test_off_the_cpu_the_run_times_itself(tmp_path):
    cuda = train.DeviceInfo(torch.device("cuda", 0), torch.bfloat16, True)
    rows = timing.describe_estimate(tiny_cpu_config(tmp_path), cuda, 100, None)
    assert rows[0][0] == "whole run" and "progress lines" in rows[0][1]


def test_system_threads_sets_the_threads_that_are_timed_and_trained_with(capsys, tiny_config_file):
    out = show_config(capsys, "--config", str(tiny_config_file), "--system.threads", "1")
    assert "cpu, float32, compile off, 1 CPU thread\n" in out
    with pytest.raises(UserError, match="system.threads must be positive, got 0"):
        train.main(["--config", str(tiny_config_file), "--system.threads", "0", "--show_config"])


def test_a_timed_evaluation_batch_prices_the_evaluations(tmp_path, monkeypatch):
    """The probe times an evaluation batch too: on a CPU it costs a fifth of a step, not EVAL_COST's third."""
    monkeypatch.delenv(timing.ENVIRONMENT_VARIABLE)
    cfg = tiny_cpu_config(tmp_path)
    cfg.training.eval_interval, cfg.training.eval_iters, cfg.training.eval_train_iters = 50, 10, 5
    timing.remember(cfg, {torch.float32: timing.ProbeTimes(step_s=2.0, eval_batch_s=0.3)})
    system = train.DeviceInfo(torch.device("cpu"), torch.float32, False)
    rows = dict(timing.describe_estimate(cfg, system, 100, None))
    assert rows["evaluation batch"] == "300 ms (forward only, timed with the step)"
    assert rows["whole run"] == "about 3m29s: 100 steps x 2.0s + 2 evaluations x 4.5s"  # 15 batches x 0.3 s
