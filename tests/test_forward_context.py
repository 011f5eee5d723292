"""forward_context.py: where compile_mode auto uses CUDA graphs, the attention backend, the forward context."""
from __future__ import annotations

import re
import types

import pytest
import torch
import torch.nn.functional as F

import forward_context
import train
import utils
from config import ModelConfig
from distributed import Ranks
from errors import UserError
from forward_context import ForwardContext, check_attention_backend, resolve_compile_mode, sdpa_backend
from tests.conftest import REPO_ROOT, tiny_model_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
TORCHRUN = Ranks(rank=0, local_rank=0, world_size=1, launched=True)


@pytest.mark.parametrize("device, launched, accumulation, expected", [
    (CUDA, False, 1, "reduce-overhead"),  # one process, static shapes: the measured 1.43x
    (CUDA, True, 1, "default"),  # torchrun: DDP or FSDP, even with one process
    (CUDA, False, 4, "default"),  # gradient accumulation overwrites param.grad in the graph's pool
    (CPU, False, 1, "default"),
    (torch.device("mps"), False, 1, "default"),
])
def test_auto_uses_cuda_graphs_only_where_they_are_safe(device, launched, accumulation, expected):
    assert resolve_compile_mode("auto", device, launched, accumulation) == expected


def test_an_explicit_compile_mode_is_used_as_given():
    for mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        assert resolve_compile_mode(mode, CPU, True, 8) == mode


