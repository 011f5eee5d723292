"""The one-token decoding step, run three ways.

eager:      model(last tokens, cache=KV cache) as Python calls it: any model with the cache hooks
            (contract.py), its cache growing with the context.
compiled:   the step against a StaticKVCache (model.py) compiled by torch.compile. The cache's
            shapes never change and its length lives on the device, so every token runs the
            same graph: one compilation for a whole generation (the first step pays it; a test
            fails on a second). Inductor's work is kept in cache/torch_compile, so the next
            run loads it instead of compiling again.
cuda_graph: the same static step captured once as a CUDA graph and replayed for each token: a
            small model's step is ~100 kernel launches of a few microseconds each, and one
            replay launches them all at once.

A static step reads its tokens from one fixed tensor and writes the logits to another, which
is what a replayed graph needs: the same addresses every time.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from config_fields import DECODE_STEPS
from contract import has_static_cache
from errors import UserError
from model import StaticKVCache
WARMUP_STEPS = 3  # eager runs before a capture, so that lazy initialisation happens outside it


def resolve_decode_step(requested: str, model: torch.nn.Module, device: torch.device) -> str:
    """The step to use for `requested` (one of DECODE_STEPS); auto: a CUDA graph on CUDA where
    the model has a static cache, else eager (on a CPU, compiling costs more than a short
    sample saves). Raises ValueError where the request cannot be met."""
    if requested not in DECODE_STEPS:
        raise ValueError(f"decode step {requested!r} is not one of {', '.join(DECODE_STEPS)}")
    if requested == "auto":
        return "cuda_graph" if device.type == "cuda" and has_static_cache(model) else "eager"
    if requested != "eager" and not has_static_cache(model):
        raise ValueError(f"decode step {requested} needs a model with new_static_cache() (model.py's GPT "
                         f"has it); {type(model).__name__} has not: use eager")
    if requested == "cuda_graph" and device.type != "cuda":
        raise ValueError(f"decode step cuda_graph needs a CUDA device, not {device.type}: use compiled or eager")
    return requested


class StaticStep:
    """Prefill and one-token steps against a StaticKVCache for a fixed batch size, the step
    run compiled, replayed as a CUDA graph, or (kind "eager", for a server's batch of rows at
    their own lengths) as it is. The first step prepares (compiles or captures); `prepare_s`
    says how long that took."""

    def __init__(self, model: torch.nn.Module, batch: int, kind: str, cache: Optional[StaticKVCache] = None):
        self.model, self.kind = model, kind
        self.cache = cache if cache is not None else model.new_static_cache(batch)
        device = next(model.parameters()).device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.run: Optional[Callable[[], torch.Tensor]] = None  # set by the first step
        self.prepare_s = 0.0

    def _forward(self) -> torch.Tensor:
        return self.model(self.tokens, cache=self.cache)[0][:, -1]

    def leading(self, rows: int) -> "StaticStep":
        """A step of this one's first `rows` rows, on this one's buffers: a batch with few rows
        in use runs only those (each size compiled or captured once)."""
        return StaticStep(self.model, rows, self.kind, self.cache.rows(0, rows))

    @torch.inference_mode()
    def prefill(self, context: torch.Tensor) -> torch.Tensor:
        """Start again from `context` (batch, T), eagerly; return the next logits (batch, vocab)."""
        self.cache.reset()
        return self.model(context, cache=self.cache)[0][:, -1]

    @torch.inference_mode()
    def prefill_row(self, row: int, context: torch.Tensor) -> torch.Tensor:
        """Start row `row` again from `context` (1, T), eagerly, the other rows left as they
        are; return its next logits (1, vocab)."""
        cache = self.cache.rows(row, row + 1)
        cache.reset()
        return self.model(context, cache=cache)[0][:, -1]

    @torch.inference_mode()
    def clear(self, rows: list[int]) -> None:
        """Set these rows' lengths to 0: a row with nothing to decode, fed a placeholder token
        at each step, then never runs past the end of its buffers."""
        self.cache.length[rows] = 0

    @torch.inference_mode()
    def step(self, last: torch.Tensor) -> torch.Tensor:
        """Feed `last` (batch, 1); return the logits after it (valid until the next step).
        Every row must have room for one more token."""
        self.tokens.copy_(last)
        if self.run is None:
            started = time.perf_counter()
            preparers = {"eager": lambda: self._forward, "compiled": self._compiled, "cuda_graph": self._captured}
            self.run = preparers[self.kind]()
            logits = self.run()
            self.prepare_s = time.perf_counter() - started
            return logits
        return self.run()

    def _compiled(self) -> Callable[[], torch.Tensor]:
        from compilation import keep_compile_cache
        keep_compile_cache("cache")  # the commands' default data.cache_dir, beside the token caches
        return torch.compile(self._forward, fullgraph=True, dynamic=False)

    def _captured(self) -> Callable[[], torch.Tensor]:
        """Capture the step as a CUDA graph (torch.cuda.graph; the warm-up runs on a side
        stream, as its documentation asks) and return what replays it. The warm-up and the
        capture write the cache at the current position, which the real step writes again."""
        length = self.cache.length.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._forward()
                self.cache.length.copy_(length)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._forward()
        self.cache.length.copy_(length)

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return replay


class StaticSteps:
    """The static steps of one model, one per batch size, kept across generations so that a
    server or an interactive session compiles or captures once, not once per reply."""

    def __init__(self, model: torch.nn.Module, kind: str):
        self.model, self.kind = model, kind
        self.by_batch: dict[int, StaticStep] = {}

    def for_batch(self, batch: int) -> StaticStep:
        if batch not in self.by_batch:
            self.by_batch[batch] = StaticStep(self.model, batch, self.kind)
        return self.by_batch[batch]


def static_steps(model: torch.nn.Module, requested: str, device: torch.device) -> Optional[StaticSteps]:
    """What generation runs its steps with for `--decode_step requested`: None for eager."""
    try:
        kind = resolve_decode_step(requested, model, device)
    except ValueError as error:
        raise UserError(f"--decode_step: {error}") from None
    return None if kind == "eager" else StaticSteps(model, kind)
