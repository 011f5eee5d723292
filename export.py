"""Export a checkpoint as a Hugging Face model folder: `python export.py models/tiny --out hf/tiny`.

`transformers.AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
load the folder with no code from this project. A GPT-2-shaped model (learned positions,
LayerNorm, GELU MLP, one key/value head per query head, no QK-norm) becomes a GPT2LMHeadModel;
one with rotary positions, RMSNorm, SwiGLU and no biases (grouped-query attention allowed) a
LlamaForCausalLM; an option neither has is refused by name. Files written:
config.json, model.safetensors, generation_config.json, the tokenizer's files and README.md
(the model card).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from checkpoint import BEST_FIRST, find_checkpoint, load_checkpoint, model_config_from_checkpoint
from cli import CliParser, run_cli
from errors import UserError
from hf_tokenizer import tokenizer_files
from huggingface import generation_config, hf_family, hf_model
from model_card import write_model_card
from tokenizer import tokenizer_from_dict

REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(description="Export a checkpoint as a Hugging Face model folder.", allow_abbrev=False)
    parser.add_argument("checkpoint", help="a checkpoint file, or a run directory (best.pt, else ckpt.pt)")
    parser.add_argument("--out", required=True, help="the folder to write (created; must be empty)")
    parser.add_argument("--push_to_hub", metavar="REPO_ID",
                        help="then upload the folder to this Hugging Face repository (name or owner/name)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--dry_run", action="store_true",
                        help="say what --push_to_hub would upload, and touch no network")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def export(checkpoint_path: Path, out: Path, repo_id: Optional[str] = None) -> list[Path]:
    """Write the Hugging Face folder for a checkpoint; return the files written. The model
    card loads it by `repo_id` where it is to be uploaded there, else from `out`."""
    from safetensors.torch import save_file

    checkpoint = load_checkpoint(checkpoint_path)
    cfg = model_config_from_checkpoint(checkpoint)
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
    family = hf_family(cfg)  # refuses, by name, an option transformers has no exact equivalent of
    model_type = checkpoint["config"]["data"].get("sentencepiece_model", "bpe")
    files = tokenizer_files(tokenizer, cfg.block_size, model_type)  # before writing: it may refuse
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; choose a new --out folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        weights, config = hf_model(checkpoint["model"], cfg, tokenizer)
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
        give_default_mode(out / "model.safetensors")
        files["config.json"] = json.dumps(config, indent=2)
        files["generation_config.json"] = json.dumps(generation_config(tokenizer), indent=2)
        for name, content in files.items():
            if isinstance(content, bytes):
                (out / name).write_bytes(content)
            else:
                (out / name).write_text(content + "\n", encoding="utf-8")
        plot = checkpoint_path.parent / "loss.png"
        if plot.is_file():
            shutil.copyfile(plot, out / "loss.png")
        write_model_card(out / "README.md", checkpoint, checkpoint_path, plot.is_file(), family,
                         repo_id or local_name(out))
    except OSError as error:
        raise UserError(f"cannot write {out}: {error.strerror}") from None
    return sorted(out.iterdir())


def local_name(folder: Path) -> str:
    """The folder as transformers should load it: a relative 'hf/tiny' would be taken for a Hub
    repository from any other folder, so it gets './'."""
    return str(folder) if folder.is_absolute() else f"./{folder.as_posix()}"


def give_default_mode(path: Path) -> None:
    """Give a file the mode a plain open() would: safetensors writes 0600, which others cannot
    read in a shared folder (or after an upload that keeps modes)."""
    umask = os.umask(0)  # the only portable way to read it is to set it and put it back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def check_repo_id(repo_id: str) -> None:
    if not REPO_ID.fullmatch(repo_id):
        raise UserError(f"--push_to_hub {repo_id!r} is not a repository id: use 'name' or 'owner/name' "
                        "(letters, digits, '-', '_', '.')")


def describe_upload(folder: Path, repo_id: str, private: bool) -> str:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    lines = [f"would upload {len(files)} files ({total / 1e6:.1f} MB) to https://huggingface.co/{repo_id} "
             f"({'private' if private else 'public'}):"]
    lines += [f"  {p.name}  {p.stat().st_size:,} bytes" for p in files]
    return "\n".join(lines)


def hub_errors() -> tuple[type[BaseException], ...]:
    """The errors an upload can end with that are not our bug: the hub's own, OSError (which
    covers requests', the client up to 0.x) and those of httpx (1.x) or httpx2 (2.x), which are
    not OSErrors."""
    from huggingface_hub.utils import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError, OSError, ValueError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # this version of huggingface_hub does not use that client
    return tuple(errors)


def push_to_hub(folder: Path, repo_id: str, private: bool) -> str:
    """Create the repository if needed and upload the folder; return its URL."""
    import huggingface_hub
    from huggingface_hub.utils import OfflineModeIsEnabled

    if huggingface_hub.get_token() is None:
        raise UserError("no Hugging Face token: run `hf auth login` (or set HF_TOKEN), then export again "
                        "with --push_to_hub; the folder is written already")
    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload from export.py")
    except OfflineModeIsEnabled:
        raise UserError("HF_HUB_OFFLINE is set, so nothing was uploaded; unset it to --push_to_hub") from None
    except hub_errors() as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"the upload to {repo_id} failed ({reason}); the exported folder {folder} is "
                        "intact, so try again later") from None
    return str(url)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)
    elif args.private or args.dry_run:
        raise UserError("--private and --dry_run go with --push_to_hub REPO_ID")
    path = find_checkpoint(args.checkpoint, prefer=BEST_FIRST)
    out = Path(args.out)
    written = export(path, out, args.push_to_hub)
    print(f"exported {path} to {out}: {', '.join(p.name for p in written)}")
    print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    if args.push_to_hub and args.dry_run:
        print(describe_upload(out, args.push_to_hub, args.private))
    elif args.push_to_hub:
        print(f"uploaded to {push_to_hub(out, args.push_to_hub, args.private)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
