"""The requests serve.py takes, read from OpenAI's JSON and checked, and its error bodies.

Each check that fails raises ApiError with the status and the one-line message the client
sees, in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class Limits:
    """What one request may ask for; serve.py's flags set them."""

    max_tokens: int = 1024  # new tokens per request (generation slides past the context)
    max_messages: int = 64  # messages in one chat request
    max_chars: int = 16_000  # characters in one message, or in a completion's prompt
    max_body_bytes: int = 1_000_000  # request bodies above this get 413


class ApiError(Exception):
    """A request the server refuses: `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": None}}


@dataclass
class Sampling:
    """The fields /v1/completions and /v1/chat/completions share."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    stream: bool = False


@dataclass
class CompletionRequest:
    prompt: str
    sampling: Sampling


@dataclass
class ChatRequest:
    messages: list[tuple[str, str]]  # (role, content)
    sampling: Sampling


def parse_json(body: bytes, limits: Limits) -> dict:
    if len(body) > limits.max_body_bytes:
        raise ApiError(413, f"the request body has {len(body):,} bytes, more than this server's limit of "
                       f"{limits.max_body_bytes:,} (serve.py --max_body_bytes)")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def _number(data: dict, name: str, default: float, low: float, high: float) -> float:
    value = data.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a number, got {json.dumps(value)}", name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low:g} and {high:g}, got {value:g}", name)
    return float(value)


def _stop(data: dict) -> list[str]:
    stop = data.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    return [s for s in stops if s]


def _sampling(data: dict, limits: Limits, default_max_tokens: int) -> Sampling:
    max_tokens = data.get("max_tokens", data.get("max_completion_tokens"))
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ApiError(400, f"'max_tokens' must be a positive whole number, got {json.dumps(max_tokens)}",
                       "max_tokens")
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"'max_tokens' is {max_tokens}, more than this server's limit of "
                       f"{limits.max_tokens} (serve.py --max_tokens)", "max_tokens")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be a whole number, got {json.dumps(seed)}", "seed")
    if data.get("n", 1) not in (1, None):
        raise ApiError(400, "'n' must be 1: this server returns one choice per request", "n")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {json.dumps(stream)}", "stream")
    top_p = _number(data, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "'top_p' must be above 0 (1 keeps every token)", "top_p")
    return Sampling(max_tokens=max_tokens, temperature=_number(data, "temperature", 1.0, 0.0, 2.0), top_p=top_p,
                    stop=_stop(data), seed=seed, stream=stream)


def _text(value: Any, name: str, limits: Limits) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a string", name)
    if len(value) > limits.max_chars:
        raise ApiError(400, f"'{name}' has {len(value):,} characters, more than this server's limit of "
                       f"{limits.max_chars:,} (serve.py --max_chars)", name)
    return value


def completion_request(data: dict, limits: Limits) -> CompletionRequest:
    prompt = data.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1:  # the openai client may send ["text"]
        prompt = prompt[0]
    return CompletionRequest(_text(prompt, "prompt", limits), _sampling(data, limits, default_max_tokens=16))


def _content(message: dict, index: int, limits: Limits) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    content = message.get("content")
    name = f"messages[{index}].content"
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
            raise ApiError(400, f"'{name}' may hold text parts only: this model reads text", name)
        content = "".join(str(part.get("text", "")) for part in content)
    return _text("" if content is None else content, name, limits)


def chat_request(data: dict, limits: Limits) -> ChatRequest:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > limits.max_messages:
        raise ApiError(400, f"'messages' has {len(messages)} messages, more than this server's limit of "
                       f"{limits.max_messages} (serve.py --max_messages)", "messages")
    parsed = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in CHAT_ROLES:
            raise ApiError(400, f"messages[{index}] has role {json.dumps(role)}; the roles are "
                           f"{', '.join(CHAT_ROLES)}", f"messages[{index}].role")
        parsed.append((role, _content(message, index, limits)))
    return ChatRequest(parsed, _sampling(data, limits, default_max_tokens=limits.max_tokens))
