"""``xiaolm serve``: an OpenAI-compatible HTTP API and a web chat page for a trained model.

Endpoints (the OpenAI schema, so the official ``openai`` client, LangChain, Open WebUI & co. work unchanged):

- ``POST /v1/chat/completions``  chat in ChatML; ``stream: true`` sends ``chat.completion.chunk`` events over SSE
  ending in ``data: [DONE]``
- ``POST /v1/completions``       plain continuation (``text_completion``); the prompt gets ``<|endoftext|>``
  prepended, as documents in the training shards start after one
- ``GET  /v1/models``, ``GET /v1/models/{id}``, ``GET /health``
- ``GET  /``                     the chat page (``serve/static``; nothing is fetched from the internet)

Every failure a client can cause (bad JSON, a wrong type, a missing field, an unknown model, a prompt that does not
fit the context window, a full queue, a body over ``max_body_mb``, lone surrogates, JSON nested too deep) is a 4xx
with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``, and the server carries on; a 5xx never
carries our exception text (it goes to the log).

Security defaults (``_Guard``): with ``api_key`` set, ``/v1/*`` needs ``Authorization: Bearer KEY`` (401 otherwise);
``allowed_hosts`` (the CLI sets it when bound to loopback) refuses other ``Host`` headers, which defeats DNS
rebinding; a POST must be ``Content-Type: application/json`` and, when a browser sends ``Origin``, come from this
server's own origin, so no other web page can make a visitor's browser run requests here. Message contents and
prompts are text: a content that spells ``<|im_end|>`` stays text (``chat_prompt_ids``), so no turn can be forged. Generation runs in :class:`xiaolm.serve.engine.Engine`: one worker thread,
a queue, and batches of up to ``--max-batch`` rows.

``create_app(...)`` builds the app without opening a socket (tests use it with Starlette's TestClient);
``BackgroundServer(app)`` runs it with uvicorn on a free loopback port in a thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from xiaolm.config import opt
from xiaolm.infer.generate import plain_prompt_ids
from xiaolm.serve.engine import Engine, EngineClosed, GenerationRequest, QueueFull, SamplingParams, Sequence
from xiaolm.serve.logprobs import TextOffsets, chat_logprobs, completion_logprobs
from xiaolm.serve.schemas import ChatCompletionRequest, CompletionRequest
from xiaolm.serve.tools import (ChoiceOutput, ToolPlan, ToolRequestError, build_prompt, constraint_factory,
                                marker_ids, plan_tools, request_chars, request_messages)

STATIC_DIR = Path(__file__).resolve().parent / "static"
KEEPALIVE_SECONDS = 5.0  # an SSE comment while a streamed request waits in the queue (lets proxies and us notice)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_BODY_MB = 4.0  # a 128k-token prompt is well under 1 MB of JSON
MAX_JSON_DEPTH = 32  # the deepest a valid request gets is about 5 (messages -> content parts -> fields)
_LOG = logging.getLogger("uvicorn.error")  # configured by uvicorn, at --log-level
# The page may load only what this server serves: a stray CDN link would be blocked, not silently fetched.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


# ------------------------------------------------------------------------------------------------ errors


class APIError(Exception):
    """An error reported to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or "-" in part or part in _TYPE_TAGS)


def _param_path(loc: tuple) -> str:
    """``('messages', 0, 'content', 'str')`` -> ``messages.0.content`` (pydantic adds union-member tags)."""
    parts = []
    for part in loc:
        if _is_type_tag(part):
            break
        parts.append(str(part))
    return ".".join(parts)


def validation_error(exc) -> APIError:
    """The first problem pydantic found, worded like OpenAI's messages."""
    errors = exc.errors()
    first = errors[0]
    param = _param_path(tuple(first.get("loc", ()))) or None
    if first.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    tags = [str(part) for e in errors if _param_path(tuple(e.get("loc", ()))) == param
            for part in e.get("loc", ())[len(param.split(".")) if param else 0:][:1] if _is_type_tag(part)]
    if tags:  # a union (e.g. prompt: string, list of strings, token ids): name the accepted forms
        forms = ", ".join(dict.fromkeys(tags))
        return APIError(400, f"Invalid type for '{param}': expected one of {forms}.", param=param, code="invalid_type")
    detail = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    message = f"Invalid value for '{param}': {detail}."
    if len(errors) > 1 and any(_param_path(tuple(e.get("loc", ()))) != param for e in errors):
        message += f" ({len(errors)} problems in all; fix this one first.)"
    return APIError(400, message, param=param, code="invalid_value")


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({limit / 2 ** 20:g} MB; see "
                         f"xiaolm serve --max-body-mb).", code="request_too_large")


