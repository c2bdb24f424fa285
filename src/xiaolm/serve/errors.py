"""The server's client-facing errors, in OpenAI's shape, and its logger."""
from __future__ import annotations

import logging
from typing import Optional

LOG = logging.getLogger("uvicorn.error")  # configured by uvicorn, at --log-level
GENERATION_FAILED = "Generation failed on the server (see the server log); the server goes on serving."


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
