"""Synthetic task chats, made here from a seed: `python tasks.py --words FILE --out data/tasks`.

Five kinds, as nanochat's midtraining uses: two-digit arithmetic, spelling a word letter by
letter, counting a letter in a word with the spelling written out first (nanochat's
SpellingBee), reversing a word, and identity chats from a small JSON file a user edits
(data/identity.json). The words are the distinct lowercase alphabetic words of 3 to 10 letters
of any text file, so nothing is downloaded.

Writes `train.jsonl` and `held_out.jsonl`: one chat per line in the format corpus.py reads
({"messages": [...]}: ChatML, the loss on the assistant's reply), each record also carrying its
`task` and `answer` (the exact reply, for an exact-match scorer; corpus.py ignores both keys).

How train and held-out never share an example: every example belongs to one side by a hash
of what it asks about, never by the seed or the sizes. A word is held out (for spelling,
counting and reversing alike) when the SHA-256 of the word falls in the held-out fifth, so no
held-out question names a word that any training question names; an arithmetic question is
held out by the hash of its operands and operator; an identity question by being, per
question/answer pair, the phrasing with the smallest hash, so each answer is still learned
from its other phrasings and held-out asks it in words never trained on. Because the sides
depend on neither seed nor size, held-out examples from one seed are unseen by a model trained
on another seed's (or a larger) training file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from cli import CliParser, run_cli
from errors import UserError

DEFAULT_IDENTITY = Path(__file__).resolve().parent / "data" / "identity.json"
HELD_OUT_PER_MILLE = 200  # a fifth of the words and arithmetic questions are held out
MIN_WORD_LENGTH, MAX_WORD_LENGTH = 3, 10
MIN_WORDS = 20  # fewer leaves one side with a handful of words, or none
ABSENT_LETTER_CHANCE = 0.2  # how often a counting question asks for a letter the word lacks
WORD_PATTERN = re.compile(r"[A-Za-z']+")  # "don't" is one token, and not a word we keep
LOWERCASE_WORD = re.compile(rf"[a-z]{{{MIN_WORD_LENGTH},{MAX_WORD_LENGTH}}}")


@dataclass(frozen=True)
class TaskChat:
    """One question and the exact reply that answers it."""
    task: str
    question: str
    answer: str

    def record(self) -> dict:
        """The JSONL record: the chat the trainer reads, then the task and answer for scoring."""
        return {"messages": [{"role": "user", "content": self.question},
                             {"role": "assistant", "content": self.answer}],
                "task": self.task, "answer": self.answer}


@dataclass(frozen=True)
class IdentityPair:
    """Ways to ask one thing about the model, and the one answer to all of them."""
    questions: tuple[str, ...]
    answer: str


# ---------------------------------------------------------------- the split


def held_out(key: str) -> bool:
    """Whether the example keyed by `key` belongs to the held-out side (by hash, seed-free)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < HELD_OUT_PER_MILLE


