"""CUDA: mixed-precision steps, compiled and CUDA-graph steps against eager ones, KV-cache
decoding, a checkpoint from the GPU read on a CPU, a real out-of-memory, --max_batch.

Every test here needs a CUDA device and is skipped without one (CI's CPUs report them skipped);
`pytest -m gpu` runs them alone, with the other tests marked gpu (tests/test_forward_context.py's), as
scripts/gpu_check.sh does first on a GPU machine.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

import bench
import gen
import serve
import train
from checkpoint import load_checkpoint, load_model
from cli import run_cli
from model import GPT
from decode_step import StaticSteps
from sampling import SamplingSettings, generate, generate_batch
from tests.conftest import REPO_ROOT, cached_and_full_logits, tiny_model_config
from tests.test_decoding import served_jobs, serve_jobs
from tokenizer import CharTokenizer
from trainer import Trainer
from utils import resolve_system

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")
HUGE_BATCH = 1 << 24  # windows of 16 tokens, 256 wide: the first embedding alone needs 256 GiB


def cuda_trainer(config_file: Path, dtype: str, *flags: str, compile_model: bool = False) -> Trainer:
    """A Trainer of the tiny test config on the GPU, built as train.py builds it."""
    args = train.build_parser().parse_args(["--config", str(config_file), "--system.device", "cuda",
                                            "--system.dtype", dtype, *flags])
    cfg, _, _ = train.resolve_run_config(args)
    system = resolve_system("cuda", dtype, compile_model, compile_mode=cfg.system.compile_mode,
                            grad_accum_steps=cfg.training.grad_accum_steps)  # the mode, resolved as train.py does
    return train.build_trainer(args, cfg, None, None, system)


def train_steps(trainer: Trainer, steps: int, may_skip: int = 0) -> list[float]:
    """Run steps as the loop does (the schedule follows trainer.step); return their losses.
    At most `may_skip` of them may be skipped as non-finite (fp16's first loss scales overflow)."""
    losses, applied = [], 0
    for _ in range(steps):
        loss, step_applied = trainer.train_step()
        losses.append(loss.item())
        applied += bool(step_applied)
        trainer.step += 1
    assert applied >= steps - may_skip, f"{steps - applied} of {steps} steps were skipped as non-finite"
    return losses


def tensors(obj: object) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors(value)


@pytest.fixture
def exact_float32():
    """float32 matmuls without TF32 (a trainer's configure_torch sets it process-wide), restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def fresh_dynamo():
    """Each compiling test starts and leaves with dynamo's caches and counters empty."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_steps_train(workdir, tiny_config_file, dtype):
    trainer = cuda_trainer(tiny_config_file, dtype, "--lr", "3e-3", "--max_steps", "40")
    assert trainer.system.device.type == "cuda" and trainer.system.dtype == getattr(torch, dtype)
    assert trainer.scaler.is_enabled() == (dtype == "float16")  # loss scaling for float16 only
    losses = train_steps(trainer, 30, may_skip=5 if dtype == "float16" else 0)
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    if dtype == "float16":
        assert 0 < trainer.scaler.get_scale() < math.inf
    # autocast computes in half precision; the weights the optimizer updates stay float32
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"], ids=["compiled", "cuda-graphs"])
def test_compiled_steps_and_evaluations_equal_eager_ones(workdir, tiny_config_file, exact_float32,
                                                         fresh_dynamo, mode):
    flags = ("--system.allow_tf32", "false", "--system.compile_mode", mode)
    eager = cuda_trainer(tiny_config_file, "float32", *flags, "--out_dir", "eager")
    compiled = cuda_trainer(tiny_config_file, "float32", *flags, "--out_dir", "compiled", compile_model=True)
    assert compiled.system.compile and compiled.system.compile_mode == mode
    assert compiled.compiled == ("model" if mode == "reduce-overhead" else "blocks")  # compile_scope auto
    runs = []
    for trainer in (eager, compiled):
        losses = train_steps(trainer, 6)  # CUDA graphs: warm-up, recording, then replays
        evaluation = trainer.evaluate()
        losses += train_steps(trainer, 2)  # training goes on after an evaluation (eval mode, no grad)
        runs.append((losses, evaluation))
    (eager_losses, eager_eval), (compiled_losses, compiled_eval) = runs
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-3)
    assert compiled_eval == pytest.approx(eager_eval, rel=1e-3)
    assert fresh_dynamo["inductor"]["cudagraph_skips"] == 0  # reduce-overhead really replayed graphs


VARIANTS = [{}, dict(position="rope", norm="rmsnorm", mlp="relu2", qk_norm=True), dict(n_kv_head=1, mlp="swiglu")]


