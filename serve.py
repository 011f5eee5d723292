"""Serve a trained model over HTTP: `python serve.py models/tiny [--port 8000] [--api_key KEY]`.

OpenAI's API (GET /v1/models, POST /v1/completions and /v1/chat/completions, streamed as
Server-Sent Events or not), GET /health, and a web chat page at / (chat_page.html). Built on
FastAPI and uvicorn. uvicorn runs on a thread of its own; the main thread generates, one
request at a time in the order they came (a queue), or with --batch N up to N together
(batching.py): the model is never shared between threads, and a client that goes away cancels
its generation at the next token, which frees its place for the next request. On a CPU the
main thread decodes fastest: int8 ran at 195-223 tokens/s on another thread with torch's two
threads, 376 with one, 466-503 on the main thread (2-core EPYC, 10.7M model; BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import AsyncIterator, Optional, Sequence

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from api_requests import ApiError, ChatRequest, CompletionRequest, Limits, Sampling, chat_request, completion_request, parse_json
from batching import FINISHED, Job, Runner, Work
from chat import fit_history, render_turn, reply_header, reply_stop_ids
from checkpoint import load_for_inference
from cli import CliParser, add_decode_step_flag, add_model_loading_flags, run_cli
from decode_step import StaticSteps, static_steps
from errors import UserError
from sampling import SamplingSettings
from tokenizer import END_OF_TEXT, IM_START, Tokenizer, tokenizer_from_dict
from utils import notice

PAGE = Path(__file__).with_name("chat_page.html")
SHUTDOWN_GRACE_S = 5  # in-flight requests may finish for this long after SIGTERM or Ctrl+C
DISCONNECT_CHECK_S = 0.05  # how often a non-streamed reply looks whether its client is still there


class Engine:
    """The model's requests: what each asks to generate (a Job), handed to the Runner that the
    main thread runs, and its text as it comes back."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, block_size: int, name: str,
                 steps: Optional[StaticSteps] = None, batch_size: int = 1):
        self.tokenizer, self.block_size, self.name = tokenizer, block_size, name
        self.runner = Runner(model, tokenizer, block_size, steps, batch_size)
        self.created = int(time.time())
        self.in_flight = 0  # requests queued or generating (touched on the event loop only)

    @property
    def can_chat(self) -> bool:
        return IM_START in self.tokenizer.special_ids

    def completion_job(self, request: CompletionRequest) -> Job:
        ids = self.tokenizer.encode(request.prompt)[-self.block_size:] or self.tokenizer.encode("\n")
        stops = frozenset(i for name, i in self.tokenizer.special_ids.items() if name == END_OF_TEXT)
        return self._job(ids, request.sampling, stops)

    def chat_job(self, request: ChatRequest) -> Job:
        if not self.can_chat:
            raise ApiError(400, f"{self.name} has no chat template: its tokenizer lacks the ChatML tokens "
                           "(<|im_start|>, <|im_end|>); use /v1/completions, or fine-tune it on chat data")
        leading = 0
        while leading < len(request.messages) and request.messages[leading][0] == "system":
            leading += 1
        system = [t for role, text in request.messages[:leading] for t in render_turn(self.tokenizer, role, text)]
        turns = [render_turn(self.tokenizer, role, text) for role, text in request.messages[leading:]]
        budget = self.block_size - min(request.sampling.max_tokens, self.block_size // 2)
        prompt = fit_history(system, turns, reply_header(self.tokenizer), budget)
        return self._job(prompt, request.sampling, reply_stop_ids(self.tokenizer))

    def _job(self, ids: list[int], sampling: Sampling, stop_ids: frozenset[int]) -> Job:
        settings = SamplingSettings(max_new_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                    top_k=None, top_p=sampling.top_p, stop=sampling.stop)
        seed = secrets.randbits(62) if sampling.seed is None else sampling.seed
        return Job(ids, settings, stop_ids, seed)

    async def pieces(self, job: Job) -> AsyncIterator[str]:
        """The job's text as it is generated; leaving early (a client gone) cancels it."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        self.in_flight += 1
        try:
            self.runner.jobs.put(Work(job, lambda item: loop.call_soon_threadsafe(pieces.put_nowait, item)))
            while (item := await pieces.get()) is not FINISHED:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            job.cancelled.set()
            self.in_flight -= 1


def usage(job: Job) -> dict:
    prompt = len(job.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": job.completion_tokens,
            "total_tokens": prompt + job.completion_tokens}


class Responder:
    """Shapes one request's replies: a whole JSON body, or the chunks of a stream."""

    def __init__(self, engine: Engine, chat: bool):
        self.engine, self.chat = engine, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, object_name: str, choices: list) -> dict:
        return {"id": self.id, "object": object_name, "created": int(time.time()), "model": self.engine.name,
                "choices": choices}

    def whole(self, text: str, job: Job) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": job.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": job.finish_reason, "logprobs": None}
        return {**self._envelope(self.object, [choice]), "usage": usage(job)}

    def chunk(self, piece: Optional[str], finish_reason: Optional[str] = None, first: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {} if piece is None else {"content": piece}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": piece or "",
                                                        "finish_reason": finish_reason, "logprobs": None}])
        return f"data: {json.dumps(body)}\n\n"

    def usage_chunk(self, job: Job) -> str:
        body = {**self._envelope("chat.completion.chunk" if self.chat else "text_completion", []),
                "usage": usage(job)}
        return f"data: {json.dumps(body)}\n\n"


