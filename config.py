"""The run's configuration: dataclasses per section, JSON files with `extends`, CLI overrides.

A config is resolved in three layers, later ones winning: the dataclass defaults, the JSON
file (after following its `extends` chain), and the flags the user actually typed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from config_fields import (
    DTYPE_ALIASES,
    DURATION_FORMS,
    check_value,
    deep_merge,
    field_types,
    load_config_file,
    option,
    parse_duration,
    resolve_alias,
    unknown_key_message,
)
from errors import UserError
from tokenizer import TIKTOKEN_ENCODINGS, padded_vocab_size

__version__ = "0.1.0"


@dataclass
class ModelConfig:
    n_layer: int = option(6, "transformer blocks")
    n_head: int = option(6, "attention heads per block")
    n_embd: int = option(384, "width of the residual stream")
    block_size: int = option(256, "context length in tokens")
    vocab_size: Optional[int] = option(
        None, "vocabulary size; null: the tokenizer's, rounded up to a multiple of vocab_multiple")
    vocab_multiple: int = option(64, "round a vocabulary taken from the tokenizer up to a multiple of this "
                                 "(faster matmuls; the extra ids are never sampled); 1: no rounding")
    dropout: float = option(0.0, "dropout probability in [0, 1)")
    bias: bool = option(False, "biases in linear layers and LayerNorms")
    flash_attention: bool = option(
        True, "fused attention (scaled_dot_product_attention); false: plain matmul-softmax-matmul")
    position: str = option("learned", "position encoding: learned embeddings (GPT-2) or rotary (RoPE)",
                           choices=("learned", "rope"))
    norm: str = option("layernorm", "normalisation layer", choices=("layernorm", "rmsnorm"))
    mlp: str = option("gelu", "MLP: GELU, GELU's tanh approximation (OpenAI's GPT-2), ReLU squared, "
                      "SwiGLU (LLaMA) or GeGLU (Gemma)",
                      choices=("gelu", "gelu_tanh", "relu2", "swiglu", "geglu"))
    n_kv_head: Optional[int] = option(
        None, "key/value heads (grouped-query attention; must divide n_head); null: n_head")
    qk_norm: bool = option(False, "RMS-normalise queries and keys per head before attention")
    tie_embeddings: bool = option(True, "share the token embedding with the output head")
    zero_init_projections: bool = option(
        False, "start the residual output projections at zero (each block begins as the identity)")
    loss_chunk_size: int = option(
        0, "compute the output head and loss this many positions at a time, each chunk's gradients at "
        "once, so the tokens x vocabulary logits never exist whole; 0: all at once")
    impl: str = option("", "the model class: empty for model.py's GPT, or 'path/to/my_gpt.py:MyGPT' for "
                       "one of your own (contract.py, docs/tutorials/build-your-own-gpt.md)")


@dataclass
class DataConfig:
    dataset: str = option(
        "shakespeare_char", "'shakespeare_char' (downloaded), or a .txt/.md/.jsonl/.parquet file, a folder "
        "or a glob pattern of them")
    text_column: str = option("text", "the column of strings a parquet file of base text is read by")
    messages_column: str = option(
        "messages", "the column of chats ({role, content} lists) a parquet file is read by, when it has one")
    tokenizer: str = option("char", "characters, a SentencePiece model trained on the corpus, or a "
                            "tiktoken encoding", choices=("char", "sentencepiece", "tiktoken"))
    vocab_size: int = option(2048, "for sentencepiece: the vocabulary size, special tokens included")
    sentencepiece_model: str = option("bpe", "for sentencepiece: the model type", choices=("bpe", "unigram"))
    tiktoken_encoding: str = option("gpt2", "for tiktoken: the named encoding",
                                    choices=TIKTOKEN_ENCODINGS)
    sampling: str = option(
        "random", "training windows: random, or sequential (each epoch walks a shuffled order of "
        "non-overlapping windows, so every token is trained on once per epoch)",
        choices=("random", "sequential"))
    num_workers: Optional[int] = option(
        None, "processes that tokenize a corpus of 8 MB or more; null: one per CPU core")
    val_fraction: float = option(0.1, "share of the text, taken from its end, held out for validation")
    cache_dir: str = option("cache", "where downloads and token caches live")
    tokenizer_file: Optional[str] = option(
        None, "a tokenizer saved as JSON (pipeline.py's tokenizer phase writes one) to encode with, "
        "instead of fitting the 'tokenizer' setting to this corpus")


@dataclass
class TrainingConfig:
    max_steps: int = option(5000, "optimizer steps to train for")
    epochs: Optional[float] = option(None, "if set, train this many passes over the train tokens instead")
    batch_size: int = option(64, "sequences per micro-batch")
    grad_accum_steps: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-3, "peak learning rate")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = option(100, "steps of linear warmup")
    lr_decay_steps: Optional[int] = option(None, "step where the decay reaches min_lr; null: the last")
    schedule: str = option(
        "cosine", "after warmup: cosine decay, or wsd (stable at lr, then a linear cooldown over "
        "the last cooldown_fraction of the steps after warmup)", choices=("cosine", "wsd"))
    cooldown_fraction: float = option(0.2, "for schedule wsd: the share of the steps after warmup spent "
                                           "decaying")
    optimizer: str = option("adamw", "adamw, or muon for the hidden matrices with AdamW for the rest",
                            choices=("adamw", "muon"))
    muon_lr: float = option(0.02, "Muon's peak learning rate (the schedule scales it like lr)")
    muon_momentum: float = option(0.95, "Muon's momentum")
    weight_decay: float = option(0.1, "AdamW weight decay, on matrices only (Muon's matrices: none)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.99, "AdamW beta2")
    grad_clip: float = option(1.0, "max gradient norm; 0 turns clipping off")
    eval_interval: int = option(250, "steps between evaluations")
    eval_iters: int = option(
        200, "validation batches an evaluation scores (and train batches where eval_train_iters is null)")
    eval_train_iters: Optional[int] = option(
        20, "train batches an evaluation scores, for the train loss it reports (nothing is decided on "
        "it, unlike on val): 20 show the train/val gap at a tenth of 200's cost; null: eval_iters")
    eval_full_val: bool = option(
        False, "score the whole validation split (non-overlapping windows) instead of eval_iters batches")
    log_interval: int = option(10, "steps between progress lines")
    checkpoint_interval: int = option(0, "steps between extra checkpoints; 0: only at evaluations")
    plot_milestone_interval: int = option(
        1000, "keep a copy of loss.png as plots/loss_step<N>.png every this many steps; 0: none")
    keep_last: int = option(3, "rolling ckpt-<step>.pt files kept beside ckpt.pt and best.pt; 0: none")
    max_bad_steps: int = option(10, "non-finite losses in a row that stop the run (each one is skipped)")
    nonfinite_check: str = option(
        "log", "a step with a non-finite loss or gradient is skipped on the device, weights and "
        "optimizer state untouched; log: the host learns of it at the next progress report (no "
        "host-device sync in a step); step: after every step (one sync a step), to name each one",
        choices=("step", "log"))
    target_val_loss: Optional[float] = option(None, "stop once an evaluation reaches this val loss")
    max_time_s: Optional[float] = option(
        None, "stop with a checkpoint before this much wall time (seconds; on the command line also "
        "1h30m, 90m, 1.5h, 45s)", parse=parse_duration, format=DURATION_FORMS)
    budget_usd: Optional[float] = option(
        None, "stop with a checkpoint before spending this many dollars (needs system.usd_per_hour)")
    out_dir: Optional[str] = option(None, "run directory; null: models/<config name>")
    loggers: list[str] = option(
        ["csv"], "where the metrics go: csv (metrics.csv, always written: the plots, report and a resume "
        "read it), tensorboard (events in <out_dir>/tensorboard), wandb (Weights & Biases, offline unless "
        "logged in or WANDB_MODE is set); on the command line --logger NAME, repeated",
        choices=("csv", "tensorboard", "wandb"))


@dataclass
class WandbConfig:
    project: str = option("gpt-trainer", "the W&B project a run with training.loggers wandb goes to")
    name: Optional[str] = option(None, "the W&B run's name; null: the run directory's name")
    tags: list[str] = option([], "the W&B run's tags (on the command line: --wandb.tags a,b)")
    group: Optional[str] = option(None, "the W&B group the run joins (runs of one experiment); null: none")


@dataclass
class SystemConfig:
    device: str = option("auto", "where to train", choices=("auto", "cpu", "cuda", "mps"))
    dtype: str = option(
        "auto", "compute dtype; auto: bfloat16 on CUDA where supported, else float16; on a CPU, float32 or "
        "bfloat16, whichever a timed step of the run's model found faster there (float32 where bf16 is emulated)",
        choices=("auto", "float32", "bfloat16", "float16"), aliases=DTYPE_ALIASES)
    compile: Optional[bool] = option(None, "torch.compile the model; null: on for CUDA, off elsewhere")
    compile_mode: str = option(
        "auto", "torch.compile mode; reduce-overhead replays CUDA graphs (fewer kernel launches); auto: "
        "reduce-overhead on one CUDA process without gradient accumulation, else default (forward_context.py)",
        choices=("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    attention_backend: str = option(
        "auto", "scaled_dot_product_attention's kernel; auto: torch's choice; a CPU has math and flash",
        choices=("auto", "flash", "cudnn", "efficient", "math"))
    compile_scope: str = option(
        "auto", "what torch.compile compiles: blocks (one transformer block's graph, reused by every "
        "layer: compiles in about a layer's time), model (the whole forward as one graph); auto: blocks, "
        "but the model in the CUDA-graph modes or where blocks cannot be (torch < 2.6)",
        choices=("auto", "blocks", "model"))
    data_on_device: Optional[bool] = option(
        None, "keep the token splits in device memory and cut batches there; null: on CUDA when "
        "they fit in 2 GiB")
    fsdp: bool = option(
        False, "under torchrun, shard parameters, gradients and optimizer state over the processes "
        "(FSDP's fully_shard) instead of a full copy each (DDP): for models that do not fit one device")
    allow_tf32: bool = option(True, "TF32 matmuls on CUDA")
    seed: int = option(1337, "seed for Python, numpy and torch")
    threads: Optional[int] = option(
        None, "CPU threads torch computes with (torch.set_num_threads); null: torch's default, one per core")
    usd_per_hour: Optional[float] = option(None, "what the machine costs, for training.budget_usd")
    peak_tflops: Optional[float] = option(
        None, "the device's peak TFLOP/s for MFU; null: from a table of common GPUs")
    deterministic: bool = option(
        False, "deterministic algorithms where torch has them (slower; CUDA results repeat exactly)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)  # section name -> dataclass, in order

# ---------------------------------------------------------------- JSON files


def config_from_dict(settings: dict, where: str = "the config") -> Config:
    """Build a Config from nested dicts, checking every section, key and type."""
    sections = {}
    for section_name, values in settings.items():
        if section_name not in SECTIONS:
            raise UserError(unknown_key_message("section", section_name, list(SECTIONS), where))
        if not isinstance(values, dict):
            raise UserError(f"section '{section_name}' in {where} must be a JSON object")
        types_ = field_types(SECTIONS[section_name])
        checked = {}
        for key, value in values.items():
            if key not in types_:
                raise UserError(
                    unknown_key_message("key", key, list(types_), where, f"{section_name}.")
                )
            value = check_value(f"{section_name}.{key}", types_[key], value)
            checked[key] = resolve_alias(SECTIONS[section_name], key, value)
        sections[section_name] = SECTIONS[section_name](**checked)
    return Config(**sections)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path, keep_out_dir: bool = True) -> None:
    """Write the config as JSON; without out_dir when `keep_out_dir` is false, so that a run of
    the file derives its own (models/<file name>) instead of sharing the original's."""
    path = Path(path)
    settings = config_to_dict(cfg)
    if not keep_out_dir:
        del settings["training"]["out_dir"]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot write the config to {path}: {error.strerror}") from None


