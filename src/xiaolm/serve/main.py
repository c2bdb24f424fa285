"""``xiaolm serve``: the command line (options, checks, the listening socket, uvicorn)."""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import Literal, Optional

from xiaolm.config import opt
from xiaolm.serve.app import create_app
from xiaolm.serve.body import DEFAULT_MAX_BODY_MB
from xiaolm.serve.guard import LOOPBACK_HOSTS, api_key_problem
from xiaolm.serve.transport import DEFAULT_READ_TIMEOUT, uvicorn_config


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
    fair_share: bool = opt(True, "continuous scheduler: admit waiting rows client by client (OpenAI's `user`, else "
                                 "the peer address), fewest running first, and keep max-batch/8 slots for clients "
                                 "with none; --no-fair-share: first come, first served")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = opt("info", "uvicorn log level")
    api_key: Optional[str] = opt(None, "require 'Authorization: Bearer KEY' on /v1/* (default: $XIAOLM_API_KEY; "
                                       "unset: no key)")
    max_body_mb: float = opt(DEFAULT_MAX_BODY_MB, "larger request bodies are refused with HTTP 413")
    read_timeout: float = opt(DEFAULT_READ_TIMEOUT, "seconds a client may take to send one whole request (headers "
                                                    "and body); slower ones get HTTP 408 and are disconnected")
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
    if not (math.isfinite(cfg.max_body_mb) and cfg.max_body_mb > 0):
        raise fail(f"--max-body-mb must be a number more than 0, got {cfg.max_body_mb}")
    if not (math.isfinite(cfg.request_timeout) and cfg.request_timeout > 0):
        raise fail(f"--request-timeout must be a number of seconds more than 0, got {cfg.request_timeout}")
    if not (math.isfinite(cfg.read_timeout) and cfg.read_timeout > 0):
        raise fail(f"--read-timeout must be a number of seconds more than 0, got {cfg.read_timeout}")
    api_key = cfg.api_key or os.environ.get("XIAOLM_API_KEY") or None
    if api_key is not None:  # refused now, not after loading the model and then on every request
        problem = api_key_problem(api_key, "--api-key" if cfg.api_key else "$XIAOLM_API_KEY")
        if problem:
            raise fail(problem)
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
                         scheduler=cfg.scheduler, fair_share=cfg.fair_share)
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
    config = uvicorn_config(app, read_timeout=cfg.read_timeout, log_level=cfg.log_level)
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
