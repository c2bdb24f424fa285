"""The HTTP connection under the app: uvicorn's h11 protocol with a bound on how long a client may take to send one
request, headers and body (``read_timeout``).

uvicorn times out idle keep-alive connections but not a request that stops half-way: a client that sends half its
headers (or a Content-Length and part of the body) held a connection, and a descriptor, until the process ran out of
them. Here every connection must deliver each whole request within ``read_timeout`` seconds of its first byte (of
the connection, for the first request); otherwise it gets a 408 in OpenAI's error shape, when no answer has started,
and is closed, as nginx's ``client_header_timeout`` / ``client_body_timeout`` do.
"""
from __future__ import annotations

import json
from typing import Any

DEFAULT_READ_TIMEOUT = 30.0  # seconds for one whole request to arrive (a 4 MB body at 1 Mbit/s takes about 32 s)


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": {"message": f"The request was not received in full within {seconds:g} s (xiaolm "
                                            f"serve --read-timeout).", "type": "invalid_request_error", "param": None,
                                 "code": "request_timeout"}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def timed_h11_protocol(read_timeout: float) -> type:
    """uvicorn's ``H11Protocol`` with the read bound above (a class for ``uvicorn.Config(http=...)``)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    receiving = (h11.IDLE, h11.SEND_BODY)  # the client's states while a request is still arriving

    class TimedH11Protocol(H11Protocol):
        _read_timer: Any = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state in receiving and not self.transport.is_closing():
                self._arm()  # a request under way: the clock runs from its first byte (not reset by each byte)
            else:
                self._disarm()  # the whole request is in

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # the next request, if any, starts its own clock with its first byte

        def _arm(self) -> None:
            if self._read_timer is None:
                self._read_timer = self.loop.call_later(read_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _timed_out(self) -> None:
            self._read_timer = None
            if self.transport.is_closing() or self.conn.their_state not in receiving:
                return
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(_timeout_response(read_timeout))
            self.logger.info("serve: %s: the request did not arrive in full within %g s; connection closed",
                             "%s:%d" % tuple(self.client[:2]) if self.client else "a client", read_timeout)
            self.transport.close()

    return TimedH11Protocol


def uvicorn_config(app, *, read_timeout: float = DEFAULT_READ_TIMEOUT, **kwargs):
    """``uvicorn.Config`` for ``app`` with the timed protocol; ``kwargs`` go to uvicorn (log_level, lifespan...)."""
    import uvicorn

    kwargs.setdefault("timeout_graceful_shutdown", 5)
    return uvicorn.Config(app, http=timed_h11_protocol(read_timeout), **kwargs)
