"""Device, dtype and compile choices, seeding and atomic writes, with the GPU faked where needed."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import utils
from errors import UserError


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend three CUDA GPUs with 5, 9 and 2 GB free; the middle one has no bfloat16."""
    free = [5e9, 9e9, 2e9]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 10e9))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)


def test_auto_picks_the_gpu_with_most_free_memory(fake_gpus):
    assert utils.select_device("auto") == torch.device("cuda", 1)
    assert utils.select_device("cuda") == torch.device("cuda", 1)
    assert utils.select_device("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="sees no CUDA GPU; use --device cpu"):
        utils.select_device("cuda")


def test_dtype_falls_back_with_a_notice(fake_gpus, capsys):
    cuda = torch.device("cuda", 0)
    assert utils.select_dtype(cuda, "auto") == torch.float16
    assert utils.select_dtype(cuda, "bfloat16") == torch.float16
    assert "no bfloat16; using float16" in capsys.readouterr().err
    assert utils.select_dtype(torch.device("mps"), "float16") == torch.float32
    assert "training in float32 instead" in capsys.readouterr().err


@pytest.mark.parametrize("native", [True, False])
def test_cpu_takes_bfloat16_when_asked_only_where_the_hardware_has_it(monkeypatch, capsys, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    cpu = torch.device("cpu")
    assert utils.select_dtype(cpu, "bfloat16") == (torch.bfloat16 if native else torch.float32)
    assert ("would be emulated" in capsys.readouterr().err) == (not native)
    assert utils.select_dtype(cpu, "float32") == torch.float32
    # auto is float32 until a training run has measured bf16 against it (tests/test_precision.py)
    assert utils.select_dtype(cpu, "auto") == torch.float32


def test_cpu_name_is_the_model_name_where_linux_says_it(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t: fpu avx2\n")
    assert utils.cpu_name(cpuinfo) == "Intel(R) Xeon(R) Platinum 8480+"
    elsewhere = utils.cpu_name(tmp_path / "missing")  # not Linux: platform's name for it
    assert elsewhere == (utils.platform.processor() or utils.platform.machine()) and elsewhere


def test_compile_is_on_for_cuda_only_and_falls_back_without_triton(fake_gpus, monkeypatch, capsys):
    assert utils.resolve_system("cpu", "auto", None).compile is False
    monkeypatch.setattr(utils.importlib.util, "find_spec", lambda name: None)
    info = utils.resolve_system("cuda", "auto", True)
    assert info.compile is False
    assert "needs Triton" in capsys.readouterr().err
    assert utils.compile_supported(torch.device("mps"))[0] is False


def test_seed_everything_repeats_every_generator():
    def draws():
        return random.random(), np.random.rand(), torch.rand(1).item()

    utils.seed_everything(3)
    first = draws()
    utils.seed_everything(3)
    assert draws() == first


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"good")

    def failing_writer(file):
        file.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        utils.write_file_atomic(target, failing_writer)
    assert target.read_bytes() == b"good"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind
    utils.write_file_atomic(target, lambda file: file.write(b"new"))
    assert target.read_bytes() == b"new"