async def _read_body(request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed ``limit`` bytes (before it is all read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:  # routine: one line, and an answer nobody will read
        _LOG.info("serve: %s %s: the client disconnected before sending its whole body", request.method,
                  request.url.path)
        raise APIError(400, "The client disconnected before sending the whole body.", code="client_disconnected") \
            from None
    return b"".join(chunks)


def _check_json_values(data) -> None:
    """Refuse what JSON allows but a request cannot mean: nesting deeper than ``MAX_JSON_DEPTH`` and strings with
    lone surrogates (``"\\udfff"``: no UTF-8 text holds one). Iterative, so depth cannot exhaust the stack."""
    stack = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.",
                           code="invalid_json")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"Invalid value for '{path or 'body'}': the string holds a lone UTF-16 surrogate "
                                    "(an unpaired \\ud800-\\udfff escape), which is not text.",
                               param=path or None, code="invalid_value") from None
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, path, depth + 1))  # keys are strings too
                stack.append((item, f"{path}.{key}" if path else str(key), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}", depth + 1) for i, item in enumerate(value))


def _decode_body(raw: bytes, schema):
    """Bytes -> validated request (runs in a worker thread: a body of a few MB takes a while)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request. (The body must be a JSON object "
                            "sent with Content-Type: application/json.)", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, not {type(data).__name__}.",
                       code="invalid_json")
    _check_json_values(data)
    from pydantic import ValidationError

    try:
        body = schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    unsupported = body.unsupported_field()
    if unsupported:
        raise APIError(400, f"'{unsupported}' is not supported by this server (a small text model); leave it out.",
                       param=unsupported, code="unsupported_parameter")
    return body


async def _parse_body(request, schema, max_body_bytes: int):
    return await asyncio.to_thread(_decode_body, await _read_body(request, max_body_bytes), schema)


# ------------------------------------------------------------------------------------------------ the guard


def _host_name(host_header: str) -> str:
    """``Host`` header -> lower-case host without the port (``[::1]:8000`` -> ``::1``)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _Guard:
    """ASGI middleware for the checks that come before any route: Host allow-list, same-origin JSON POSTs, API key.

    Pure ASGI rather than ``@app.middleware``, so streamed responses pass through untouched."""

    def __init__(self, app, api_key: Optional[str], allowed_hosts: Optional[list[str]]):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.allowed_hosts = {h.lower().strip("[]") for h in allowed_hosts} if allowed_hosts else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope) -> Optional[APIError]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        host = headers.get("host", "")
        if self.allowed_hosts is not None and _host_name(host) not in self.allowed_hosts:
            return APIError(400, f"Invalid Host header {host!r}: this server answers only to "
                                 f"{', '.join(sorted(self.allowed_hosts))} (xiaolm serve --allowed-hosts).",
                            code="invalid_host")
        method, path = scope.get("method", "GET"), scope.get("path", "")
        if method not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            if origin is not None and origin.lower() not in (f"http://{host.lower()}", f"https://{host.lower()}"):
                return APIError(403, f"Cross-origin request from {origin!r} refused: the API answers pages served "
                                     f"by this server only.", type="permission_error", code="cross_origin")
        if path.startswith("/v1/") and self.api_key is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                return APIError(401, "You didn't provide an API key. You need to provide your API key in an "
                                     "Authorization header using Bearer auth (Authorization: Bearer YOUR_KEY).",
                                code="invalid_api_key")
            if not hmac.compare_digest(given.strip().encode(), self.api_key):
                return APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        if method == "POST" and path.startswith("/v1/"):
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                return APIError(415, f"Content-Type must be application/json, not {ctype or 'missing'!r}.",
                                code="unsupported_media_type")
        return None


# ------------------------------------------------------------------------------------------------ the app


@dataclass
class _Served:
    """What the routes need; kept on ``app.state.served``."""

    engine: Engine
    tokenizer: Any
    model_name: str
    context_length: int
    default_max_tokens: int
    request_timeout: float
    created: int
    device: str
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2 ** 20)
    max_token_chars: Optional[int] = None  # no token covers more characters; None: no cheap bound
    _call_grammar: Any = None  # xiaolm.infer.constrain.CallGrammar, made on the first forced tool call

    def call_grammar(self):
        """The grammar compiler for forced tool calls (llguidance), made once; None if it cannot be."""
        if self._call_grammar is None:
            from xiaolm.infer.constrain import CallGrammar

            try:
                self._call_grammar = CallGrammar(self.tokenizer, self.engine.model.config.vocab_size,
                                                 self.engine.eos_ids)
            except (ImportError, ValueError) as exc:
                _LOG.warning("serve: tool calls will not be constrained: %s", exc)
                self._call_grammar = False
        return self._call_grammar or None


