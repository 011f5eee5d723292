"""The command-line surface the commands share: config flags, one-line errors, exit codes.

Every config field gets a `--section.field VALUE` flag, typed from the dataclass; the fields
people change most also get a short flag. Only the flags a user types override the config. A
list field's flag may be repeated, and each value may hold several, comma-separated: the values
given replace the config's list.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from typing import Any, Callable, Mapping, NoReturn, Sequence

from config import SECTIONS
from config_fields import DECODE_STEPS, DTYPE_ALIASES, QUANTIZATIONS, TYPE_WORDS, field_types, is_list, unwrap_optional
from errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError

# Short flags for the fields people change most: `--lr 3e-4` means `--training.lr 3e-4`.
SHORT_FLAGS: dict[str, str] = {
    "device": "system.device",
    "seed": "system.seed",
    "dataset": "data.dataset",
    "out_dir": "training.out_dir",
    "max_steps": "training.max_steps",
    "epochs": "training.epochs",
    "batch_size": "training.batch_size",
    "lr": "training.lr",
    "eval_interval": "training.eval_interval",
    "eval_iters": "training.eval_iters",
    "log_interval": "training.log_interval",
    "checkpoint_interval": "training.checkpoint_interval",
    "target_val_loss": "training.target_val_loss",
    "max_time": "training.max_time_s",
    "budget": "training.budget_usd",
    "precision": "system.dtype",
    "model_impl": "model.impl",
    "logger": "training.loggers",  # repeated: --logger tensorboard --logger wandb
}


SHORT_FOR = {long: short for short, long in SHORT_FLAGS.items()}  # "training.lr": "lr"


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one-line UserErrors with a suggestion."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()[0]
            typed = unknown.split("=")[0]
            flags = [f for action in self._actions for f in action.option_strings]
            close = [f for f in flags if f.startswith(typed)] or difflib.get_close_matches(
                typed, flags, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else "; see --help for the flags"
            raise UserError(f"unknown flag {unknown}{hint}")
        raise UserError(f"{message}; see --help")


def run_cli(main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run a command's main(argv) and turn a UserError into one line on stderr and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return main(argv)
    except UserError as error:
        if debug:
            raise
        rank = os.environ.get("RANK", "0")  # torchrun's: say which process it was, beyond rank 0
        print(f"error{'' if rank == '0' else f' (rank {rank})'}: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader left (`gen.py ... | head`): stop quietly, as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return EXIT_BROKEN_PIPE


def parse_flag_value(flag: str, tp: Any, text: str | list[str], metadata: Mapping[str, Any] = {}) -> Any:
    """Convert the text of a command-line value to the field's type, or raise UserError.

    A field may bring its own parser (durations such as 1h30m) and aliases (bf16 for bfloat16);
    a list field gets the texts of its repeated flag, each split at commas.
    """
    inner, optional = unwrap_optional(tp)
    if is_list(inner):
        return [item.strip() for value in text for item in value.split(",") if item.strip()]
    lowered = text.strip().lower()
    if optional and lowered in ("null", "none", "auto"):
        return None
    try:
        if "parse" in metadata:
            return metadata["parse"](text)
        if inner is bool:
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if inner is int:
            number = float(text)  # accepts 1e4 and 2000.0 but not 2.5
            if not number.is_integer():
                raise ValueError
            return int(number)
        if inner is float:
            return float(text)
        return metadata.get("aliases", {}).get(text, text)
    except ValueError:
        hint = " (or null)" if optional else ""
        expected = metadata.get("format", TYPE_WORDS[inner])
        raise UserError(f"{flag} expects {expected}{hint}, got '{text}'") from None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add `--section.field` for every field, and the short flags; unset flags stay absent."""
    group = parser.add_argument_group("config overrides (any field: --section.field VALUE)")
    for section_name, section_cls in SECTIONS.items():
        types_ = field_types(section_cls)
        for f in dataclasses.fields(section_cls):
            long = f"{section_name}.{f.name}"
            flags = [f"--{long}"] + ([f"--{SHORT_FOR[long]}"] if long in SHORT_FOR else [])
            choices = f.metadata.get("choices")
            help_text = f.metadata["help"] + (f" ({'|'.join(choices)})" if choices else "")
            group.add_argument(*flags, dest=long, metavar="VALUE", default=argparse.SUPPRESS,
                               help=help_text, action="append" if is_list(types_[f.name]) else "store")


def add_model_loading_flags(parser: argparse.ArgumentParser, dtype_default: str) -> None:
    """The flags of the commands that load a trained model (gen.py, eval.py): the device, the
    dtype, the model's class where its file has moved, its quantisation, and --debug."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                        help="where to run the model; auto: CUDA, else MPS, else the CPU")
    parser.add_argument("--dtype", default=dtype_default,
                        choices=("auto", "float32", "bfloat16", "float16", *DTYPE_ALIASES),
                        help="the compute dtype; auto: bfloat16 on CUDA where supported, else float16; "
                        "float32 on a CPU")
    parser.add_argument("--model_impl", metavar="PATH.py:CLASS",
                        help="the model's class, where the file the checkpoint names has moved")
    parser.add_argument("--quantize", default="none", choices=QUANTIZATIONS,
                        help="int8: weight-only int8 matrices (quantize.py), a quarter of float32's bytes")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def add_decode_step_flag(parser: argparse.ArgumentParser) -> None:
    """The flag of the commands that generate (gen.py, serve.py): how the one-token step runs."""
    parser.add_argument("--decode_step", default="auto", choices=DECODE_STEPS,
                        help="how each new token's forward runs (decode_step.py): eager; compiled by "
                        "torch.compile (once, kept in cache/torch_compile); cuda_graph, replayed; "
                        "auto: cuda_graph on CUDA, else eager")


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Return the config flags the user gave, as nested dicts of typed values."""
    overrides: dict[str, dict] = {}
    for section_name, section_cls in SECTIONS.items():
        types_ = field_types(section_cls)
        for f in dataclasses.fields(section_cls):
            long = f"{section_name}.{f.name}"
            if hasattr(args, long):
                # either flag may have been typed: name both (--max_time (--training.max_time_s))
                flag = f"--{SHORT_FOR[long]} (--{long})" if long in SHORT_FOR else f"--{long}"
                value = parse_flag_value(flag, types_[f.name], getattr(args, long), f.metadata)
                overrides.setdefault(section_name, {})[f.name] = value
    return overrides


