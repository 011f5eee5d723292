"""Shared fixtures: a real corpus when ../shared has it, tiny configs, a clean working folder."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from config import ModelConfig
from data_loader import batch_at, random_starts
from precision import ENVIRONMENT_VARIABLE as CPU_DTYPE_VARIABLE
from timing import ENVIRONMENT_VARIABLE as STEP_TIME_VARIABLE

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_CORPUS = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
UNPINNED = "unpinned-in-a-test:pin-system.dtype"
CPU_THREADS = 2


def generated_corpus(n_chars: int = 60_000, seed: int = 0) -> str:
    """Return Shakespeare-flavoured text made up here, for machines without ../shared."""
    rng = random.Random(seed)
    words = ("thou art the king and i am but a fool that loves thee well my lord "
             "what say you to this sweet night of love and war").split()
    speakers = ("ROMEO", "JULIET", "KING", "FOOL")
    lines = []
    while sum(len(line) for line in lines) < n_chars:
        lines.append(f"{rng.choice(speakers)}:\n" + " ".join(rng.choice(words) for _ in range(12)) + ".\n")
    return "\n".join(lines)


def cached_and_full_logits(model: torch.nn.Module, tokens: torch.Tensor,
                           static: bool = False) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Return the last position's logits at each step of decoding `tokens` (1, T) with the KV
    cache (a prefill of 5, then one token at a time), every position's logits from position 4
    on computed from the whole context at once (the two must agree), and the cache, full
    when T is the block size. static: with model.new_static_cache()."""
    with torch.no_grad():
        full = model(tokens)[0][0]
        cache = model.new_static_cache() if static else model.new_cache()
        cached = [model(tokens[:, :5], cache=cache)[0][0, -1]]
        cached += [model(tokens[:, t : t + 1], cache=cache)[0][0, -1] for t in range(5, tokens.size(1))]
    return torch.stack(cached), full[4:], cache


@pytest.fixture(scope="session", autouse=True)
def no_test_leaves_the_cpu_dtype_to_auto():
    """Make every test that leaves `dtype auto` to decide on a CPU fail, on every machine.

    auto picks float32 on some CPUs and bfloat16 on others (precision.py), so such a test
    would pass on one machine and fail on another. The variable (which subprocesses inherit)
    holds no dtype, so the run stops with "GPT_TRAINER_CPU_DTYPE=... is not a CPU dtype":
    pin `system.dtype` in the test. Tests of auto itself remove the variable.
    """
    before = os.environ.get(CPU_DTYPE_VARIABLE)
    os.environ[CPU_DTYPE_VARIABLE] = UNPINNED
    yield
    if before is None:
        os.environ.pop(CPU_DTYPE_VARIABLE, None)
    else:
        os.environ[CPU_DTYPE_VARIABLE] = before


@pytest.fixture(scope="session", autouse=True)
def no_show_config_times_a_step():
    """Give --show_config's estimate a step time instead of a timed step (seconds each, for
    the bigger configs), in this process and the commands tests start; tests of the timing
    itself remove the variable."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(STEP_TIME_VARIABLE, "0.5")
        yield


@pytest.fixture(scope="session", autouse=True)
def two_cpu_threads():
    """Run every test with the thread count of CI's 2-core machines, on any machine, in this
    process and in the training processes tests start (torchrun's set their own: one each)."""
    before = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(CPU_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(CPU_THREADS)
    yield
    torch.set_num_threads(before[0])
    if before[1] is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = before[1]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """Tiny Shakespeare from ../shared when present, else a generated corpus."""
    if SHARED_CORPUS.is_file():
        return SHARED_CORPUS
    path = tmp_path_factory.mktemp("corpus") / "generated.txt"
    path.write_text(generated_corpus(1_200_000))
    return path


@pytest.fixture(scope="session")
def small_corpus_file(tmp_path_factory) -> Path:
    """A small corpus (about 60 kB) for tests that build caches and train a few steps."""
    path = tmp_path_factory.mktemp("small") / "small.txt"
    path.write_text(generated_corpus())
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder so cache/ and models/ never touch the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


TINY_SETTINGS = {
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16},
    "training": {"max_steps": 6, "batch_size": 4, "eval_interval": 3, "eval_iters": 2,
                 "eval_train_iters": 2, "log_interval": 1, "warmup_steps": 2},
    "system": {"device": "cpu", "dtype": "float32"},  # pinned: auto differs between CPUs
}


@pytest.fixture
def tiny_config_file(workdir, small_corpus_file) -> Path:
    """A config file for a model that trains in well under a second per step."""
    settings = json.loads(json.dumps(TINY_SETTINGS))
    settings["data"] = {"dataset": str(small_corpus_file)}
    path = workdir / "tiny_test.json"
    path.write_text(json.dumps(settings))
    return path


def tiny_model_config(**changes) -> ModelConfig:
    values = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11, dropout=0.0, bias=True)
    values.update(changes)
    return ModelConfig(**values)


def random_batch(tokens, batch_size, block_size, generator, device, mask=None):
    """batch_size random windows of `tokens`, as the trainer draws them."""
    return batch_at(tokens, random_starts(len(tokens), batch_size, block_size, generator), block_size, device,
                    mask)