def _max_token_chars(tokenizer) -> Optional[int]:
    """The most input characters one token can cover: with no normaliser, a token's string (bytes for byte-level
    BPE) is at least as long as the text it encodes. A prompt of C characters is then at least C / this tokens."""
    tok = getattr(tokenizer, "tok", None)
    if tok is None or tok.normalizer is not None:
        return None
    return max((len(t) for t in tok.get_vocab(with_added_tokens=False)), default=None)


def _check_length_cheaply(chars: int, served: "_Served", param: str) -> None:
    """Refuse a prompt whose character count alone proves it cannot fit, before tokenising it."""
    if served.max_token_chars and math.ceil(chars / served.max_token_chars) >= served.context_length:
        raise APIError(400, f"This model's maximum context length is {served.context_length} tokens. However, your "
                            f"prompt has {chars} characters, which is at least "
                            f"{math.ceil(chars / served.max_token_chars)} tokens. Please shorten it.",
                       param=param, code="context_length_exceeded")


def create_app(
    run: Optional[str | Path] = None,
    *,
    model=None,
    tokenizer=None,
    model_name: Optional[str] = None,
    device: str = "cpu",
    dtype=None,
    checkpoint: str = "latest",
    max_batch: int = 8,
    max_queue: int = 256,
    default_max_tokens: int = 512,
    request_timeout: float = 600.0,
    api_key: Optional[str] = None,
    allowed_hosts: Optional[list[str]] = None,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    docs: bool = False,
    scheduler: str = "continuous",
):
    """The FastAPI app serving ``run`` (loaded with ``load_model``) or an already loaded ``model`` + ``tokenizer``.

    ``model_name`` is the id clients send as ``model`` (default: the run directory's name). ``default_max_tokens``
    applies to chat requests that set no ``max_tokens`` (clamped to what the context window leaves).
    ``request_timeout`` bounds how long one request may wait and generate, in seconds. ``api_key``,
    ``allowed_hosts`` (``Host`` names accepted; None: any) and ``max_body_mb`` are the guards described above;
    ``docs`` serves FastAPI's ``/docs`` page, which loads Swagger UI from a CDN (off by default).
    ``scheduler`` is the engine's: ``continuous`` (default) or ``static``.
    """
    if model is None:
        if run is None:
            raise ValueError("create_app needs a run directory or a loaded model and tokenizer")
        from xiaolm.model.io import load_model

        model, tokenizer, _info = load_model(run, device=device, dtype=dtype, which=checkpoint)
    if tokenizer is None:
        raise ValueError("create_app needs the tokenizer that goes with the model")
    if model_name is None:
        model_name = Path(run).resolve().name if run is not None else "xiaolm"
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, scheduler=scheduler)
    served = _Served(engine=engine, tokenizer=tokenizer, model_name=model_name,
                     context_length=engine.context_length, default_max_tokens=int(default_max_tokens),
                     request_timeout=float(request_timeout), created=int(time.time()), device=str(model.device),
                     max_body_bytes=int(max_body_mb * 2 ** 20), max_token_chars=_max_token_chars(tokenizer))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()  # now, so /health can tell a dead worker from one not started yet
        yield
        engine.close()

    app = FastAPI(title="xiaolm", description="OpenAI-compatible API for a xiaolm model", lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url=None)
    app.add_middleware(_Guard, api_key=api_key, allowed_hosts=allowed_hosts)
    app.state.served = served
    app.state.engine = engine

    # ---------------------------------------------------------------------------------- error handlers

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc):
        err = validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = APIError(exc.status_code, str(exc.detail), param=None, code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        # A bug of ours: the log gets the traceback, the client a message that reveals nothing of the code.
        _LOG.error("serve: %s %s failed", request.method, request.url.path, exc_info=exc)
        err = APIError(500, "The server had an error while processing your request (see the server log).",
                       type="server_error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    # ------------------------------------------------------------------------------------ small routes

    @app.get("/health")
    async def health():
        alive = engine.alive
        body = {"status": "ok" if alive else "engine not running", "model": served.model_name,
                "context_length": served.context_length, "device": served.device, **engine.snapshot()}
        return JSONResponse(body, status_code=200 if alive else 503)

    def _model_card() -> dict:
        return {"id": served.model_name, "object": "model", "created": served.created, "owned_by": "xiaolm",
                "max_model_len": served.context_length}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        _check_model(model_id, served)
        return _model_card()

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ----------------------------------------------------------------------------------- completions

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = await _parse_body(request, ChatCompletionRequest, served.max_body_bytes)
        _check_model(body.model, served)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true.", param="top_logprobs",
                           code="invalid_value")
        try:
            plan = plan_tools(body)
            messages = request_messages(body)
        except ToolRequestError as exc:
            raise APIError(400, str(exc), param=exc.param, code="invalid_value") from None
        _check_length_cheaply(request_chars(messages, plan), served, "messages")
        prompt_ids = await asyncio.to_thread(build_prompt, tokenizer, messages, plan)
        explicit = body.requested_max_tokens()
        max_tokens = _resolve_max_tokens(len(prompt_ids), explicit, served, "messages",
                                         "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens")
        n = body.n or 1
        try:
            constraint = await asyncio.to_thread(constraint_factory, served.call_grammar, plan)
        except ToolRequestError as exc:
            raise APIError(400, str(exc), param=exc.param, code="invalid_value") from None
        gen = _submit(served, [prompt_ids] * n, [max_tokens] * n, body, "n", constraint=constraint,
                      keep_ids=marker_ids(tokenizer))
        meta = _ResponseMeta("chatcmpl-" + gen.id, int(time.time()), served.model_name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chat_stream(gen, meta, n, len(prompt_ids), include_usage, served, plan),
                                     media_type="text/event-stream", headers=_SSE_HEADERS)
        await _collect(gen, request, served)
        choices = [_chat_choice(s, plan, chat_logprobs(tokenizer, s.logprobs) if body.logprobs else None)
                   for s in gen.sequences]
        return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
                "choices": choices, "usage": _usage(len(prompt_ids), gen.sequences)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = await _parse_body(request, CompletionRequest, served.max_body_bytes)
        _check_model(body.model, served)
        _check_completion_scoring(body)
        if body.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported by this model.", param="suffix",
                           code="unsupported_parameter")
        try:
            prompts = body.prompt_list()
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt", code="invalid_value") from None
        explicit = body.max_tokens if "max_tokens" in body.model_fields_set else None
        n = body.n or 1
        prompt_ids, echoes, limits, prepended = [], [], [], []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                _check_length_cheaply(len(p) + 1, served, "prompt")
                ids = await asyncio.to_thread(plain_prompt_ids, tokenizer, p)
                echo = p
            else:
                bad = [t for t in p if not 0 <= t < tokenizer.vocab_size]
                if not p or bad:
                    raise APIError(400, f"prompt {i} holds token ids outside the vocabulary (0..{tokenizer.vocab_size - 1})"
                                   if bad else f"prompt {i} is an empty token list", param="prompt", code="invalid_value")
                ids = list(p)
                echo = tokenizer.decode(ids, skip_special_tokens=True)
            limit = _resolve_max_tokens(len(ids), explicit, served, "prompt", "max_tokens",
                                        default=body.max_tokens)
            for _ in range(n):
                prompt_ids.append(ids)
                echoes.append(echo if body.echo else "")
                limits.append(limit)
                prepended.append(isinstance(p, str))
        gen = _submit(served, prompt_ids, limits, body, "n" if len(prompts) == 1 else "prompt")
        meta = _ResponseMeta("cmpl-" + gen.id, int(time.time()), served.model_name)
        prompt_tokens = sum(len(prompt_ids[i]) for i in range(0, len(prompt_ids), n))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_completion_stream(gen, meta, echoes, prompt_tokens, include_usage, served),
                                     media_type="text/event-stream", headers=_SSE_HEADERS)
        await _collect(gen, request, served)
        choices = [{"index": s.index, "text": echoes[s.index] + s.text,
                    "logprobs": _completion_choice_logprobs(tokenizer, s, body, prepended[s.index]),
                    "finish_reason": s.finish_reason} for s in gen.sequences]
        return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                "choices": choices, "usage": _usage(prompt_tokens, gen.sequences)}

    return app