async def whole_reply(engine: Engine, job: Job, responder: Responder, request: Request) -> JSONResponse:
    """Collect the text; a client that hangs up meanwhile cancels the job (looked at every
    DISCONNECT_CHECK_S, not at every token: each look is a trip through the ASGI receive)."""
    text = []
    checked = time.monotonic()
    async for piece in engine.pieces(job):
        text.append(piece)
        if time.monotonic() - checked > DISCONNECT_CHECK_S:
            if await request.is_disconnected():
                break
            checked = time.monotonic()
    return JSONResponse(responder.whole("".join(text), job))


async def streamed_reply(engine: Engine, job: Job, responder: Responder, include_usage: bool) -> AsyncIterator[str]:
    try:
        if responder.chat:
            yield responder.chunk(None, first=True)
        async for piece in engine.pieces(job):
            yield responder.chunk(piece)
        yield responder.chunk(None, job.finish_reason)
        if include_usage:
            yield responder.usage_chunk(job)
    except Exception as error:  # the status line went out already: the error travels as an event
        traceback.print_exc()
        yield f"data: {json.dumps(ApiError(500, f'generation failed: {error}').body())}\n\n"
    yield "data: [DONE]\n\n"


def error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def create_app(engine: Engine, limits: Limits, api_key: Optional[str]) -> FastAPI:
    app = FastAPI(title="nanoGPT-style trainer: serve.py", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def refused(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = (f"no such route: {request.method} {request.url.path}; the routes are GET /, GET /health, "
                   "GET /v1/models, POST /v1/completions, POST /v1/chat/completions"
                   if error.status_code in (404, 405) else str(error.detail))
        return error_response(ApiError(error.status_code, message))

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        traceback.print_exc()  # for whoever runs the server; the client gets one line
        return error_response(ApiError(500, f"the server failed on this request: {type(error).__name__}: {error}"))

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                what = "is missing" if not given else "is wrong"
                return error_response(ApiError(401, f"the API key {what}: send the header 'Authorization: "
                                               "Bearer KEY' with the key the server was started with (--api_key)"))
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            return error_response(ApiError(413, f"the request body has {int(declared):,} bytes, more than this "
                                           f"server's limit of {limits.max_body_bytes:,} (serve.py --max_body_bytes)"))
        return await call_next(request)

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        generating = engine.runner.generating
        return {"status": "ok", "model": engine.name, "chat": engine.can_chat, "generating": generating,
                "waiting": max(0, engine.in_flight - generating)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created,
                                            "owned_by": "local"}]}

    async def reply(request: Request, chat: bool) -> Response:
        data = parse_json(await request.body(), limits)
        parsed = chat_request(data, limits) if chat else completion_request(data, limits)
        try:
            job = engine.chat_job(parsed) if chat else engine.completion_job(parsed)
        except UserError as error:  # text the tokenizer cannot encode
            raise ApiError(400, str(error)) from None
        responder = Responder(engine, chat)
        if not parsed.sampling.stream:
            return await whole_reply(engine, job, responder, request)
        options = data.get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return StreamingResponse(streamed_reply(engine, job, responder, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await reply(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await reply(request, chat=True)

    return app


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(description="Serve a trained GPT over OpenAI's HTTP API, with a web chat page at /.",
                       allow_abbrev=False)
    parser.add_argument("checkpoint", help="a checkpoint file, or a run directory (best.pt, else ckpt.pt)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on; 127.0.0.1 keeps it to this machine, 0.0.0.0 opens it to all")
    parser.add_argument("--port", type=int, default=8000, help="the port to listen on")
    parser.add_argument("--api_key", help="require 'Authorization: Bearer KEY' on /v1/ requests")
    defaults = Limits()
    parser.add_argument("--max_tokens", type=int, default=defaults.max_tokens,
                        help="the most new tokens one request may ask for")
    parser.add_argument("--max_messages", type=int, default=defaults.max_messages,
                        help="the most messages in one chat request")
    parser.add_argument("--max_chars", type=int, default=defaults.max_chars,
                        help="the most characters in one message, or in a completion's prompt")
    parser.add_argument("--max_body_bytes", type=int, default=defaults.max_body_bytes,
                        help="larger request bodies get 413")
    add_model_loading_flags(parser, dtype_default="auto")
    add_decode_step_flag(parser)
    parser.add_argument("--batch", type=int, default=8,
                        help="decode up to this many requests together, one forward per token for those "
                        "running (batching.py); 1: one at a time, in turn")
    return parser


def limits_from(args: argparse.Namespace) -> Limits:
    limits = Limits(args.max_tokens, args.max_messages, args.max_chars, args.max_body_bytes)
    for name, value in vars(limits).items():
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    return limits


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_port_free(host: str, port: int) -> None:
    """Fail before loading the model, in one line, where uvicorn would fail after it."""
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"cannot listen on {host}:{port}: {error.strerror}; pick another --port "
                            "(or --host)") from None


def load_engine(args: argparse.Namespace) -> Engine:
    found = load_for_inference(args)
    checkpoint, path = found.checkpoint, found.path
    name = path.parent.name if path.parent.name else path.stem
    steps = static_steps(found.model, args.decode_step, found.device)
    return Engine(found.model, tokenizer_from_dict(checkpoint["tokenizer"]), checkpoint["config"]["model"]["block_size"],
                  name, steps, args.batch)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    limits = limits_from(args)
    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    check_port_free(args.host, args.port)
    if not is_loopback(args.host) and not args.api_key:
        notice(f"listening on {args.host} without --api_key: anyone who can reach this machine can use the model")
    engine = load_engine(args)
    engine.runner.prepare()
    app = create_app(engine, limits, args.api_key)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    chat = "the web chat at /" if engine.can_chat else "no chat (the tokenizer has no ChatML), completions only"
    print(f"serving {engine.name} at http://{shown}:{args.port}/ ({chat}; OpenAI's API under /v1; "
          "Ctrl+C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=SHUTDOWN_GRACE_S))

    def stop(number: int, frame: object) -> None:
        # uvicorn, off the main thread, leaves the signals to us: it stops taking requests,
        # gives those in flight SHUTDOWN_GRACE_S to finish (generating goes on meanwhile),
        # cancels the rest, and its thread ends
        server.should_exit = True

    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, stop)
    http = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    http.start()
    try:
        engine.runner.run_until(stopped=lambda: not http.is_alive())
    finally:
        engine.runner.closing.set()  # a generation still running ends at its next token
    if not server.started:
        raise UserError(f"the server did not start on {args.host}:{args.port} (its error is above)")
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
