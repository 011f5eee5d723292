"""Generation jobs for serve.py, and decoding several of them together.

A Job is one request's generation; its text goes out in pieces through `push`, then FINISHED.
`run_alone` decodes one job by itself (sampling.generate). A Batch decodes up to N jobs at
once, one forward per token for all of them: each job takes a free row when it comes and
leaves it when it ends, so a short reply never waits for a long one (iteration-level
scheduling, as Orca did: Yu et al., OSDI 2022). Rows stand at their own lengths in one
StaticKVCache (model.py), so the step keeps its shapes, and can be compiled or replayed as a
CUDA graph (decode_step.py) as for one sample.

Both ways give a job the tokens it would get alone: its own generator (its seed), its own
settings, the same context slide when the context fills. A Runner takes the jobs from a queue
and runs them either way.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from decode_step import StaticStep, StaticSteps
from sampling import SamplingSettings, TextStream, choose_tokens, generate, kept_after_slide
from tokenizer import Tokenizer
from utils import notice

FINISHED = object()  # what a job's pieces end with
POLL_S = 0.1  # how often an idle Runner looks whether it should stop
Push = Callable[[object], None]  # takes a piece of text, an exception, or FINISHED


@dataclass
class Job:
    """One request's generation, and what it reports back."""

    prompt_ids: list[int]
    settings: SamplingSettings
    stop_ids: frozenset[int]
    seed: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0
    finish_reason: str = "length"


@dataclass
class Work:
    """A job handed to the generating thread, and where its pieces of text go."""

    job: Job
    push: Push


class Output:
    """A job's tokens turned into whole-character text, pushed as it becomes printable."""

    def __init__(self, work: Work, tokenizer: Tokenizer):
        self.job, self.push = work.job, work.push
        self.text = TextStream(tokenizer, work.job.settings.stop)

    def add(self, token: int) -> bool:
        """Take one new token; return whether the job is done (a stop string, or max tokens)."""
        self.job.completion_tokens += 1
        piece = self.text.add(token)
        if piece:
            self.push(piece)
        return self.text.stopped or self.job.completion_tokens >= self.job.settings.max_new_tokens

    def finish(self) -> None:
        """The job ended by itself (not cancelled): push the rest of its text."""
        ran_out = self.job.completion_tokens == self.job.settings.max_new_tokens and not self.text.stopped
        self.job.finish_reason = "length" if ran_out else "stop"
        rest = self.text.finish()
        if rest:
            self.push(rest)


def run_alone(work: Work, model: torch.nn.Module, block_size: int, tokenizer: Tokenizer,
              steps: Optional[StaticSteps] = None, stopping: Callable[[], bool] = lambda: False) -> None:
    """Decode one job by itself; a failure is pushed for the request to raise, then FINISHED."""
    job, output = work.job, Output(work, tokenizer)
    try:
        if job.cancelled.is_set() or stopping():
            return
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(job.seed)
        for token in generate(model, block_size, job.prompt_ids, job.settings, tokenizer.vocab_size,
                              job.stop_ids, generator, steps=steps):
            if job.cancelled.is_set() or stopping():
                return
            if output.add(token):
                break
        output.finish()
    except Exception as error:  # the request fails (500), the server goes on
        work.push(error)
    finally:
        work.push(FINISHED)


@dataclass
class Row:
    """A job in a row of the batch: its tokens so far, and how many of them the cache holds."""

    output: Output
    ids: list[int]
    generator: torch.Generator
    cached: int = 0


