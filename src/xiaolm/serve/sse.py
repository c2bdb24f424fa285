"""Shaping a streamed answer as server-sent events: chat and legacy completion chunks, keep-alive comments while a
request waits, an error event instead of a broken stream, the usage chunk, ``data: [DONE]``."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Callable, Optional

from xiaolm.serve.request import GenerationRequest
from xiaolm.serve.errors import GENERATION_FAILED, LOG, APIError
from xiaolm.serve.handling import ResponseMeta, Served, log_disconnect, usage_body
from xiaolm.serve.logprobs import TextOffsets, chat_logprobs, completion_logprobs
from xiaolm.serve.tools import ChoiceOutput, ToolPlan

KEEPALIVE_SECONDS = 5.0  # an SSE comment while a streamed request waits in the queue (lets proxies and us notice)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# SSE splits events on CR/LF only, but many clients read lines with str.splitlines() (httpx's aiter_lines does),
# which also breaks at these; JSON may escape them, so it does, and the text arrives whole everywhere.
_SPLITLINES_EXTRA = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def sse_event(obj: Any) -> str:
    text = json.dumps(obj, ensure_ascii=False)  # control characters below U+0020 are escaped by json already
    for char, escaped in _SPLITLINES_EXTRA.items():
        text = text.replace(char, escaped)
    return f"data: {text}\n\n"


async def events_with_keepalive(gen: GenerationRequest, served: Served) -> AsyncIterator[Any]:
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


def _stream_error(message: str, code: str) -> str:
    return sse_event(APIError(500, message, type="server_error", code=code).body())


def _chunk(meta: ResponseMeta, object_name: str, include_usage: bool, choice: dict) -> dict:
    obj = {"id": meta.id, "object": object_name, "created": meta.created, "model": meta.model, "choices": [choice]}
    if include_usage:
        obj["usage"] = None
    return obj


async def _stream(gen: GenerationRequest, meta: ResponseMeta, object_name: str, opening: str, prompt_tokens: int,
                  include_usage: bool, served: Served, delta: Callable[[Any], Optional[dict]],
                  finish: Callable[[int, str], list[dict]]) -> AsyncIterator[str]:
    """One streamed response: ``opening``, a chunk per delta (``delta(event)``; None: nothing to send yet) and the
    chunks of each finished choice (``finish(index, reason)``), the usage chunk, ``[DONE]``; chat and legacy
    completions differ only in their chunks."""
    try:
        if opening:
            yield opening  # one write
        async for event in events_with_keepalive(gen, served):
            if event is None:
                yield ": keep-alive\n\n"
            elif event.kind == "delta":
                chunk = delta(event)
                if chunk is not None:
                    yield sse_event(chunk)
            elif event.kind == "finish" and event.finish_reason in ("stop", "length"):
                yield "".join(sse_event(chunk) for chunk in finish(event.index, event.finish_reason))
            elif event.kind == "finish" and event.finish_reason == "cancelled":
                yield _stream_error("the request was cancelled because the server is shutting down.", "shutting_down")
            elif event.kind == "error":
                LOG.error("serve: request %s: %s", gen.id, event.text)
                yield _stream_error(GENERATION_FAILED, "generation_failed")
        if include_usage:
            yield sse_event({"id": meta.id, "object": object_name, "created": meta.created, "model": meta.model,
                        "choices": [], "usage": usage_body(prompt_tokens, gen.sequences)})
        yield "data: [DONE]\n\n"
    except TimeoutError as exc:
        yield _stream_error(str(exc), "timeout")
        yield "data: [DONE]\n\n"
    finally:
        if not gen.finished and not gen.cancelled:
            log_disconnect(gen)
        gen.cancel()  # the client went away (this generator was cancelled) or we are done: free the rows


def chat_stream(gen: GenerationRequest, meta: ResponseMeta, n: int, prompt_tokens: int,
                include_usage: bool, served: Served, plan: ToolPlan) -> AsyncIterator[str]:
    """Chat chunks: each choice's text taken apart as it streams into ``reasoning_content``, ``content`` and
    ``tool_calls`` deltas (``serve/tools.py``); a choice that called tools ends with ``finish_reason: tool_calls``."""
    outputs = [ChoiceOutput(plan) for _ in range(n)]

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

    opening = "".join(sse_event(chunk(index, {"role": "assistant", "content": ""})) for index in range(n))
    return _stream(gen, meta, "chat.completion.chunk", opening, prompt_tokens, include_usage, served, delta, finish)


def completion_stream(gen: GenerationRequest, meta: ResponseMeta, echoes: list[str], prompt_tokens: int,
                       include_usage: bool, served: Served) -> AsyncIterator[str]:
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

    opening = "".join(sse_event(chunk(index, echo)) for index, echo in enumerate(echoes) if echo)
    return _stream(gen, meta, "text_completion", opening, prompt_tokens, include_usage, served, delta,
                   lambda index, reason: [chunk(index, "", reason)])
