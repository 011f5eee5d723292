"""The pipeline's config: its phases, the data each one trains on, and the run config of each.

A pipeline config is JSON, read strictly (an unknown key or a wrong type is one line):

    {"run_dir": "models/pipeline_laptop", "dataset": "shakespeare_char",
     "tokenizer": {"kind": "char"},
     "tasks": {"seed": 0, "per_kind": 3000, "held_out": 200, "sizes": {"identity": 400}},
     "base": {"config": "pipeline/laptop_base.json", "data": ["base"]},
     "mid": {"config": "pipeline/laptop_mid.json", "data": ["base", "tasks"]},
     "sft": {"config": "pipeline/laptop_sft.json", "data": ["tasks"]},
     "eval": {"multiple_choice": ["tasks"]},
     "report": {"prompts": ["What is 47 + 38?", "Who are you?"]}}

A training phase's config is an ordinary train.py config (`extends` works), its path taken
relative to the pipeline config's folder. Its data is a list of sources: "base" (the base
text, `dataset`), "tasks" (the task chats the tokenizer phase generates) or a path (file,
folder or glob, as train.py takes them).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from config_fields import check_value, option, read_json_object, shipped_configs, unknown_key_message
from errors import UserError
from tasks import DEFAULT_IDENTITY, KIND_NAMES

PHASES = ("tokenizer", "base", "mid", "sft", "eval", "report")
TRAINING_PHASES = ("base", "mid", "sft")
BASE_TEXT, TASK_CHATS = "base", "tasks"  # the data names a phase may list besides paths


@dataclass
class TokenizerSpec:
    """The tokenizer phase: fitted to the base text and the task chats, shared by every phase."""
    kind: str = option("char", "sentencepiece is trained here; tiktoken is a fixed encoding, nothing to train")
    vocab_size: int = option(2048, "sentencepiece: the vocabulary it trains")
    model: str = option("bpe", "sentencepiece: its algorithm")
    encoding: str = option("gpt2", "tiktoken: the encoding")


@dataclass
class TasksSpec:
    """tasks.py's settings: the synthetic task chats that mid and sft learn."""
    seed: int = option(0, "the seed the chats are drawn with")
    per_kind: int = option(2000, "training chats per kind")
    held_out: int = option(200, "held-out chats per kind, at most (eval's exact-match questions)")
    sizes: dict = option({}, "training chats of some kinds, over per_kind: {\"identity\": 400}")
    kinds: list = option(list(KIND_NAMES), "which kinds of task")
    identity: str = option(str(DEFAULT_IDENTITY), "the identity JSON (the model's name, what it is, question "
                                                  "and answer pairs)")


@dataclass
class TrainingPhase:
    """One of base, mid and sft."""
    config: str = option("", "its train.py config, relative to the pipeline config's folder")
    data: list = option([], "what it trains on: \"base\" (the base text), \"tasks\" (the task chats) or "
                            "paths (a file, folder or glob)")


@dataclass
class EvalSpec:
    """The eval phase: every trained phase's model scored the same way."""
    multiple_choice: list = option([], "multiple-choice JSONL files (question, choices, answer); \"tasks\": "
                                       "the held-out tasks asked as multiple choice")
    dtype: str = option("float32", "the dtype eval.py scores in")


@dataclass
class ReportSpec:
    """The report phase: report.md, with sample chats of the final model."""
    prompts: list = option([], "the sample chats' opening messages")
    system: str = option("", "their system prompt (none if empty)")