# ------------------------------------------------------------------------------------------ route helpers

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class _ResponseMeta:
    id: str
    created: int
    model: str


def _check_model(name: str, served: _Served) -> None:
    if name != served.model_name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{served.model_name}' "
                            f"(see GET /v1/models).", param="model", code="model_not_found")


def _resolve_max_tokens(prompt_tokens: int, explicit: Optional[int], served: _Served, prompt_param: str,
                        max_param: str, default: Optional[int] = None) -> int:
    """OpenAI's rule: a prompt plus an explicit max_tokens that overflow the context is rejected
    (context_length_exceeded); without an explicit max_tokens the default is clamped to what is left."""
    ctx = served.context_length
    if prompt_tokens >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your prompt is "
                            f"{prompt_tokens} tokens, which leaves no room for a completion. Please shorten it.",
                       param=prompt_param, code="context_length_exceeded")
    if explicit is not None:
        if prompt_tokens + explicit > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{prompt_tokens + explicit} tokens ({prompt_tokens} in the prompt, {explicit} in the "
                                f"completion). Please reduce the length of the prompt or of {max_param}.",
                           param=max_param, code="context_length_exceeded")
        return explicit
    wanted = default if default is not None else served.default_max_tokens
    return max(1, min(wanted, ctx - prompt_tokens))


