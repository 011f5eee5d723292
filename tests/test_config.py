"""Config files, `extends`, command-line overrides and validation."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

import precision
import train
from checkpoint import load_checkpoint
from cli import parse_flag_value, run_cli
from config import (
    SECTIONS,
    Config,
    config_from_dict,
    deep_merge,
    load_config_file,
    parse_duration,
    resolve_config,
    validate,
)
from errors import UserError
from precision import ENVIRONMENT_VARIABLE as CPU_DTYPE_VARIABLE
from tests.conftest import REPO_ROOT

PIPELINE_FILES = sorted((REPO_ROOT / "configs").glob("pipeline_*.json"))  # pipeline.py's, not train.py's
CONFIG_FILES = sorted(set((REPO_ROOT / "configs").glob("*.json")) - set(PIPELINE_FILES)) + sorted(
    (REPO_ROOT / "configs" / "pipeline").glob("*.json"))


def write(path: Path, settings: dict) -> Path:
    path.write_text(json.dumps(settings))
    return path


def args_for(argv: list[str]):
    return train.build_parser().parse_args(argv)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = resolve_config(str(path), {})
    assert cfg.training.out_dir == str(Path("models") / path.stem)


def test_shipped_configs_hold_the_documented_recipes():
    laptop = resolve_config(str(REPO_ROOT / "configs/nanogpt_laptop.json"), {})
    assert (laptop.model.n_layer, laptop.model.n_head, laptop.model.n_embd, laptop.model.block_size) == (
        4, 4, 128, 64)
    assert (laptop.training.batch_size, laptop.training.max_steps, laptop.model.dropout) == (12, 2000, 0.0)
    assert (laptop.training.lr, laptop.training.optimizer, laptop.model.position) == (
        1e-3, "adamw", "learned")
    cpu = resolve_config(str(REPO_ROOT / "configs/cpu_shakespeare_char.json"), {})
    assert (cpu.model.n_layer, cpu.model.n_embd, cpu.model.block_size) == (4, 128, 64)
    assert (cpu.training.optimizer, cpu.model.position, cpu.training.eval_full_val) == ("muon", "rope", True)
    gpu = resolve_config(str(REPO_ROOT / "configs/shakespeare_char.json"), {})
    assert (gpu.model.n_layer, gpu.model.n_head, gpu.model.n_embd, gpu.model.block_size) == (6, 6, 384, 256)
    assert (gpu.training.batch_size, gpu.training.max_steps, gpu.model.dropout) == (64, 5000, 0.2)
    assert (gpu.training.lr, gpu.training.beta2, gpu.training.warmup_steps) == (1e-3, 0.99, 100)


def test_the_speedrun_recipe_is_the_baseline_model_with_the_levers_on():
    """Its time to val 1.47 compares with shakespeare_char.json's: the same model, data and batch."""
    base = resolve_config(str(REPO_ROOT / "configs/shakespeare_char.json"), {})
    speedrun = resolve_config(str(REPO_ROOT / "configs/shakespeare_char_speedrun.json"), {})
    def shape(cfg):
        return (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size,
                cfg.training.batch_size, cfg.data.tokenizer, cfg.data.val_fraction)

    assert shape(speedrun) == shape(base) == (6, 6, 384, 256, 64, "char", 0.1)
    m, t = speedrun.model, speedrun.training
    assert (m.position, m.norm, m.mlp, m.qk_norm, t.optimizer, t.schedule) == (
        "rope", "rmsnorm", "relu2", True, "muon", "wsd")
    assert m.dropout < base.model.dropout and t.max_steps < 1000 and t.max_steps % t.eval_interval == 0
    assert t.eval_full_val and t.eval_iters <= 10 and t.keep_last == 0  # evaluations cost little