def hash_order(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


# ---------------------------------------------------------------- the kinds


def arithmetic(a: int, operator: str, b: int) -> TaskChat:
    """A two-digit sum or difference (the larger number first, so no answer is negative)."""
    value = a + b if operator == "+" else a - b
    return TaskChat("arithmetic", f"What is {a} {operator} {b}?", str(value))


def spell(word: str) -> TaskChat:
    """The word's letters joined by hyphens."""
    return TaskChat("spell", f"Spell the word '{word}'.", "-".join(word))


def count_letter(word: str, letter: str) -> TaskChat:
    """The spelling written out, then how often the letter occurs: the spelling is the working
    a small model needs before it can count (nanochat's SpellingBee)."""
    return TaskChat("count", f"How many '{letter}' are in '{word}'?", f"{'-'.join(word)}: {word.count(letter)}")


def reverse(word: str) -> TaskChat:
    """The word spelled backwards."""
    return TaskChat("reverse", f"Reverse the word '{word}'.", word[::-1])


def arithmetic_questions() -> list[tuple[int, str, int]]:
    """Every two-digit question: a + b, and a - b with a >= b."""
    numbers = range(10, 100)
    return [(a, "+", b) for a in numbers for b in numbers] + [(a, "-", b) for a in numbers for b in numbers if a >= b]


def arithmetic_side(want_held_out: bool) -> list[tuple[int, str, int]]:
    return [q for q in arithmetic_questions() if held_out(f"{q[0]} {q[1]} {q[2]}") == want_held_out]


def count_chat(rng: random.Random, word: str) -> TaskChat:
    """A counting question about the word: mostly a letter it has, sometimes one it lacks."""
    absent = sorted(set(string.ascii_lowercase) - set(word))
    if rng.random() < ABSENT_LETTER_CHANCE and absent:
        return count_letter(word, rng.choice(absent))
    return count_letter(word, rng.choice(sorted(set(word))))


# ---------------------------------------------------------------- reading the inputs


def words_in(lines: Iterable[str], where: str) -> list[str]:
    """Return the distinct lowercase alphabetic words of 3 to 10 letters in the text, sorted."""
    words: set[str] = set()
    for line in lines:
        words.update(w for w in WORD_PATTERN.findall(line) if LOWERCASE_WORD.fullmatch(w))
    if len(words) < MIN_WORDS:
        raise UserError(f"{where} has {len(words)} distinct lowercase words of {MIN_WORD_LENGTH} to "
                        f"{MAX_WORD_LENGTH} letters; give a text with at least {MIN_WORDS}")
    return sorted(words)


def corpus_words(path: Path) -> list[str]:
    """The words of a text file (see words_in)."""
    try:
        with open(path, encoding="utf-8") as file:
            return words_in(file, f"--words {path}")
    except FileNotFoundError:
        raise UserError(f"--words {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--words {path} is a folder; give one text file") from None
    except UnicodeDecodeError:
        raise UserError(f"--words {path} is not UTF-8 text") from None


def word_sides(words: list[str]) -> tuple[list[str], list[str]]:
    """Split the words into (train, held-out) by hash; refuse a split that leaves a side empty."""
    train = [w for w in words if not held_out(w)]
    held = [w for w in words if held_out(w)]
    if not train or not held:
        raise UserError(f"the {len(words)} words split into {len(train)} for training and {len(held)} held out; "
                        "give a text with more words")
    return train, held


def read_identity(path: Path) -> list[IdentityPair]:
    """Read the identity file: {"name", "about", "pairs": [{"questions": [...], "answer"}]},
    where "{name}" and "{about}" in the text stand for those two fields."""
    where = f"identity file {path}"
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{where}: no such file; give one with --identity or leave identity out of --kinds") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{where} is not valid JSON: {getattr(error, 'msg', error)}") from None
    if not isinstance(settings, dict) or not all(
            isinstance(settings.get(key), str) and settings[key].strip() for key in ("name", "about")):
        raise UserError(f"{where} needs an object with a 'name' and an 'about' string")
    fields = {key: settings[key] for key in ("name", "about")}
    pairs = settings.get("pairs")
    if not isinstance(pairs, list) or not pairs:
        raise UserError(f"{where} needs a non-empty 'pairs' list of {{'questions': [...], 'answer': ...}}")

    def fill(text: str) -> str:
        return text.replace("{name}", fields["name"]).replace("{about}", fields["about"])

    read = []
    for number, pair in enumerate(pairs, start=1):
        questions = pair.get("questions") if isinstance(pair, dict) else None
        answer = pair.get("answer") if isinstance(pair, dict) else None
        if (not isinstance(questions, list) or len(questions) < 2 or not isinstance(answer, str)
                or not all(isinstance(q, str) and q.strip() for q in questions)):
            raise UserError(f"{where}: pair {number} needs 'questions' (at least two phrasings, "
                            "one held out) and an 'answer' string")
        read.append(IdentityPair(tuple(fill(q) for q in questions), fill(answer)))
    return read


def identity_sides(pairs: list[IdentityPair]) -> tuple[list[TaskChat], list[TaskChat]]:
    """Return (train, held-out) identity chats: per pair, the phrasing with the smallest hash
    is held out, the others train."""
    train, held = [], []
    for pair in pairs:
        first, *rest = sorted(dict.fromkeys(pair.questions), key=hash_order)
        held.append(TaskChat("identity", first, pair.answer))
        train += [TaskChat("identity", q, pair.answer) for q in rest]
    if not train:
        raise UserError("every identity pair needs at least two different phrasings of its question")
    return train, held


# ---------------------------------------------------------------- drawing examples


def draw(rng: random.Random, pool: list, count: int) -> list:
    """Draw `count` items of the pool: distinct while it lasts, then round again (a small
    pool, such as identity's, repeats in training; shuffled each round)."""
    drawn: list = []
    while len(drawn) < count and pool:
        drawn += rng.sample(pool, min(len(pool), count - len(drawn)))
    return drawn


Maker = Callable[[random.Random, object], TaskChat]  # an item of a pool (and the kind's rng) -> a chat
KIND_NAMES = ("arithmetic", "spell", "count", "reverse", "identity")
WORD_KINDS = ("spell", "count", "reverse")


@dataclass(frozen=True)
class TaskPools:
    """One kind's training items, held-out items, and how an item becomes a chat."""
    train: list
    held_out: list
    make: Maker


