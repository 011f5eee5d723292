"""The pipeline's data: the base text's files, the task chats, the tokenizer fitted to both, and
the dataset each training phase reads.

The tokenizer phase fits the tokenizer to the base text and the task chats together, so that
every character a task needs (digits, say, which Tiny Shakespeare lacks) has an id: a
character-level model that cannot write "7" could never answer "What is 3 + 4?".
"""
from __future__ import annotations

import itertools
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from config import DataConfig
from corpus import corpus_characters, fit_tokenizer, source_bytes, source_files
from data_loader import download_shakespeare
from errors import UserError
from multiple_choice import PROMPT_FORMAT
from pipeline_config import BASE_TEXT, TASK_CHATS, TasksSpec, TokenizerSpec
from tasks import WORD_KINDS, TaskChat, TaskSizes, generate, read_identity, words_in, write_jsonl
from tokenizer import CharTokenizer, Tokenizer

CHOICES_PER_QUESTION = 4


@dataclass(frozen=True)
class TaskFiles:
    train: Path  # chats to learn (mid, sft)
    held_out: Path  # chats to score by exact match (eval)
    choices: Path  # the held-out questions as multiple choice (eval)


def task_files(folder: Path) -> TaskFiles:
    return TaskFiles(folder / "train.jsonl", folder / "held_out.jsonl", folder / "choices.jsonl")


def base_text_files(dataset: str, cache_dir: str = "cache") -> list[Path]:
    """The base text's files: Tiny Shakespeare (downloaded once), or a file, folder or glob."""
    if dataset == "shakespeare_char":
        return [download_shakespeare(cache_dir)]
    return source_files(dataset)


def multiple_choice_records(held: list[TaskChat], seed: int) -> list[dict]:
    """Each held-out question with its answer among others of its kind, in a drawn position."""
    rng = random.Random(f"{seed}:choices")
    records = []
    for chat in held:
        others = sorted({c.answer for c in held if c.task == chat.task and c.answer != chat.answer})
        if len(others) < CHOICES_PER_QUESTION - 1:
            continue  # a kind with too few distinct answers (identity's handful) gives no question
        choices = rng.sample(others, CHOICES_PER_QUESTION - 1)
        answer = rng.randrange(CHOICES_PER_QUESTION)
        choices.insert(answer, chat.answer)
        records.append({"question": chat.question, "choices": choices, "answer": answer, "task": chat.task})
    return records


def make_task_files(spec: TasksSpec, base_files: list[Path], folder: Path) -> TaskFiles:
    """Generate the task chats (words from the base text) and their multiple-choice form."""
    needs_words = any(kind in WORD_KINDS for kind in spec.kinds)
    words = words_in(corpus_characters(base_files), "the base text") if needs_words else []
    identity = read_identity(Path(spec.identity)) if "identity" in spec.kinds else []
    unknown = sorted(set(spec.sizes) - set(spec.kinds))
    if unknown:
        raise UserError(f"tasks.sizes names '{unknown[0]}', which tasks.kinds does not generate")
    sizes = TaskSizes({kind: spec.sizes.get(kind, spec.per_kind) for kind in spec.kinds}, spec.held_out)
    train, held = generate(spec.kinds, sizes, spec.seed, words, identity)
    files = task_files(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(files.train, train)
    write_jsonl(files.held_out, held)
    with open(files.choices, "w", encoding="utf-8", newline="\n") as file:
        file.writelines(json.dumps(record) + "\n" for record in multiple_choice_records(held, spec.seed))
    return files


def fit_pipeline_tokenizer(spec: TokenizerSpec, base_files: list[Path], tasks: TaskFiles) -> Tokenizer:
    """The tokenizer of the whole pipeline, fitted to the base text and the task chats."""
    files = [*base_files, tasks.train, tasks.held_out]
    if spec.kind == "char":  # the multiple-choice prompt's own characters too
        prompts = [PROMPT_FORMAT.format(question="")]
        return CharTokenizer.train(itertools.chain(corpus_characters(files), prompts))
    data_cfg = DataConfig(dataset="", tokenizer=spec.kind, vocab_size=spec.vocab_size,
                          sentencepiece_model=spec.model, tiktoken_encoding=spec.encoding)
    return fit_tokenizer(files, data_cfg, source_bytes(files))


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.symlink(source.resolve(), target)
    except OSError:  # no symlinks here (some Windows setups): a copy reads the same
        shutil.copyfile(source, target)


def phase_files(sources: list[str], base_files: list[Path], tasks: TaskFiles) -> list[Path]:
    """The files a training phase reads, in the order its data names them."""
    files: list[Path] = []
    for source in sources:
        files += base_files if source == BASE_TEXT else [tasks.train] if source == TASK_CHATS else source_files(source)
    return files


def phase_dataset(files: list[Path], folder: Path) -> str:
    """The dataset train.py is given: one file as it is, else `folder` (see link_phase_files)."""
    return str(files[0]) if len(files) == 1 else str(folder)


def link_phase_files(files: list[Path], folder: Path) -> None:
    """Link several files into `folder`, named so that they sort in the order given (the last
    of them then holds the validation split)."""
    if len(files) == 1:
        return
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for index, path in enumerate(files):
        link_or_copy(path, folder / f"{index:03d}-{path.name}")