def test_extends_is_relative_to_the_file_and_deep_merged(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.json", {"model": {"n_layer": 3, "n_head": 2}, "training": {"lr": 0.01}})
    child = write(tmp_path / "sub" / "child.json",
                  {"extends": "../base.json", "model": {"n_layer": 5}})
    settings = load_config_file(child)
    assert settings == {"model": {"n_layer": 5, "n_head": 2}, "training": {"lr": 0.01}}


def test_extends_cycle_is_detected(tmp_path):
    write(tmp_path / "a.json", {"extends": "b.json"})
    write(tmp_path / "b.json", {"extends": "a.json"})
    with pytest.raises(UserError, match="cycle: a.json -> b.json -> a.json"):
        load_config_file(tmp_path / "a.json")


def test_deep_merge_leaves_inputs_alone():
    base = {"model": {"n_layer": 1, "n_head": 1}}
    merged = deep_merge(base, {"model": {"n_layer": 2}})
    assert merged == {"model": {"n_layer": 2, "n_head": 1}}
    assert base == {"model": {"n_layer": 1, "n_head": 1}}


@pytest.mark.parametrize("settings, message", [
    ({"model": {"n_layers": 4}}, "unknown key 'model.n_layers'.*did you mean 'model.n_layer'"),
    ({"modle": {}}, "unknown section 'modle'.*did you mean 'model'"),
    ({"training": {"lr": "fast"}}, "training.lr must be a number, got \"fast\""),
    ({"training": {"max_steps": 10.5}}, "training.max_steps must be a whole number"),
    ({"model": {"bias": "yes"}}, "model.bias must be true or false"),
    ({"model": {"n_layer": None}}, "model.n_layer must be a whole number, not null"),
])
def test_bad_keys_and_types_are_named(settings, message):
    with pytest.raises(UserError, match=message):
        config_from_dict(settings)


@pytest.mark.parametrize("section, key, value, message", [
    ("model", "n_head", 5, r"n_embd \(384\) must be divisible by model.n_head \(5\); try n_head 4"),
    ("model", "n_layer", 0, "model.n_layer must be positive, got 0"),
    ("training", "batch_size", -1, "training.batch_size must be positive"),
    ("training", "lr", 0.0, "training.lr must be positive"),
    ("training", "min_lr", 0.5, "min_lr .* must not exceed training.lr"),
    ("model", "dropout", 1.0, r"model.dropout must be in \[0, 1\)"),
    ("data", "val_fraction", 0.0, "data.val_fraction must be between 0 and 1"),
    ("system", "device", "tpu", "system.device must be one of auto, cpu, cuda, mps"),
    ("training", "epochs", -2.0, "training.epochs must be positive"),
    ("training", "eval_train_iters", 0, "training.eval_train_iters must be positive"),
])
def test_validation_messages_say_what_is_wrong(section, key, value, message):
    cfg = Config()
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(UserError, match=message):
        validate(cfg)


def test_flag_values_are_typed_from_the_fields():
    assert parse_flag_value("--lr", float, "3e-4") == 3e-4
    assert parse_flag_value("--max_steps", int, "1e3") == 1000
    assert parse_flag_value("--bias", bool, "false") is False
    from typing import Optional
    assert parse_flag_value("--epochs", Optional[float], "null") is None
    with pytest.raises(UserError, match="--max_steps expects a whole number, got '2.5'"):
        parse_flag_value("--max_steps", int, "2.5")


def test_only_flags_given_override_the_file(tmp_path):
    path = write(tmp_path / "c.json", {"training": {"lr": 0.005, "batch_size": 7}})
    args = args_for(["--config", str(path), "--training.batch_size", "9", "--seed", "3"])
    cfg, _, _ = train.resolve_run_config(args)
    assert cfg.training.lr == 0.005  # from the file, untouched by the absent --lr
    assert cfg.training.batch_size == 9
    assert cfg.system.seed == 3
    assert cfg.training.out_dir == str(Path("models") / "c")


def test_short_and_long_flags_reach_the_same_field():
    short = train.resolve_run_config(args_for(["--lr", "0.02", "--no_compile"]))[0]
    long = train.resolve_run_config(args_for(["--training.lr", "0.02", "--system.compile", "false"]))[0]
    assert short == long
    assert short.training.lr == 0.02 and short.system.compile is False


def test_saved_config_loads_back_identically_but_for_a_derived_out_dir(tmp_path, workdir, capsys):
    """A run of the saved file gets a directory of its own, not the original config's."""
    cfg = resolve_config(str(REPO_ROOT / "configs/tiny.json"), {"training": {"lr": 0.0123}})
    code = train.main(["--config", str(REPO_ROOT / "configs/tiny.json"), "--lr", "0.0123",
                       "--save_config", str(tmp_path / "saved.json")])
    assert code == 0
    assert "out_dir" not in json.loads((tmp_path / "saved.json").read_text())["training"]
    again = resolve_config(str(tmp_path / "saved.json"), {})
    assert again.training.out_dir == str(Path("models") / "saved")
    again.training.out_dir = cfg.training.out_dir
    assert again == cfg
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "without out_dir" in out and str(Path("models") / "saved") in out
    assert train.main(["--config", str(REPO_ROOT / "configs/tiny.json"), "--lr", "0.5", "--save_config",
                       str(tmp_path / "saved.json"), "--overwrite"]) == 0  # without --overwrite: refused
    assert resolve_config(str(tmp_path / "saved.json"), {}).training.lr == 0.5


@pytest.mark.parametrize("where", ["flag", "file"])
def test_an_out_dir_set_explicitly_is_saved(tmp_path, workdir, capsys, where):
    path = write(tmp_path / "mine.json", {"training": {"out_dir": "runs/file"}} if where == "file" else {})
    flags = ["--out_dir", "runs/flag"] if where == "flag" else []
    assert train.main(["--config", str(path), *flags, "--save_config", str(tmp_path / "saved.json")]) == 0
    assert resolve_config(str(tmp_path / "saved.json"), {}).training.out_dir == f"runs/{where}"
    assert f"with out_dir runs/{where}" in capsys.readouterr().out


def test_show_config_prints_sections_and_derived_values(capsys, workdir, small_corpus_file):
    code = train.main(["--config", str(REPO_ROOT / "configs/tiny.json"),
                       "--dataset", str(small_corpus_file), "--device", "cpu", "--system.dtype", "float32",
                       "--show_config"])
    out = capsys.readouterr().out
    assert code == 0
    for heading in ("[model]", "[data]", "[training]", "[system]", "[model: derived]", "[system: derived]"):
        assert heading in out
    assert re.search(r"tokens per step +768 = batch 12 x accumulation 1 x context 64\n", out)
    assert re.search(r"device +cpu, float32, compile off", out)
    assert re.search(r"parameters +[0-9,]+ \([0-9,]+ without embeddings\)", out)
    assert re.search(r"lr schedule +warmup 100 steps to 0.002, cosine to 0.0002 at step 1,200", out)
    assert re.search(r"eval_iters +20\n +eval_train_iters +20\n", out)


def test_show_config_never_downloads(capsys, workdir):
    code = train.main(["--config", str(REPO_ROOT / "configs/tiny.json"), "--system.dtype", "float32",
                       "--show_config"])
    assert code == 0
    assert "known once the dataset is downloaded" in capsys.readouterr().out
    assert not (workdir / "cache").exists()


@pytest.mark.parametrize("native_bf16, device, dtype", [
    (True, "cpu, auto, compile off", "float32 or bfloat16, whichever a step of this model runs faster in here; "
                                     "timed once the dataset is downloaded"),
    (False, "cpu, float32, compile off", "float32: bfloat16 is emulated on this CPU")])
def test_show_config_before_the_download_names_no_dtype_auto_has_not_timed(capsys, workdir, monkeypatch,
                                                                           native_bf16, device, dtype):
    """It said float32 where the run, once it had the data, timed a step and trained in bfloat16."""
    monkeypatch.delenv(CPU_DTYPE_VARIABLE)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    assert train.main(["--config", str(REPO_ROOT / "configs/tiny.json"), "--device", "cpu", "--show_config"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"device +{device}", out) and re.search(rf"dtype +{re.escape(dtype)}", out)
    assert not (workdir / "cache").exists()  # nothing timed, nothing downloaded


def test_show_config_of_a_resume_names_the_dtype_the_run_keeps(capsys, workdir, tiny_config_file, monkeypatch):
    assert train.main(["--config", str(tiny_config_file), "--max_steps", "2"]) == 0  # trained in float32
    monkeypatch.delenv(CPU_DTYPE_VARIABLE)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "time_training_step", lambda cfg: pytest.fail("a resume keeps its dtype"))
    capsys.readouterr()
    assert train.main(["--config", str(tiny_config_file), "--resume", "--system.dtype", "auto", "--show_config"]) == 0
    assert re.search(r"dtype +float32: as the run this continues was trained", capsys.readouterr().out)


def test_show_config_of_a_fine_tune_shows_the_tokenizer_it_continues_with(capsys, workdir, tiny_config_file):
    """It fitted the config's tokenizer instead, and failed where a 2,048-piece one does not fit the text."""
    assert train.main(["--config", str(tiny_config_file), "--max_steps", "2"]) == 0  # characters
    vocabulary = load_checkpoint(workdir / "models/tiny_test/ckpt.pt")["tokenizer"]
    capsys.readouterr()
    assert train.main(["--config", str(tiny_config_file), "--load_model_only", "models/tiny_test", "--out_dir",
                       "fine", "--data.tokenizer", "sentencepiece", "--data.vocab_size", "2048",
                       "--show_config"]) == 0
    derived = capsys.readouterr().out.split("[data: derived]")[1]
    assert re.search(r"tokenizer +char\n", derived)
    assert re.search(rf"vocabulary +{len(vocabulary['chars']) + 3}\n", derived)  # its characters and 3 specials


def test_show_config_counts_steps_from_epochs(capsys, workdir, small_corpus_file):
    train.main(["--config", str(REPO_ROOT / "configs/tiny.json"), "--dataset", str(small_corpus_file),
                "--epochs", "1", "--system.dtype", "float32", "--show_config"])
    out = capsys.readouterr().out
    train_tokens = int(len(small_corpus_file.read_text()) * 0.9)
    assert re.search(rf"steps +{-(-train_tokens // 768):,} \(1.0 epochs\)", out)


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("gpt-trainer ")


def test_the_config_reference_documents_every_config_field():
    reference = (REPO_ROOT / "docs" / "reference" / "config.md").read_text()
    for section_name, section_cls in SECTIONS.items():
        for f in dataclasses.fields(section_cls):
            assert f"`--{section_name}.{f.name}" in reference, f"docs/reference/config.md lacks {section_name}.{f.name}"


def test_precision_flag_and_dtype_aliases(tmp_path):
    assert train.resolve_run_config(args_for(["--precision", "fp32"]))[0].system.dtype == "float32"
    assert train.resolve_run_config(args_for(["--precision", "bf16"]))[0].system.dtype == "bfloat16"
    path = write(tmp_path / "p.json", {"system": {"dtype": "fp16"}, "model": {"flash_attention": False}})
    cfg = resolve_config(str(path), {})
    assert cfg.system.dtype == "float16" and cfg.model.flash_attention is False


@pytest.mark.parametrize("text, seconds", [
    ("5400", 5400), ("1.5", 1.5), ("45s", 45), ("90m", 5400), ("2h", 7200), ("1.5h", 5400),
    ("1h30m", 5400), ("1h30m15s", 5415), ("1m30s", 90), ("2h 5s", 7205), (" 1h30m ", 5400)])
def test_a_duration_is_read_whole(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "1h30", "1m30", "2h5", "", " ", "h", "1d", "soon", "30m1h", "1h1h", "-5", "1:30", "inf", "1.h",
    "1 h"])
def test_a_duration_not_understood_whole_is_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_a_refused_duration_is_one_line_naming_the_forms(workdir, capsys):
    assert run_cli(train.main, ["--max_time", "1h30", "--show_config"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "got '1h30'" in error
    for form in ("5400", "1h30m", "90m", "1.5h", "45s"):
        assert form in error


def test_guard_rail_flags(tmp_path):
    cfg = train.resolve_run_config(args_for(["--max_time", "1h30m", "--target_val_loss", "1.47",
                                             "--budget", "3", "--system.usd_per_hour", "2.5"]))[0]
    assert cfg.training.max_time_s == 5400.0 and cfg.training.target_val_loss == 1.47
    assert cfg.training.budget_usd == 3.0 and cfg.system.usd_per_hour == 2.5


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: p.name)
def test_every_shipped_pipeline_config_loads(path):
    from pipeline_config import TRAINING_PHASES, load_pipeline_config
    cfg = load_pipeline_config(path)
    assert all(cfg.phase_config(phase).is_file() for phase in TRAINING_PHASES)
