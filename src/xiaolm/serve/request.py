"""What a request to the engine is: its sampling settings, its rows (one per choice), the events the rows produce,
and the per-token log-probabilities it may ask for. The HTTP layer builds a :class:`GenerationRequest` and reads its
events; :mod:`xiaolm.serve.engine` runs its rows.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from xiaolm.infer.generate import StreamDecoder


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
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency_penalty * (times the token was generated so far)
    presence_penalty: float = 0.0  # OpenAI: logit -= presence_penalty if the token was generated at all
    logprobs: bool = False  # report each generated token's log-probability
    top_logprobs: int = 0  # ... and this many most likely alternatives

    def normalised(self) -> "SamplingParams":
        """Greedy decoding ignores top_p/top_k, and top_p = 0 means "only the most likely token" (greedy)."""
        if self.temperature <= 0 or self.top_p <= 0:
            return dataclasses.replace(self, temperature=0.0, top_p=1.0, top_k=0)
        return self

    @property
    def penalised(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def derive_seed(seed: int, offset: int = 0) -> int:
    """A generator seed for row ``offset`` of a request seeded with ``seed``: any integer (2**64, negative) maps
    into torch's range, so no client-sent seed can overflow ``manual_seed``."""
    return (int(seed) + int(offset)) % (2 ** 63)


@dataclass
class TokenLogprob:
    """One position's log-probability (natural log, from the model's own distribution before penalties and
    temperature) and its most likely alternatives, as token ids."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprobs(logprobs: torch.Tensor, tokens: list[int], top_n: int) -> list[TokenLogprob]:
    """Entries for ``tokens`` [N] given their rows of log-probabilities ``logprobs`` [N, V]."""
    if not tokens:
        return []
    index = torch.tensor(tokens, device=logprobs.device)[:, None]
    chosen = logprobs.gather(1, index)[:, 0].tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in tokens]
    if top_n > 0:
        values, ids = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens, chosen, tops)]


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
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when asked for
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # echo: one per prompt token (None for the 1st)
    constraint: Any = None  # a grammar the row's tokens must follow (xiaolm.infer.constrain.CallConstraint)
    _unsent_logprobs: list[TokenLogprob] = field(default_factory=list)  # streamed with the next text delta

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
    logprobs: list[TokenLogprob] = field(default_factory=list)  # a delta's tokens, when logprobs were asked for


class GenerationRequest:
    """What the HTTP layer submits: one or more rows sharing sampling settings, and the events they produce.

    ``prompts`` holds one token-id list per row (a chat request with ``n=3`` repeats its prompt three times).
    ``constraint``, when given, makes each row's grammar (``xiaolm.infer.constrain``): only tokens it allows are
    sampled. ``keep_ids`` are special tokens that stay in the text (the thinking and tool-call markers).
    Create it inside a running event loop to consume events with ``async for event in request.events()``;
    otherwise call ``request.result()`` from any thread.
    """

    _ids = itertools.count()

    def __init__(self, tokenizer, prompts: list[list[int]], max_tokens: list[int], params: SamplingParams,
                 stop: list[str] = (), loop: Optional[asyncio.AbstractEventLoop] = None,
                 prompt_logprobs: Optional[int] = None, client: Optional[str] = None,
                 constraint: Optional[Callable[[], Any]] = None, keep_ids: list[int] = ()):
        if len(prompts) != len(max_tokens):
            raise ValueError("one max_tokens per prompt")
        self.id = uuid.uuid4().hex
        # who sent it, for fair shares of the batch (the server: OpenAI's `user`, else the peer address); alone
        # otherwise
        self.client = client if client is not None else self.id
        self.order = next(self._ids)
        self.params = params.normalised()
        # echo with logprobs: score every prompt token too (with this many alternatives), as lm-eval needs
        self.prompt_logprobs = prompt_logprobs
        self.stop = list(stop)
        self.created = time.time()
        self.sequences = [
            Sequence(self, i, list(p), int(m), StreamDecoder(tokenizer, self.stop, keep_ids),
                     constraint=constraint() if constraint is not None else None)
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