class Batch:
    """Up to `step`'s batch size of jobs decoded together (see the module's docstring)."""

    def __init__(self, step: StaticStep, block_size: int, tokenizer: Tokenizer):
        self.step, self.block_size, self.tokenizer = step, block_size, tokenizer
        size = step.tokens.size(0)
        self.rows: list[Optional[Row]] = [None] * size
        self.device = step.tokens.device
        # A forward runs the fewest leading rows that hold every job: 1, 2, 4, ... or all.
        # Jobs take the first free row, so a lone job costs one row's work, not the batch's.
        self.sizes = sorted({min(1 << n, size) for n in range(size.bit_length() + 1)})
        self.steps = {n: step if n == size else step.leading(n) for n in self.sizes}

    @property
    def active(self) -> int:
        return sum(row is not None for row in self.rows)

    @property
    def full(self) -> bool:
        return all(row is not None for row in self.rows)

    def admit(self, work: Work) -> None:
        """Give the job the first free row: its prompt, all but the last token, goes into the
        cache now; the next step feeds the last one with the other rows' tokens."""
        index = self.rows.index(None)
        generator = torch.Generator(device=self.device).manual_seed(work.job.seed)
        row = Row(Output(work, self.tokenizer), list(work.job.prompt_ids), generator)
        self.rows[index] = row
        try:
            self._prefill(index, row, row.ids[-self.block_size:])
        except Exception as error:  # this request fails (500); the others go on
            work.push(error)
            self._free(index)

    def _prefill(self, index: int, row: Row, context: list[int]) -> None:
        head = context[:-1]
        if head:
            self.step.prefill_row(index, torch.tensor([head], device=self.device))
        else:
            self.step.clear([index])
        row.cached = len(head)

    def advance(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """One forward for every row, then each row's next token; a row whose job ended or
        was cancelled is freed. A failure ends every job in the batch with it."""
        try:
            logits = self._forward()
            for index, row in enumerate(self.rows):
                if row is not None and (row.output.job.cancelled.is_set() or stopping()):
                    self._free(index)
            for index, token in self._choose(logits).items():
                row = self.rows[index]
                if token in row.output.job.stop_ids or row.output.add(token):
                    row.output.finish()
                    self._free(index)
                    continue
                row.ids.append(token)
                if row.cached == self.block_size:  # full: keep the last three quarters, as sampling.Decoder
                    self._prefill(index, row, row.ids[-kept_after_slide(self.block_size):])
        except Exception as error:
            for index, row in enumerate(self.rows):
                if row is not None:
                    row.output.push(error)
                    self._free(index)

    def _choose(self, logits: torch.Tensor) -> dict[int, int]:
        """The next token of each row in use, by row index. Rows whose jobs sample alike are
        chosen together, in one host read: one for the whole batch when all requests agree."""
        groups: dict[tuple, list[int]] = {}
        for index, row in enumerate(self.rows):
            if row is not None:
                groups.setdefault(row.output.job.settings.choice_key(), []).append(index)
        chosen: dict[int, int] = {}
        for indices in groups.values():
            rows = [self.rows[index] for index in indices]
            settings = rows[0].output.job.settings
            tokens = choose_tokens(logits[indices, : self.tokenizer.vocab_size], self._recent(rows, settings),
                                   settings, [row.generator for row in rows])
            chosen.update(zip(indices, tokens))
        return chosen

    def _recent(self, rows: list[Row], settings: SamplingSettings) -> torch.Tensor:
        """The ids a repetition penalty looks at, as sampling.generate_batch: each row's last
        block_size tokens, the shorter rows padded with their own last id (penalised once all
        the same); none where there is no penalty."""
        if settings.repetition_penalty == 1.0:
            return torch.empty(len(rows), 0, dtype=torch.long, device=self.device)
        recent = [row.ids[-self.block_size:] for row in rows]
        longest = max(map(len, recent))
        return torch.tensor([ids + ids[-1:] * (longest - len(ids)) for ids in recent], device=self.device)

    def _forward(self) -> torch.Tensor:
        """Feed the last token of each row in use (a placeholder for a free one among them,
        whose length is then cleared); return their logits (rows, vocab)."""
        used = 1 + max(index for index, row in enumerate(self.rows) if row is not None)
        rows = self.rows[: next(n for n in self.sizes if n >= used)]
        step = self.steps[len(rows)]
        last = [[row.ids[-1]] if row is not None else [0] for row in rows]
        free = [index for index, row in enumerate(rows) if row is None]
        if free:
            step.clear(free)
        logits = step.step(torch.tensor(last, device=self.device))
        for row in self.rows:
            if row is not None:
                row.cached += 1
        return logits

    def _free(self, index: int) -> None:
        self.rows[index].output.push(FINISHED)
        self.rows[index] = None


class Runner:
    """Runs queued jobs on the calling thread: one at a time, in turn, or with batch_size > 1
    up to that many together (a Batch)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, block_size: int,
                 steps: Optional[StaticSteps] = None, batch_size: int = 1):
        self.model, self.tokenizer, self.block_size = model, tokenizer, block_size
        self.steps = steps  # compiled or CUDA-graph one-token steps, prepared by prepare()
        self.batch = None
        if batch_size > 1:
            step = steps.for_batch(batch_size) if steps else StaticStep(model, batch_size, "eager")
            self.batch = Batch(step, block_size, tokenizer)
        self.jobs: queue.Queue[Work] = queue.Queue()
        self.closing = threading.Event()  # set: a running job ends at its next token
        self.generating = 0  # jobs being decoded now

    def prepare(self) -> None:
        """Compile or capture the one-token step now (a few greedy tokens), so that the first
        request does not wait for it."""
        if self.steps is None:
            return
        started = time.perf_counter()
        failures: list[Exception] = []

        def warm_up() -> Work:
            return Work(Job([0], SamplingSettings(max_new_tokens=3, temperature=0, top_k=None), frozenset(), 0),
                        push=lambda item: failures.append(item) if isinstance(item, Exception) else None)

        if self.batch is None:
            run_alone(warm_up(), self.model, self.block_size, self.tokenizer, self.steps)
        for size in self.batch.sizes if self.batch else []:  # every size of forward the batch runs
            for _ in range(size):
                self.batch.admit(warm_up())
            while self.batch.active:
                self.batch.advance()
        if failures:
            raise failures[0]
        notice(f"decode step {self.steps.kind} prepared in {time.perf_counter() - started:.1f} s")

    def _next(self, timeout: float) -> Optional[Work]:
        """The next queued job not cancelled while it waited, or None after `timeout` seconds."""
        while True:
            try:
                work = self.jobs.get(timeout=timeout) if timeout else self.jobs.get_nowait()
            except queue.Empty:
                return None
            if not work.job.cancelled.is_set():
                return work
            work.push(FINISHED)

    def run_until(self, stopped: Callable[[], bool]) -> None:
        """Generate the queued jobs until `stopped` says so."""
        while not stopped():
            if self.batch is None:
                work = self._next(POLL_S)
                if work is not None:
                    self.generating = 1
                    run_alone(work, self.model, self.block_size, self.tokenizer, self.steps, self.closing.is_set)
                    self.generating = 0
                continue
            while not self.batch.full and (work := self._next(0 if self.batch.active else POLL_S)):
                self.batch.admit(work)
            self.generating = self.batch.active
            if self.batch.active:
                self.batch.advance(self.closing.is_set)
