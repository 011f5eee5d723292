"""How a config field is declared and how a value given for it is checked: option() with its
help text, durations ("1h30m"), JSON types (lists of strings too), value aliases ("bf16"), the
hint for an unknown key, and reading config files with their `extends` chain. config.py declares
the sections with these; cli.py builds its flags from the same facts.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from errors import UserError


def option(default: Any, help: str, **extra: Any) -> Any:
    """Return a dataclass field carrying its help text (and choices or a parser) as metadata;
    a list or dict default becomes a fresh copy per instance, so no two configs share one."""
    metadata = {"help": help, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def field_default(f: dataclasses.Field) -> Any:
    """Return a field's default value, whether given as a value or as a factory (lists)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


NUMBER = r"\d+(?:\.\d+)?"
DURATION = re.compile(rf"(?:({NUMBER})h)?\s*(?:({NUMBER})m)?\s*(?:({NUMBER})s)?")
DURATION_FORMS = "seconds (5400) or hours, minutes and seconds each with its unit (1h30m, 90m, 1.5h, 2h, 45s)"


def parse_duration(text: str) -> float:
    """Return seconds from '5400', '45s', '90m', '1.5h' or '1h30m'; raise ValueError otherwise.

    Only a lone number goes without a unit: '1h30' could mean 30 minutes or 30 seconds, so it
    is refused rather than guessed.
    """
    text = text.strip()
    if re.fullmatch(NUMBER, text):
        return float(text)
    match = DURATION.fullmatch(text)
    if not match or not any(match.groups()):
        raise ValueError(text)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
QUANTIZATIONS = ("none", "int8")  # of a loaded model's weights, for gen.py and eval.py: quantize.py
DECODE_STEPS = ("auto", "eager", "compiled", "cuda_graph")  # how generation runs a one-token step (decode_step.py)


def field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Return (inner type, whether None is allowed) for `X` or `Optional[X]`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def is_list(tp: Any) -> bool:
    """Whether a field's type is a list (of strings: the only kind of list a config holds)."""
    return typing.get_origin(tp) is list


def type_words(tp: Any) -> str:
    return "a list of strings" if is_list(tp) else TYPE_WORDS[tp]


def check_value(where: str, tp: Any, value: Any) -> Any:
    """Return `value` if it has JSON type `tp` (ints accepted as floats), else raise UserError."""
    inner, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{where} must be {type_words(inner)}, not null")
    if is_list(inner):
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise UserError(f"{where} must be a list of strings, got {json.dumps(value)}")
        return list(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[inner]
    if not ok:
        raise UserError(f"{where} must be {TYPE_WORDS[inner]}, got {json.dumps(value)}")
    return float(value) if inner is float else value


def resolve_alias(section_cls: type, name: str, value: Any) -> Any:
    """Return the canonical spelling of a value with aliases (e.g. dtype 'bf16' -> 'bfloat16')."""
    aliases = next(f for f in dataclasses.fields(section_cls) if f.name == name).metadata.get("aliases", {})
    return aliases.get(value, value) if aliases else value


def unknown_key_message(what: str, key: str, known: list[str], where: str, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean '{prefix}{close[0]}'?"
    else:
        hint = "known: " + ", ".join(prefix + k for k in known)
    return f"unknown {what} '{prefix}{key}' in {where}; {hint}"


def read_json_object(path: Path, what: str, missing_hint: str) -> dict:
    """Return the JSON object a config file holds; a missing, broken or non-object file is one line."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {missing_hint}")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{what} {path} is not valid JSON: {error}") from None
    if not isinstance(settings, dict):
        raise UserError(f"{what} {path} must hold a JSON object with sections")
    return settings


def deep_merge(base: dict, override: dict) -> dict:
    """Return a copy of `base` with `override` merged in, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def shipped_configs() -> str:
    """The project's configs/ folder, as a path that works from the current folder."""
    folder = Path(__file__).resolve().parent / "configs"
    relative = os.path.relpath(folder)
    return (relative if not relative.startswith("..") else str(folder)) + os.sep


def load_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Return the file's settings as a dict, with its `extends` chain merged underneath."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise UserError(f"config files extend each other in a cycle: {cycle}")
    hint = f"'extends' in {_chain[-1]} names it" if _chain else f"the shipped ones are in {shipped_configs()}"
    settings = read_json_object(path, "config file", hint)
    parent = settings.pop("extends", None)
    if parent is None:
        return settings
    if not isinstance(parent, str):
        raise UserError(f"'extends' in {path} must be a file name, got {json.dumps(parent)}")
    base = load_config_file(path.parent / parent, (*_chain, path))
    return deep_merge(base, settings)
