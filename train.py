"""Train a GPT: `python train.py --config configs/tiny.json [--section.field VALUE ...]`."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from checkpoint import (
    check_same_architecture,
    find_checkpoint,
    load_checkpoint,
    load_latest_valid,
    load_resumable,
    with_architecture_of,
)
from cli import CliParser, add_config_flags, overrides_from_args, run_cli
from config import (
    Config,
    __version__,
    config_from_dict,
    default_out_dir,
    fill_vocab_size,
    format_config,
    load_config_file,
    resolve_config,
    save_config,
    tokens_per_step,
    validate,
)
from contract import build_model, params_without_embeddings
from data_loader import (
    PreparedData,
    check_enough_tokens,
    describe_data,
    prepare_data,
    shakespeare_is_local,
)
from distributed import Collectives, ranks_from_environment
from errors import UserError
from huggingface import checkpoint_from_hf, is_hf_folder
from forward_context import check_attention_backend
from loggers import require_packages
from optim import total_steps
from precision import choose_cpu_dtype
from run_description import RunFacts, Style, describe_run, format_sections
from run_files import checkpoints_in, clear_earlier_run, outputs_in
from tokenizer import read_tokenizer_file, tokenizer_from_dict
from trainer import Trainer
from timing import describe_estimate
from utils import DeviceInfo, configure_threads, configure_torch, notice, process_start_time, resolve_system


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(description="Train a small GPT language model.", allow_abbrev=False)
    parser.add_argument("--config", help="JSON config file (may 'extends' another)")
    parser.add_argument("--show_config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--save_config", metavar="PATH", help="write the resolved config as JSON and exit")
    parser.add_argument("--data_stats", action="store_true",
                        help="tokenize the dataset (or read its cache), print its statistics and exit")
    parser.add_argument("--version", action="version", version=f"gpt-trainer {__version__}")
    parser.add_argument("--resume", nargs="?", const="", metavar="PATH",
                        help="continue a run: the newest checkpoint that verifies, or the one named")
    parser.add_argument("--load_model_only", metavar="PATH",
                        help="start from another checkpoint's weights (fresh optimizer, step 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run even if out_dir holds checkpoints (the earlier run's "
                        "checkpoints, metrics, plots and report are removed); let --save_config replace "
                        "a file")
    parser.add_argument("--no_cache", action="store_true", help="rebuild the token cache")
    parser.add_argument("--no_compile", action="store_true", help="do not torch.compile the model")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    add_config_flags(parser)
    return parser


def resolve_run_config(args: argparse.Namespace) -> tuple[Config, Optional[dict], Optional[Path]]:
    """Return the config and, when resuming, the checkpoint and its path.

    A resume continues in the checkpoint's directory (`--resume PATH`'s, or the newest valid
    one in out_dir). Without `--config` it takes the checkpoint's own config; with it, the
    file's settings but the run's own data. Flags given on the command line still apply.
    """
    overrides = overrides_from_args(args)
    if args.no_compile:
        overrides.setdefault("system", {})["compile"] = False
    if args.resume is None:
        return resolve_config(args.config, overrides), None, None
    if args.load_model_only:
        raise UserError("--resume and --load_model_only exclude each other; use one")
    if args.resume:
        checkpoint, path = load_resumable(Path(args.resume))
    else:
        checkpoint, path = load_latest_valid(Path(resolve_config(args.config, overrides).training.out_dir))
    overrides.setdefault("training", {}).setdefault("out_dir", str(path.parent))
    if not args.config:
        return resolve_config(None, overrides, checkpoint["config"]), checkpoint, path
    cfg = resolve_config(args.config, overrides)
    return with_the_runs_data(cfg, checkpoint, overrides.get("data", {}), args.config), checkpoint, path


MACHINE_DATA_FIELDS = ("cache_dir", "num_workers")  # where and how this machine reads the data: the file's


def with_the_runs_data(cfg: Config, checkpoint: dict, typed: dict, config_path: str) -> Config:
    """Return `cfg` with the data settings the resumed run trained with (but for where and how
    this machine reads them), the data flags typed now over them: a `--dataset` given when the
    run began is in no config file, and a file changed since would switch a run's data unseen."""
    theirs = config_from_dict({"data": checkpoint["config"]["data"]}, "the checkpoint's config").data
    ours = {name: getattr(cfg.data, name) for name in MACHINE_DATA_FIELDS}
    data = dataclasses.replace(theirs, **{**ours, **typed})
    if data == cfg.data:
        return cfg
    names = [field.name for field in dataclasses.fields(data)]
    changed = [f"{name} {getattr(data, name)!r}, not {getattr(cfg.data, name)!r}" for name in names
               if getattr(data, name) != getattr(cfg.data, name)]
    if ranks_from_environment().is_main:  # under torchrun, once
        notice(f"resuming on the run's own data settings ({'; '.join(changed)} as {config_path} says); "
               "flags such as --dataset choose others")
    resumed = dataclasses.replace(cfg, data=data)
    validate(resumed)
    return resumed