def _logprob_settings(body) -> tuple[bool, int, Optional[int]]:
    """(logprobs, top_logprobs, prompt_logprobs) of a chat (``logprobs: bool``, ``top_logprobs: int``) or
    completions (``logprobs: int``; with ``echo`` the prompt is scored too) request."""
    if isinstance(body, CompletionRequest):
        if body.logprobs is None:
            return False, 0, None
        return True, body.logprobs, body.logprobs if body.echo else None
    return bool(body.logprobs), (body.top_logprobs or 0) if body.logprobs else 0, None


def _chat_choice(seq: Sequence, plan: ToolPlan, logprobs) -> dict:
    """One non-streamed chat choice: the text taken apart into reasoning, content and tool calls."""
    output = ChoiceOutput(plan)
    output.push(seq.text)
    output.finish()
    choice = {"index": seq.index, "message": output.message(), "logprobs": logprobs,
              "finish_reason": output.finish_reason(seq.finish_reason)}
    if output.errors:
        choice["tool_call_errors"] = output.errors
    return choice


def _submit(served: _Served, prompts: list[list[int]], limits: list[int], body, rows_param: str,
            constraint=None, keep_ids: list[int] = ()) -> GenerationRequest:
    if len(prompts) > served.engine.max_queue:  # would be refused however long the client waits: not a 429
        raise APIError(400, f"This request needs {len(prompts)} generation rows (prompts x n), more than this server "
                            f"ever queues ({served.engine.max_queue}, xiaolm serve --max-queue). Send fewer prompts "
                            f"or a smaller n.", param=rows_param, code="too_many_rows")
    logprobs, top_logprobs, prompt_logprobs = _logprob_settings(body)
    params = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        repetition_penalty=body.repetition_penalty or 1.0,
        seed=body.seed,
        ignore_eos=bool(body.ignore_eos),
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    gen = GenerationRequest(served.tokenizer, prompts, limits, params, body.stop_list(),
                            prompt_logprobs=prompt_logprobs, constraint=constraint, keep_ids=keep_ids)
    try:
        served.engine.submit(gen)
    except QueueFull as exc:
        raise APIError(429, f"{exc}; retry shortly.", type="rate_limit_error", code="queue_full") from None
    except EngineClosed:
        raise APIError(503, "the server is shutting down.", type="server_error", code="shutting_down") from None
    except ValueError as exc:
        raise APIError(400, str(exc), code="context_length_exceeded") from None
    return gen


def _log_disconnect(gen: GenerationRequest) -> None:
    """One line, no traceback: a client hanging up is routine."""
    _LOG.info("serve: request %s: the client disconnected after %d tokens; its generation stopped", gen.id,
              sum(s.tokens for s in gen.sequences))


def _check_completion_scoring(body: CompletionRequest) -> None:
    """max_tokens 0 only scores a prompt (echo); a streamed echo does not carry the prompt's logprobs."""
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be at least 1 (0 is allowed only with echo, to score the prompt).",
                       param="max_tokens", code="invalid_value")
    if body.stream and body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported when streaming; send it without stream.",
                       param="logprobs", code="unsupported_parameter")


