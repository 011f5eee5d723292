"""Sample text from a trained model: `python gen.py models/tiny --prompt "ROMEO:"`.

Modes: samples of one prompt (from --prompt, --prompt_file or piped stdin), --interactive
prompting, a --chat session in ChatML (chat.py), and --benchmark for prefill/decode speed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, TextIO

import torch

TORCH_IMPORTED_AT = time.time()  # what --benchmark reports as the start-up cost of torch itself

from chat import PIPED, chat_session
from checkpoint import load_for_inference
from cli import CliParser, add_decode_step_flag, add_model_loading_flags, run_cli
from contract import has_kv_cache
from config_fields import DECODE_STEPS
from decode_step import StaticSteps, static_steps
from errors import UserError
from sampling import SamplingSettings, TextStream, generate_batch, kept_after_slide
from tokenizer import END_OF_TEXT, Tokenizer, tokenizer_from_dict
from utils import notice, process_start_time

SAMPLE_SEPARATOR = "\n" + "-" * 40


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(description="Generate text from a trained GPT checkpoint.", allow_abbrev=False)
    parser.add_argument("checkpoint", help="a checkpoint file, or a run directory (best.pt, else ckpt.pt)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="text the samples continue (default: piped stdin, else a newline)")
    source.add_argument("--prompt_file", help="read the prompt from this file")
    parser.add_argument("--num_samples", type=int, default=1, help="how many samples to print")
    parser.add_argument("--max_new_tokens", type=int, default=500, help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="below 1 is safer, above 1 more varied; 0 always takes the likeliest")
    parser.add_argument("--top_k", type=int, default=200, help="sample among the k likeliest tokens; 0: all")
    parser.add_argument("--top_p", type=float, default=1.0,
                        help="sample among the likeliest tokens that make up this much probability")
    parser.add_argument("--min_p", type=float, default=0.0,
                        help="drop tokens less likely than this fraction of the likeliest one")
    parser.add_argument("--repetition_penalty", type=float, default=1.0,
                        help="above 1 makes tokens already in the context less likely")
    parser.add_argument("--stop", nargs="+", action="extend", default=[], metavar="TEXT",
                        help="end a sample where one of these strings appears (not printed)")
    parser.add_argument("--seed", type=int, default=1337, help="the same seed gives the same text")
    parser.add_argument("--no_stream", action="store_true", help="print each sample whole, once finished")
    parser.add_argument("--output", help="also write the samples to this file")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--interactive", action="store_true", help="ask for a prompt, generate, ask again")
    mode.add_argument("--chat", action="store_true",
                      help=f"talk to a chat model (ChatML); /reset, /exit; {PIPED}")
    mode.add_argument("--benchmark", action="store_true", help="measure prefill and decode tokens/s")
    parser.add_argument("--rounds", type=int, default=1, help="--benchmark: decode this many times, report the median")
    parser.add_argument("--compare_step", choices=DECODE_STEPS[1:],
                        help="--benchmark: in each round also decode with this --decode_step; report the speed-up")
    parser.add_argument("--system", default="", help="the system prompt of a --chat session")
    add_model_loading_flags(parser, dtype_default="auto")
    add_decode_step_flag(parser)
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be zero or more, got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top_k must be zero (off) or more, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    if not 0 <= args.min_p < 1:
        raise UserError(f"--min_p must be in [0, 1), got {args.min_p}")
    if args.repetition_penalty <= 0:
        raise UserError(f"--repetition_penalty must be positive (1 is off), got {args.repetition_penalty}")
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {args.rounds}")
    if args.prompt == "":
        raise UserError("--prompt is empty; give at least one character, e.g. --prompt $'\\n'")


def settings_from(args: argparse.Namespace) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k or None, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, stop=args.stop)


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt: --prompt, --prompt_file, else piped stdin, else a newline."""
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read --prompt_file {args.prompt_file}: {error}") from None
        if not text:
            raise UserError(f"--prompt_file {args.prompt_file} is empty")
        return text
    try:
        piped = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    except OSError:  # stdin closed or not readable (a test runner's, say): no piped prompt
        piped = ""
    return piped or "\n"


