"""torch.compile in training: one compilation, in the first step; none for evaluation."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import compilation
import train
from tests.conftest import TINY_SETTINGS
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
def test_nothing_compiles_after_the_first_step(workdir, small_corpus_file, scope):
    """Dropout, gradient accumulation, whole-split evaluations with a shorter last batch of
    views (stride block_size), random-batch evaluations of the train split, a final one:
    each used to recompile the forward at the first evaluation; now only step 1 compiles."""
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
    monkeypatch.delenv(compilation.CACHE_VARIABLE, raising=False)
    assert compilation.keep_compile_cache(str(tmp_path / "cache")) == tmp_path / "cache" / "torch_compile"
    assert os.environ[compilation.CACHE_VARIABLE] == str(tmp_path / "cache" / "torch_compile")
    monkeypatch.setenv(compilation.CACHE_VARIABLE, str(tmp_path / "mine"))
    assert compilation.keep_compile_cache(str(tmp_path / "cache")) == tmp_path / "mine"
