"""`dtype auto` on every kind of machine, with the hardware faked: AVX2 only, AVX-512 BF16,
AMX, Apple MPS, CUDA with and without bfloat16; the timing, its cache and its sentence."""
from __future__ import annotations

import json
import re

import pytest
import torch

import precision
import timing
import train
import utils
from checkpoint import load_checkpoint
from config import Config, DataConfig, ModelConfig, SystemConfig, TrainingConfig
from errors import UserError
from precision import choose_cpu_dtype

CPU_KINDS = {  # what torch.cpu's checks answer on each kind: (AVX-512 BF16, AMX tiles)
    "avx2": (False, False),
    "avx512_bf16": (True, False),
    "amx": (True, True),
}


@pytest.fixture
def cpu_kind(request, monkeypatch):
    """Pretend the CPU is of the kind named by the test's parameter; let auto decide for real."""
    avx512_bf16, amx = CPU_KINDS[request.param]
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.delenv(precision.ENVIRONMENT_VARIABLE, raising=False)
    return request.param


def step_times(float32_s: float, bfloat16_s: float) -> dict[torch.dtype, timing.ProbeTimes]:
    return {torch.float32: timing.ProbeTimes(float32_s), torch.bfloat16: timing.ProbeTimes(bfloat16_s)}


@pytest.fixture
def timings(monkeypatch):
    """Replace the timed probe by given figures; record each time it is asked to measure."""
    calls: list[Config] = []
    figures = {"times": step_times(float32_s=0.14, bfloat16_s=0.10)}

    def fake(cfg: Config) -> dict[torch.dtype, timing.ProbeTimes]:
        calls.append(cfg)
        return figures["times"]

    monkeypatch.setattr(precision, "time_training_step", fake)
    return calls, figures


def run_config(tmp_path, dtype: str = "auto", **model) -> Config:
    sizes = {**dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32), **model}
    return Config(model=ModelConfig(**sizes), data=DataConfig(cache_dir=str(tmp_path / "cache")),
                  training=TrainingConfig(batch_size=4), system=SystemConfig(device="cpu", dtype=dtype))


def cpu_system(processes: int = 1) -> utils.DeviceInfo:
    return utils.DeviceInfo(torch.device("cpu"), torch.float32, False, processes)


@pytest.mark.parametrize("cpu_kind", ["avx2"], indirect=True)
def test_a_cpu_without_native_bf16_trains_in_float32_without_timing(cpu_kind, timings, tmp_path):
    chosen = choose_cpu_dtype(run_config(tmp_path), cpu_system())
    assert chosen.dtype == torch.float32
    assert chosen.dtype_reason == "float32: bfloat16 is emulated on this CPU (no AVX-512 BF16 or AMX)"
    assert timings[0] == []


@pytest.mark.parametrize("cpu_kind", ["avx512_bf16", "amx"], indirect=True)
@pytest.mark.parametrize("float32_s, bfloat16_s, expected, reason", [
    (0.14, 0.10, torch.bfloat16, "bfloat16: measured 1.40x faster than float32 here (a step: float32 140 ms, bfloat16 100 ms)"),
    (0.112, 0.154, torch.float32, "float32: measured 1.38x faster than bfloat16 here (a step: float32 112 ms, bfloat16 154 ms)"),
    (0.105, 0.100, torch.float32, "float32: bfloat16 measured only 1.05x faster here, not worth its lower "
                                  "precision (it needs 1.1x) (a step: float32 105 ms, bfloat16 100 ms)"),
    (0.088, 0.0882, torch.float32, "float32: measured as fast as bfloat16 here, and more precise "
                                   "(a step: float32 88 ms, bfloat16 88 ms)"),
])
def test_a_cpu_with_native_bf16_takes_the_dtype_measured_faster(cpu_kind, timings, tmp_path, float32_s,
                                                                 bfloat16_s, expected, reason):
    calls, figures = timings
    figures["times"] = step_times(float32_s, bfloat16_s)
    chosen = choose_cpu_dtype(run_config(tmp_path), cpu_system())
    assert (chosen.dtype, chosen.dtype_reason) == (expected, reason)
    assert len(calls) == 1


