"""Measure a trained model on text: `python eval.py models/tiny --text my.txt`.

Loss per token, perplexity, and bits per token, per character and per byte, over every token
of a file or of a dataset's split (windows of the model's context, side by side, the last one
shorter; each window's first token is predicted from nothing before it, as in training).
Bits per character and per byte compare models whose tokenizers differ; they count the
characters of the scored text, not those of special tokens such as <|endoftext|>.
With `--tasks FILE.jsonl ...`, task accuracy instead: multiple-choice files by log-likelihood
(multiple_choice.py), task-chat files (tasks.py's held_out.jsonl) by exact match of greedy
replies (task_eval.py); the text's figures as well only when --text or --dataset is given.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import BEST_FIRST, find_checkpoint, load_checkpoint, load_model
from cli import CliParser, add_model_loading_flags, run_cli
from config import Config, config_from_dict
from config_fields import DTYPE_ALIASES
from data_loader import prepare_data
from errors import UserError
from model import IGNORE_INDEX
from multiple_choice import MultipleChoiceResult, score_file
from quantize import apply_quantization
from task_eval import TaskResult, is_task_chat_file, score_task_chats
from tokenizer import Tokenizer, tokenizer_from_dict
from utils import autocast_context, read_user_text, resolve_system

LN2 = math.log(2)


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(description="Loss, perplexity and bits per character of a trained GPT; multiple-choice "
                                   "accuracy with --tasks.",
                       allow_abbrev=False)
    parser.add_argument("checkpoint", help="a checkpoint file, or a run directory (best.pt, else ckpt.pt)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", help="a UTF-8 text file to score whole")
    source.add_argument("--dataset", help="a dataset as train.py takes it (default: the checkpoint's own)")
    parser.add_argument("--split", default="val", choices=("val", "train", "all"),
                        help="which part of --dataset to score")
    parser.add_argument("--batch_size", type=int, default=16, help="windows per forward pass")
    parser.add_argument("--tasks", nargs="+", metavar="FILE.jsonl",
                        help="task files to score: multiple choice, each line {question, choices: [str], "
                             "answer: index} (MMLU) or {question, choices: {text, label}, answerKey} (ARC); or "
                             "task chats ({messages, task, answer}, tasks.py's held_out.jsonl), by exact match; "
                             "the text is then scored only if --text or --dataset is given")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    add_model_loading_flags(parser, dtype_default="float32")
    return parser


@dataclass
class Scored:
    """What a model's loss came to over a text."""

    tokens: int  # targets scored
    nats: float  # their summed loss
    characters: int  # in the text of those targets
    bytes: int  # the same text in UTF-8

    @property
    def loss(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_token(self) -> float:
        return self.loss / LN2

    @property
    def bits_per_character(self) -> float:
        return self.nats / LN2 / self.characters

    @property
    def bits_per_byte(self) -> float:
        return self.nats / LN2 / self.bytes


def windows(n_tokens: int, block_size: int) -> Iterator[slice]:
    """Yield the spans of block_size + 1 tokens (inputs and their targets) that cover every
    target once, side by side; the last span is shorter."""
    for start in range(0, n_tokens - 1, block_size):
        yield slice(start, min(start + block_size + 1, n_tokens))


def batches(spans: list[slice], batch_size: int) -> Iterator[list[slice]]:
    """Group spans of equal length into batches (only the last span is shorter)."""
    full = [s for s in spans if s.stop - s.start == spans[0].stop - spans[0].start]
    for first in range(0, len(full), batch_size):
        yield full[first:first + batch_size]
    if len(full) < len(spans):
        yield spans[len(full):]


@torch.no_grad()
def score(model: torch.nn.Module, block_size: int, tokens: np.ndarray, tokenizer: Tokenizer,
          mask: Optional[np.ndarray] = None, batch_size: int = 16, dtype: torch.dtype = torch.float32,
          progress: bool = False) -> Scored:
    """Return the model's summed loss over every target of `tokens` (those the mask keeps), in
    windows of block_size."""
    if len(tokens) < 2:
        raise UserError("the text has fewer than 2 tokens: nothing to predict")
    device = next(model.parameters()).device
    spans = list(windows(len(tokens), block_size))
    nats, counted = 0.0, 0
    autocast = autocast_context(device, dtype)
    for group in tqdm(list(batches(spans, batch_size)), desc="scoring", unit="batch", disable=not progress,
                      file=sys.stderr):
        window = torch.from_numpy(np.stack([tokens[s] for s in group]).astype(np.int64)).to(device)
        x, y = window[:, :-1], window[:, 1:]
        if mask is not None:
            kept = torch.from_numpy(np.stack([mask[s] for s in group])[:, 1:].astype(bool)).to(device)
            y = y.masked_fill(~kept, IGNORE_INDEX)
        with autocast:
            _, loss = model(x, y)  # the mean over the batch's counted targets
        n = int((y != IGNORE_INDEX).sum())
        nats += float(loss.float()) * n if n else 0.0  # a batch with no target may have loss NaN
        counted += n
    if counted == 0:
        raise UserError("no token of the text is scored: its loss mask leaves out every one")
    targets = tokens[1:] if mask is None else tokens[1:][mask[1:].astype(bool)]
    specials = set(tokenizer.special_ids.values())  # document separators, not characters of text
    text = tokenizer.decode([int(t) for t in targets if int(t) not in specials])
    return Scored(tokens=counted, nats=nats, characters=len(text), bytes=len(text.encode("utf-8")))


def text_tokens(path: str, tokenizer: Tokenizer) -> np.ndarray:
    return np.asarray(tokenizer.encode(read_user_text(path, "--text")), dtype=np.int64)


def dataset_tokens(checkpoint: dict, dataset: Optional[str], split: str,
                   tokenizer: Tokenizer) -> tuple[np.ndarray, Optional[np.ndarray], str]:
    """Return the tokens (and loss mask) of a dataset's split, encoded with the model's tokenizer."""
    cfg: Config = config_from_dict(checkpoint["config"], "the checkpoint's config")
    data_cfg = dataclasses.replace(cfg.data, dataset=dataset or cfg.data.dataset)
    data = prepare_data(data_cfg, tokenizer=tokenizer)
    parts = {"train": [(data.train, data.train_mask)], "val": [(data.val, data.val_mask)],
             "all": [(data.train, data.train_mask), (data.val, data.val_mask)]}[split]
    tokens = np.concatenate([np.asarray(t) for t, _ in parts])
    masks = [m for _, m in parts]
    mask = None if masks[0] is None else np.concatenate([np.asarray(m) for m in masks])
    return tokens, mask, f"{data_cfg.dataset} ({split} split)"


def report(scored: Scored, path: Path, source: str) -> dict:
    return {"checkpoint": str(path), "source": source, "tokens": scored.tokens,
            "characters": scored.characters, "bytes": scored.bytes, "loss": scored.loss,
            "perplexity": scored.perplexity, "bits_per_token": scored.bits_per_token,
            "bits_per_character": scored.bits_per_character, "bits_per_byte": scored.bits_per_byte}


def score_text(args: argparse.Namespace, checkpoint: dict, model: torch.nn.Module, tokenizer: Tokenizer,
               block_size: int, dtype: torch.dtype) -> tuple[Scored, str]:
    """Return the model's loss over --text, --dataset or the checkpoint's own dataset."""
    if args.text:
        tokens, mask, source = text_tokens(args.text, tokenizer), None, args.text
    else:
        tokens, mask, source = dataset_tokens(checkpoint, args.dataset, args.split, tokenizer)
    return score(model, block_size, tokens, tokenizer, mask, args.batch_size, dtype,
                 progress=not args.json and sys.stderr.isatty()), source


def text_summary(scored: Scored, path: Path, source: str) -> str:
    return (f"{path} on {source}: {scored.tokens:,} tokens, {scored.characters:,} characters\n"
            f"loss {scored.loss:.4f} per token, perplexity {scored.perplexity:.3f}\n"
            f"{scored.bits_per_token:.4f} bits per token, {scored.bits_per_character:.4f} per character, "
            f"{scored.bits_per_byte:.4f} per byte")


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    path = find_checkpoint(args.checkpoint, prefer=BEST_FIRST)
    checkpoint = load_checkpoint(path)
    system = resolve_system(args.device, DTYPE_ALIASES.get(args.dtype, args.dtype), compile_requested=False)
    model = load_model(checkpoint, system.device, str(path), impl=args.model_impl)  # fp32; autocast for bf16
    model = apply_quantization(model, args.quantize)
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
    block_size = checkpoint["config"]["model"]["block_size"]
    progress = not args.json and sys.stderr.isatty()
    choices: list[MultipleChoiceResult] = []
    exact: list[TaskResult] = []
    for task in args.tasks or []:
        if is_task_chat_file(task):
            exact += score_task_chats(model, tokenizer, block_size, task, system.dtype, progress)
        else:
            choices.append(score_file(model, tokenizer, block_size, task, system.dtype, progress))
    scored, source = None, ""
    if not args.tasks or args.text or args.dataset:
        scored, source = score_text(args, checkpoint, model, tokenizer, block_size, system.dtype)
    if args.json:
        record = report(scored, path, source) if scored else {"checkpoint": str(path)}
        if args.tasks:
            record["multiple_choice"] = [result.to_dict() for result in choices]
            record["exact_match"] = [result.to_dict() for result in exact]
        print(json.dumps(record))
        return 0
    if scored:
        print(text_summary(scored, path, source))
    for result in [*choices, *exact]:
        print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
