"""Multiple-choice accuracy of a trained model: `python eval.py models/tiny --tasks arc.jsonl`.

Each question is scored by the model's log-likelihood of each choice given the question, with
no sampling: the choice whose text the model finds likeliest per character is its answer.
Accepted JSONL records, one per line (blank lines are skipped):
- {"question": str, "choices": [str, ...], "answer": int}  (MMLU exports; answer is an index)
- {"question": str, "choices": {"text": [str, ...], "label": [str, ...]}, "answerKey": str}
  (ARC exports; answerKey is one of the labels)
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.nn import functional as F
from tqdm import tqdm

from errors import UserError
from tokenizer import Tokenizer
from utils import autocast_context, read_user_text

PROMPT_FORMAT = "Question: {question}\nAnswer:"
NORMALISATION = "mean log-likelihood per character of the choice"


@dataclass(frozen=True)
class Question:
    """One record of a multiple-choice file."""

    line: int  # 1-based, for messages
    question: str
    choices: list[str]
    answer: int  # index into choices


def _choices_and_answer(record: dict, where: str) -> tuple[list, object]:
    """Return the record's choices and its answer as given, in either accepted form."""
    if "choices" not in record:
        raise UserError(f"{where}: the field 'choices' is missing")
    choices = record["choices"]
    if isinstance(choices, dict):  # ARC: {"text": [...], "label": [...]} and "answerKey"
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise UserError(f"{where}: 'choices' as an object needs lists 'text' and 'label' of one length")
        if "answerKey" not in record:
            raise UserError(f"{where}: the field 'answerKey' is missing (choices given with labels)")
        if record["answerKey"] not in labels:
            raise UserError(f"{where}: answerKey {record['answerKey']!r} is not one of the labels {labels}")
        return texts, labels.index(record["answerKey"])
    if "answer" not in record:
        raise UserError(f"{where}: the field 'answer' (the index of the right choice) is missing")
    return choices, record["answer"]


def parse_question(text: str, where: str, line: int) -> Question:
    """Return the Question one JSONL line holds, or raise UserError saying what is wrong."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: not JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("question"), str):
        raise UserError(f"{where}: the field 'question' (a string) is missing")
    choices, answer = _choices_and_answer(record, where)
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise UserError(f"{where}: 'choices' must be a list of strings")
    if len(choices) < 2:
        raise UserError(f"{where}: {len(choices)} choice(s); a question needs at least 2")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise UserError(f"{where}: 'answer' must be an integer index, got {answer!r}")
    if not 0 <= answer < len(choices):
        raise UserError(f"{where}: answer index {answer} is out of range for {len(choices)} choices "
                        f"(0 to {len(choices) - 1})")
    return Question(line=line, question=record["question"], choices=choices, answer=answer)


def read_questions(path: str) -> list[Question]:
    """Return every question of a JSONL file, or raise UserError naming the file and line."""
    lines = read_user_text(path, "--tasks").splitlines()
    questions = [parse_question(text, f"{path} line {n}", n) for n, text in enumerate(lines, 1) if text.strip()]
    if not questions:
        raise UserError(f"--tasks {path} holds no question")
    return questions


@dataclass(frozen=True)
class EncodedQuestion:
    """A question's prompt and choices as token ids, the prompt cut to fit the model."""

    prompt: list[int]
    choices: list[list[int]]
    characters: list[int]  # of each choice's scored text, the denominators of the normalisation
    truncated: bool  # the prompt lost tokens on its left


def encode_question(question: Question, tokenizer: Tokenizer, block_size: int,
                    where: str) -> Optional[EncodedQuestion]:
    """Return the question's tokens, or None when a choice alone fills the model's context.

    The prompt is PROMPT_FORMAT and each choice is scored as " " + choice, the two encoded
    apart so that a choice's tokens are the same whatever precedes them. A row of prompt and
    choice has block_size + 1 tokens at most (its last token is only a target); every choice
    stays whole and the prompt, shared by all the choices, loses tokens from its left.
    """
    texts = [" " + choice for choice in question.choices]
    try:
        prompt = tokenizer.encode(PROMPT_FORMAT.format(question=question.question))
        choices = [tokenizer.encode(text) for text in texts]
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    room = block_size + 1 - max(len(c) for c in choices)
    if room < 1:  # not even one token of context before the longest choice
        return None
    return EncodedQuestion(prompt=prompt[-room:], choices=choices, characters=[len(t) for t in texts],
                           truncated=len(prompt) > room)