def describe_config(cfg: Config, system: DeviceInfo, data: Optional[PreparedData],
                    continuing: Optional[str] = None) -> str:
    """Return the resolved config and the values derived from it, for --show_config
    (`continuing`: the dtype of the run a resume continues)."""
    facts = None
    sized = fill_vocab_size(cfg, data.tokenizer.vocab_size) if data is not None else cfg
    system = choose_cpu_dtype(sized, system, continuing, can_time=data is not None)  # timed, or cached
    if data is not None:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = build_model(sized.model)
        facts = RunFacts(params=model.num_params(),
                         params_without_embeddings=params_without_embeddings(model),
                         vocab_size=data.tokenizer.vocab_size, train_tokens=len(data.train),
                         val_tokens=len(data.val), tokenizer=data.tokenizer.kind,
                         max_steps=total_steps(cfg.training, len(data.train), tokens_per_step(cfg)))
    sections = describe_run(cfg, system, facts)
    if facts is not None:
        sections.append(("time", describe_estimate(sized, system, facts.max_steps, facts.val_tokens)))
    else:
        sections.append(("time", [("whole run", "known once the dataset is downloaded (the first run "
                                                "downloads it)")]))
    derived = [(f"{title}: derived", rows) for title, rows in sections]
    return format_config(cfg) + "\n" + format_sections(derived, Style(enabled=False))


def prepare_out_dir(out_dir: Path, resumed_from: Optional[Path], overwrite: bool) -> None:
    """Create the run directory; refuse to write over another run's checkpoints (unless
    --overwrite), and clear what an earlier run left there, so every file in it is the new run's."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(
            f"cannot write to out_dir {out_dir} ({error.strerror}); pick another --out_dir"
        ) from None
    for leftover in out_dir.glob(".*.partial-*"):  # from a run killed while saving; never valid
        leftover.unlink()
    if resumed_from is not None and resumed_from.parent.resolve() == out_dir.resolve():
        return  # continuing here: the metrics, plots and report go on
    checkpoints = checkpoints_in(out_dir)
    if checkpoints and not overwrite:
        raise UserError(f"{out_dir} already holds a checkpoint of an earlier run; continue it with "
                        "--resume, replace it with --overwrite, or choose another --out_dir")
    earlier = checkpoints + outputs_in(out_dir)  # outputs alone: a run stopped before its first save
    if earlier:
        print(clear_earlier_run(out_dir, earlier), flush=True)


def out_dir_was_set(args: argparse.Namespace) -> bool:
    """Whether the user chose out_dir (by flag, in the config file, or as --resume's checkpoint
    directory) rather than it being derived from the config's name."""
    if args.resume or hasattr(args, "training.out_dir"):
        return True
    file_settings = load_config_file(args.config) if args.config else {}
    return file_settings.get("training", {}).get("out_dir") is not None


def save_run_config(args: argparse.Namespace, cfg: Config) -> None:
    """Write the resolved config for --save_config, and say what became of out_dir."""
    if Path(args.save_config).is_dir():
        raise UserError(f"--save_config {args.save_config} is a folder; name a file such as "
                        f"{Path(args.save_config) / 'config.json'}")
    if Path(args.save_config).exists() and not args.overwrite:
        raise UserError(f"--save_config {args.save_config} exists; name a new file, or pass --overwrite "
                        "to replace it")
    keep = out_dir_was_set(args)
    save_config(cfg, args.save_config, keep_out_dir=keep)
    if keep:
        print(f"saved the resolved config to {args.save_config}, with out_dir {cfg.training.out_dir}")
    else:
        print(f"saved the resolved config to {args.save_config}, without out_dir (derived from the "
              f"config's name): a run of it writes to {default_out_dir(args.save_config)}; "
              "pass --out_dir to save one")


def local_data(args: argparse.Namespace, cfg: Config, start_from: Optional[dict]) -> Optional[PreparedData]:
    """Return the run's data if its text is on disk already; never download for --show_config."""
    if cfg.data.dataset == "shakespeare_char" and not shakespeare_is_local(cfg.data.cache_dir):
        return None
    return prepare_run_data(args, cfg, start_from, rebuild=False)


def starting_point(args: argparse.Namespace, cfg: Config, checkpoint: Optional[dict]) -> tuple[Config, Optional[dict]]:
    """Return the config and the checkpoint the run starts from (starting_checkpoint); an imported
    Hugging Face model's weights fix the shape, whatever the config says."""
    start_from = starting_checkpoint(args, checkpoint)
    if start_from is not None and "source" in start_from:
        cfg = with_architecture_of(cfg, start_from)
    return cfg, start_from


