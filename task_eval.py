"""Exact-match accuracy on task chats: the model's greedy reply to each held-out question.

A task-chat file is what `tasks.py` writes (held_out.jsonl): one chat a line, {"messages":
[..., {"role": "assistant", ...}], "task": KIND, "answer": REPLY}. The prompt is every turn
before the last assistant reply, in ChatML as training renders it, then `<|im_start|>assistant\\n`;
the reply is decoded greedily until `<|im_end|>` and is right only if it equals the answer
exactly (surrounding whitespace aside). Prompts of the same length are decoded together, as
one batch against one KV cache, so a few hundred questions take seconds on a laptop.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from chat import render_turn, reply_header, reply_stop_ids
from contract import has_kv_cache
from errors import UserError
from tokenizer import IM_START, Tokenizer
from utils import autocast_context, read_user_text

BATCH = 64  # prompts decoded together
SPARE_TOKENS = 8  # decoded past the longest answer, so a reply that runs on is seen to


@dataclass(frozen=True)
class TaskQuestion:
    task: str
    turns: tuple[tuple[str, str], ...]  # (role, content) before the reply
    answer: str


@dataclass
class TaskResult:
    """One task kind's exact-match score, and a few of its replies to show."""
    source: str
    task: str
    questions: int
    correct: int
    examples: list[dict]  # {"question", "answer", "reply"} of the first few

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy}

    def summary(self) -> str:
        return (f"{self.source} {self.task}: exact match {self.accuracy:.4f} "
                f"({self.correct}/{self.questions}), greedy replies")


def is_task_chat_file(path: str) -> bool:
    """Whether a JSONL file holds task chats (a 'messages' list) rather than multiple-choice
    questions, judged by its first record."""
    for line in read_user_text(path, "--tasks").splitlines():
        if line.strip():
            try:
                return isinstance(json.loads(line), dict) and "messages" in json.loads(line)
            except json.JSONDecodeError:
                return False  # multiple_choice.py names the broken line
    return False


def parse_task_chat(record: object, where: str) -> TaskQuestion:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise UserError(f"{where}: expected a task chat {{\"messages\": [...], \"task\", \"answer\"}}")
    turns = record["messages"]
    if not turns or not isinstance(turns[-1], dict) or turns[-1].get("role") != "assistant":
        raise UserError(f"{where}: the chat must end with the assistant's reply, the answer to score against")
    before = []
    for turn in turns[:-1]:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise UserError(f"{where}: each turn must be an object with a 'role' and a 'content' string")
        before.append((str(turn.get("role")), turn["content"]))
    answer = record.get("answer", turns[-1].get("content"))
    if not isinstance(answer, str):
        raise UserError(f"{where}: 'answer' must be a string")
    return TaskQuestion(str(record.get("task", "chat")), tuple(before), answer)


def read_task_chats(path: str) -> list[TaskQuestion]:
    questions = []
    for number, line in enumerate(read_user_text(path, "--tasks").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number} is not valid JSON: {error.msg}") from None
        questions.append(parse_task_chat(record, f"{path} line {number}"))
    if not questions:
        raise UserError(f"--tasks {path} holds no task chats")
    return questions


def prompt_tokens(tokenizer: Tokenizer, question: TaskQuestion) -> list[int]:
    """The turns before the reply, in ChatML, then the reply's header."""
    tokens = [token for role, content in question.turns for token in render_turn(tokenizer, role, content)]
    return [*tokens, *reply_header(tokenizer)]


def same_length_batches(prompts: list[list[int]], size: int) -> Iterator[list[int]]:
    """Yield the indices of prompts in batches of equal token length."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    for indices in by_length.values():
        for first in range(0, len(indices), size):
            yield indices[first:first + size]


@torch.inference_mode()
def greedy_batch(model: torch.nn.Module, prompts: list[list[int]], max_new: int, stop_ids: frozenset[int],
                 vocab_limit: int, dtype: torch.dtype) -> list[list[int]]:
    """Decode equal-length prompts together, greedily, each until a stop id or max_new tokens."""
    device = next(model.parameters()).device
    tokens = torch.tensor(prompts, device=device)
    cache = model.new_cache() if has_kv_cache(model) else None
    replies: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with autocast_context(device, dtype):
        logits = model(tokens, cache=cache)[0] if cache is not None else model(tokens)[0]
        for _ in range(max_new):
            chosen = logits[:, -1, :vocab_limit].float().argmax(dim=-1)
            for row, token in enumerate(chosen.tolist()):
                done[row] = done[row] or token in stop_ids
                if not done[row]:
                    replies[row].append(token)
            if all(done):
                break
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
            logits = model(chosen[:, None], cache=cache)[0] if cache is not None else model(tokens)[0]
    return replies


def score_task_chats(model: torch.nn.Module, tokenizer: Tokenizer, block_size: int, path: str,
                     dtype: torch.dtype = torch.float32, progress: bool = False,
                     examples: int = 3) -> list[TaskResult]:
    """Return the exact-match accuracy per task kind of the model's greedy replies in `path`."""
    if IM_START not in tokenizer.special_ids:
        raise UserError(f"--tasks {path}: this model's tokenizer has no ChatML tokens, so it cannot answer chats")
    questions = read_task_chats(path)
    prompts = [prompt_tokens(tokenizer, q) for q in questions]
    longest = max(prompts, key=len)
    if len(longest) >= block_size:
        raise UserError(f"--tasks {path}: a prompt of {len(longest)} tokens does not fit the model's context "
                        f"of {block_size}")
    answer_tokens = max(len(tokenizer.encode(q.answer)) for q in questions) + SPARE_TOKENS
    stop_ids = reply_stop_ids(tokenizer)
    replies: list[str] = [""] * len(questions)
    batches = list(same_length_batches(prompts, BATCH))
    for indices in tqdm(batches, desc=Path(path).name, unit="batch", disable=not progress, file=sys.stderr):
        max_new = min(answer_tokens, block_size - len(prompts[indices[0]]))
        decoded = greedy_batch(model, [prompts[i] for i in indices], max_new, stop_ids,
                               tokenizer.vocab_size, dtype)
        for index, ids in zip(indices, decoded):
            replies[index] = tokenizer.decode(ids)
    results: dict[str, TaskResult] = {}
    for question, reply in zip(questions, replies):
        result = results.setdefault(question.task, TaskResult(path, question.task, 0, 0, []))
        result.questions += 1
        result.correct += reply.strip() == question.answer.strip()
        if len(result.examples) < examples:
            result.examples.append({"question": question.turns[-1][1] if question.turns else "",
                                    "answer": question.answer, "reply": reply})
    return list(results.values())
