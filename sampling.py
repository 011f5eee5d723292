"""Generation: decoding with a KV cache, the sampling filters, and text streamed safely.

The filters apply in this order to the last position's logits:
padding ids removed -> repetition penalty -> (temperature 0: the likeliest token, done)
-> temperature -> top-k -> top-p -> min-p -> a draw from what is left.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.nn import functional as F

from contract import has_kv_cache
from decode_step import StaticStep, StaticSteps
from tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding shows for the first bytes of an unfinished character


@dataclass
class SamplingSettings:
    max_new_tokens: int = 500
    temperature: float = 0.8  # 0: greedy
    top_k: Optional[int] = 200
    top_p: float = 1.0  # keep the likeliest tokens whose probabilities add up to this
    min_p: float = 0.0  # keep tokens at least this fraction as likely as the likeliest
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the context less likely
    stop: list[str] = field(default_factory=list)

    def choice_key(self) -> tuple:
        """The settings choose_tokens reads: rows whose keys are equal are chosen together
        (batching.py), so a setting choose_tokens comes to read belongs here too."""
        return self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty


def penalise_repetition(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make the tokens in `previous` (per row, like logits) less likely (CTRL, Keskar et al.
    2019): a positive logit is divided by the penalty, a negative one multiplied by it."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    seen = logits.gather(-1, previous)
    return logits.scatter(-1, previous, torch.where(seen > 0, seen / penalty, seen * penalty))


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of likeliest tokens whose probabilities reach p (nucleus sampling,
    Holtzman et al. 2020); the likeliest token always stays."""
    if p >= 1.0:
        return logits
    ordered, order = torch.sort(logits, descending=True)
    probs = F.softmax(ordered, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # of the likelier tokens than each
    drop_ordered = mass_before >= p
    drop = torch.empty_like(drop_ordered).scatter_(-1, order, drop_ordered)  # back to id order
    return logits.masked_fill(drop, float("-inf"))


def keep_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens at least min_p times as likely as the likeliest (Nguyen et al. 2024)."""
    if min_p <= 0.0:
        return logits
    probs = F.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


def draw(probs: torch.Tensor, generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """One token per row of probs (B, vocab), row i drawn with generators[i]: the argmax of
    p / E with E ~ Exponential(1) picks id j with probability p_j (the exponential race, as
    Gumbel-max), in a few element-wise kernels where multinomial costs ~0.1 ms on a CPU."""
    race = torch.stack([torch.empty_like(row).exponential_(generator=g) for row, g in zip(probs, generators)])
    return (probs / race).argmax(dim=-1)


def choose_tokens(logits: torch.Tensor, previous: torch.Tensor, s: SamplingSettings,
                  generators: Sequence[Optional[torch.Generator]]) -> list[int]:
    """Pick the next token of each row of logits (B, vocab), in the module's documented order:
    one host round-trip for the whole batch. The settings it reads are SamplingSettings.choice_key()."""
    logits = penalise_repetition(logits.float(), previous, s.repetition_penalty)
    if s.temperature == 0:
        return logits.argmax(dim=-1).tolist()
    logits = logits / s.temperature
    if s.top_k is not None:
        logits = keep_top_k(logits, s.top_k)
    logits = keep_min_p(keep_top_p(logits, s.top_p), s.min_p)
    return draw(F.softmax(logits, dim=-1), generators).tolist()


def choose_token(logits: torch.Tensor, previous: torch.Tensor, s: SamplingSettings,
                 generator: Optional[torch.Generator]) -> int:
    """choose_tokens for one position's logits (vocab,)."""
    return choose_tokens(logits[None], previous[None], s, [generator])[0]


def kept_after_slide(block_size: int) -> int:
    """How many of the latest tokens the context keeps when it is full and slides on."""
    return 3 * block_size // 4


class Decoder:
    """Feeds a model one token per row at a time against its KV cache. When the context is
    full, it keeps the last three quarters, computes their cache afresh, and goes on (calling
    `on_slide` once, so the user hears of it). A model without the cache hooks (contract.py)
    is run on the whole context, up to block_size tokens, for every new token. With `steps`,
    the one-token steps run compiled or as a CUDA graph (decode_step.py). Every row has the
    same length, so one tensor holds them."""

    def __init__(self, model: torch.nn.Module, block_size: int, on_slide: Callable[[], None] = lambda: None,
                 steps: Optional[StaticSteps] = None):
        self.model, self.block_size, self.on_slide = model, block_size, on_slide
        self.cached = has_kv_cache(model)
        self.cache = None
        self.cache_length = 0  # tokens in the cache
        self.device = next(model.parameters()).device
        self.slid = False
        self.steps = steps
        self.static: Optional[StaticStep] = None

    @torch.inference_mode()
    def start(self, rows: list[list[int]]) -> torch.Tensor:
        """Prefill the cache with each row's last block_size tokens; return the next logits (B, vocab)."""
        context = torch.tensor([row[-self.block_size:] for row in rows], device=self.device)
        if not self.cached:
            return self.model(context)[0][:, -1]
        self.cache_length = context.size(1)
        if self.steps is not None:
            self.static = self.steps.for_batch(len(rows))
            return self.static.prefill(context)
        self.cache = self.model.new_cache()
        return self.model(context, cache=self.cache)[0][:, -1]

    @torch.inference_mode()
    def step(self, rows: list[list[int]]) -> torch.Tensor:
        """Feed the last token of each row (all tokens so far); return the logits after them."""
        if not self.cached:
            return self.start(rows)
        if self.cache_length < self.block_size:
            self.cache_length += 1
            last = torch.tensor([row[-1:] for row in rows], device=self.device)
            if self.static is not None:
                return self.static.step(last)
            return self.model(last, cache=self.cache)[0][:, -1]
        if not self.slid:
            self.slid = True
            self.on_slide()
        keep = kept_after_slide(self.block_size)
        return self.start([row[-keep:] for row in rows])


def generate_batch(model: torch.nn.Module, block_size: int, prompt: list[int], settings: SamplingSettings,
                   vocab_limit: int, generators: Sequence[Optional[torch.Generator]],
                   stop_ids: frozenset[int] = frozenset(), on_slide: Callable[[], None] = lambda: None,
                   steps: Optional[StaticSteps] = None) -> Iterator[list[Optional[int]]]:
    """Decode len(generators) samples after `prompt` together, one forward per token for all;
    yield each step's new ids, None for a sample already ended (by a token in `stop_ids`, not
    yielded), until every sample has ended or has max_new_tokens. Sample i draws with
    generators[i], so it is the sample that generate() gives with that generator. The model
    sees at most block_size tokens; ids from vocab_limit up (the padding) are never chosen.
    With `steps`, the one-token steps run compiled or as a CUDA graph (decode_step.py)."""
    decoder = Decoder(model, block_size, on_slide, steps)
    rows = [list(prompt) for _ in generators]
    ended = [False] * len(rows)
    logits = decoder.start(rows)
    for count in range(settings.max_new_tokens):
        recent = (torch.tensor([row[-block_size:] for row in rows], device=logits.device)
                  if settings.repetition_penalty != 1.0 else logits.new_empty(0, dtype=torch.long))
        tokens = choose_tokens(logits[:, :vocab_limit], recent, settings, generators)  # padding ids cut off
        ended = [done or token in stop_ids for done, token in zip(ended, tokens)]
        if all(ended):
            return
        yield [None if done else token for done, token in zip(ended, tokens)]
        for row, token in zip(rows, tokens):
            row.append(token)  # an ended row goes on being fed, unread, to keep the batch whole
        if count + 1 < settings.max_new_tokens:
            logits = decoder.step(rows)


def generate(model: torch.nn.Module, block_size: int, prompt: list[int], settings: SamplingSettings,
             vocab_limit: int, stop_ids: frozenset[int] = frozenset(),
             generator: Optional[torch.Generator] = None, on_slide: Callable[[], None] = lambda: None,
             steps: Optional[StaticSteps] = None) -> Iterator[int]:
    """Yield new token ids after `prompt` until max_new_tokens or a token in `stop_ids` (not
    yielded): generate_batch for one sample."""
    for (token,) in generate_batch(model, block_size, prompt, settings, vocab_limit, [generator], stop_ids,
                                   on_slide, steps):
        yield token


class TextStream:
    """Turns generated ids into text that is safe to print as it comes: whole characters only
    (a subword tokenizer can split one across tokens), and never a stop string or the start of
    one that may still complete. Only the tokens of an unfinished character are decoded again,
    so a long sample costs linear time."""

    MAX_PENDING = 8  # tokens that still make no whole character are taken as they are

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.pending: list[int] = []  # tokens whose text ends in an unfinished character
        self.text = ""  # the text of every token before `pending`
        self.printed = 0  # characters of self.text handed out so far
        self.stopped = False

    def add(self, token: int) -> str:
        """Take one more token; return the text that became printable."""
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending)
        if piece.endswith(REPLACEMENT) and len(self.pending) < self.MAX_PENDING:
            return ""
        return self._settle(piece, final=False)

    def finish(self) -> str:
        """Return what is left to print once generation ends (nothing after a stop string)."""
        if self.stopped:
            return ""
        return self._settle(self.tokenizer.decode(self.pending), final=True)

    def _settle(self, piece: str, final: bool) -> str:
        """Append decoded text; return what may be printed: up to a stop string, and short of
        an ending that could still grow into one (unless nothing more comes)."""
        self.text += piece
        self.pending = []
        for stop in self.stops:
            found = self.text.find(stop, max(0, self.printed - len(stop)))
            if found >= 0:
                self.stopped = True
                return self._release(found)
        held = 0 if final else max((n for stop in self.stops for n in range(1, len(stop))
                                    if self.text.endswith(stop[:n])), default=0)
        return self._release(len(self.text) - held)

    def _release(self, end: int) -> str:
        new = self.text[self.printed : max(end, self.printed)]
        self.printed = max(end, self.printed)
        return new

    @property
    def result(self) -> str:
        """The sample's text, cut before a stop string."""
        return self.text[: self.printed] if self.stopped else self.text