def _completion_choice_logprobs(tokenizer, seq: Sequence, body: CompletionRequest, prepended: bool) -> Optional[dict]:
    """The legacy logprobs of one choice: the prompt's tokens first when echoed (without the ``<|endoftext|>``
    we prepended to a text prompt, which is not part of the echoed text), then the generated ones."""
    if body.logprobs is None:
        return None
    entries, tokens = [], []
    if body.echo and seq.prompt_logprobs is not None:
        skip = 1 if prepended else 0
        entries, tokens = list(seq.prompt_logprobs[skip:]), list(seq.prompt_ids[skip:])
    entries += seq.logprobs
    tokens += [e.token for e in seq.logprobs]
    return completion_logprobs(tokenizer, entries, tokens, TextOffsets(), body.logprobs)


def _usage(prompt_tokens: int, sequences: list[Sequence]) -> dict:
    completion = sum(s.tokens for s in sequences)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def _collect(gen: GenerationRequest, request, served: _Served) -> None:
    """Wait for a non-streamed request; a client that hangs up cancels it, and so does the timeout."""
    deadline = time.monotonic() + served.request_timeout
    errors: list[str] = []
    try:
        while True:
            event = await gen.next_event(timeout=0.5)
            if event is None:
                if await request.is_disconnected():
                    if not gen.cancelled:
                        _log_disconnect(gen)
                    gen.cancel()
                if time.monotonic() > deadline:
                    gen.cancel()
                    raise APIError(504, f"the request did not finish within {served.request_timeout:.0f} s.",
                                   type="server_error", code="timeout")
                continue
            if event.kind == "done":
                break
            if event.kind == "error":
                errors.append(event.text)
    finally:
        gen.cancel()  # no-op when finished; frees the rows if this handler was cancelled
    if errors:
        _LOG.error("serve: request %s: %s", gen.id, errors[0])
        raise APIError(500, GENERATION_FAILED, type="server_error", code="generation_failed")
    if any(s.finish_reason == "cancelled" for s in gen.sequences) and not await request.is_disconnected():
        raise APIError(503, "the request was cancelled because the server is shutting down.", type="server_error",
                       code="shutting_down")


# SSE splits events on CR/LF only, but many clients read lines with str.splitlines() (httpx's aiter_lines does),
# which also breaks at these; JSON may escape them, so it does, and the text arrives whole everywhere.
_SPLITLINES_EXTRA = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _sse(obj: Any) -> str:
    text = json.dumps(obj, ensure_ascii=False)  # control characters below U+0020 are escaped by json already
    for char, escaped in _SPLITLINES_EXTRA.items():
        text = text.replace(char, escaped)
    return f"data: {text}\n\n"


async def _events_with_keepalive(gen: GenerationRequest, served: _Served) -> AsyncIterator[Any]:
    """The request's events; ``None`` now and then while nothing happens (becomes an SSE comment)."""
    deadline = time.monotonic() + served.request_timeout
    while True:
        # Queued events come without a suspension point; yielding to the loop once per event lets it notice a
        # client that hung up (connection_lost) before we write into the dead socket again and again.
        await asyncio.sleep(0)
        event = await gen.next_event(timeout=KEEPALIVE_SECONDS)
        if event is None:
            if time.monotonic() > deadline:
                gen.cancel()
                raise TimeoutError(f"the request did not finish within {served.request_timeout:.0f} s")
            yield None
            continue
        if event.kind == "done":
            return
        yield event


GENERATION_FAILED = "Generation failed on the server (see the server log); the server goes on serving."


def _stream_error(message: str, code: str) -> str:
    return _sse(APIError(500, message, type="server_error", code=code).body())


def _chunk(meta: _ResponseMeta, object_name: str, include_usage: bool, choice: dict) -> dict:
    obj = {"id": meta.id, "object": object_name, "created": meta.created, "model": meta.model, "choices": [choice]}
    if include_usage:
        obj["usage"] = None
    return obj


async def _stream(gen: GenerationRequest, meta: _ResponseMeta, object_name: str, opening: str, prompt_tokens: int,
                  include_usage: bool, served: _Served, delta: Callable[[Any], Optional[dict]],
                  finish: Callable[[int, str], list[dict]]) -> AsyncIterator[str]:
    """One streamed response: ``opening``, a chunk per delta (``delta(event)``; None: nothing to send yet) and the
    chunks of each finished choice (``finish(index, reason)``), the usage chunk, ``[DONE]``; chat and legacy
    completions differ only in their chunks."""
    try:
        if opening:
            yield opening  # one write
        async for event in _events_with_keepalive(gen, served):
            if event is None:
                yield ": keep-alive\n\n"
            elif event.kind == "delta":
                chunk = delta(event)
                if chunk is not None:
                    yield _sse(chunk)
            elif event.kind == "finish" and event.finish_reason in ("stop", "length"):
                yield "".join(_sse(chunk) for chunk in finish(event.index, event.finish_reason))
            elif event.kind == "finish" and event.finish_reason == "cancelled":
                yield _stream_error("the request was cancelled because the server is shutting down.", "shutting_down")
            elif event.kind == "error":
                _LOG.error("serve: request %s: %s", gen.id, event.text)
                yield _stream_error(GENERATION_FAILED, "generation_failed")
        if include_usage:
            yield _sse({"id": meta.id, "object": object_name, "created": meta.created, "model": meta.model,
                        "choices": [], "usage": _usage(prompt_tokens, gen.sequences)})
        yield "data: [DONE]\n\n"
    except TimeoutError as exc:
        yield _stream_error(str(exc), "timeout")
        yield "data: [DONE]\n\n"
    finally:
        if not gen.finished and not gen.cancelled:
            _log_disconnect(gen)
        gen.cancel()  # the client went away (this generator was cancelled) or we are done: free the rows


