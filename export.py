"""Export a checkpoint as a Hugging Face model folder: `python export.py models/tiny --out hf/tiny`.

`transformers.AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
load the folder with no code from this project. A GPT-2-shaped model (learned positions,
LayerNorm, GELU MLP, one key/value head per query head, no QK-norm) becomes a GPT2LMHeadModel;
any other option has no exact GPT-2 equivalent and is refused by name. Files written:
config.json, model.safetensors, generation_config.json, the tokenizer's files and README.md
(the model card).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

from checkpoint import find_checkpoint, load_checkpoint, model_config_from_checkpoint
from cli import CliParser, run_cli
from errors import UserError
from huggingface import check_gpt2_shape, generation_config, gpt2_config, gpt2_weights, tokenizer_files
from model_card import write_model_card
from tokenizer import tokenizer_from_dict


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(description="Export a checkpoint as a Hugging Face model folder.", allow_abbrev=False)
    parser.add_argument("checkpoint", help="a checkpoint file, or a run directory (best.pt, else ckpt.pt)")
    parser.add_argument("--out", required=True, help="the folder to write (created; must be empty)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def export(checkpoint_path: Path, out: Path) -> list[Path]:
    """Write the Hugging Face folder for a checkpoint; return the files written."""
    from safetensors.torch import save_file

    checkpoint = load_checkpoint(checkpoint_path)
    cfg = model_config_from_checkpoint(checkpoint)
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
    check_gpt2_shape(cfg)
    files = tokenizer_files(tokenizer, cfg.block_size)  # before anything is written: it may refuse
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; choose a new --out folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        weights = gpt2_weights(checkpoint["model"], cfg)
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
        files["config.json"] = json.dumps(gpt2_config(cfg, tokenizer), indent=2)
        files["generation_config.json"] = json.dumps(generation_config(tokenizer), indent=2)
        for name, text in files.items():
            (out / name).write_text(text + "\n", encoding="utf-8")
        plot = checkpoint_path.parent / "loss.png"
        if plot.is_file():
            shutil.copyfile(plot, out / "loss.png")
        write_model_card(out / "README.md", checkpoint, checkpoint_path, plot.is_file())
    except OSError as error:
        raise UserError(f"cannot write {out}: {error.strerror}") from None
    return sorted(out.iterdir())


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    path = find_checkpoint(args.checkpoint, prefer=("best.pt", "ckpt.pt"))
    written = export(path, Path(args.out))
    print(f"exported {path} to {args.out}: {', '.join(p.name for p in written)}")
    print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