def starting_checkpoint(args: argparse.Namespace, checkpoint: Optional[dict]) -> Optional[dict]:
    """Return the checkpoint the run starts from: the one it resumes, or --load_model_only's
    (a checkpoint, a run directory, or a Hugging Face GPT-2 folder)."""
    if checkpoint is not None or not args.load_model_only:
        return checkpoint
    if is_hf_folder(args.load_model_only):
        return checkpoint_from_hf(args.load_model_only)
    return load_checkpoint(find_checkpoint(args.load_model_only))


def prepare_run_data(args: argparse.Namespace, cfg: Config, start_from: Optional[dict],
                     rebuild: Optional[bool] = None) -> PreparedData:
    """Return the run's data; a model continues with the tokenizer it learned (a checkpoint's),
    whatever tokenizer the data settings would fit to this corpus."""
    if start_from is not None:
        tokenizer = tokenizer_from_dict(start_from["tokenizer"])
    elif cfg.data.tokenizer_file:
        tokenizer = read_tokenizer_file(cfg.data.tokenizer_file)
    else:
        tokenizer = None
    rebuild = args.no_cache if rebuild is None else rebuild
    return prepare_data(cfg.data, rebuild=rebuild, tokenizer=tokenizer)


def build_trainer(args: argparse.Namespace, cfg: Config, checkpoint: Optional[dict],
                  checkpoint_path: Optional[Path], system: DeviceInfo,
                  collectives: Optional[Collectives] = None) -> Trainer:
    """Return a Trainer ready to run: data prepared, weights and state loaded, out_dir checked.

    Under torchrun rank 0 builds the token cache and prepares out_dir while the others wait,
    then they read what it made; only rank 0 ever writes.
    """
    collectives = collectives or Collectives(ranks_from_environment(), system.device)
    main = collectives.ranks.is_main
    if cfg.system.fsdp and not collectives.ranks.launched:
        notice("system.fsdp shards the model over torchrun's processes; this run is one process, "
               "so it keeps the whole model")
    configure_torch(cfg.system)
    cfg, start_from = starting_point(args, cfg, checkpoint)
    with collectives.main_first():
        data = prepare_run_data(args, cfg, start_from, rebuild=args.no_cache and main)
    check_enough_tokens(data, cfg.model.block_size)
    cfg = fill_vocab_size(cfg, data.tokenizer.vocab_size)
    if cfg.model.impl:
        build_model(cfg.model)  # a class of the user's that breaks the contract stops here, out_dir untouched
    check_attention_backend(cfg.system.attention_backend, system.device, system.dtype, cfg.model)  # so does this
    if start_from is not None:
        check_same_architecture(start_from, cfg.model, checkpoint_path or Path(args.load_model_only))
    with collectives.main_first():
        if main:
            prepare_out_dir(Path(cfg.training.out_dir), checkpoint_path, args.overwrite)

    # on a CPU, auto times float32 against bfloat16 (once per shape), after every refusal above
    system = choose_cpu_dtype(cfg, system, continuing=checkpoint.get("dtype") if checkpoint else None)
    trainer = Trainer(cfg, data, system, process_start_time(), collectives)
    if checkpoint is not None:
        trainer.resume(checkpoint, checkpoint_path)  # the summary before training says so
    elif start_from is not None:
        trainer.load_weights(start_from)
        if main:
            print(f"starting from the weights of {start_from.get('source', args.load_model_only)}",
                  flush=True)
    return trainer


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg, checkpoint, checkpoint_path = resolve_run_config(args)
    configure_threads(cfg.system.threads)  # before anything is timed or trained
    ranks = ranks_from_environment()
    system = resolve_system(cfg.system.device, cfg.system.dtype, cfg.system.compile, ranks,
                            cfg.system.compile_mode, cfg.training.grad_accum_steps)
    if args.show_config:
        cfg, start_from = starting_point(args, cfg, checkpoint)
        continuing = checkpoint.get("dtype") if checkpoint else None
        print(describe_config(cfg, system, local_data(args, cfg, start_from), continuing))
        return 0
    if args.data_stats:
        data = prepare_run_data(args, cfg, starting_checkpoint(args, checkpoint))
        print(format_sections([("data", describe_data(data))], Style(enabled=False)))
        return 0
    if args.save_config:
        save_run_config(args, cfg)
        return 0
    require_packages(cfg.training.loggers)  # a missing one stops the run before it touches a file

    with Collectives(ranks, system.device) as collectives:
        trainer = build_trainer(args, cfg, checkpoint, checkpoint_path, system, collectives)
        if trainer.step >= trainer.max_steps:
            if ranks.is_main:
                print(f"already trained to step {trainer.step} of {trainer.max_steps}; "
                      "raise --max_steps to train further")
            return 0
        result = trainer.train()
    # The shell's convention for a run ended by a signal: 130 for SIGINT, 143 for SIGTERM.
    return 128 + result.stopped_by_signal if result.stopped_by_signal else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