def _chat_stream(gen: GenerationRequest, meta: _ResponseMeta, n: int, prompt_tokens: int,
                 include_usage: bool, served: _Served, plan: ToolPlan) -> AsyncIterator[str]:
    outputs = [ChoiceOutput(plan) for _ in range(n)]  # each choice's reasoning / content / tool calls

    def chunk(index: int, delta: dict, finish_reason: Optional[str] = None, logprobs=None) -> dict:
        return _chunk(meta, "chat.completion.chunk", include_usage,
                      {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})

    def delta(event) -> Optional[dict]:
        logprobs = chat_logprobs(served.tokenizer, event.logprobs) if gen.params.logprobs else None
        parts = outputs[event.index].push(event.text)
        if parts is None and not logprobs:
            return None  # held back: it may be the start of a marker
        return chunk(event.index, parts or {}, logprobs=logprobs)

    def finish(index: int, reason: str) -> list[dict]:
        output = outputs[index]
        rest = output.finish()
        last = chunk(index, {}, output.finish_reason(reason))
        if output.errors:
            last["choices"][0]["tool_call_errors"] = output.errors
        return ([chunk(index, rest)] if rest else []) + [last]

    opening = "".join(_sse(chunk(index, {"role": "assistant", "content": ""})) for index in range(n))
    return _stream(gen, meta, "chat.completion.chunk", opening, prompt_tokens, include_usage, served, delta, finish)


def _completion_stream(gen: GenerationRequest, meta: _ResponseMeta, echoes: list[str], prompt_tokens: int,
                       include_usage: bool, served: _Served) -> AsyncIterator[str]:
    offsets = [TextOffsets(len(echo)) for echo in echoes]  # legacy logprobs count characters of the whole text

    def chunk(index: int, text: str, finish_reason: Optional[str] = None, logprobs=None) -> dict:
        return _chunk(meta, "text_completion", include_usage,
                      {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason})

    def delta(event) -> dict:
        logprobs = None
        if gen.params.logprobs:
            logprobs = completion_logprobs(served.tokenizer, event.logprobs, [e.token for e in event.logprobs],
                                           offsets[event.index], gen.params.top_logprobs)
        return chunk(event.index, event.text, logprobs=logprobs)

    opening = "".join(_sse(chunk(index, echo)) for index, echo in enumerate(echoes) if echo)
    return _stream(gen, meta, "text_completion", opening, prompt_tokens, include_usage, served, delta,
                   lambda index, reason: [chunk(index, "", reason)])


# ------------------------------------------------------------------------------------ running the server