@pytest.mark.parametrize("cpu_kind", ["amx"], indirect=True)
def test_the_measurement_is_cached_per_machine_and_shape(cpu_kind, timings, tmp_path):
    calls, figures = timings
    cfg = run_config(tmp_path)
    first = choose_cpu_dtype(cfg, cpu_system())
    figures["times"] = step_times(0.1, 0.2)  # not asked again for the same shape
    assert choose_cpu_dtype(cfg, cpu_system()) == first
    assert len(calls) == 1
    wider = run_config(tmp_path, n_embd=32)
    assert choose_cpu_dtype(wider, cpu_system()).dtype == torch.float32  # another shape: timed
    assert len(calls) == 2
    entries = json.loads((tmp_path / "cache" / timing.CACHE_FILE).read_text())
    assert len(entries) == 2
    assert all(utils.cpu_name() in key and f"{torch.get_num_threads()} threads" in key for key in entries)


@pytest.mark.parametrize("cpu_kind", ["amx"], indirect=True)
def test_a_damaged_cache_is_measured_again_and_rewritten(cpu_kind, timings, tmp_path):
    cfg = run_config(tmp_path)
    cache = tmp_path / "cache" / timing.CACHE_FILE
    cache.parent.mkdir()
    cache.write_text("{not json")
    assert choose_cpu_dtype(cfg, cpu_system()).dtype == torch.bfloat16
    assert len(timings[0]) == 1
    assert timing.probe_key(cfg) in json.loads(cache.read_text())


@pytest.mark.parametrize("cpu_kind", ["amx"], indirect=True)
@pytest.mark.parametrize("entry", [{"float32_s": 0.1, "bfloat16_s": 0}, {"float32_s": "NaN", "bfloat16_s": 0.1},
                                   {"float32_s": -1, "bfloat16_s": 0.1}, {"float32_s": 0.1}])
def test_an_impossible_cached_entry_is_timed_again(cpu_kind, timings, tmp_path, entry):
    cfg = run_config(tmp_path)
    cache = tmp_path / "cache" / timing.CACHE_FILE
    cache.parent.mkdir()
    cache.write_text(json.dumps({timing.probe_key(cfg): entry}))
    assert choose_cpu_dtype(cfg, cpu_system()).dtype == torch.bfloat16
    assert len(timings[0]) == 1


@pytest.mark.parametrize("cpu_kind", ["avx512_bf16", "amx"], indirect=True)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_resumed_run_keeps_the_dtype_it_was_trained_in(cpu_kind, timings, tmp_path, dtype):
    chosen = choose_cpu_dtype(run_config(tmp_path), cpu_system(processes=2), continuing=dtype)
    assert (chosen.dtype, chosen.dtype_reason) == (getattr(torch, dtype), f"{dtype}: as the run this continues "
                                                                          "was trained")
    assert timings[0] == []


@pytest.mark.parametrize("cpu_kind", ["avx2"], indirect=True)
def test_a_run_resumed_on_a_cpu_without_native_bf16_goes_on_in_float32(cpu_kind, timings, tmp_path):
    assert choose_cpu_dtype(run_config(tmp_path), cpu_system(), continuing="bfloat16").dtype == torch.float32


@pytest.mark.parametrize("cpu_kind", ["amx"], indirect=True)
def test_torchrun_processes_do_not_time_each_other(cpu_kind, timings, tmp_path):
    chosen = choose_cpu_dtype(run_config(tmp_path), cpu_system(processes=2))
    assert chosen.dtype == torch.float32 and "not measured under torchrun" in chosen.dtype_reason
    assert timings[0] == []


