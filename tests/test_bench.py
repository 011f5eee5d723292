"""bench.py: the JSON record of a real (tiny) run, synthetic data, the max-batch search."""
from __future__ import annotations

import json

import pytest

import bench
from cli import run_cli


def test_bench_prints_one_json_line(workdir, tiny_config_file, capsys):
    assert run_cli(bench.main, ["--config", str(tiny_config_file), "--steps", "6", "--log_interval", "1",
                                "--target_val_loss", "100"]) == 0
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert len(out) == 1
    assert "[files]" in captured.err and "when bench.py ends; --keep keeps them)" in captured.err
    record = json.loads(out[0])
    for key in ("device", "dtype", "compile", "params", "tokens_per_step", "median_ms_per_step",
                "tokens_per_s", "mfu", "tflops", "peak_memory_mb", "seconds_to_target", "final_val_loss"):
        assert key in record, key
    assert record["device"] == "cpu" and record["tokens_per_step"] == 64 and record["mfu"] is None
    assert record["compile_mode"] is None and record["data_on_device"] is False
    assert record["compiled"] is None and record["first_step_s"] > 0
    assert record["steps"] == 3  # the target (100) is reached at the first evaluation
    assert record["seconds_to_target"] > 0 and record["final_val_loss"] < 100
    assert not list(workdir.glob("models/*"))  # the run directory was temporary


def test_bench_on_synthetic_tokens(workdir, tiny_config_file, capsys):
    assert run_cli(bench.main, ["--config", str(tiny_config_file), "--synthetic", "--model.vocab_size", "64",
                                "--steps", "4", "--log_interval", "1"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["steps"] == 4 and record["seconds_to_target"] is None
    assert record["final_val_loss"] == pytest.approx(4.16, abs=0.15)  # random tokens: about ln 64


def test_a_synthetic_run_scores_a_few_batches_not_the_whole_split(workdir, tiny_config_file, monkeypatch,
                                                                   capsys):
    """Random tokens: the loss means nothing, so scoring all of its 200k-token split is waste."""
    scored = []
    eval_batches = bench.Trainer._eval_batches

    def counting(trainer, split):
        batches = list(eval_batches(trainer, split))
        scored.append((split, len(batches)))
        return iter(batches)

    monkeypatch.setattr(bench.Trainer, "_eval_batches", counting)
    assert run_cli(bench.main, ["--config", str(tiny_config_file), "--synthetic", "--model.vocab_size", "64",
                                "--steps", "3", "--eval_iters", "50", "--training.eval_train_iters", "50",
                                "--system.dtype", "float32"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert scored == [("train", 3), ("val", 3)]  # one evaluation, at the end, of 3 batches a split
    assert record["val_loss_over"] == "3 random batches of synthetic tokens"


def test_bench_tokenize_times_a_fresh_cache(workdir, tiny_config_file, small_corpus_file, capsys):
    assert run_cli(bench.main, ["--config", str(tiny_config_file), "--dataset", str(small_corpus_file),
                                "--tokenize"]) == 0
    record = json.loads(capsys.readouterr().out)
    size = small_corpus_file.stat().st_size
    assert record["files"] == 1 and record["megabytes"] == round(size / 1e6, 1) and record["workers"] == 1
    assert record["tokens"] == len(small_corpus_file.read_text()) + 1  # characters and <|endoftext|>
    assert record["megabytes_per_s"] > 0 and record["peak_rss_mb"] > 0
    assert not (workdir / "cache").exists()  # built in the temporary directory, then removed


def test_bench_errors(workdir, tiny_config_file, capsys):
    assert run_cli(bench.main, ["--config", str(tiny_config_file), "--synthetic"]) == 2
    assert "--synthetic needs model.vocab_size" in capsys.readouterr().err
    assert run_cli(bench.main, ["--config", str(tiny_config_file), "--steps", "0"]) == 2
    assert capsys.readouterr().err == "error: --steps must be at least 1, got 0\n"  # the flag typed, not max_steps
    for flag in ("--max_batch", "--at_max_batch"):
        assert run_cli(bench.main, ["--config", str(tiny_config_file), flag]) == 2
        assert "--max_batch and --at_max_batch search GPU memory" in capsys.readouterr().err
    # said before the data is read: this one would be a download (it failed for want of a network)
    assert run_cli(bench.main, ["--config", str(tiny_config_file), "--max_batch", "--dataset", "shakespeare_char",
                                "--data.cache_dir", str(workdir / "downloads")]) == 2
    assert "search GPU memory" in capsys.readouterr().err and not (workdir / "downloads").exists()


@pytest.mark.parametrize("largest", [0, 1, 2, 3, 7, 48, 1000, 1 << 16])
def test_max_batch_search_finds_the_edge(largest):
    tried = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= largest

    assert bench.find_max_batch(fits) == largest
    assert len(tried) <= 2 * 17 + 1  # doubling then bisection, not a scan


def test_at_max_batch_benchmarks_at_the_largest_micro_batch_found(workdir, tiny_config_file, monkeypatch,
                                                                   capsys):
    searched = []

    def found(cfg, vocab):
        searched.append(cfg.model.loss_chunk_size)  # the search sees the run's model settings
        return {"device": "NVIDIA H200", "block_size": 16, "max_batch": 3, "peak_memory_mb": 90,
                "total_memory_mb": 100}

    monkeypatch.setattr(bench, "max_batch", found)
    monkeypatch.setattr(bench, "searched_gpu", lambda cfg: None)  # the found batch stands for a GPU's
    assert run_cli(bench.main, ["--config", str(tiny_config_file), "--synthetic", "--model.vocab_size", "64",
                                "--steps", "2", "--at_max_batch", "--model.loss_chunk_size", "7"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert searched == [7]
    assert record["batch_size"] == 3 and record["tokens_per_step"] == 3 * 16 and record["loss_chunk_size"] == 7
    assert record["attention_backend"] == "auto"
    assert "largest micro-batch that fits: 3 (peak 90 MiB of 100); benchmarking at it" in captured.err


def test_at_max_batch_without_room_for_one_sequence_is_one_line(workdir, tiny_config_file, monkeypatch, capsys):
    monkeypatch.setattr(bench, "max_batch", lambda cfg, vocab: {"device": "NVIDIA T4", "block_size": 16,
                                                               "max_batch": 0, "peak_memory_mb": 0,
                                                               "total_memory_mb": 100})
    monkeypatch.setattr(bench, "searched_gpu", lambda cfg: None)
    assert run_cli(bench.main, ["--config", str(tiny_config_file), "--synthetic", "--model.vocab_size", "64",
                                "--at_max_batch"]) == 2
    assert "not even one sequence of 16 tokens fits a training step in NVIDIA T4's memory" in capsys.readouterr().err
