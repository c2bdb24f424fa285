"""The generation engine behind the server: one worker thread owns the model, requests wait in a queue, and the
worker runs waiting rows together as one left-padded batch.

Why a single worker: a model on one device does one forward pass at a time anyway, and batching several rows into
that pass is where the throughput comes from. Every choice of every request is one *row* (``Sequence``); the worker
takes up to ``max_batch`` waiting rows that can share a batch (same sampling settings, and together they fit the
context window) and calls :func:`xiaolm.infer.generate.generate_ids` once for them. Its ``on_token`` hook feeds each
row's :class:`~xiaolm.infer.generate.StreamDecoder` (so a streamed delta never holds half a character) and its
``should_stop`` hook ends a row at its own ``max_tokens``, at a stop string, or as soon as its client has gone.

Batching is static: a batch runs until all its rows end, and rows that arrive meanwhile wait for the next one.
A row whose client disconnects stops costing compute at the next token (``should_stop``), and a cancelled row still
in the queue is dropped before it runs.

Events reach the HTTP side through a per-request queue: an ``asyncio.Queue`` fed with
``loop.call_soon_threadsafe`` for the server, or a ``queue.Queue`` for plain threaded callers (tests, scripts).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from xiaolm.infer.generate import StreamDecoder, generate_ids


class QueueFull(RuntimeError):
    """The engine already holds as many waiting rows as it was allowed to."""


class EngineClosed(RuntimeError):
    """The engine was shut down."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    ignore_eos: bool = False

    def normalised(self) -> "SamplingParams":
        """Greedy decoding ignores top_p/top_k, and top_p = 0 means "only the most likely token" (greedy)."""
        if self.temperature <= 0 or self.top_p <= 0:
            return SamplingParams(0.0, 1.0, 0, self.repetition_penalty, self.seed, self.ignore_eos)
        return self


@dataclass
class Sequence:
    """One row: one choice of one request."""

    request: "GenerationRequest"
    index: int  # the choice index reported to the client
    prompt_ids: list[int]
    max_tokens: int
    decoder: StreamDecoder
    tokens: int = 0
    finish_reason: Optional[str] = None  # "stop" | "length" | "cancelled" | "error"

    @property
    def text(self) -> str:
        return self.decoder.text()


@dataclass
class Event:
    kind: str  # "delta" (text), "finish" (finish_reason, tokens), "done" (all rows ended), "error" (text)
    index: int = 0
    text: str = ""
    finish_reason: Optional[str] = None
    tokens: int = 0