@pytest.mark.parametrize("cpu_kind", ["avx2", "amx"], indirect=True)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_explicit_dtype_is_never_second_guessed(cpu_kind, timings, tmp_path, dtype):
    system = utils.resolve_system("cpu", dtype, None)
    assert choose_cpu_dtype(run_config(tmp_path, dtype=dtype), system) == system
    assert timings[0] == []


@pytest.mark.parametrize("cpu_kind", ["avx2", "amx"], indirect=True)
def test_the_environment_variable_decides_without_timing(cpu_kind, timings, tmp_path, monkeypatch):
    monkeypatch.setenv(precision.ENVIRONMENT_VARIABLE, "bfloat16")
    chosen = choose_cpu_dtype(run_config(tmp_path), cpu_system())
    assert (chosen.dtype, chosen.dtype_reason) == (torch.bfloat16, "bfloat16: set by GPT_TRAINER_CPU_DTYPE")
    monkeypatch.setenv(precision.ENVIRONMENT_VARIABLE, "fp8")
    with pytest.raises(UserError, match="GPT_TRAINER_CPU_DTYPE=fp8 is not a CPU dtype; set it to float32"):
        choose_cpu_dtype(run_config(tmp_path), cpu_system())
    assert timings[0] == []


def test_mps_and_cuda_keep_their_own_rules(monkeypatch, timings, tmp_path):
    """auto on a Mac's GPU is float32, on CUDA bf16 where the GPU has it, else float16; no timing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(utils, "_mps_available", lambda: True)
    mps = utils.resolve_system("auto", "auto", None)
    assert (mps.device.type, mps.dtype) == ("mps", torch.float32)
    assert choose_cpu_dtype(run_config(tmp_path), mps) == mps
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for bf16, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
        gpu = utils.resolve_system("auto", "auto", None)
        assert (gpu.device, gpu.dtype) == (torch.device("cuda", 0), expected)
        assert choose_cpu_dtype(run_config(tmp_path), gpu) == gpu
    assert timings[0] == []


def test_the_probe_times_both_dtypes_and_leaves_the_random_state_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "PROBE_TOKENS", 64)
    cfg = run_config(tmp_path)
    cfg.training.batch_size = 32  # more than the probe's tokens: it times a smaller batch, scaled
    assert timing.probe_batch_size(cfg) == 64 // cfg.model.block_size
    before = torch.get_rng_state()
    times = precision.time_training_step(cfg)
    assert torch.equal(torch.get_rng_state(), before)
    assert list(times) == [torch.float32, torch.bfloat16]
    assert all(0 < t.step_s < 10 and 0 < t.eval_batch_s < 10 for t in times.values())


@pytest.mark.parametrize("cpu_kind", ["amx"], indirect=True)
def test_the_summary_before_training_says_which_dtype_and_why(cpu_kind, timings, capsys, tiny_config_file,
                                                              workdir):
    code = train.main(["--config", str(tiny_config_file), "--system.dtype", "auto", "--max_steps", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"device +cpu, bfloat16, compile off", out)
    assert re.search(r"dtype +bfloat16: measured 1\.40x faster than float32 here", out)
    assert len(timings[0]) == 1
    code = train.main(["--config", str(tiny_config_file), "--system.dtype", "auto", "--show_config"])
    assert re.search(r"dtype +bfloat16: measured 1\.40x faster", capsys.readouterr().out)
    assert len(timings[0]) == 1  # --show_config took the cached figures
    assert load_checkpoint(workdir / "models/tiny_test/ckpt.pt")["dtype"] == "bfloat16"
    (workdir / "cache" / timing.CACHE_FILE).unlink()
    timings[1]["times"] = step_times(float32_s=0.1, bfloat16_s=0.2)  # now float32 would be faster
    assert train.main(["--config", str(tiny_config_file), "--system.dtype", "auto", "--resume",
                       "--max_steps", "2"]) == 0
    assert re.search(r"dtype +bfloat16: as the run this continues was trained", capsys.readouterr().out)
    assert len(timings[0]) == 1

