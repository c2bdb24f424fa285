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

Security defaults (``serve/guard.py``): with ``api_key`` set, ``/v1/*`` needs ``Authorization: Bearer KEY`` (401 otherwise);
``allowed_hosts`` (the CLI sets it when bound to loopback) refuses other ``Host`` headers, which defeats DNS
rebinding; a POST must be ``Content-Type: application/json`` and, when a browser sends ``Origin``, come from this
server's own origin, so no other web page can make a visitor's browser run requests here. Message contents and
prompts are text: a content that spells ``<|im_end|>`` stays text (``chat_prompt_ids``), so no turn can be
forged. Generation runs in :class:`xiaolm.serve.engine.Engine`: one worker thread, a queue, and batches of up to
``--max-batch`` rows.

The package, by concern: ``app`` (this module: the routes), ``body`` (reading and decoding a request body),
``guard`` (the security middleware), ``handling`` (the steps every completion route shares), ``sse`` (streamed
answers), ``errors`` (OpenAI-shaped errors), ``engine`` (batched generation), ``main`` (the ``xiaolm serve`` command).
``create_app(...)`` builds the app without opening a socket (tests use it with Starlette's TestClient, or
``tests/serve_harness.py`` to run it with uvicorn on a free loopback port).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from xiaolm.infer.generate import plain_prompt_ids
from xiaolm.infer.toolstream import marker_ids
from xiaolm.serve.body import DEFAULT_MAX_BODY_MB, parse_body
from xiaolm.serve.engine import Engine
from xiaolm.serve.errors import LOG, APIError, validation_error
from xiaolm.serve.guard import LOOPBACK_HOSTS, Guard, api_key_problem  # noqa: F401  (LOOPBACK_HOSTS: part of this module's API)
from xiaolm.serve.handling import (ResponseMeta, Served, check_completion_scoring, check_length_cheaply, check_model,
                                   collect, completion_choice_logprobs, longest_token_chars, resolve_max_tokens,
                                   submit, usage_body)
from xiaolm.serve.logprobs import chat_logprobs
from xiaolm.serve.schemas import ChatCompletionRequest, CompletionRequest
from xiaolm.serve.sse import SSE_HEADERS, chat_stream, completion_stream
from xiaolm.serve.tools import (ToolRequestError, build_prompt, chat_choice, constraint_factory,
                                plan_tools, request_chars, request_messages, several_calls)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The page may load only what this server serves: a stray CDN link would be blocked, not silently fetched.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


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
    fair_share: bool = True,
):
    """The FastAPI app serving ``run`` (loaded with ``load_model``) or an already loaded ``model`` + ``tokenizer``.

    ``model_name`` is the id clients send as ``model`` (default: the run directory's name). ``default_max_tokens``
    applies to chat requests that set no ``max_tokens`` (clamped to what the context window leaves).
    ``request_timeout`` bounds how long one request may wait and generate, in seconds. ``api_key``,
    ``allowed_hosts`` (``Host`` names accepted; None: any) and ``max_body_mb`` are the guards described above;
    ``docs`` serves FastAPI's ``/docs`` page, which loads Swagger UI from a CDN (off by default).
    ``scheduler`` is the engine's: ``continuous`` (default) or ``static``. ``fair_share`` (continuous only): waiting
    rows are admitted client by client (OpenAI's ``user``, else the peer address), fewest running rows first, and a
    few slots stay for clients with none (``Engine``); off, first come first served.
    """
    problem = api_key_problem(api_key, "api_key") if api_key else None
    if problem:  # before loading anything
        raise ValueError(problem)
    if model is None:
        if run is None:
            raise ValueError("create_app needs a run directory or a loaded model and tokenizer")
        from xiaolm.model.io import load_model

        model, tokenizer, _info = load_model(run, device=device, dtype=dtype, which=checkpoint)
    if tokenizer is None:
        raise ValueError("create_app needs the tokenizer that goes with the model")
    if model_name is None:
        model_name = Path(run).resolve().name if run is not None else "xiaolm"
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, scheduler=scheduler,
                    fair_share=fair_share)
    served = Served(engine=engine, tokenizer=tokenizer, model_name=model_name,
                     context_length=engine.context_length, default_max_tokens=int(default_max_tokens),
                     request_timeout=float(request_timeout), created=int(time.time()), device=str(model.device),
                     max_body_bytes=int(max_body_mb * 2 ** 20), max_token_chars=longest_token_chars(tokenizer))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()  # now, so /health can tell a dead worker from one not started yet
        yield
        engine.close()

    app = FastAPI(title="xiaolm", description="OpenAI-compatible API for a xiaolm model", lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url=None)
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=allowed_hosts)
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
        LOG.error("serve: %s %s failed", request.method, request.url.path, exc_info=exc)
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
        check_model(model_id, served)
        return _model_card()

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ----------------------------------------------------------------------------------- completions

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest, served.max_body_bytes)
        check_model(body.model, served)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true.", param="top_logprobs",
                           code="invalid_value")
        try:
            plan = plan_tools(body)
            messages = request_messages(body)
        except ToolRequestError as exc:
            raise APIError(400, str(exc), param=exc.param, code="invalid_value") from None
        check_length_cheaply(request_chars(messages, plan), served, "messages")
        prompt_ids = await asyncio.to_thread(build_prompt, tokenizer, messages, plan)
        explicit = body.requested_max_tokens()
        max_tokens = resolve_max_tokens(len(prompt_ids), explicit, served, "messages",
                                         "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens")
        n = body.n or 1
        try:
            constraint = await asyncio.to_thread(constraint_factory, served.call_grammar, plan,
                                                 several_calls(tokenizer, plan))
        except ToolRequestError as exc:
            raise APIError(400, str(exc), param=exc.param, code="invalid_value") from None
        gen = submit(served, [prompt_ids] * n, [max_tokens] * n, body, "n", _peer(request), constraint=constraint,
                     keep_ids=marker_ids(tokenizer))
        meta = ResponseMeta("chatcmpl-" + gen.id, int(time.time()), served.model_name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(chat_stream(gen, meta, n, len(prompt_ids), include_usage, served, plan),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        await collect(gen, request, served)
        choices = [chat_choice(s.index, s.text, s.finish_reason, plan,
                               chat_logprobs(tokenizer, s.logprobs) if body.logprobs else None)
                   for s in gen.sequences]
        return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
                "choices": choices, "usage": usage_body(len(prompt_ids), gen.sequences)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = await parse_body(request, CompletionRequest, served.max_body_bytes)
        check_model(body.model, served)
        check_completion_scoring(body)
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
                check_length_cheaply(len(p) + 1, served, "prompt")
                ids = await asyncio.to_thread(plain_prompt_ids, tokenizer, p)
                echo = p
            else:
                bad = [t for t in p if not 0 <= t < tokenizer.vocab_size]
                if not p or bad:
                    raise APIError(400, f"prompt {i} holds token ids outside the vocabulary (0..{tokenizer.vocab_size - 1})"
                                   if bad else f"prompt {i} is an empty token list", param="prompt", code="invalid_value")
                ids = list(p)
                echo = tokenizer.decode(ids, skip_special_tokens=True)
            limit = resolve_max_tokens(len(ids), explicit, served, "prompt", "max_tokens",
                                        default=body.max_tokens)
            for _ in range(n):
                prompt_ids.append(ids)
                echoes.append(echo if body.echo else "")
                limits.append(limit)
                prepended.append(isinstance(p, str))
        gen = submit(served, prompt_ids, limits, body, "n" if len(prompts) == 1 else "prompt", _peer(request))
        meta = ResponseMeta("cmpl-" + gen.id, int(time.time()), served.model_name)
        prompt_tokens = sum(len(prompt_ids[i]) for i in range(0, len(prompt_ids), n))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(completion_stream(gen, meta, echoes, prompt_tokens, include_usage, served),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        await collect(gen, request, served)
        choices = [{"index": s.index, "text": echoes[s.index] + s.text,
                    "logprobs": completion_choice_logprobs(tokenizer, s, body, prepended[s.index]),
                    "finish_reason": s.finish_reason} for s in gen.sequences]
        return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                "choices": choices, "usage": usage_body(prompt_tokens, gen.sequences)}

    return app


def _peer(request: Request) -> Optional[str]:
    """The client's address, which identifies it for fair shares when it sends no ``user``."""
    return request.client.host if request.client is not None else None