# ---------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Raise UserError on the first setting that cannot work, saying how to fix it."""
    m, d, t, s = cfg.model, cfg.data, cfg.training, cfg.system
    positive = {
        "model.n_layer": m.n_layer, "model.n_head": m.n_head, "model.n_embd": m.n_embd,
        "model.block_size": m.block_size, "training.max_steps": t.max_steps,
        "training.batch_size": t.batch_size, "training.grad_accum_steps": t.grad_accum_steps,
        "training.eval_interval": t.eval_interval, "training.eval_iters": t.eval_iters,
        "training.log_interval": t.log_interval, "model.vocab_multiple": m.vocab_multiple,
        "data.vocab_size": d.vocab_size,
    }
    if m.n_kv_head is not None:
        positive["model.n_kv_head"] = m.n_kv_head
    for name, value in positive.items():
        if value <= 0:
            raise UserError(f"{name} must be positive, got {value}")
    non_negative = {
        "training.warmup_steps": t.warmup_steps, "training.weight_decay": t.weight_decay,
        "training.grad_clip": t.grad_clip, "training.checkpoint_interval": t.checkpoint_interval,
        "training.min_lr": t.min_lr, "training.keep_last": t.keep_last,
        "training.plot_milestone_interval": t.plot_milestone_interval,
        "model.loss_chunk_size": m.loss_chunk_size,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise UserError(f"{name} must be zero or more, got {value}")
    optional_positive = {
        "training.lr": t.lr, "training.epochs": t.epochs, "training.muon_lr": t.muon_lr,
        "training.lr_decay_steps": t.lr_decay_steps,
        "model.vocab_size": m.vocab_size, "training.max_time_s": t.max_time_s,
        "training.budget_usd": t.budget_usd, "system.usd_per_hour": s.usd_per_hour,
        "training.max_bad_steps": t.max_bad_steps, "system.peak_tflops": s.peak_tflops,
        "data.num_workers": d.num_workers, "training.eval_train_iters": t.eval_train_iters,
        "system.threads": s.threads,
    }
    for name, value in optional_positive.items():
        if value is not None and value <= 0:
            raise UserError(f"{name} must be positive, got {value}")
    if not all(math.isfinite(v) for v in (t.lr, t.min_lr, t.weight_decay, t.grad_clip)):
        raise UserError("learning rates, weight decay and grad_clip must be finite numbers")
    if m.n_embd % m.n_head != 0:
        raise UserError(
            f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head}); "
            f"try n_head {_nearest_divisor(m.n_embd, m.n_head)}"
        )
    if m.n_kv_head is not None and m.n_head % m.n_kv_head != 0:
        raise UserError(f"model.n_kv_head ({m.n_kv_head}) must divide model.n_head ({m.n_head}); "
                        f"try {_nearest_divisor(m.n_head, m.n_kv_head)}")
    if t.budget_usd is not None and s.usd_per_hour is None:
        raise UserError("--budget needs the machine's price: set system.usd_per_hour "
                        "(e.g. --system.usd_per_hour 2.49)")
    if t.min_lr > t.lr:
        raise UserError(f"training.min_lr ({t.min_lr}) must not exceed training.lr ({t.lr})")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if not 0.0 < t.cooldown_fraction <= 1.0:
        raise UserError(f"training.cooldown_fraction must be in (0, 1], got {t.cooldown_fraction}")
    if not 0.0 < d.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be between 0 and 1, got {d.val_fraction}")
    for name, value in (("beta1", t.beta1), ("beta2", t.beta2), ("muon_momentum", t.muon_momentum)):
        if not 0.0 <= value < 1.0:
            raise UserError(f"training.{name} must be in [0, 1), got {value}")
    if not d.dataset.strip():
        raise UserError("data.dataset is empty; name 'shakespeare_char' or a path to a .txt file")
    for section in (m, d, t, s, cfg.wandb):
        _check_choices(section)


