"""Running a tool call safely: ``run_tool(fn, arguments, timeout_s=..., max_chars=...) -> str``.

A call runs in a forked child process (so a runaway loop can be killed, and nothing it does reaches the parent's
state) under an audit hook that refuses files, sockets, subprocesses, ``exec``/``fork``/``kill`` and loading native
code, with a CPU-time rlimit as a second stop. The parent waits at most ``timeout_s`` and kills the child it started.
Whatever happens, the caller gets text, the way a model sees a tool's answer: the result (``str``, or JSON for
dicts and lists), cut to ``max_chars``, or one line ``error: ...``. A tool error is a tool response, not an exception:
the model is supposed to read it and recover.

Without ``fork`` (Windows) an audit hook could not be scoped to one call, so calls run in-process, unguarded;
``sandbox_mode()`` says which applies.
"""
from __future__ import annotations

import inspect
import json
import math
import multiprocessing
import os
import sys
from typing import Callable, Mapping

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_MAX_CHARS = 2000

# Audit events refused inside the child (prefix match), see https://docs.python.org/3/library/audit_events.html
_BLOCKED = ("open", "os.", "shutil.", "socket.", "subprocess.", "ctypes.", "glob.", "pty.", "webbrowser.",
            "urllib.", "http.", "ftplib.", "smtplib.", "import", "exec", "code.__new__", "marshal.", "pickle.")
_ALLOWED = ("os.getpid",)  # harmless and used by multiprocessing's own bookkeeping


def sandbox_mode() -> str:
    return "fork" if hasattr(os, "fork") else "in-process (no isolation on this platform)"


def _audit(event: str, _args) -> None:
    if event.startswith(_BLOCKED) and not event.startswith(_ALLOWED):
        raise PermissionError(f"the tool sandbox refuses {event}")


def format_result(value: object, max_chars: int) -> str:
    """What the model reads: text as is, other values as JSON (unicode kept), cut to ``max_chars``."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = str(value)
    if len(text) > max_chars:
        text = text[:max_chars] + f"…(cut at {max_chars} characters)"
    return text


def _check_arguments(fn: Callable, arguments: object) -> str | None:
    """Why ``arguments`` cannot be passed to ``fn`` (missing, unknown names), or None."""
    if not isinstance(arguments, Mapping):
        return f"arguments must be a JSON object, got {type(arguments).__name__}"
    try:
        inspect.signature(fn).bind(**arguments)
    except TypeError as exc:
        return f"bad arguments for {getattr(fn, '__name__', 'tool')}: {exc}"
    return None


def _child(fn: Callable, arguments: dict, conn, cpu_s: int, max_chars: int) -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    except (ImportError, ValueError, OSError):
        pass
    sys.addaudithook(_audit)  # from here on, no files, sockets, processes or imports
    try:
        result = ("ok", format_result(fn(**arguments), max_chars))
    except BaseException as exc:  # noqa: BLE001 - any failure is the tool's answer
        result = ("error", f"{type(exc).__name__}: {exc}"[:max_chars])
    try:
        conn.send(result)
    finally:
        conn.close()  # multiprocessing ends the forked child itself when this returns


def run_tool(fn: Callable, arguments: object, timeout_s: float = DEFAULT_TIMEOUT_S,
             max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Call ``fn(**arguments)`` in the sandbox; returns its result as text or ``error: ...`` (never raises for what
    the tool does: bad arguments, exceptions, timeouts, oversized output)."""
    problem = _check_arguments(fn, arguments)
    if problem:
        return f"error: {problem}"
    if not hasattr(os, "fork"):
        try:
            return format_result(fn(**arguments), max_chars)
        except Exception as exc:  # noqa: BLE001
            return f"error: {type(exc).__name__}: {exc}"[:max_chars]
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, dict(arguments), child, max(1, math.ceil(timeout_s)), max_chars),
                       daemon=True)
    proc.start()
    child.close()
    try:
        if parent.poll(timeout_s):
            try:
                status, text = parent.recv()
            except EOFError:
                status, text = "error", "the tool's process ended without an answer"
        else:
            status, text = "error", f"timed out after {timeout_s:g}s"
    finally:
        parent.close()
        if proc.is_alive():
            proc.kill()
        proc.join(1.0)
    return text if status == "ok" else f"error: {text}"