def task_pools(kind: str, words: list[str], identity: list[IdentityPair]) -> TaskPools:
    """The two pools of one kind (see the module's docstring for why they never overlap)."""
    if kind == "arithmetic":
        return TaskPools(arithmetic_side(False), arithmetic_side(True), lambda rng, q: arithmetic(*q))
    if kind == "identity":
        train, held = identity_sides(identity)
        return TaskPools(train, held, lambda rng, chat: chat)
    train_words, held_words = word_sides(words)
    make: Maker = {"spell": lambda rng, w: spell(w), "reverse": lambda rng, w: reverse(w), "count": count_chat}[kind]
    return TaskPools(train_words, held_words, make)


@dataclass(frozen=True)
class TaskSizes:
    """How many training examples each kind gets, and at most how many held-out ones."""
    per_kind: dict[str, int]
    held_out: int


def generate(kinds: Sequence[str], sizes: TaskSizes, seed: int, words: list[str],
             identity: list[IdentityPair]) -> tuple[list[TaskChat], list[TaskChat]]:
    """Return (train, held-out) chats: train shuffled across kinds (the trainer validates on
    the file's end, which should hold every kind); held-out distinct, kind after kind."""
    train: list[TaskChat] = []
    held: list[TaskChat] = []
    for kind in kinds:
        rng = random.Random(f"{seed}:{kind}")  # a string seed is hashed the same on every run
        pools = task_pools(kind, words, identity)
        train += [pools.make(rng, item) for item in draw(rng, pools.train, sizes.per_kind[kind])]
        held_items = rng.sample(pools.held_out, min(sizes.held_out, len(pools.held_out)))
        held += [pools.make(rng, item) for item in held_items]
    random.Random(f"{seed}:shuffle").shuffle(train)
    return train, held


def write_jsonl(path: Path, chats: list[TaskChat]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as file:
        file.writelines(json.dumps(chat.record()) + "\n" for chat in chats)


# ---------------------------------------------------------------- the command


def parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KIND_NAMES]
    if unknown or not kinds:
        raise UserError(f"--kinds: unknown kind '{unknown[0] if unknown else text}'; "
                        f"choose from {','.join(KIND_NAMES)}")
    return list(dict.fromkeys(kinds))


def parse_sizes(text: str, kinds: list[str], per_kind: int) -> dict[str, int]:
    """`--sizes spell=3000,identity=100` over the --per_kind default."""
    sizes = dict.fromkeys(kinds, per_kind)
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, number = item.partition("=")
        if kind not in kinds:
            raise UserError(f"--sizes: '{kind}' is not one of the kinds generated ({','.join(kinds)})")
        if not number.isdigit():
            raise UserError(f"--sizes: expected KIND=COUNT, got '{item}'")
        sizes[kind] = int(number)
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(description="Generate synthetic task chats (train and held-out JSONL).", allow_abbrev=False)
    parser.add_argument("--words", help="a text file whose words spell, count and reverse use")
    parser.add_argument("--out", required=True, help="the folder to write train.jsonl and held_out.jsonl in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per_kind", type=int, default=2000, help="training examples per kind")
    parser.add_argument("--sizes", default="", help="per-kind training sizes over --per_kind: KIND=N,...")
    parser.add_argument("--held_out", type=int, default=200, help="held-out examples per kind, at most")
    parser.add_argument("--kinds", default=",".join(KIND_NAMES), help=f"which kinds, of {','.join(KIND_NAMES)}")
    parser.add_argument("--identity", default=str(DEFAULT_IDENTITY), help="the identity JSON (name, about, pairs)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.per_kind < 0 or args.held_out < 0:
        raise UserError("--per_kind and --held_out must be 0 or more")
    kinds = parse_kinds(args.kinds)
    sizes = TaskSizes(parse_sizes(args.sizes, kinds, args.per_kind), args.held_out)
    needs_words = [k for k in kinds if k in WORD_KINDS]
    if needs_words and not args.words:
        raise UserError(f"--words FILE is needed for {','.join(needs_words)}: any text, such as "
                        "../shared/data/tinyshakespeare.txt")
    words = corpus_words(Path(args.words)) if needs_words else []
    identity = read_identity(Path(args.identity)) if "identity" in kinds else []
    train, held = generate(kinds, sizes, args.seed, words, identity)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "held_out.jsonl", held)
    for kind in kinds:
        print(f"{kind:<11} train {sum(c.task == kind for c in train):>6,}   "
              f"held out {sum(c.task == kind for c in held):>5,}")
    print(f"wrote {out / 'train.jsonl'} and {out / 'held_out.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