@dataclass
class PipelineConfig:
    run_dir: str = option("models/pipeline", "where every phase writes its folder, and the report")
    dataset: str = option("shakespeare_char", "the base text: a dataset name, a file, a folder or a glob")
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    tasks: TasksSpec = field(default_factory=TasksSpec)
    base: TrainingPhase = field(default_factory=TrainingPhase)
    mid: TrainingPhase = field(default_factory=TrainingPhase)
    sft: TrainingPhase = field(default_factory=TrainingPhase)
    eval: EvalSpec = field(default_factory=EvalSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    source: Path = Path(".")  # the file read, whose folder phase configs are relative to

    def phase_config(self, phase: str) -> Path:
        return self.source.parent / getattr(self, phase).config


CHOICES = {"tokenizer.kind": ("char", "sentencepiece", "tiktoken"), "tokenizer.model": ("bpe", "unigram")}


def _typed(where: str, default: Any, value: Any) -> Any:
    """Check a value against its default's JSON type: lists of strings, dicts of counts, scalars."""
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise UserError(f"{where} must be a list of strings, got {json.dumps(value)}")
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict) or not all(isinstance(n, int) and n >= 0 for n in value.values()):
            raise UserError(f"{where} must be an object of counts, such as {{\"identity\": 300}}")
        return value
    return check_value(where, type(default), value)


def _section_class(spec: dataclasses.Field) -> Any:
    """The dataclass a PipelineConfig field holds (its annotation is a string here)."""
    return globals().get(spec.type) if isinstance(spec.type, str) else spec.type


def _section(cls: type, settings: Any, where: str, name: str) -> Any:
    if not isinstance(settings, dict):
        raise UserError(f"'{name}' in {where} must be an object")
    defaults = cls()
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in settings.items():
        if key not in names:
            raise UserError(unknown_key_message("key", key, names, where, prefix=f"{name}."))
        value = _typed(f"{name}.{key} in {where}", getattr(defaults, key), value)
        if f"{name}.{key}" in CHOICES and value not in CHOICES[f"{name}.{key}"]:
            raise UserError(f"{name}.{key} in {where} must be one of {', '.join(CHOICES[f'{name}.{key}'])}")
        values[key] = value
    return cls(**values)


def check_training_phase(cfg: PipelineConfig, phase: str, where: str) -> None:
    spec: TrainingPhase = getattr(cfg, phase)
    if not spec.config:
        raise UserError(f"{where} names no config for phase {phase}; add \"{phase}\": {{\"config\": "
                        "\"FILE.json\", \"data\": [...]}}")
    if not cfg.phase_config(phase).is_file():
        raise UserError(f"phase {phase}'s config {cfg.phase_config(phase)} does not exist; fix "
                        f"{phase}.config in {where}")
    if not spec.data:
        raise UserError(f"phase {phase} in {where} names no data; give \"data\": [\"base\"], [\"tasks\"] or paths")


def flag_value(text: str) -> Any:
    """A --tasks.per_kind 100 style value: JSON where it parses (numbers, lists), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_pipeline_config(path: str | Path, overrides: Optional[dict] = None) -> PipelineConfig:
    """Read and check a pipeline config, with `overrides` ({section: {field: text}}) over it;
    every phase config it names must exist."""
    path = Path(path)
    settings = read_json_object(path, "pipeline config", f"see {shipped_configs()}pipeline_laptop.json")
    top = {f.name: f for f in dataclasses.fields(PipelineConfig) if f.name != "source"}
    for section, fields in (overrides or {}).items():
        typed = {name: flag_value(text) for name, text in fields.items()}
        _section(_section_class(top[section]), typed, "the flags", section)  # a mistake in a flag names the flag
        if not isinstance(settings.setdefault(section, {}), dict):
            raise UserError(f"'{section}' in {path} must be an object")
        settings[section].update(typed)
    values: dict[str, Any] = {"source": path}
    for key, value in settings.items():
        if key not in top:
            raise UserError(unknown_key_message("key", key, list(top), str(path)))
        section_cls = _section_class(top[key])
        if dataclasses.is_dataclass(section_cls):
            values[key] = _section(section_cls, value, str(path), key)
        else:
            values[key] = check_value(f"{key} in {path}", str, value)
    cfg = PipelineConfig(**values)
    for phase in TRAINING_PHASES:
        check_training_phase(cfg, phase, str(path))
    unknown = [kind for kind in cfg.tasks.kinds if kind not in KIND_NAMES]
    if unknown:
        raise UserError(f"tasks.kinds in {path}: unknown kind '{unknown[0]}'; choose from {', '.join(KIND_NAMES)}")
    return cfg