@pytest.mark.parametrize("variant", VARIANTS, ids=["gpt2", "cpu-recipe", "gqa-swiglu"])
def test_kv_cache_decoding_on_cuda_equals_recomputing_the_context(exact_float32, variant):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(block_size=16, n_head=4, n_embd=32, **variant)).to(CUDA).eval()
    tokens = torch.randint(0, 11, (1, 16), device=CUDA)
    cached, full, _ = cached_and_full_logits(model, tokens)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    greedy = SamplingSettings(max_new_tokens=12, temperature=0)  # 3 + 12 <= 16: no sliding
    decoded = list(generate(model, 16, [1, 2, 3], greedy, vocab_limit=11))
    recomputed = [1, 2, 3]
    with torch.no_grad():
        for _ in range(12):
            recomputed.append(int(model(torch.tensor([recomputed], device=CUDA))[0][0, -1].argmax()))
    assert decoded == recomputed[3:]


@pytest.mark.parametrize("variant", VARIANTS, ids=["gpt2", "cpu-recipe", "gqa-swiglu"])
def test_cuda_graph_decoding_gives_the_tokens_of_eager_decoding(exact_float32, variant):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(block_size=16, n_head=4, n_embd=32, **variant)).to(CUDA).eval()
    steps = StaticSteps(model, "cuda_graph")
    greedy = SamplingSettings(max_new_tokens=30, temperature=0)  # 3 + 30 > 16: the context slides
    for prompt in ([1, 2, 3], [4, 5]):  # the second generation replays the graph captured by the first
        eager = list(generate(model, 16, prompt, greedy, vocab_limit=11))
        assert list(generate(model, 16, prompt, greedy, vocab_limit=11, steps=steps)) == eager
    assert len(steps.by_batch) == 1 and steps.by_batch[1].prepare_s > 0
    warm = SamplingSettings(max_new_tokens=20, temperature=1.0, top_k=None)
    batches = [list(generate_batch(model, 16, [1, 2, 3], warm, 11, [torch.Generator(device=CUDA).manual_seed(s)
                                                                     for s in (7, 8)], steps=run_steps))
               for run_steps in (None, steps)]
    assert batches[0] == batches[1] and 2 in steps.by_batch


def test_a_batch_of_requests_replayed_as_a_cuda_graph_gives_each_its_reply_alone(exact_float32):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(block_size=16, n_head=4, n_embd=32, position="rope")).to(CUDA).eval()
    tokenizer = CharTokenizer("abcdefghij\n")
    alone = serve.Engine(model, tokenizer, 16, "tiny")
    batched = serve.Engine(model, tokenizer, 16, "tiny", StaticSteps(model, "cuda_graph"), batch_size=3)
    batched.runner.prepare()
    expected = [serve_jobs(alone, [job])[0] for job in served_jobs(alone, tokenizer)]
    assert serve_jobs(batched, served_jobs(batched, tokenizer)) == expected and len(set(expected)) == 4


def test_a_checkpoint_written_from_cuda_loads_on_a_cpu_with_tied_weights(workdir, tiny_config_file, capsys):
    trainer = cuda_trainer(tiny_config_file, "bfloat16", "--out_dir", "from_cuda")
    train_steps(trainer, 2)
    path = trainer.save_latest()
    checkpoint = load_checkpoint(path)  # its checksum verifies
    assert all(t.device.type == "cpu" for t in tensors(checkpoint))  # weights, optimizer state, RNG
    weights = checkpoint["model"]
    assert weights["lm_head.weight"].untyped_storage().data_ptr() == weights["wte.weight"].untyped_storage().data_ptr()
    model = load_model(checkpoint, torch.device("cpu"), str(path))
    assert model.lm_head.weight is model.wte.weight  # one matrix, as in the model trained
    restored = model.state_dict()
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(restored[name], tensor.cpu()), name
    capsys.readouterr()
    assert run_cli(gen.main, [str(path.parent), "--device", "cpu", "--dtype", "float32", "--prompt", "the",
                              "--max_new_tokens", "5", "--no_stream"]) == 0
    assert capsys.readouterr().out.startswith("the")


@pytest.mark.slow
def test_a_real_out_of_memory_ends_with_one_line_and_exit_2(workdir, tiny_config_file):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--config", str(tiny_config_file),
                           "--system.device", "cuda", "--system.dtype", "bfloat16", "--no_compile",
                           "--model.n_embd", "256", "--batch_size", str(HUGE_BATCH), "--max_steps", "1"],
                          cwd=workdir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: CUDA ran out of memory with batch_size {HUGE_BATCH}, block_size 16, "
                           "grad_accum_steps 1: lower --batch_size"), last


def test_max_batch_finds_the_edge_of_gpu_memory(workdir, tiny_config_file, capsys):
    """A 50k-word head at context 1024 takes hundreds of MB a sequence: memory ends the search."""
    assert run_cli(bench.main, ["--config", str(tiny_config_file), "--synthetic", "--max_batch",
                                "--system.device", "cuda", "--system.dtype", "bfloat16",
                                "--model.vocab_size", "50304", "--model.block_size", "1024",
                                "--model.n_embd", "768", "--model.n_head", "12"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["block_size"] == 1024
    assert 1 <= record["max_batch"] < 1 << 16  # the edge of memory, not the search's own limit
    assert 0 < record["peak_memory_mb"] <= record["total_memory_mb"]
