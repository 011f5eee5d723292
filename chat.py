"""A chat session in ChatML, for `gen.py --chat`: turns in, replies out, history kept in context.

Each turn is `<|im_start|>role\\ncontent<|im_end|>\\n`, the format the data pipeline trains on
(corpus.py); a reply is generated after `<|im_start|>assistant\\n` until `<|im_end|>`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, TextIO

from errors import UserError
from tokenizer import IM_END, IM_START, Tokenizer
from utils import notice

if TYPE_CHECKING:  # gen.py imports this module; the type is only for annotations
    from gen import Session

HELP = "chat: /reset forgets the conversation, /exit or Ctrl+D leaves"
PIPED = ("with stdin piped: one message per line in, one reply per line out, line breaks "
         "written \\n (\\r) and backslashes \\\\ both ways")
ESCAPES = {"n": "\n", "r": "\r", "\\": "\\"}  # what a backslash and the next character stand for
ESCAPED = re.compile(r"\\(.)")


def escape_reply(reply: str) -> str:
    """The reply on one line, for a script that reads one reply per line: backslashes first,
    so that a literal backslash-n in the reply stays apart from an escaped line break."""
    return reply.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def unescape_message(line: str) -> str:
    """A piped message as escape_reply writes a reply (so a script sends line breaks as it
    reads them); a backslash before any other character stays as it is."""
    return ESCAPED.sub(lambda found: ESCAPES.get(found.group(1), found.group(0)), line)


def reply_header(tokenizer: Tokenizer) -> list[int]:
    """The tokens that open the assistant's turn; its reply is generated after them."""
    return [tokenizer.special_ids[IM_START], *tokenizer.encode("assistant\n")]


def reply_stop_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The ids that end a reply: its own end (<|im_end|>), the end of text, and the start of
    another turn, which an undertrained model may begin without closing its own. A ChatML
    reply holds none of them (and its text, kept in the history, stays encodable by a
    character tokenizer, which has no '<' for the token's name)."""
    return frozenset(tokenizer.special_ids.values())


def render_turn(tokenizer: Tokenizer, role: str, content: str) -> list[int]:
    return [tokenizer.special_ids[IM_START], *tokenizer.encode(f"{role}\n"), *tokenizer.encode(content),
            tokenizer.special_ids[IM_END], *tokenizer.encode("\n")]


def fit_history(system: list[int], turns: list[list[int]], header: list[int], budget: int) -> list[int]:
    """Return the prompt: the system turn, as many of the latest turns as fit in `budget`
    tokens, and the reply's header. Older turns are dropped first; a last message too long
    by itself keeps its end."""
    kept: list[list[int]] = []
    used = len(system) + len(header)
    for turn in reversed(turns):
        if kept and used + len(turn) > budget:
            break
        kept.insert(0, turn)
        used += len(turn)
    prompt = [*system, *(token for turn in kept for token in turn), *header]
    if len(prompt) > budget:
        notice(f"the conversation needs {len(prompt)} tokens, more than the {budget} the context leaves; "
               "the start of the message is cut")
        prompt = prompt[-budget:]
    return prompt


def read_message(stdin: TextIO, interactive: bool) -> str | None:
    """The next message, or None at the end of input (Ctrl+D)."""
    try:
        line = input("you> ") if interactive else stdin.readline()
    except EOFError:
        return None
    if not interactive and not line:
        return None
    return line.rstrip("\n")


def chat_session(session: "Session", system_prompt: str, stdin: TextIO) -> None:
    """Talk until /exit or the end of input. From a terminal it prompts `you>` and streams the
    replies; from a pipe it answers one message per line with one reply per line (escaped)."""
    tokenizer = session.tokenizer
    if IM_START not in tokenizer.special_ids:
        raise UserError("this model's tokenizer has no ChatML tokens (<|im_start|>, <|im_end|>), so "
                        "it cannot chat; train or fine-tune a model on chat data first (README: 'Your own "
                        "data')")
    interactive = stdin.isatty()
    system = render_turn(tokenizer, "system", system_prompt) if system_prompt else []
    header, stop_ids = reply_header(tokenizer), reply_stop_ids(tokenizer)
    block = session.block_size
    budget = block - min(session.settings.max_new_tokens, block // 2)  # room left for the reply
    replier = session if interactive else dataclasses.replace(session, stream=False)
    turns: list[list[int]] = []
    if interactive:
        print(HELP)
    while (message := read_message(stdin, interactive)) is not None:
        if message.strip() == "/exit":
            break
        if message.strip() == "/reset":
            turns.clear()
            print("(conversation forgotten)")
            continue
        if not message.strip():
            continue
        turns.append(render_turn(tokenizer, "user", message if interactive else unescape_message(message)))
        if interactive:
            print("model> ", end="", flush=True)
        prompt = fit_history(system, turns, header, budget)
        reply = replier.complete(prompt, stop_ids, session.seed + len(turns))
        if not interactive:
            print(escape_reply(reply), flush=True)
        else:
            print("" if session.stream else reply, flush=True)  # a streamed reply is out already
        replier.tell_slide()
        turns.append(render_turn(tokenizer, "assistant", reply))