@pytest.fixture
def one_fake_gpu(monkeypatch):
    """Pretend one CUDA GPU with bfloat16 and Triton."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(utils, "compile_supported", lambda device: (True, ""))


def test_resolve_system_resolves_the_mode_on_a_faked_gpu(one_fake_gpu):
    gpu = utils.resolve_system("auto", "auto", None)
    assert (gpu.compile, gpu.compile_mode) == (True, "reduce-overhead")
    assert gpu.describe() == "cuda:0 (NVIDIA H200), bfloat16, compile on (reduce-overhead)"
    assert utils.resolve_system("auto", "auto", None, grad_accum_steps=2).compile_mode == "default"
    assert utils.resolve_system("auto", "auto", None, TORCHRUN).compile_mode == "default"
    assert utils.resolve_system("cpu", "float32", True).compile_mode == "default"
    assert forward_context.uses_cuda_graphs(gpu.compile_mode, gpu.compile, gpu.device)
    assert not forward_context.uses_cuda_graphs("reduce-overhead", True, CPU)  # no graphs off CUDA
    assert not forward_context.uses_cuda_graphs("reduce-overhead", False, CUDA)  # nor uncompiled


def test_show_config_says_which_compile_mode_a_run_gets(capsys, workdir, small_corpus_file):
    flags = ["--config", str(REPO_ROOT / "configs/tiny.json"), "--dataset", str(small_corpus_file),
             "--device", "cpu", "--system.dtype", "float32", "--show_config"]
    assert train.main([*flags, "--system.compile", "true"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"compile_mode +\"auto\"", out)  # the setting, and below what it resolved to
    assert re.search(r"device +cpu, float32, compile on \(default\)", out)


def test_math_and_auto_give_the_same_loss_and_gradients():
    torch.manual_seed(0)
    from model import GPT

    model = GPT(tiny_model_config(n_head=2, n_embd=16))
    idx = torch.randint(0, 11, (2, 8))
    results = []
    for backend in (None, sdpa_backend("math"), sdpa_backend("flash")):
        model.zero_grad()
        with ForwardContext(torch.autocast("cpu", enabled=False), backend):
            loss = model(idx, idx)[1]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (auto_loss, auto_grads), *others = results
    for loss, grads in others:
        assert torch.allclose(loss, auto_loss, atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, auto_grads))


def attention_kernel(backend) -> str:
    """The name of the backward node scaled_dot_product_attention records under `backend`."""
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with ForwardContext(torch.autocast("cpu", enabled=False), backend):
        return type(F.scaled_dot_product_attention(q, q, q, is_causal=True).grad_fn).__name__


def test_the_context_pins_the_kernel_and_restores_torch_s_choice_after():
    assert "FlashAttentionForCpu" in attention_kernel(sdpa_backend("flash"))
    assert "FlashAttention" not in attention_kernel(sdpa_backend("math"))  # the plain matmuls
    assert "FlashAttentionForCpu" in attention_kernel(None)  # auto again: torch picks its CPU flash
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


def test_the_context_is_reusable_and_marks_a_graph_step_for_each_forward(monkeypatch):
    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    context = ForwardContext(torch.autocast("cpu", dtype=torch.bfloat16), sdpa_backend("math"), cuda_graphs=True)
    for _ in range(3):
        with context:
            assert torch.is_autocast_enabled("cpu") and not torch.backends.cuda.flash_sdp_enabled()
    assert len(steps) == 3 and not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError):
        with context:
            raise ValueError("a failed forward")
    assert torch.backends.cuda.flash_sdp_enabled()  # left as it was, even after an error
    with ForwardContext(torch.autocast("cpu", enabled=False)):
        pass
    assert len(steps) == 4  # without CUDA graphs no step is marked


def test_the_backend_context_works_around_a_compiled_model():
    """The kernel is chosen when the compiled graph is traced, inside the context."""
    from model import GPT

    torch.manual_seed(0)
    model = GPT(tiny_model_config(n_head=2, n_embd=16))
    idx = torch.randint(0, 11, (2, 8))
    eager = model(idx, idx)[1]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for backend in ("math", "flash"):
        with ForwardContext(torch.autocast("cpu", enabled=False), sdpa_backend(backend)):
            assert torch.allclose(compiled(idx, idx)[1], eager, atol=1e-6)
    torch._dynamo.reset()


def cpu_model(**changes) -> ModelConfig:
    return ModelConfig(**{"n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 11, **changes})


def test_backends_that_cannot_run_are_one_line_at_start_up():
    for name in ("cudnn", "efficient"):
        with pytest.raises(UserError, match=f"{name} is a CUDA kernel; on cpu torch has math and flash"):
            check_attention_backend(name, CPU, torch.float32, cpu_model())
    with pytest.raises(UserError, match="flash cannot run this model's attention on cpu in float32: "
                                        "Both fused kernels do not support non-zero dropout; use auto"):
        check_attention_backend("flash", CPU, torch.float32, cpu_model(dropout=0.1))
    with pytest.raises(UserError, match="which model.flash_attention false does not call"):
        check_attention_backend("math", CPU, torch.float32, cpu_model(flash_attention=False))
    for name in ("auto", "math", "flash"):
        check_attention_backend(name, CPU, torch.float32, cpu_model())
    before = torch.get_rng_state()
    check_attention_backend("math", CPU, torch.float32, cpu_model(dropout=0.1))  # math does dropout
    assert torch.equal(torch.get_rng_state(), before)  # the check draws no numbers of the run's


def test_a_torch_without_the_backend_is_told_so(monkeypatch):
    older = types.SimpleNamespace(MATH=1, FLASH_ATTENTION=2, EFFICIENT_ATTENTION=3)  # no CUDNN_ATTENTION
    monkeypatch.setattr(forward_context, "SDPBackend", older)
    with pytest.raises(UserError, match=r"torch .* has no SDPBackend.CUDNN_ATTENTION; upgrade torch or use auto"):
        sdpa_backend("cudnn")
    assert sdpa_backend("auto") is None and sdpa_backend("math") == 1


def test_a_trainer_runs_its_forwards_with_the_backend(workdir, tiny_config_file, monkeypatch):
    from tests.test_trainer import build

    seen = []
    attention = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch.backends.cuda.flash_sdp_enabled())
        return attention(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    trainer = build(tiny_config_file, "--system.attention_backend", "math",
                    system=utils.resolve_system("cpu", "float32", None))
    trainer.train_step()
    trainer.evaluate()
    assert seen and not any(seen)  # every training and evaluation forward ran with flash off


def test_the_loop_keeps_no_tensor_a_forward_returned(workdir, tiny_config_file):
    """A CUDA graph's outputs are overwritten by its next replay, so the loss a step reports
    (and the progress window sums) must be a tensor of its own, not the forward's output."""
    from tests.test_trainer import build

    trainer = build(tiny_config_file, system=utils.resolve_system("cpu", "float32", None))
    forward, outputs = trainer.forward_model, []

    def recording(x, y):
        logits, loss = forward(x, y)
        outputs.append(loss)  # kept alive, so no later tensor can take its memory
        return logits, loss

    trainer.forward_model = recording
    kept = [kept for _ in range(2) for kept in trainer.train_step()]  # the loss, and whether applied
    assert len(outputs) == 2
    pointers = {loss.untyped_storage().data_ptr() for loss in outputs}
    assert not {loss.untyped_storage().data_ptr() for loss in kept} & pointers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_losses_equal_eager_ones(workdir, tiny_config_file):
    """reduce-overhead replays the same kernels: a few steps' losses match the eager run's."""
    from tests.test_trainer import build

    losses = {}
    for mode, compiled in (("reduce-overhead", True), ("default", False)):
        torch._dynamo.reset()
        system = utils.resolve_system("cuda", "float32", compiled, compile_mode=mode)
        trainer = build(tiny_config_file, "--system.compile_mode", mode, "--system.dtype", "float32",
                        "--system.allow_tf32", "false", "--out_dir", mode, system=system)  # no TF32 rounding
        losses[mode] = torch.stack([trainer.train_step()[0] for _ in range(5)]).cpu()
        assert trainer.evaluate()["val"] > 0
    assert torch.allclose(losses["reduce-overhead"], losses["default"], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["flash", "cudnn", "efficient", "math"])
def test_each_cuda_backend_runs_or_says_why_not(name):
    cfg = cpu_model(n_head=4, n_embd=256, block_size=64)
    try:
        check_attention_backend(name, CUDA, torch.bfloat16, cfg)
    except UserError as error:
        assert "\n" not in str(error) and "use auto" in str(error)
        pytest.skip(str(error))
    q = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    with ForwardContext(torch.autocast("cuda", dtype=torch.bfloat16), sdpa_backend(name)):
        pinned = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    reference = F.scaled_dot_product_attention(q.float(), q.float(), q.float(), is_causal=True)
    assert torch.allclose(pinned.float(), reference, atol=3e-2)  # bfloat16's rounding