@torch.no_grad()
def choice_log_likelihoods(model: torch.nn.Module, encoded: EncodedQuestion,
                           dtype: torch.dtype = torch.float32) -> list[float]:
    """Return the summed log-probability of each choice's tokens after the prompt, all the
    choices in one forward (rows padded on the right, which a causal model never sees)."""
    device = next(model.parameters()).device
    rows = [encoded.prompt + choice for choice in encoded.choices]
    width = max(len(row) for row in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        inputs[i, :len(row) - 1] = torch.tensor(row[:-1])
    with autocast_context(device, dtype):
        logits, _ = model(inputs.to(device))
    log_probs = F.log_softmax(logits.float(), dim=-1).cpu()
    start = len(encoded.prompt) - 1  # the position that predicts a choice's first token
    totals = []
    for i, choice in enumerate(encoded.choices):
        positions = torch.arange(start, start + len(choice))
        totals.append(float(log_probs[i, positions, torch.tensor(choice)].sum()))
    return totals


def predicted_choice(log_likelihoods: list[float], characters: list[int]) -> int:
    """Return the index of the choice with the highest mean log-likelihood per character (a
    longer choice is not penalised for its length; per character, so tokenizers compare)."""
    per_character = [total / count for total, count in zip(log_likelihoods, characters)]
    return max(range(len(per_character)), key=per_character.__getitem__)


@dataclass
class MultipleChoiceResult:
    """What a model scored on one multiple-choice file."""

    source: str
    questions: int  # scored: those whose longest choice fits the context
    correct: int
    chance: float  # the mean over scored questions of 1 / their number of choices
    truncated: int  # questions whose prompt lost tokens on its left to fit
    skipped: int  # questions with a choice longer than the context, not scored
    normalisation: str = NORMALISATION

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions

    @property
    def centred(self) -> float:
        """(accuracy - chance) / (1 - chance): 0 at chance, 1 when every answer is right."""
        return (self.accuracy - self.chance) / (1 - self.chance)

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy, "centred": self.centred}

    def summary(self) -> str:
        return (f"{self.source}: accuracy {self.accuracy:.4f} ({self.correct}/{self.questions}), "
                f"chance {self.chance:.4f}, centred {self.centred:.4f}; {self.questions} questions, "
                f"{self.normalisation}; {self.truncated} with the question cut from the left to fit "
                f"the context, {self.skipped} skipped (a choice longer than the context)")


def score_file(model: torch.nn.Module, tokenizer: Tokenizer, block_size: int, path: str,
               dtype: torch.dtype = torch.float32, progress: bool = False) -> MultipleChoiceResult:
    """Return the model's accuracy on every question of a multiple-choice JSONL file."""
    questions = read_questions(path)
    correct = truncated = skipped = 0
    chances = []
    for question in tqdm(questions, desc=Path(path).name, unit="question", disable=not progress,
                         file=sys.stderr):
        encoded = encode_question(question, tokenizer, block_size, f"{path} line {question.line}")
        if encoded is None:
            skipped += 1
            continue
        choice = predicted_choice(choice_log_likelihoods(model, encoded, dtype), encoded.characters)
        correct += choice == question.answer
        truncated += encoded.truncated
        chances.append(1 / len(question.choices))
    if not chances:
        raise UserError(f"--tasks {path}: every question has a choice longer than the model's "
                        f"context of {block_size} tokens; none could be scored")
    return MultipleChoiceResult(source=path, questions=len(chances), correct=correct,
                                chance=sum(chances) / len(chances), truncated=truncated, skipped=skipped)
