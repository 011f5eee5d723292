"""Sample text from a trained model: `python gen.py models/tiny/ckpt.pt --prompt "ROMEO:"`."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from checkpoint import find_checkpoint, load_checkpoint, model_config_from_checkpoint
from cli import CliParser, run_cli
from errors import UserError
from model import GPT
from tokenizer import END_OF_TEXT, tokenizer_from_dict
from utils import autocast_context, resolve_system

SAMPLE_SEPARATOR = "\n" + "-" * 40


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(description="Generate text from a trained GPT checkpoint.", allow_abbrev=False)
    parser.add_argument("checkpoint", help="a checkpoint file, or a run directory (best.pt, else ckpt.pt)")
    parser.add_argument("--prompt", default="\n", help="text the samples continue (default: a newline)")
    parser.add_argument("--num_samples", type=int, default=1, help="how many samples to print")
    parser.add_argument("--max_new_tokens", type=int, default=500, help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="below 1 is safer, above 1 more varied; 0 always takes the likeliest")
    parser.add_argument("--top_k", type=int, default=200, help="sample only among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=1337, help="the same seed gives the same text")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be zero or more, got {args.temperature}")
    if args.top_k < 1:
        raise UserError(f"--top_k must be at least 1, got {args.top_k}")
    if not args.prompt:
        raise UserError("--prompt is empty; give at least one character, e.g. --prompt $'\\n'")


def load_model(checkpoint: dict, device: torch.device, path: str) -> GPT:
    """Return the checkpoint's model in eval mode on `device`."""
    model = GPT(model_config_from_checkpoint(checkpoint))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise UserError(f"the weights in {path} do not match the model its config describes") from None
    return model.to(device).eval()


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    path = find_checkpoint(args.checkpoint, prefer=("best.pt", "ckpt.pt"))
    checkpoint = load_checkpoint(path)
    system = resolve_system(args.device, "auto", compile_requested=False)
    model = load_model(checkpoint, system.device, str(path))
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
    prompt = torch.tensor([tokenizer.encode(args.prompt)], device=system.device)
    generator = torch.Generator(device=system.device).manual_seed(args.seed)
    end_of_text = tokenizer.special_ids.get(END_OF_TEXT)
    with autocast_context(system.device, system.dtype):
        for sample in range(args.num_samples):
            if sample:
                print(SAMPLE_SEPARATOR)
            print(args.prompt, end="", flush=True)
            for token in model.generate(prompt, args.max_new_tokens, args.temperature,
                                        args.top_k, generator, vocab_limit=tokenizer.vocab_size):
                if token.item() == end_of_text:  # the document is over, and so is the sample
                    break
                print(tokenizer.decode(token[0].tolist()), end="", flush=True)
            print()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