def _nearest_divisor(n: int, near: int) -> int:
    return min((k for k in range(1, n + 1) if n % k == 0), key=lambda k: abs(k - near))


def _check_choices(section: Any) -> None:
    section_name = next(k for k, v in SECTIONS.items() if isinstance(section, v))
    for f in dataclasses.fields(section):
        choices = f.metadata.get("choices")
        value = getattr(section, f.name)
        for item in value if isinstance(value, list) else [value]:
            if choices and item not in choices:
                raise UserError(f"{section_name}.{f.name} must be one of {', '.join(choices)}; got '{item}'")


def default_out_dir(config_path: str | Path | None) -> str:
    """The run directory of a config that sets none: models/<config file name>."""
    return str(Path("models") / (Path(config_path).stem if config_path else "default"))


def resolve_config(config_path: str | None, overrides: dict, base: dict | None = None) -> Config:
    """Return the validated Config from a file (or `base` settings), then the overrides."""
    settings = load_config_file(config_path) if config_path else dict(base or {})
    where = str(config_path) if config_path else "the settings"
    cfg = config_from_dict(deep_merge(settings, overrides), where)
    if cfg.training.out_dir is None:
        cfg.training.out_dir = default_out_dir(config_path)
    cfg.training.loggers = list(dict.fromkeys(["csv", *cfg.training.loggers]))  # metrics.csv always
    validate(cfg)
    return cfg