@dataclass
class Session:
    """What every mode needs: the model and its tokenizer, the settings, where text goes."""

    model: torch.nn.Module
    block_size: int  # the most tokens the model sees at once
    tokenizer: Tokenizer
    settings: SamplingSettings
    device: torch.device
    seed: int
    stream: bool = True
    params: int = 0  # the model's parameters, counted before any quantisation
    quantize: str = "none"
    steps: Optional[StaticSteps] = None  # compiled or CUDA-graph one-token steps; None: eager
    output: Optional[TextIO] = None
    slid: bool = field(default=False, init=False)  # the context filled during the last generation

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        limit = self.block_size
        if len(ids) > limit:
            notice(f"the prompt has {len(ids)} tokens, more than the model's context of {limit}; "
                   f"keeping its last {limit}")
            ids = ids[-limit:]
        return ids

    def complete(self, prompt_ids: list[int], stop_ids: frozenset[int], seed: int) -> str:
        """Generate one sample after prompt_ids, printing it as it comes (when streaming)."""
        return self.complete_together(prompt_ids, stop_ids, [seed])[0]

    def complete_together(self, prompt_ids: list[int], stop_ids: frozenset[int], seeds: list[int]) -> list[str]:
        """Generate one sample per seed after prompt_ids, all in one batch (one forward per
        token for all); the first is printed as it comes (when streaming), the others are
        returned whole. Sample i is the one complete() gives with seeds[i]."""
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        texts = [TextStream(self.tokenizer, self.settings.stop) for _ in seeds]
        vocab = self.tokenizer.vocab_size
        for tokens in generate_batch(self.model, self.block_size, prompt_ids, self.settings, vocab, generators,
                                     stop_ids, on_slide=self._note_slide, steps=self.steps):
            for row, (text, token) in enumerate(zip(texts, tokens)):
                if token is not None and not text.stopped:
                    piece = text.add(token)
                    if row == 0 and self.stream:
                        print(piece, end="", flush=True)
            if all(text.stopped for text in texts):
                break
        rest = texts[0].finish()
        for text in texts[1:]:
            text.finish()
        if self.stream:
            print(rest, end="", flush=True)
        return [text.result for text in texts]

    def _note_slide(self) -> None:
        self.slid = True  # said by tell_slide once the text is out: a notice inside it would cut it in two

    def tell_slide(self) -> None:
        """Say, after the samples (or the reply) are printed, that the context filled while they
        were generated."""
        if self.slid:
            self.slid = False
            limit = self.block_size
            notice(f"the context of {limit} tokens filled during this generation; from then on the model "
                   f"saw the last {kept_after_slide(limit)} tokens, recomputed each time it filled")


def write_samples(session: Session, prompt: str, count: int) -> None:
    """Print `count` samples continuing `prompt`, decoded as one batch (and write them to --output)."""
    prompt_ids = session.encode_prompt(prompt)
    stop_ids = frozenset(i for name, i in session.tokenizer.special_ids.items() if name == END_OF_TEXT)
    if session.stream:
        print(prompt, end="", flush=True)
    seeds = [session.seed + sample for sample in range(count)]
    texts = [prompt + text for text in session.complete_together(prompt_ids, stop_ids, seeds)]
    for sample, text in enumerate(texts):
        if sample:
            print(SAMPLE_SEPARATOR)
        if sample or not session.stream:  # the first streamed out already
            print(text, end="")
        print(flush=True)
        if session.output is not None:
            session.output.write(("" if sample == 0 else SAMPLE_SEPARATOR + "\n") + text + "\n")
            session.output.flush()
    session.tell_slide()


def interactive(session: Session, count: int) -> None:
    """Ask for a prompt, generate, ask again; an empty line or Ctrl+D ends it."""
    while True:
        try:
            prompt = input("prompt> ")
        except EOFError:
            print()
            return
        if not prompt:
            return
        write_samples(session, prompt, count)


@dataclass
class LoadTimes:
    """Seconds spent before the first token: the process's start to `import torch` done, and
    the checkpoint's reading, building and (when asked) quantising."""

    import_torch_s: float
    checkpoint_load_s: float


def decode_times(session: Session, ids: list[int], count: int, steps: Optional[StaticSteps]) -> list[float]:
    """perf_counter() before, and after each new token of, `count` samples decoded together."""
    generators = [torch.Generator(device=session.device).manual_seed(session.seed + i) for i in range(count)]
    times = [time.perf_counter()]
    for _ in generate_batch(session.model, session.block_size, ids, session.settings, session.tokenizer.vocab_size,
                            generators, steps=steps):
        times.append(time.perf_counter())
    return times


