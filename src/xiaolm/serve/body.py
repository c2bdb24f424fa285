"""Reading and decoding a request body: the size limit (413), JSON that parses, values JSON allows but a request
cannot mean (deep nesting, lone surrogates), then the pydantic schema (400 naming the parameter)."""
from __future__ import annotations

import asyncio
import json
from typing import Optional

from xiaolm.serve.errors import LOG, APIError, validation_error
from xiaolm.serve.guard import header_charset

DEFAULT_MAX_BODY_MB = 4.0  # a 128k-token prompt is well under 1 MB of JSON
MAX_JSON_DEPTH = 32  # the deepest a valid request gets is about 5 (messages -> content parts -> fields)
# How much of an oversized body is read and dropped so the client can read its 413 (see read_body).
DRAIN_BYTES = 64 * 2 ** 20
DRAIN_SECONDS = 5.0


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({limit / 2 ** 20:g} MB; see "
                         f"xiaolm serve --max-body-mb).", code="request_too_large")


async def read_body(request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed ``limit`` bytes (before it is all read).

    Many clients (Python's urllib, httpx and so the ``openai`` client) write the whole body before they read the
    answer: closing on them with unread bytes makes the kernel send a reset, and they see "connection reset" instead
    of the 413. So the rest of an oversized body is read and dropped first, as nginx's lingering close does, within
    ``DRAIN_BYTES`` and ``DRAIN_SECONDS``; a body larger than that is refused without waiting for it."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    declared = int(declared) if declared is not None and declared.isdigit() else None
    chunks, size = [], 0
    stream = request.stream()  # one iterator: starlette refuses a second request.stream()
    try:
        if declared is not None and declared > limit:
            await _drain(stream, declared)
            raise _too_large(limit)
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                await _drain(stream, None, size)
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:  # routine: one line, and an answer nobody will read
        LOG.info("serve: %s %s: the client disconnected before sending its whole body", request.method,
                 request.url.path)
        raise APIError(400, "The client disconnected before sending the whole body.", code="client_disconnected") \
            from None
    return b"".join(chunks)


async def _drain(stream, declared: Optional[int], seen: int = 0) -> None:
    """Read and drop what is left of an oversized body, unless it is declared (or turns out) larger than
    ``DRAIN_BYTES`` or takes longer than ``DRAIN_SECONDS``; then the 413 goes out at once."""
    if declared is not None and declared > DRAIN_BYTES:
        return
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            async for chunk in stream:
                seen += len(chunk)
                if seen > DRAIN_BYTES:
                    return
    except TimeoutError:
        return


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


def decode_body(raw: bytes, schema, charset: Optional[str] = None):
    """Bytes -> validated request (runs in a worker thread: a body of a few MB takes a while). ``charset`` is the
    Content-Type's (the guard has refused names Python cannot decode); without one, JSON's own rule (UTF-8, or
    UTF-16/32 recognised by their zero bytes)."""
    if charset is not None:
        try:
            raw = raw.decode(charset)
        except UnicodeDecodeError as exc:
            raise APIError(400, f"The body is not valid {charset} (as its Content-Type says) at byte {exc.start}.",
                           code="invalid_json") from None
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


async def parse_body(request, schema, max_body_bytes: int):
    charset = header_charset(request.headers.get("content-type", ""))
    return await asyncio.to_thread(decode_body, await read_body(request, max_body_bytes), schema, charset)