class GenerationRequest:
    """What the HTTP layer submits: one or more rows sharing sampling settings, and the events they produce.

    ``prompts`` holds one token-id list per row (a chat request with ``n=3`` repeats its prompt three times).
    Create it inside a running event loop to consume events with ``async for event in request.events()``;
    otherwise call ``request.result()`` from any thread.
    """

    _ids = itertools.count()

    def __init__(self, tokenizer, prompts: list[list[int]], max_tokens: list[int], params: SamplingParams,
                 stop: list[str] = (), loop: Optional[asyncio.AbstractEventLoop] = None):
        if len(prompts) != len(max_tokens):
            raise ValueError("one max_tokens per prompt")
        self.id = uuid.uuid4().hex
        self.order = next(self._ids)
        self.params = params.normalised()
        self.stop = list(stop)
        self.created = time.time()
        self.sequences = [
            Sequence(self, i, list(p), int(m), StreamDecoder(tokenizer, self.stop))
            for i, (p, m) in enumerate(zip(prompts, max_tokens))
        ]
        self.batches_started = 0  # seeds the n-th batch of a seeded request with seed + n
        self._cancelled = threading.Event()
        self._open_rows = len(self.sequences)
        self._lock = threading.Lock()
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        self._loop = loop
        self._queue: Any = asyncio.Queue() if loop is not None else queue.Queue()

    # ---------------------------------------------------------------------------------------- lifecycle

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating for this request (client gone). Safe to call from any thread, any number of times."""
        self._cancelled.set()

    @property
    def finished(self) -> bool:
        return self._open_rows == 0

    def _emit(self, event: Event) -> None:
        if self._loop is None:
            self._queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            self.cancel()

    def _finish_row(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        self._emit(Event("finish", seq.index, finish_reason=reason, tokens=seq.tokens))
        with self._lock:
            self._open_rows -= 1
            last = self._open_rows == 0
        if last:
            self._emit(Event("done"))

    # -------------------------------------------------------------------------------------- consumption

    async def next_event(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next event (a ``done`` event once every row has finished), or ``None`` after ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def events(self) -> "collections.abc.AsyncIterator[Event]":
        """Events until every row has finished (the final ``done`` event is not yielded)."""
        while True:
            event = await self._queue.get()
            if event.kind == "done":
                return
            yield event

    def iter_events(self, timeout: float = 300.0) -> Iterator[Event]:
        """Blocking variant of ``events()`` for threaded callers; raises ``TimeoutError`` when it stalls."""
        while True:
            try:
                event = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no event from the engine in {timeout} s") from None
            if event.kind == "done":
                return
            yield event

    def result(self, timeout: float = 300.0) -> list[Sequence]:
        """Wait until every row has finished (threaded callers); returns the rows."""
        for event in self.iter_events(timeout):
            if event.kind == "error":
                raise RuntimeError(event.text)
        return self.sequences


@dataclass
class BatchRecord:
    """What one batch was, for /health and for tests that check batching happened."""

    size: int
    requests: int
    new_tokens: int
    seconds: float


@dataclass
class EngineStats:
    batches: int = 0
    rows_finished: int = 0
    rows_cancelled: int = 0
    tokens_generated: int = 0
    errors: int = 0
    recent_batches: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))
    recent_rows: collections.deque = field(default_factory=lambda: collections.deque(maxlen=256))


class Engine:
    """Queue + batching worker around one model.

    ``max_batch`` caps the rows in one forward pass; ``max_queue`` caps the rows waiting (a further submit raises
    ``QueueFull``, which the server turns into a 429). The worker thread starts on the first ``submit`` (or
    ``start()``; with ``autostart=False`` only on ``start()``) and stops on ``close()``.
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 256, autostart: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self.autostart = autostart
        self.context_length = int(model.config.max_position_embeddings)
        self.eos_ids = sorted({tokenizer.eot_id, getattr(tokenizer, "im_end_id", tokenizer.eot_id)})
        self.stats = EngineStats()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------------------------------ control

    def start(self) -> None:
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine has been closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name="xiaolm-engine", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel everything, let the running batch end (at its next token) and join the worker."""
        with self._cond:
            self._closed = True
            for seq in list(self._waiting) + list(self._running):
                seq.request.cancel()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:  # rows that never ran end now, so nobody waits for them forever
            while self._waiting:
                seq = self._waiting.popleft()
                seq.request._finish_row(seq, "cancelled")

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running (/health turns 503 when it is not)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        for seq in request.sequences:
            if not seq.prompt_ids:
                raise ValueError("every prompt needs at least one token")
            if len(seq.prompt_ids) + seq.max_tokens > self.context_length:
                raise ValueError(
                    f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens ({seq.max_tokens}) exceeds the "
                    f"context length {self.context_length}"
                )
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine has been closed")
            if len(self._waiting) + len(request.sequences) > self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._waiting)} rows are waiting (limit {self.max_queue})")
            self._waiting.extend(request.sequences)
            self._cond.notify_all()
        if self.autostart:
            self.start()
        return request

    def snapshot(self) -> dict:
        """Counters for /health."""
        with self._cond:
            waiting, running = len(self._waiting), len(self._running)
        s = self.stats
        return {
            "waiting_rows": waiting, "running_rows": running, "max_batch": self.max_batch,
            "max_queue": self.max_queue, "batches": s.batches, "rows_finished": s.rows_finished,
            "rows_cancelled": s.rows_cancelled, "tokens_generated": s.tokens_generated, "errors": s.errors,
        }

    # ------------------------------------------------------------------------------------------- worker

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._take_batch()
                self._running = batch
            if batch:
                try:
                    self._run_batch(batch)
                finally:
                    with self._cond:
                        self._running = []

    def _batch_key(self, seq: Sequence) -> tuple:
        p = seq.request.params
        # A seeded request runs only with its own rows, so its output does not depend on who else is waiting.
        owner = seq.request.id if p.seed is not None else None
        return (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.ignore_eos, owner)

    def _take_batch(self) -> list[Sequence]:
        """Oldest waiting row first, then later rows that can share its batch; called with the lock held."""
        while self._waiting and self._waiting[0].request.cancelled:
            seq = self._waiting.popleft()
            self._count_finished(seq, "cancelled")
            seq.request._finish_row(seq, "cancelled")
        if not self._waiting:
            return []
        head = self._waiting[0]
        key = self._batch_key(head)
        batch: list[Sequence] = []
        longest_prompt, longest_new = 0, 0
        keep: collections.deque[Sequence] = collections.deque()
        for seq in self._waiting:
            fits = len(batch) < self.max_batch and self._batch_key(seq) == key and not seq.request.cancelled
            if fits:
                # generate_ids shortens every row when the longest prompt + the most new tokens overflow the
                # context, so a row joins only if the batch still fits.
                lp, ln = max(longest_prompt, len(seq.prompt_ids)), max(longest_new, seq.max_tokens)
                fits = lp + ln <= self.context_length
            if fits:
                batch.append(seq)
                longest_prompt, longest_new = lp, ln
            else:
                keep.append(seq)
        self._waiting = keep
        return batch

    def _count_finished(self, seq: Sequence, reason: str) -> None:
        s = self.stats
        s.rows_finished += 1
        s.rows_cancelled += reason == "cancelled"
        s.recent_rows.append({"request": seq.request.id, "index": seq.index, "finish_reason": reason,
                              "tokens": seq.tokens, "max_tokens": seq.max_tokens})

    def _run_batch(self, batch: list[Sequence]) -> None:
        started = time.perf_counter()
        params = batch[0].request.params
        generator = None
        if params.seed is not None:
            request = batch[0].request
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed + request.batches_started)
            request.batches_started += 1

        def on_token(row: int, token: int) -> None:
            seq = batch[row]
            seq.tokens += 1
            if seq.request.cancelled:
                return
            delta = seq.decoder.push(token)
            if delta:
                seq.request._emit(Event("delta", seq.index, text=delta))

        def should_stop(row: int, new_ids: list[int]) -> bool:
            seq = batch[row]
            return seq.request.cancelled or seq.decoder.stopped or len(new_ids) >= seq.max_tokens

        error: Optional[BaseException] = None
        try:
            generate_ids(
                self.model, [s.prompt_ids for s in batch], max(s.max_tokens for s in batch),
                pad_id=self.tokenizer.pad_id, eos_ids=[] if params.ignore_eos else self.eos_ids,
                temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                repetition_penalty=params.repetition_penalty, generator=generator,
                on_token=on_token, should_stop=should_stop,
            )
        except Exception as exc:  # a failing batch must not take the server down with it
            error = exc
        seconds = time.perf_counter() - started
        self.stats.batches += 1
        self.stats.tokens_generated += sum(s.tokens for s in batch)
        self.stats.recent_batches.append(BatchRecord(len(batch), len({s.request.id for s in batch}),
                                                     sum(s.tokens for s in batch), seconds))
        for seq in batch:
            request = seq.request
            if error is not None:
                self.stats.errors += 1
                request._emit(Event("error", seq.index, text=f"generation failed: {type(error).__name__}: {error}"))
                reason = "error"
            elif request.cancelled:
                reason = "cancelled"
            else:
                tail = seq.decoder.finish()
                if tail:
                    request._emit(Event("delta", seq.index, text=tail))
                # A row that ended before its budget without a stop string ended at an end-of-text token.
                reason = "stop" if seq.decoder.stopped or seq.tokens < seq.max_tokens else "length"
            self._count_finished(seq, reason)
            request._finish_row(seq, reason)
