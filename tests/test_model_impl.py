"""model.impl: a user's model class (examples/my_gpt.py, the tutorial's end) trained, resumed,
sampled, evaluated and benchmarked through the same commands as ours."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import bench
import eval as eval_cli
import export
import gen
import train
from checkpoint import load_checkpoint
from cli import run_cli
from config import TrainingConfig
from contract import (
    CachedLanguageModel,
    LanguageModel,
    flops_per_token,
    has_kv_cache,
    load_class,
    params_without_embeddings,
)
from model import GPT
from optim import make_optimizer
from tests.conftest import REPO_ROOT, TINY_SETTINGS, tiny_model_config

EXAMPLE = REPO_ROOT / "examples" / "my_gpt.py"


@pytest.fixture(scope="module")
def user_run(tmp_path_factory, small_corpus_file):
    """Six steps of examples/my_gpt.py:MyGPT through train.py, in a folder of its own."""
    root = tmp_path_factory.mktemp("user_model")
    shutil.copy(EXAMPLE, root / "my_gpt.py")
    settings = json.loads(json.dumps(TINY_SETTINGS))
    settings["data"] = {"dataset": str(small_corpus_file), "cache_dir": str(root / "cache")}
    settings["training"]["out_dir"] = str(root / "run")
    config = root / "run.json"
    config.write_text(json.dumps(settings))
    return root, config


def train_user_model(root, config, *flags: str) -> int:
    impl = f"{root / 'my_gpt.py'}:MyGPT"
    return run_cli(train.main, ["--config", str(config), "--model_impl", impl, *flags])


def test_a_user_model_trains_resumes_and_is_recorded(user_run, capsys):
    root, config = user_run
    assert train_user_model(root, config) == 0
    out = capsys.readouterr().out
    assert f"class              {root / 'my_gpt.py'}:MyGPT" in out and "val loss" in out
    saved = load_checkpoint(root / "run" / "ckpt.pt")
    assert saved["step"] == 6 and saved["config"]["model"]["impl"] == f"{root / 'my_gpt.py'}:MyGPT"
    assert "token_embedding.weight" in saved["model"]  # the user's own names, not ours
    assert saved["losses"]["final_val"] < saved["losses"]["worst_val"]  # it learned between evaluations
    # resuming takes the class from the checkpoint's config, and goes on from step 6
    assert run_cli(train.main, ["--resume", str(root / "run" / "ckpt.pt"), "--max_steps", "8"]) == 0
    assert load_checkpoint(root / "run" / "ckpt.pt")["step"] == 8


def test_gen_and_eval_use_the_class_the_checkpoint_names(user_run, capsys):
    root, config = user_run
    if not (root / "run" / "ckpt.pt").exists():
        assert train_user_model(root, config) == 0
    capsys.readouterr()
    assert run_cli(gen.main, [str(root / "run"), "--prompt", "KING:", "--max_new_tokens", "30",
                              "--temperature", "0", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("KING:") and len(captured.out) > len("KING:") + 10
    assert "MyGPT has no KV-cache hooks" in captured.err and "recomputes the whole context" in captured.err
    assert run_cli(eval_cli.main, [str(root / "run"), "--json", "--device", "cpu"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["tokens"] > 1000 and 0 < scored["loss"] < 5


def test_a_moved_class_file_is_named_again_with_model_impl(user_run, tmp_path, capsys):
    root, config = user_run
    shutil.copy(EXAMPLE, tmp_path / "old.py")
    assert run_cli(train.main, ["--config", str(config), "--model_impl", f"{tmp_path / 'old.py'}:MyGPT",
                                "--max_steps", "2", "--out_dir", str(tmp_path / "run")]) == 0
    (tmp_path / "old.py").rename(tmp_path / "new.py")
    capsys.readouterr()
    args = [str(tmp_path / "run"), "--prompt", "KING", "--max_new_tokens", "3", "--device", "cpu"]
    assert run_cli(gen.main, args) == 2
    error = capsys.readouterr().err
    assert "old.py does not exist" in error and "pass --model_impl" in error
    moved = [*args, "--model_impl", f"{tmp_path / 'new.py'}:MyGPT"]
    assert run_cli(gen.main, moved) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("KING") and "has changed" not in captured.err  # moved, the same text
    with open(tmp_path / "new.py", "a") as file:
        file.write("# edited after training\n")
    assert run_cli(gen.main, moved) == 0
    assert f"{tmp_path / 'new.py'} has changed since" in capsys.readouterr().err


def test_bench_measures_a_user_model(user_run, capsys):
    root, config = user_run
    assert run_cli(bench.main, ["--config", str(config), "--steps", "3",
                                "--model_impl", f"{root / 'my_gpt.py'}:MyGPT"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    built = train_user_model(root, config, "--show_config")  # prints the parameter count it would train
    assert built == 0 and f"parameters         {figures['params']:,} (" in capsys.readouterr().out
    assert figures["steps"] == 3 and figures["tokens_per_s"] > 0


def test_export_refuses_a_user_model_by_name(user_run, tmp_path, capsys):
    root, config = user_run
    if not (root / "run" / "ckpt.pt").exists():
        assert train_user_model(root, config) == 0
    assert run_cli(export.main, [str(root / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert "your own class" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_fallbacks_for_what_a_user_model_may_lack():
    cfg = tiny_model_config(vocab_size=64)
    mine, ours = load_class(f"{EXAMPLE}:MyGPT")(cfg), GPT(cfg)
    assert isinstance(mine, LanguageModel) and isinstance(ours, CachedLanguageModel)
    assert not isinstance(mine, CachedLanguageModel) and not isinstance(nn.Linear(2, 2), LanguageModel)
    assert not has_kv_cache(mine) and has_kv_cache(ours)
    # without num_params(include_embeddings=...): the nn.Embedding weights (tied head once) subtracted
    assert params_without_embeddings(mine) == params_without_embeddings(ours) == ours.num_params(
        include_embeddings=False)
    # without flops_per_token(): 6 per non-embedding parameter and attention's 12 * L * d * T
    assert flops_per_token(mine, cfg) == 6 * params_without_embeddings(ours) + 12 * 2 * 16 * 8
    assert flops_per_token(ours, cfg) == ours.flops_per_token()


class LayersElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])


def test_muon_says_when_a_user_model_keeps_no_blocks(capsys):
    optimizer = make_optimizer(LayersElsewhere(), TrainingConfig(optimizer="muon"), torch.device("cpu"))
    assert "found no 2-D weights under 'blocks.' in LayersElsewhere" in capsys.readouterr().err
    assert sum(len(group["params"]) for group in optimizer.param_groups) == 4
