"""The commands of a page's ```bash blocks, read as a shell would split them (tests/test_docs.py)."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class DocCommand:
    """One command as a page shows it: its words, and what a shell would feed it."""
    page: str
    line: int
    text: str
    words: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    stdin: str | None = None  # piped from echo or printf
    heredoc: str | None = None  # `python - <<'PY'`
    redirect: str | None = None  # `echo ... > FILE`

    def where(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
HEREDOC = re.compile(r"<<\s*'?(\w+)'?")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def bash_blocks(text: str) -> Iterator[tuple[int, list[str]]]:
    """Yield each bash block's first line number and its lines."""
    for match in FENCE.finditer(text):
        yield text.count("\n", 0, match.start(1)) + 1, match.group(1).splitlines()


def logical_lines(lines: list[str]) -> Iterator[tuple[int, str, str | None]]:
    """Yield (offset, line with its continuations joined, heredoc body or None)."""
    index = 0
    while index < len(lines):
        start, line = index, lines[index]
        index += 1
        while line.rstrip().endswith("\\") and index < len(lines):
            line, index = line.rstrip()[:-1] + " " + lines[index].strip(), index + 1
        heredoc = None
        if marker := HEREDOC.search(line):
            end = lines.index(marker.group(1), index)
            heredoc, index = "\n".join(lines[index:end]) + "\n", end + 1
            line = line[: marker.start()] + line[marker.end():]
        yield start, line, heredoc


def shell_words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&>")
    lexer.whitespace_split = True
    return list(lexer)


def split_segments(words: list[str], separator: str) -> list[list[str]]:
    segments: list[list[str]] = [[]]
    for word in words:
        if word == separator:
            segments.append([])
        else:
            segments[-1].append(word)
    return segments


def printed(words: list[str]) -> str:
    """What `echo TEXT` or `printf TEXT` writes."""
    text = " ".join(words[1:])
    return text.replace("\\n", "\n") if words[0] == "printf" else text + "\n"


def to_command(page: str, line: int, text: str, words: list[str], heredoc: str | None) -> DocCommand:
    stdin = None
    pipeline = split_segments(words, "|")
    if len(pipeline) == 2 and pipeline[0][0] in ("echo", "printf"):
        stdin, words = printed(pipeline[0]), pipeline[1]
    redirect = None
    if ">" in words:
        words, redirect = words[: words.index(">")], words[words.index(">") + 1]
    env = tuple(tuple(word.split("=", 1)) for word in words if ENV_ASSIGNMENT.match(word))
    return DocCommand(page, line, text, tuple(words[len(env):]), env, stdin, heredoc, redirect)


def block_commands(page: str, first: int, lines: list[str]) -> Iterator[DocCommand]:
    """The commands of one block; `A && B` is two, and a heredoc feeds the last of its line."""
    for offset, line, heredoc in logical_lines(lines):
        segments = [words for words in split_segments(shell_words(line), "&&") if words]
        for index, words in enumerate(segments):
            yield to_command(page, first + offset, line.split("  #")[0].strip(), words,
                             heredoc if index == len(segments) - 1 else None)


def page_commands(page: Path, root: Path) -> list[DocCommand]:
    """Every command of a page, named by its path under `root`."""
    name = page.relative_to(root).as_posix()
    return [command for first, lines in bash_blocks(page.read_text())
            for command in block_commands(name, first, lines)]
