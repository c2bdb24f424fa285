"""Run a serve app with uvicorn on a free loopback port in a background thread (tests and benchmarks)."""
from __future__ import annotations

import socket
import threading
import time
from typing import Optional

from xiaolm.serve.transport import uvicorn_config


class BackgroundServer:
    """Run an app with uvicorn on a free loopback port in a background thread (tests, notebooks, benchmarks).

    ``with BackgroundServer(app) as server: httpx.get(server.url + "/health")``. The socket is bound before the
    thread starts, so there is no race for the port.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout: float = 30.0, read_timeout: Optional[float] = None):
        self.app, self.host, self.port, self.log_level, self.start_timeout = app, host, port, log_level, start_timeout
        self.read_timeout = read_timeout  # None: the server's default (xiaolm.serve.transport)
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
        extra = {} if self.read_timeout is None else {"read_timeout": self.read_timeout}
        config = uvicorn_config(self.app, log_level=self.log_level, lifespan="on", **extra)  # what `serve` runs
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
