"""Load test for `xiaolm serve`: N concurrent streaming chat clients on loopback, against a server it starts itself.

For each --max-batch value the script starts `python -m xiaolm serve RUNDIR --host 127.0.0.1 --port P` in a
subprocess, waits for /health, sends one warm-up request, then runs --clients concurrent asyncio + httpx clients
that together send --requests streaming chat completions (stream_options.include_usage, ignore_eos so every answer
is --max-tokens long and rows are comparable). It stops issuing requests after --time-limit seconds; every request
has its own timeout. Measured per configuration:

  requests/s      completed requests / wall time
  TTFT p50 / p95  time to first token: request sent -> first non-empty content delta
  tokens/s        completion tokens (from the usage chunk) / wall time, all clients together
  rows/batch      the engine's mean batch size (from /health: rows finished / batches)
  errors          non-200 answers, error events, streams without [DONE], timeouts, exceptions (target: 0)

The first --max-batch value, by default 1 (a plain queue: one request at a time), is the baseline; the last column
is tokens/s against it, measured in the same run. The server's default scheduler is used (continuous batching;
see --batching for static against continuous).

    python bench/serve_load.py RUNDIR                       # any RUNDIR / HF / quantised dir
    python bench/serve_load.py                              # builds a tiny random-weight model first (not timed)
    python bench/serve_load.py RUNDIR --clients 16 --requests 64 --max-tokens 64 --max-batch 1 4 16

--batching compares the engine's schedulers in one run instead: for `--scheduler static` (a batch runs until all its
rows end) and `continuous` (rows join the running batch at every decode step), one server each with the same
--max-batch, at 1, 8 and 32 concurrent streams (--streams) whose requests mix short and long answers
(--lengths, cycled): time to first token p50/p99 and aggregate tokens/s, static being the baseline.

    python bench/serve_load.py --batching                   # tiny random-weight model, CPU
    python bench/serve_load.py RUNDIR --batching --device cuda --streams 1 8 32 --lengths 16 64 192

--fairness measures what one heavy client does to everyone else: a client streaming many large-`n` requests keeps
the server full while small clients send one-row requests; time to first token p50/p99 of the small requests and the
heavy client's tokens/s, first come first served (`--no-fair-share`, the baseline) against fair shares (default).

    python bench/serve_load.py --fairness                   # tiny random-weight model, CPU, --max-batch 8

Only 127.0.0.1 is used. Exit status 1 if any request failed.

--hostile runs one server (the first --max-batch value) twice over the same normal streaming load: alone, then
interleaved with --hostile-requests hostile requests (malformed and oversized bodies, chunked bodies past the limit,
lone surrogates, JSON nested 100,000 deep, seeds of 2**64, strings for integers, unsupported fields, wrong
Content-Type, cross-origin POSTs, forged Host headers, streams and bodies cut off mid-way). It prints what was sent,
the status codes by class, the 5xx count (goal 0), the normal requests' success rate (goal 100%) and p50/p99
latency with and without the hostile traffic, tracebacks in the server log (goal 0) and the server's RSS before
and after. Bounded: at most --hostile-requests requests and --time-limit seconds per phase, loopback only.

    python bench/serve_load.py --hostile --requests 24 --hostile-requests 200
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HOST = "127.0.0.1"
PROMPTS = [
    "给我讲一个关于小猫的故事。", "小明今天去公园做了什么？", "请用三句话介绍一下春天。", "为什么天空是蓝色的？",
    "写一首关于月亮的短诗。", "小兔子和小乌龟谁跑得快？", "怎样才能交到好朋友？", "讲一个勇敢的小女孩的故事。",
]


# ------------------------------------------------------------------------------------------- the model


def build_tiny_run(root: Path, preset: str, context: int) -> Path:
    """A random-weight model with a real tokenizer trained on the built-in stories: enough to load-test the server
    (the text is gibberish; speed does not care)."""
    import torch

    from xiaolm.data.synth import write_stories
    from xiaolm.model.llama import Llama, preset_config
    from xiaolm.data.vocab import train_tokenizer
    from xiaolm.train.checkpoint import save_checkpoint

    stories = root / "stories.jsonl"
    write_stories(stories, num=400, seed=0)
    tokenizer = train_tokenizer([str(stories)], root / "tokenizer", vocab_size=1024, field="story_zh")
    run = root / "run"
    torch.manual_seed(0)
    cfg = preset_config(preset, vocab_size=tokenizer.vocab_size, max_position_embeddings=context)
    model = Llama(cfg)
    tokenizer.save(run / "tokenizer")
    save_checkpoint(run, 0, model, cfg.to_dict(), {"tokenizer_fingerprint": tokenizer.fingerprint})
    return run


# ------------------------------------------------------------------------------------------ the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`xiaolm serve` in a subprocess, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, run: str, max_batch: int, device: str, start_timeout: float, scheduler: str = "",
                 extra: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.cmd = [sys.executable, "-m", "xiaolm", "serve", run, "--host", HOST, "--port", str(self.port),
                    "--max-batch", str(max_batch), "--device", device, "--log-level", "warning",
                    "--model-name", "bench", "--max-queue", "4096"]
        if scheduler:
            self.cmd += ["--scheduler", scheduler]
        self.cmd += list(extra)
        self.start_timeout = start_timeout
        self.log = tempfile.TemporaryFile()

    def __enter__(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"the server did not answer /health within {self.start_timeout:.0f} s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def rss_mb(self) -> float:
        """Resident memory of the server process (Linux /proc)."""
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def full_output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


# ----------------------------------------------------------------------------------------- the clients


@dataclass
class Result:
    ok: bool
    ttft: float | None = None
    latency: float = 0.0
    tokens: int = 0
    error: str = ""


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0


async def one_request(http: httpx.AsyncClient, prompt: str, max_tokens: int, timeout: float, n: int = 1,
                      user: str | None = None) -> Result:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0.8, "top_p": 0.95, "n": n}
    if user is not None:
        body["user"] = user
    started = time.perf_counter()
    seen = {"ttft": None, "tokens": 0, "done": False}

    async def stream() -> str:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return f"HTTP {r.status_code}: {r.text[:200]}"
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue  # blank separators and ": keep-alive" comments
                data = line[6:]
                if data == "[DONE]":
                    seen["done"] = True
                    return ""
                chunk = json.loads(data)
                if "error" in chunk:
                    return f"error event: {chunk['error'].get('message')}"
                if chunk.get("usage"):
                    seen["tokens"] = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if seen["ttft"] is None and choice.get("delta", {}).get("content"):
                        seen["ttft"] = time.perf_counter() - started
        return ""

    try:
        error = await asyncio.wait_for(stream(), timeout)
    except asyncio.TimeoutError:
        error = f"timed out after {timeout:.0f} s"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    latency = time.perf_counter() - started
    if not error and not seen["done"]:
        error = "stream ended without [DONE]"
    if not error and seen["tokens"] != n * max_tokens:
        error = f"usage says {seen['tokens']} tokens, expected {n * max_tokens}"
    return Result(not error, seen["ttft"], latency, seen["tokens"], error)


async def warm_up(url: str) -> Result:
    async with httpx.AsyncClient(base_url=url) as http:
        return await one_request(http, PROMPTS[0], 4, 60)


async def load(url: str, clients: int, requests: int, max_tokens: int, time_limit: float,
               request_timeout: float) -> Run:
    run = Run()
    issued = 0
    deadline = time.perf_counter() + time_limit
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            prompt = PROMPTS[issued % len(PROMPTS)]
            issued += 1
            run.results.append(await one_request(http, prompt, max_tokens, request_timeout))

    async with httpx.AsyncClient(base_url=url, timeout=request_timeout, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        run.wall = time.perf_counter() - started
    return run


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# ------------------------------------------------------------------------------------------- hostile mode


def _chat_body(**extra) -> dict:
    return {"model": "bench", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 4, **extra}


def _json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


# name -> raw body and headers; what a careless or hostile client sends (each must get a 4xx, never a 5xx)
HOSTILE_BODIES = {
    "malformed JSON": (b"{not json", {}),
    "not an object": (b"[1, 2, 3]", {}),
    "oversized body (6 MB)": (_json(_chat_body(messages=[{"role": "user", "content": "猫" * 2_000_000}])), {}),
    "huge prompt under the limit": (_json(_chat_body(messages=[{"role": "user", "content": "猫" * 900_000}])), {}),
    "lone surrogate": (b'{"model": "bench", "messages": [{"role": "user", "content": "\\udfff"}]}', {}),
    "JSON 100000 deep": (b"[" * 100_000 + b"]" * 100_000, {}),
    "seed 2**64": (_json(_chat_body(seed=2 ** 64)), {}),
    "max_tokens \"3\"": (_json(_chat_body(max_tokens="3")), {}),
    "tools": (_json(_chat_body(tools=[{"type": "function", "function": {"name": "f"}}])), {}),
    "text/plain POST": (_json(_chat_body()), {"content-type": "text/plain"}),
    "cross-origin POST": (_json(_chat_body()), {"origin": "http://evil.example"}),
    "forged Host": (_json(_chat_body()), {"host": "rebind.example"}),
    "unknown model": (_json(_chat_body(model="gpt-4o")), {}),
}
RAW_KINDS = ["chunked body past the limit", "stream cut mid-way", "body cut mid-way"]


async def _raw(port: int, kind: str) -> str:
    """Requests that need a raw socket; returns the status line's code, or 'disconnect'."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        if kind == "chunked body past the limit":
            writer.write((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
            chunk = b" " * 1_000_000
            try:
                for _ in range(8):
                    writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            except ConnectionError:
                pass  # the server answered 413 and closed while we were still sending
            line = await asyncio.wait_for(reader.readline(), 30)
            return line.split()[1].decode() if len(line.split()) > 1 else "disconnect"
        body = _json({**_chat_body(max_tokens=48, ignore_eos=True), "stream": kind == "stream cut mid-way", "n": 4})
        if kind == "stream cut mid-way":
            writer.write((head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
            await writer.drain()
            await asyncio.wait_for(reader.read(300), 30)
        else:  # promise a body and hang up halfway through it
            writer.write((head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body[: len(body) // 2])
            await writer.drain()
            await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, as a crash would
        return "disconnect"
    finally:
        writer.close()


async def hostile_traffic(url: str, port: int, count: int, deadline: float) -> list[tuple[str, str]]:
    """(kind, status) for each hostile request, sent one after another round-robin until count or deadline."""
    kinds = list(HOSTILE_BODIES) + RAW_KINDS
    sent: list[tuple[str, str]] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for i in range(count):
            if time.perf_counter() > deadline:
                break
            kind = kinds[i % len(kinds)]
            try:
                if kind in RAW_KINDS:
                    status = await _raw(port, kind)
                else:
                    body, headers = HOSTILE_BODIES[kind]
                    r = await http.post("/v1/chat/completions", content=body,
                                        headers={"content-type": "application/json", **headers})
                    status = str(r.status_code)
            except (httpx.HTTPError, OSError, asyncio.TimeoutError) as exc:
                status = f"error {type(exc).__name__}"
            sent.append((kind, status))
            await asyncio.sleep(0.01)
    return sent


async def normal_with_hostile(url: str, port: int, args) -> tuple[Run, list[tuple[str, str]]]:
    """The normal load of the first phase, kept going (at least --requests) for as long as the hostile traffic."""
    deadline = time.perf_counter() + args.time_limit
    hostile_done = asyncio.Event()
    run = Run()
    issued = 0
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while (issued < args.requests or not hostile_done.is_set()) and time.perf_counter() < deadline:
            prompt = PROMPTS[issued % len(PROMPTS)]
            issued += 1
            run.results.append(await one_request(http, prompt, args.max_tokens, args.request_timeout))

    async def hostile_then_flag() -> list[tuple[str, str]]:
        try:
            return await hostile_traffic(url, port, args.hostile_requests, deadline)
        finally:
            hostile_done.set()

    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as http:
        started = time.perf_counter()
        results = await asyncio.gather(hostile_then_flag(), *(client(http) for _ in range(args.clients)))
        run.wall = time.perf_counter() - started
    return run, results[0]


def status_class(status: str) -> str:
    return f"{status[0]}xx" if status[:1].isdigit() else ("disconnect" if status == "disconnect" else "no answer")


def run_hostile(args, run_dir: str) -> int:
    with ServerProcess(run_dir, args.max_batch[0], args.device, start_timeout=180) as server:
        warm = asyncio.run(warm_up(server.url))
        if not warm.ok:
            raise SystemExit(f"warm-up request failed: {warm.error}\n{server.output()}")
        rss_before = server.rss_mb()
        alone = asyncio.run(load(server.url, args.clients, args.requests, args.max_tokens, args.time_limit,
                                 args.request_timeout))
        mixed, hostile = asyncio.run(normal_with_hostile(server.url, server.port, args))
        health_after = httpx.get(server.url + "/health", timeout=10).status_code
        rss_after = server.rss_mb()
        log = server.full_output()

    def latency(run: Run, q: float) -> float:
        return percentile([r.latency for r in run.results if r.ok], q)

    by_kind: dict[str, dict[str, int]] = {}
    for kind, status in hostile:
        by_kind.setdefault(kind, {}).setdefault(status, 0)
        by_kind[kind][status] += 1
    classes: dict[str, int] = {}
    for _kind, status in hostile:
        classes[status_class(status)] = classes.get(status_class(status), 0) + 1
    fives = classes.get("5xx", 0)
    tracebacks = log.count("Traceback")
    print(f"\nserve hostile test: {args.clients} concurrent streaming clients, {args.requests} normal requests of "
          f"{args.max_tokens} tokens per phase, {len(hostile)} hostile requests, device {args.device}, "
          f"max-batch {args.max_batch[0]}")
    header = f"{'phase':<24} {'normal':>6} {'ok':>6} {'success':>8} {'p50 latency':>12} {'p99 latency':>12}"
    print(header)
    print("-" * len(header))
    for name, run in (("normal only", alone), ("normal + hostile", mixed)):
        ok = sum(r.ok for r in run.results)
        rate = 100.0 * ok / len(run.results) if run.results else float("nan")
        print(f"{name:<24} {len(run.results):>6} {ok:>6} {rate:>7.1f}% {latency(run, 50):>11.3f}s "
              f"{latency(run, 99):>11.3f}s")
        for sample in sorted({r.error for r in run.results if not r.ok})[:3]:
            print(f"{'':<24} error: {sample}")
    print(f"\nhostile requests sent: {len(hostile)}; by class: "
          + ", ".join(f"{k} {v}" for k, v in sorted(classes.items())))
    header = f"{'hostile kind':<30} {'sent':>5}  statuses"
    print(header)
    print("-" * 60)
    for kind, statuses in by_kind.items():
        print(f"{kind:<30} {sum(statuses.values()):>5}  " + ", ".join(f"{s} x{n}" for s, n in sorted(statuses.items())))
    print(f"\n5xx answers: {fives} (goal 0)   tracebacks in the server log: {tracebacks} (goal 0)   "
          f"/health after: {health_after}")
    print(f"server RSS: {rss_before:.0f} MB before, {rss_after:.0f} MB after ({rss_after - rss_before:+.0f} MB)")
    if tracebacks:  # what they were: the exception line that ends each one
        ends = [block.split("\n\n")[0].strip().splitlines()[-1] for block in log.split("Traceback")[1:]]
        print("tracebacks end in: " + "; ".join(f"{e} x{ends.count(e)}" for e in sorted(set(ends))))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "hostile": hostile, "classes": classes, "tracebacks": tracebacks, "rss_mb": [rss_before, rss_after],
            "normal_only": [r.__dict__ for r in alone.results], "mixed": [r.__dict__ for r in mixed.results],
        }, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    failed = fives or tracebacks or health_after != 200 or not all(r.ok for r in alone.results + mixed.results)
    failed = failed or any(status_class(st) == "no answer" for _k, st in hostile)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------ --batching mode


async def mixed_load(url: str, streams: int, requests: int, lengths: list[int], request_timeout: float) -> Run:
    """``streams`` clients, each sending its next request as soon as the last one ends; request i asks for
    ``lengths[i % len(lengths)]`` tokens with prompt ``PROMPTS[i % len(PROMPTS)]`` (short and long mixed)."""
    run = Run()
    issued = 0
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests:
            i = issued
            issued += 1
            run.results.append(await one_request(http, PROMPTS[i % len(PROMPTS)], lengths[i % len(lengths)],
                                                 request_timeout))

    async with httpx.AsyncClient(base_url=url, timeout=request_timeout, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(streams)))
        run.wall = time.perf_counter() - started
    return run


def batching_main(args, run_dir: str) -> list[dict]:
    """Static vs continuous batching at each --streams value; prints the table, returns its rows."""
    rows = []
    # Both servers are up at once and measured back to back at each stream count, so a machine whose load drifts
    # (a shared CPU) affects both alike; an idle server costs nothing.
    with ServerProcess(run_dir, args.max_batch[-1], args.device, start_timeout=180, scheduler="static") as static, \
            ServerProcess(run_dir, args.max_batch[-1], args.device, start_timeout=180,
                          scheduler="continuous") as continuous:
        servers = {"static": static, "continuous": continuous}
        for server in servers.values():
            warm = asyncio.run(warm_up(server.url))
            if not warm.ok:
                raise SystemExit(f"warm-up request failed: {warm.error}\n{server.output()}")
        for streams in args.streams:
            requests = max(args.min_requests, streams * args.requests_per_stream)
            runs: dict[str, list[Run]] = {name: [] for name in servers}
            for _ in range(args.repeats):  # alternate, so both see the same machine
                for scheduler, server in servers.items():
                    runs[scheduler].append(asyncio.run(mixed_load(server.url, streams, requests, args.lengths,
                                                                  args.request_timeout)))
            for scheduler, done in runs.items():
                results = [r for run in done for r in run.results]
                ok = [r for r in results if r.ok]
                ttfts = [r.ttft for r in ok if r.ttft is not None]
                rows.append({
                    "scheduler": scheduler, "streams": streams, "requests": len(results),
                    "errors": len(results) - len(ok), "error_samples": sorted({r.error for r in results if not r.ok})[:3],
                    "wall_s": sum(run.wall for run in done), "ttft_p50_s": percentile(ttfts, 50),
                    "ttft_p99_s": percentile(ttfts, 99),
                    "tokens_per_s": sum(r.tokens for r in ok) / sum(run.wall for run in done),
                })
    static = {r["streams"]: r for r in rows if r["scheduler"] == "static"}
    header = (f"{'scheduler':>10} {'streams':>7} {'requests':>8} {'errors':>6} {'wall s':>7} {'TTFT p50':>9} "
              f"{'TTFT p99':>9} {'tokens/s':>9} {'vs static':>9}")
    print(f"\nstatic vs continuous batching: max-batch {args.max_batch[-1]}, answers of {args.lengths} tokens "
          f"(cycled, ignore_eos), {args.repeats} alternating repeats per row (tokens/s and TTFT over all of "
          f"them), device {args.device}, model {args.run or repr(args.preset) + ' random-weight (built)'}")
    print(header)
    print("-" * len(header))
    for r in rows:
        base = static[r["streams"]]["tokens_per_s"] or float("nan")
        print(f"{r['scheduler']:>10} {r['streams']:>7} {r['requests']:>8} {r['errors']:>6} {r['wall_s']:>7.2f} "
              f"{r['ttft_p50_s']:>8.3f}s {r['ttft_p99_s']:>8.3f}s {r['tokens_per_s']:>9.1f} "
              f"{r['tokens_per_s'] / base:>8.2f}x")
        for sample in r["error_samples"]:
            print(f"{'':>10} error: {sample}")
    return rows


# ------------------------------------------------------------------------------------------ --fairness


async def fairness_load(url: str, args) -> tuple[list[Result], list[Result], float]:
    """A heavy client (--heavy-streams streams of n=--heavy-n requests of --heavy-tokens tokens, `user` "heavy")
    keeps the server full; after it has queued its first requests, --small-streams small clients (each its own
    `user`) send --small-requests one-row requests of --small-tokens tokens in all, one after another. Returns the
    heavy results completed meanwhile, the small results and the small clients' wall time."""
    heavy_results: list[Result] = []
    small_results: list[Result] = []
    stop = asyncio.Event()
    streams = args.heavy_streams + args.small_streams
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as http:
        async def heavy() -> None:
            while not stop.is_set():
                heavy_results.append(await one_request(http, PROMPTS[1], args.heavy_tokens, args.request_timeout,
                                                       n=args.heavy_n, user="heavy"))

        async def small(i: int) -> None:
            for k in range(i, args.small_requests, args.small_streams):
                small_results.append(await one_request(http, PROMPTS[k % len(PROMPTS)], args.small_tokens,
                                                       args.request_timeout, user=f"small-{i}"))

        tasks = [asyncio.create_task(heavy()) for _ in range(args.heavy_streams)]
        await asyncio.sleep(args.heavy_head_start)
        started = time.perf_counter()
        await asyncio.gather(*(small(i) for i in range(args.small_streams)))
        wall = time.perf_counter() - started
        stop.set()
        for task in tasks:  # requests in flight are dropped (not counted)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return heavy_results, small_results, wall


def fairness_main(args, run_dir: str) -> list[dict]:
    """First come, first served (--no-fair-share) against fair shares, the same load on both, alternating."""
    rows = []
    modes = {"fifo": ("--no-fair-share",), "fair": ("--fair-share",)}
    with ServerProcess(run_dir, args.max_batch[-1], args.device, start_timeout=180, extra=modes["fifo"]) as fifo, \
            ServerProcess(run_dir, args.max_batch[-1], args.device, start_timeout=180, extra=modes["fair"]) as fair:
        servers = {"fifo": fifo, "fair": fair}
        for server in servers.values():
            warm = asyncio.run(warm_up(server.url))
            if not warm.ok:
                raise SystemExit(f"warm-up request failed: {warm.error}\n{server.output()}")
        runs: dict[str, list] = {name: [] for name in servers}
        for _ in range(args.repeats):
            for name, server in servers.items():
                runs[name].append(asyncio.run(fairness_load(server.url, args)))
        for name, done in runs.items():
            small = [r for _h, s, _w in done for r in s]
            heavy = [r for h, _s, _w in done for r in h]
            wall = sum(w for _h, _s, w in done)
            ok = [r for r in small if r.ok]
            ttfts = [r.ttft for r in ok if r.ttft is not None]
            rows.append({
                "mode": name, "small_requests": len(small), "small_errors": len(small) - len(ok),
                "heavy_errors": sum(not r.ok for r in heavy),
                "error_samples": sorted({r.error for r in small + heavy if not r.ok})[:3],
                "small_ttft_p50_s": percentile(ttfts, 50), "small_ttft_p99_s": percentile(ttfts, 99),
                "small_latency_p99_s": percentile([r.latency for r in ok], 99),
                "heavy_tokens_per_s": sum(r.tokens for r in heavy if r.ok) / wall, "wall_s": wall,
            })
    header = (f"{'mode':>5} {'small':>5} {'errors':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'lat p99':>8} "
              f"{'heavy tok/s':>11} {'p99 vs fifo':>11}")
    print(f"\nsmall requests beside a heavy client: max-batch {args.max_batch[-1]}; heavy: {args.heavy_streams} "
          f"streams of n={args.heavy_n} x {args.heavy_tokens} tokens (user 'heavy'); small: {args.small_streams} "
          f"streams, {args.small_requests} requests of {args.small_tokens} tokens in all; {args.repeats} alternating "
          f"repeats; device {args.device}, model {args.run or repr(args.preset) + ' random-weight (built)'}")
    print(header)
    print("-" * len(header))
    base = next(r for r in rows if r["mode"] == "fifo")["small_ttft_p99_s"] or float("nan")
    for r in rows:
        print(f"{r['mode']:>5} {r['small_requests']:>5} {r['small_errors'] + r['heavy_errors']:>6} "
              f"{r['small_ttft_p50_s']:>8.3f}s {r['small_ttft_p99_s']:>8.3f}s {r['small_latency_p99_s']:>7.2f}s "
              f"{r['heavy_tokens_per_s']:>11.1f} {r['small_ttft_p99_s'] / base:>10.2f}x")
        for sample in r["error_samples"]:
            print(f"{'':>5} error: {sample}")
    return rows


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", help="RUNDIR / checkpoint / HF / quantised dir (default: build a tiny "
                                               "random-weight model)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default 16)")
    parser.add_argument("--requests", type=int, default=96, help="requests in all, per configuration (default 96)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default 64)")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 4, 8, 16],
                        help="server --max-batch values to compare; the first is the baseline (default 1 4 8 16)")
    parser.add_argument("--time-limit", type=float, default=120.0,
                        help="stop issuing requests after this many seconds, per configuration (default 120)")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request (default 120)")
    parser.add_argument("--device", default="cpu", help="server device (default cpu)")
    parser.add_argument("--preset", default="tiny", help="preset of the built model when no RUNDIR is given")
    parser.add_argument("--context", type=int, default=256, help="context of the built model (default 256)")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--hostile", action="store_true",
                        help="interleave hostile requests with the normal load (see above) instead of comparing "
                             "--max-batch values")
    parser.add_argument("--hostile-requests", type=int, default=200,
                        help="hostile requests at most, with --hostile (default 200)")
    batching = parser.add_argument_group("--batching mode (static vs continuous scheduler)")
    batching.add_argument("--batching", action="store_true", help="compare the schedulers instead")
    batching.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32],
                          help="concurrent streams to measure (default 1 8 32)")
    batching.add_argument("--lengths", type=int, nargs="+", default=[8, 32, 96],
                          help="answer lengths in tokens, cycled over the requests (default 8 32 96)")
    batching.add_argument("--requests-per-stream", type=int, default=3, help="requests per stream (default 3)")
    batching.add_argument("--min-requests", type=int, default=12, help="requests at least, per row (default 12)")
    batching.add_argument("--repeats", type=int, default=3,
                          help="measurements per row, alternating the schedulers (default 3)")
    fairness = parser.add_argument_group("--fairness mode (small requests beside a heavy client)")
    fairness.add_argument("--fairness", action="store_true",
                          help="first come, first served against fair shares (p99 time to first token of small "
                               "requests beside a heavy client)")
    fairness.add_argument("--heavy-streams", type=int, default=4, help="heavy client's streams (default 4)")
    fairness.add_argument("--heavy-n", type=int, default=8, help="n of each heavy request (default 8)")
    fairness.add_argument("--heavy-tokens", type=int, default=64, help="tokens per heavy row (default 64)")
    fairness.add_argument("--heavy-head-start", type=float, default=1.0,
                          help="seconds the heavy client runs before the small ones start (default 1)")
    fairness.add_argument("--small-streams", type=int, default=2, help="small clients (default 2)")
    fairness.add_argument("--small-requests", type=int, default=16, help="small requests in all (default 16)")
    fairness.add_argument("--small-tokens", type=int, default=8, help="tokens per small request (default 8)")
    args = parser.parse_args()
    if args.fairness:
        if "--max-batch" not in sys.argv:
            args.max_batch = [8]
        if "--repeats" not in sys.argv:
            args.repeats = 2
        with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
            run_dir = args.run or str(build_tiny_run(Path(tmp), args.preset, args.context))
            rows = fairness_main(args, run_dir)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return 1 if any(r["small_errors"] or r["heavy_errors"] for r in rows) else 0
    if args.batching:
        if "--max-batch" not in sys.argv:
            args.max_batch = [32]
        if any(v < 1 for v in args.streams + args.lengths + [args.repeats]):
            parser.error("--streams, --lengths and --repeats must be positive")
        with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
            run_dir = args.run
            if run_dir is None:
                print(f"building a random-weight '{args.preset}' model (context {args.context}) ...", file=sys.stderr)
                run_dir = str(build_tiny_run(Path(tmp), args.preset, args.context))
            rows = batching_main(args, run_dir)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return 1 if any(r["errors"] for r in rows) else 0
    if not 1 <= args.clients <= 256:
        parser.error("--clients must be between 1 and 256")
    if args.requests < 1 or args.max_tokens < 1 or any(b < 1 for b in args.max_batch):
        parser.error("--requests, --max-tokens and --max-batch must be positive")

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        run_dir = args.run
        if run_dir is None:
            print(f"building a random-weight '{args.preset}' model (context {args.context}) ...", file=sys.stderr)
            run_dir = str(build_tiny_run(Path(tmp), args.preset, args.context))
        if args.hostile:
            if not 1 <= args.hostile_requests <= 5000:
                parser.error("--hostile-requests must be between 1 and 5000")
            return run_hostile(args, run_dir)
        rows = []
        for max_batch in args.max_batch:
            with ServerProcess(run_dir, max_batch, args.device, start_timeout=180) as server:
                warm = asyncio.run(warm_up(server.url))
                if not warm.ok:
                    raise SystemExit(f"warm-up request failed: {warm.error}\n{server.output()}")
                before = server.health()
                run = asyncio.run(load(server.url, args.clients, args.requests, args.max_tokens, args.time_limit,
                                       args.request_timeout))
                after = server.health()
            ok = [r for r in run.results if r.ok]
            errors = [r for r in run.results if not r.ok]
            ttfts = [r.ttft for r in ok if r.ttft is not None]
            batches = after["batches"] - before["batches"]
            rows.append({
                "max_batch": max_batch, "clients": args.clients, "requests": len(run.results), "ok": len(ok),
                "errors": len(errors), "error_samples": sorted({e.error for e in errors})[:3],
                "wall_s": run.wall, "requests_per_s": len(ok) / run.wall if run.wall else 0.0,
                "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
                "latency_mean_s": statistics.fmean(r.latency for r in ok) if ok else float("nan"),
                "tokens_per_s": sum(r.tokens for r in ok) / run.wall if run.wall else 0.0,
                "rows_per_batch": (after["rows_finished"] - before["rows_finished"]) / batches if batches else 0.0,
            })

    base = rows[0]["tokens_per_s"] or float("nan")
    header = (f"{'max-batch':>9} {'clients':>7} {'requests':>8} {'errors':>6} {'wall s':>7} {'req/s':>7} "
              f"{'TTFT p50':>9} {'TTFT p95':>9} {'latency':>8} {'tokens/s':>9} {'rows/batch':>10} {'vs first':>8}")
    print(f"\nserve load test: {args.clients} concurrent streaming clients, {args.requests} requests of "
          f"{args.max_tokens} tokens, device {args.device}, model {args.run or 'tiny random-weight (built)'}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['max_batch']:>9} {r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['wall_s']:>7.2f} "
              f"{r['requests_per_s']:>7.2f} {r['ttft_p50_s']:>8.3f}s {r['ttft_p95_s']:>8.3f}s "
              f"{r['latency_mean_s']:>7.2f}s {r['tokens_per_s']:>9.1f} {r['rows_per_batch']:>10.2f} "
              f"{r['tokens_per_s'] / base:>7.2f}x")
        for sample in r["error_samples"]:
            print(f"{'':>9} error: {sample}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