def median_rate(times: list[float], count: int) -> Optional[float]:
    """Tokens/s from the median gap between new tokens (so that a stray pause does not move it)."""
    gaps = [b - a for a, b in zip(times[1:], times[2:])]
    return count / statistics.median(gaps) if gaps else None


def benchmark(session: Session, prompt: str, count: int, loaded: LoadTimes, rounds: int = 1,
              compare: Optional[StaticSteps | str] = None) -> dict:
    """Time `count` samples decoded together after the prompt (repeated to half the context):
    the prefill up to the first new token, then the gaps between the others. The first gap is
    reported too: a compiled or CUDA-graph step prepares there. With `rounds`, the decoding
    is repeated and the median round reported; with `compare` (other steps, or "eager"), each
    round also decodes with those, in turn, and the speed-up is the median of the rounds'."""
    block = session.block_size
    ids = session.tokenizer.encode(prompt)
    ids = (ids * (block // (2 * len(ids)) + 1))[: block // 2]
    runs, others = [], []
    for _ in range(rounds):
        runs.append(decode_times(session, ids, count, session.steps))
        if compare is not None:
            others.append(decode_times(session, ids, count, None if compare == "eager" else compare))
    times = runs[0]
    first, rates = times[1] - times[0], [median_rate(run, count) for run in runs]
    record = {"device": str(session.device), "dtype": str(next(session.model.parameters()).dtype).removeprefix("torch."),
              "quantize": session.quantize, "decode_step": session.steps.kind if session.steps else "eager",
              "params": session.params, "samples": count, "prompt_tokens": len(ids), "new_tokens": len(times) - 1,
              "import_torch_s": round(loaded.import_torch_s, 2), "checkpoint_load_s": round(loaded.checkpoint_load_s, 3),
              "first_token_s": round(first, 4), "prefill_tokens_per_s": round(count * len(ids) / first),
              "first_step_s": round(times[2] - times[1], 4) if len(times) > 2 else None,
              "decode_tokens_per_s": round(statistics.median(rates)) if rates[0] else None,
              "decode_tokens_per_s_mean": round(count * (len(times) - 2) / (times[-1] - times[1])) if rates[0] else None}
    if rounds > 1:
        record["rounds"] = [round(rate) for rate in rates if rate]
    if compare is not None and rates[0]:
        other_rates = [median_rate(run, count) for run in others]
        record.update(compare_step=compare if compare == "eager" else compare.kind,
                      compare_decode_tokens_per_s=round(statistics.median(other_rates)),
                      speedup=round(statistics.median(a / b for a, b in zip(rates, other_rates)), 2))
    return record


def main(argv: Sequence[str]) -> int:
    process_start = process_start_time()
    args = build_parser().parse_args(argv)
    check_arguments(args)
    load_started = time.perf_counter()
    found = load_for_inference(args)
    model, checkpoint = found.model, found.checkpoint
    loaded = LoadTimes(TORCH_IMPORTED_AT - process_start, time.perf_counter() - load_started)
    if not has_kv_cache(model):
        notice(f"{type(model).__name__} has no KV-cache hooks (new_cache(), forward(..., cache=)); each new "
               "token recomputes the whole context, which is slower (contract.py says how to add them)")
    block_size = checkpoint["config"]["model"]["block_size"]
    steps = static_steps(model, args.decode_step, found.device)
    session = Session(model, block_size, tokenizer_from_dict(checkpoint["tokenizer"]), settings_from(args),
                      found.device, args.seed, stream=not args.no_stream, params=found.params,
                      quantize=args.quantize, steps=steps)
    if args.chat:
        chat_session(session, args.system, sys.stdin)
        return 0
    if args.benchmark:
        compare = args.compare_step
        if compare not in (None, "eager"):
            compare = static_steps(model, compare, found.device)
        print(json.dumps(benchmark(session, read_prompt(args), args.num_samples, loaded, args.rounds, compare)))
        return 0
    try:
        session.output = open(args.output, "w", encoding="utf-8") if args.output else None
    except OSError as error:
        raise UserError(f"cannot write --output {args.output}: {error.strerror}") from None
    try:
        if args.interactive:
            interactive(session, args.num_samples)
        else:
            write_samples(session, read_prompt(args), args.num_samples)
    finally:
        if session.output is not None:
            session.output.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
