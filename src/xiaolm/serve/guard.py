"""The security middleware: Host allow-list (DNS rebinding), same-origin JSON POSTs, the API key."""
from __future__ import annotations

import hmac
from typing import Optional

from fastapi.responses import JSONResponse

from xiaolm.serve.errors import APIError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def api_key_problem(key: str, source: str = "--api-key") -> Optional[str]:
    """Why ``key`` can never be matched by a client (one line naming ``source``), or None. HTTP headers carry
    visible ASCII (RFC 9110), and the guard strips the header's value: a key outside that, or one that is only
    whitespace, would start a server that refuses every request."""
    if not key.strip():
        return f"{source} is only whitespace; give a key clients can send, or leave it unset for no key"
    if key != key.strip():
        return f"{source} starts or ends with whitespace, which no Authorization header can carry; strip it"
    bad = next((c for c in key if not (c == " " or "!" <= c <= "~")), None)
    if bad is not None:
        return (f"{source} holds {bad!r} (U+{ord(bad):04X}); an Authorization header carries visible ASCII only, "
                f"so no client could send this key")
    return None


def header_charset(content_type: str) -> Optional[str]:
    """The ``charset`` parameter of a Content-Type value (lower case, unquoted), or None."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower() or None
    return None


def text_codec(charset: str) -> bool:
    """Whether Python can decode bytes to text with ``charset`` (``rot13``, ``base64`` and unknown names: no)."""
    try:
        b"{}".decode(charset)  # an empty input would not even look the name up
    except LookupError:
        return False
    except UnicodeDecodeError:  # a text encoding; these two bytes just are not a whole character in it
        pass
    return True


def _host_name(host_header: str) -> str:
    """``Host`` header -> lower-case host without the port (``[::1]:8000`` -> ``::1``)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
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
            content_type = headers.get("content-type", "")
            ctype = content_type.split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                return APIError(415, f"Content-Type must be application/json, not {ctype or 'missing'!r}.",
                                code="unsupported_media_type")
            charset = header_charset(content_type)
            if charset is not None and not text_codec(charset):
                return APIError(415, f"Unknown charset {charset!r} in Content-Type; send UTF-8 (or name a text "
                                     f"encoding such as gb18030 or utf-16).", code="unsupported_media_type")
        return None
