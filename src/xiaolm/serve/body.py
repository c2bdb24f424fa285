"""Reading and decoding a request body: the size limit (413), JSON that parses, values JSON allows but a request
cannot mean (deep nesting, lone surrogates), then the pydantic schema (400 naming the parameter)."""
from __future__ import annotations

import asyncio
import json

from xiaolm.serve.errors import LOG, APIError, validation_error

DEFAULT_MAX_BODY_MB = 4.0  # a 128k-token prompt is well under 1 MB of JSON
MAX_JSON_DEPTH = 32  # the deepest a valid request gets is about 5 (messages -> content parts -> fields)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({limit / 2 ** 20:g} MB; see "
                         f"xiaolm serve --max-body-mb).", code="request_too_large")


async def read_body(request, limit: int) -> bytes:
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
        LOG.info("serve: %s %s: the client disconnected before sending its whole body", request.method,
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


def decode_body(raw: bytes, schema):
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


async def parse_body(request, schema, max_body_bytes: int):
    return await asyncio.to_thread(decode_body, await read_body(request, max_body_bytes), schema)