def fill_vocab_size(cfg: Config, vocab_size: int) -> Config:
    """Return the config with model.vocab_size taken from the tokenizer (rounded up to
    model.vocab_multiple) when not set."""
    if cfg.model.vocab_size is None:
        padded = padded_vocab_size(vocab_size, cfg.model.vocab_multiple)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=padded))
    if cfg.model.vocab_size < vocab_size:
        raise UserError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's "
                        f"{vocab_size}; set it to null or at least {vocab_size}")
    return cfg


def tokens_per_step(cfg: Config, processes: int = 1) -> int:
    """Return the tokens one optimizer step trains on: processes x batch x accumulation x context
    (batch_size is per process: each rank of a torchrun run trains on its own batches)."""
    t = cfg.training
    return processes * t.batch_size * t.grad_accum_steps * cfg.model.block_size


def cooldown_start(t: TrainingConfig, max_steps: int) -> float:
    """Return the step where schedule wsd's linear cooldown begins: cooldown_fraction of the
    steps between warmup and the decay's end are left."""
    decay_end = t.lr_decay_steps or max_steps
    return decay_end - t.cooldown_fraction * (decay_end - t.warmup_steps)


def train_eval_iters(t: TrainingConfig) -> int:
    """Return the train batches an evaluation scores: eval_train_iters, or eval_iters where null."""
    return t.eval_iters if t.eval_train_iters is None else t.eval_train_iters


def format_config(cfg: Config) -> str:
    """Return the config as aligned `key  value` lines grouped by section."""
    lines = []
    for section_name, values in config_to_dict(cfg).items():
        lines.append(f"[{section_name}]")
        width = max(len(k) for k in values)
        for key, value in values.items():
            lines.append(f"  {key:<{width}}  {json.dumps(value)}")
    return "\n".join(lines)