class BackgroundServer:
    """Run an app with uvicorn on a free loopback port in a background thread (tests, notebooks, benchmarks).

    ``with BackgroundServer(app) as server: httpx.get(server.url + "/health")``. The socket is bound before the
    thread starts, so there is no race for the port.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout: float = 30.0):
        self.app, self.host, self.port, self.log_level, self.start_timeout = app, host, port, log_level, start_timeout
        self.url = ""
        self._server = None
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "BackgroundServer":
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(self.app, log_level=self.log_level, lifespan="on", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="xiaolm-uvicorn")
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)


# ------------------------------------------------------------------------------------------------ CLI


@dataclass
class ServeConfig:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
    /health) with a web chat page at /. Requests are queued and generated in batches by one worker."""

    run: str = opt(None, "RUNDIR, checkpoint, quantised or Hugging Face directory to serve",
                   required="no model given (xiaolm serve RUNDIR)")
    host: str = opt("127.0.0.1", "address to listen on (keep it on loopback, or set --api-key, unless you know who "
                                 "can reach it)")
    port: int = opt(8000, "TCP port")
    model_name: Optional[str] = opt(None, "the model id clients send in `model` (default: the run directory's name)")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "weights dtype: auto is bfloat16 on a GPU that supports it, float32 otherwise")
    checkpoint: str = opt("latest", "which checkpoint of a RUNDIR: latest or best")
    max_batch: int = opt(8, "rows (requests x n) generated together in one batch")
    max_queue: int = opt(256, "rows allowed to wait for a batch; beyond that requests get HTTP 429 (and one that "
                                   "needs more rows than this, 400)")
    default_max_tokens: int = opt(512, "max_tokens of a chat request that sets none (clamped to the context left)")
    request_timeout: float = opt(600.0, "seconds one request may wait and generate before it is cancelled")
    scheduler: Literal["continuous", "static"] = opt(
        "continuous", "continuous: new requests join the running batch at every step; static: a batch runs to its end")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = opt("info", "uvicorn log level")
    api_key: Optional[str] = opt(None, "require 'Authorization: Bearer KEY' on /v1/* (default: $XIAOLM_API_KEY; "
                                       "unset: no key)")
    max_body_mb: float = opt(DEFAULT_MAX_BODY_MB, "larger request bodies are refused with HTTP 413")
    allowed_hosts: list[str] = opt([], "Host header names accepted besides the loopback names, which are the only "
                                       "ones accepted when listening on loopback (defeats DNS rebinding)")
    docs: bool = opt(False, "serve FastAPI's /docs page (it loads Swagger UI from a CDN)")


def _pick_dtype(name: str, device: str):
    import torch

    if name == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def main(argv: list[str]) -> int:
    from xiaolm.config import parse_config
    from xiaolm.model.io import CheckpointError
    from xiaolm.utils import fail, log, pick_device

    cfg, _ = parse_config(
        ServeConfig, argv, "xiaolm serve", positionals={"run": "RUNDIR"},
        epilog="example:\n  xiaolm serve runs/sft --port 8000\n  open http://127.0.0.1:8000/  (or point any OpenAI "
               "client at http://127.0.0.1:8000/v1)",
    )
    if cfg.max_batch < 1 or cfg.max_queue < 1:
        raise fail("--max-batch and --max-queue must be at least 1")
    if not 0 <= cfg.port <= 65535:
        raise fail(f"--port {cfg.port} is not a TCP port")
    if not cfg.max_body_mb > 0:
        raise fail(f"--max-body-mb must be more than 0, got {cfg.max_body_mb}")
    api_key = cfg.api_key or os.environ.get("XIAOLM_API_KEY") or None
    allowed_hosts = None  # any Host header
    if cfg.host in LOOPBACK_HOSTS:
        allowed_hosts = list(LOOPBACK_HOSTS) + list(cfg.allowed_hosts)
    elif cfg.allowed_hosts:
        allowed_hosts = list(cfg.allowed_hosts)
    try:
        device = pick_device(cfg.device)
    except RuntimeError as exc:
        raise fail(str(exc))
    try:
        app = create_app(cfg.run, model_name=cfg.model_name, device=device, dtype=_pick_dtype(cfg.dtype, device),
                         checkpoint=cfg.checkpoint, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                         default_max_tokens=cfg.default_max_tokens, request_timeout=cfg.request_timeout,
                         api_key=api_key, allowed_hosts=allowed_hosts, max_body_mb=cfg.max_body_mb, docs=cfg.docs,
                         scheduler=cfg.scheduler)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        raise fail(str(exc))
    import uvicorn

    try:
        sock = _bind(cfg.host, cfg.port)
    except OSError as exc:  # port in use, address not available
        app.state.engine.close()
        raise fail(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}")
    port = sock.getsockname()[1]
    served = app.state.served
    if cfg.host not in LOOPBACK_HOSTS and not api_key:
        log(f"serve: warning: listening on {cfg.host} without --api-key; anyone who can reach it can use the model")
    shown_host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    log(f"serve: model '{served.model_name}' on {served.device}, context {served.context_length} tokens, "
        f"batches of up to {cfg.max_batch}" + ("; API key required on /v1" if api_key else ""))
    log(f"serve: chat page http://{shown_host}:{port}/   API http://{shown_host}:{port}/v1")
    config = uvicorn.Config(app, log_level=cfg.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, opened before anything says the server is up (uvicorn would bind only
    after its startup, so a banner printed before ``uvicorn.run`` could announce a server that never ran)."""
    family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock

