"""The generation engine behind the server: one worker thread owns the model, requests wait in a queue, and the
worker generates waiting rows together.

Why a single worker: a model on one device does one forward pass at a time anyway, and batching several rows into
that pass is where the throughput comes from. Every choice of every request is one *row* (``Sequence``). Each
generated token feeds the row's :class:`~xiaolm.infer.generate.StreamDecoder` (so a streamed delta never holds half
a character), and a row ends at its own ``max_tokens``, at a stop string, or as soon as its client has gone.

Two schedulers. ``continuous`` (the default, as in vLLM and llama.cpp's server) keeps a
:class:`~xiaolm.infer.cache.RowKVCache` of ``max_batch`` slots: at every decode step waiting rows are admitted into
free slots (each prefilled alone into its slot), then one forward pass decodes every running row at its own
position, and a finished row frees its slot at once. Rows with different sampling settings share the forward pass;
each row samples with its own settings (and its own generator when seeded), so a row's output does not depend on
who else is running. ``static`` is the older scheme: up to ``max_batch`` waiting rows with the same sampling settings
(that together fit the context window) run as one left-padded :func:`~xiaolm.infer.generate.generate_ids` batch
until all of them end, and rows that arrive meanwhile wait for the next one.

Who gets a free slot (continuous, ``fair_share``, the default): the waiting row of the client that holds the fewest
slots, the oldest on a tie, and the last ``max_batch // 8`` free slots only go to a client that holds none; so one
client with many large-``n`` requests cannot hold everyone else back until its queue has run. A row whose numbers go
bad (NaN or infinite logits) fails alone in either scheduler; the other rows draw what they would have drawn.

A row whose client disconnects stops costing compute at the next token, and a cancelled row still in the queue is
dropped before it runs. The worker loop cannot be killed by a request: an exception in a step fails that step's rows
(HTTP 500, no exception text sent) and the loop goes on; ``Engine.alive`` says whether the worker is running.

Events reach the HTTP side through a per-request queue: an ``asyncio.Queue`` fed with
``loop.call_soon_threadsafe`` for the server, or a ``queue.Queue`` for plain threaded callers (tests, scripts).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from xiaolm.infer.cache import RowKVCache, model_dtype
from xiaolm.infer.generate import generate_ids, sample_rows
from xiaolm.serve.errors import GENERATION_FAILED
from xiaolm.serve.request import (EngineClosed, Event, GenerationRequest, QueueFull, Sequence, TokenLogprob, derive_seed,
                                  token_logprobs)

log = logging.getLogger("xiaolm.serve")
SCHEDULERS = ("continuous", "static")
PREFILL_TOKENS = 2048  # padded prompt tokens in one prefill pass of newly admitted rows (bounds its logits' memory)


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

    ``max_batch`` caps the rows in one forward pass (the continuous scheduler's KV slots); ``max_queue`` caps the
    rows waiting (a further submit raises ``QueueFull``, which the server turns into a 429). ``scheduler`` is
    ``continuous`` or ``static`` (see the module docstring). The worker thread starts on the first ``submit`` (or
    ``start()``; with ``autostart=False`` only on ``start()``) and stops on ``close()``.
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 256, autostart: bool = True,
                 scheduler: str = "continuous", fair_share: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self.autostart = autostart
        self.scheduler = scheduler
        self.fair_share = fair_share
        # Slots a client holding none can always find free: a lone heavy client never takes the whole batch, so a
        # newcomer starts at the next step instead of after a whole generation (there is no pre-emption).
        self.reserved_slots = max_batch // 8 if fair_share else 0
        self.context_length = int(model.config.max_position_embeddings)
        self.eos_ids = sorted({tokenizer.eot_id, getattr(tokenizer, "im_end_id", tokenizer.eot_id)})
        self.stats = EngineStats()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._cache: Optional[RowKVCache] = None

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
            if seq.max_tokens < 0:
                raise ValueError(f"max_tokens must not be negative, got {seq.max_tokens}")
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
            "max_queue": self.max_queue, "scheduler": self.scheduler, "fair_share": self.fair_share,
            "batches": s.batches,
            "rows_finished": s.rows_finished, "rows_cancelled": s.rows_cancelled,
            "tokens_generated": s.tokens_generated, "errors": s.errors,
        }

    # ------------------------------------------------------------------------------------------- worker

    @torch.no_grad()
    def _worker(self) -> None:
        if self.scheduler == "continuous":
            self._continuous_worker()
        else:
            self._static_worker()

    def _static_worker(self) -> None:
        while True:
            batch: list[Sequence] = []
            try:
                with self._cond:
                    while not self._waiting and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                    batch = self._take_batch()
                    self._running = batch
                if batch:
                    self._run_batch(batch)
            except Exception:  # the loop must outlive any one batch: fail its rows, go on
                log.exception("serve: engine step failed")
                self._fail_rows(batch)
                time.sleep(0.01)  # should the failure repeat, do not spin
            finally:
                with self._cond:
                    self._running = []

    def _fail_rows(self, rows: list[Sequence]) -> None:
        """End ``rows`` with an error event (a 500 for their clients); never raises."""
        for seq in rows:
            if seq.finish_reason is not None:
                continue
            try:
                self.stats.errors += 1
                seq.request._emit(Event("error", seq.index, text=GENERATION_FAILED))
                self._count_finished(seq, "error")
                seq.request._finish_row(seq, "error")
            except Exception:
                log.exception("serve: could not report a failed row")

    def _batch_key(self, seq: Sequence) -> tuple:
        p = seq.request.params
        # A seeded request runs only with its own rows, so its output does not depend on who else is waiting.
        owner = seq.request.id if p.seed is not None else None
        return (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.ignore_eos, p.frequency_penalty,
                p.presence_penalty, p.logprobs, p.top_logprobs, owner)

    def _take_batch(self) -> list[Sequence]:
        """Oldest waiting row first, then later rows that can share its batch; called with the lock held."""
        self._drop_cancelled_head()
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

    def _drop_cancelled(self) -> None:
        keep: collections.deque[Sequence] = collections.deque()
        for seq in self._waiting:
            if seq.request.cancelled:
                self._count_finished(seq, "cancelled")
                seq.request._finish_row(seq, "cancelled")
            else:
                keep.append(seq)
        self._waiting = keep

    def _drop_cancelled_head(self) -> None:
        while self._waiting and self._waiting[0].request.cancelled:
            seq = self._waiting.popleft()
            self._count_finished(seq, "cancelled")
            seq.request._finish_row(seq, "cancelled")

    def _count_finished(self, seq: Sequence, reason: str) -> None:
        s = self.stats
        s.rows_finished += 1
        s.rows_cancelled += reason == "cancelled"
        s.recent_rows.append({"request": seq.request.id, "index": seq.index, "finish_reason": reason,
                              "tokens": seq.tokens, "max_tokens": seq.max_tokens})

    # ---------------------------------------------------------------------------------- shared row logic

    def _keep_token(self, seq: Sequence, token: int, entry: Optional[TokenLogprob]) -> None:
        """A generated token (not an end-of-text): count it, stream its text (and logprobs)."""
        seq.tokens += 1
        if seq.request.cancelled:
            return
        if entry is not None:
            seq.logprobs.append(entry)
            seq._unsent_logprobs.append(entry)
        delta = seq.decoder.push(token)
        if delta:
            seq.request._emit(Event("delta", seq.index, text=delta, logprobs=seq._unsent_logprobs))
            seq._unsent_logprobs = []

    def _keep_eos_logprob(self, seq: Sequence, entry: TokenLogprob) -> None:
        """The end-of-text token a row ended at is not text, but its logprob is reported (as OpenAI and vLLM do:
        lm-eval's scoring drops the last entry, expecting the one generated token there)."""
        if not seq.request.cancelled:
            seq.logprobs.append(entry)
            seq._unsent_logprobs.append(entry)

    def _row_done(self, seq: Sequence) -> bool:
        return seq.request.cancelled or seq.decoder.stopped or seq.tokens >= seq.max_tokens

    def _end_row(self, seq: Sequence) -> None:
        """A row that ran to its end (not an error): flush its text, report why it ended."""
        request = seq.request
        if request.cancelled:
            reason = "cancelled"
        else:
            tail = seq.decoder.finish()
            if tail or seq._unsent_logprobs:
                request._emit(Event("delta", seq.index, text=tail, logprobs=seq._unsent_logprobs))
                seq._unsent_logprobs = []
            # A row that ended before its budget without a stop string ended at an end-of-text token.
            reason = "stop" if seq.decoder.stopped or seq.tokens < seq.max_tokens else "length"
        self._count_finished(seq, reason)
        request._finish_row(seq, reason)

    def _score_prompt(self, seq: Sequence, logits: Optional[torch.Tensor] = None) -> None:
        """echo + logprobs: each prompt token's log-probability given the tokens before it (None for the first)."""
        top_n = seq.request.prompt_logprobs
        if top_n is None:
            return
        if logits is None:
            ids = torch.tensor([seq.prompt_ids], device=self.model.device)
            logits = self.model(ids).logits[0]
        lp = torch.log_softmax(logits.float()[:-1], dim=-1)
        seq.prompt_logprobs = [None] + token_logprobs(lp, seq.prompt_ids[1:], top_n)

    # ------------------------------------------------------------------------------------ static batches

    def _run_batch(self, batch: list[Sequence]) -> None:
        started = time.perf_counter()
        params = batch[0].request.params
        generator = None
        if params.seed is not None:
            request = batch[0].request
            generator = torch.Generator(device=self.model.device).manual_seed(
                derive_seed(params.seed, request.batches_started))
            request.batches_started += 1
        for seq in batch:
            self._score_prompt(seq)
        counts = None  # generated-token counts per row, for frequency/presence penalties
        step_logprobs: list[Optional[torch.Tensor]] = [None]  # this step's, read once the token is known

        constrained = any(s.constraint is not None for s in batch)

        def process(logits: torch.Tensor, _outputs) -> torch.Tensor:
            nonlocal counts
            if params.logprobs:
                step_logprobs[0] = torch.log_softmax(logits, dim=-1)
            if params.penalised:
                if counts is None:
                    counts = torch.zeros_like(logits)
                logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
            if constrained:
                logits = _constrain(logits, [s.constraint for s in batch])
            return logits

        def on_token(row: int, token: int) -> None:
            seq = batch[row]
            if counts is not None:
                counts[row, token] += 1
            entry = None
            if params.logprobs:
                entry = token_logprobs(step_logprobs[0][row:row + 1], [token], params.top_logprobs)[0]
            if seq.constraint is not None:
                seq.constraint.accept(token)
            self._keep_token(seq, token, entry)

        def on_eos(row: int, token: int) -> None:
            if params.logprobs:
                self._keep_eos_logprob(batch[row], token_logprobs(step_logprobs[0][row:row + 1], [token],
                                                                  params.top_logprobs)[0])

        def should_stop(row: int, _new_ids: list[int]) -> bool:
            return self._row_done(batch[row])

        went_bad: list[Sequence] = []  # NaN / infinite numbers: failed alone, the batch goes on

        def on_bad_row(row: int) -> None:
            log.warning("serve: request %s choice %d: sampling produced no valid distribution (NaN or infinite "
                        "logits); that row failed, the rest of the batch goes on", batch[row].request.id,
                        batch[row].index)
            went_bad.append(batch[row])

        error: Optional[BaseException] = None
        try:
            generate_ids(
                self.model, [s.prompt_ids for s in batch], max(s.max_tokens for s in batch),
                pad_id=self.tokenizer.pad_id, eos_ids=[] if params.ignore_eos else self.eos_ids,
                temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                repetition_penalty=params.repetition_penalty, generator=generator,
                on_token=on_token, should_stop=should_stop, on_eos=on_eos, on_bad_row=on_bad_row,
                logits_processor=process if params.logprobs or params.penalised or constrained else None,
            )
        except Exception as exc:  # a failing batch must not take the server down with it
            log.exception("serve: generation failed")
            error = exc
        seconds = time.perf_counter() - started
        self.stats.batches += 1
        self.stats.tokens_generated += sum(s.tokens for s in batch)
        self.stats.recent_batches.append(BatchRecord(len(batch), len({s.request.id for s in batch}),
                                                     sum(s.tokens for s in batch), seconds))
        if error is not None:
            self._fail_rows(batch)
            return
        self._fail_rows(went_bad)
        for seq in batch:
            if seq.finish_reason is None:
                self._end_row(seq)

    # ------------------------------------------------------------------------------- continuous batching

    def _continuous_worker(self) -> None:
        slots: list[Optional[_Row]] = [None] * self.max_batch
        while True:
            step_rows: list[Sequence] = []
            try:
                with self._cond:
                    while not self._waiting and not any(slots) and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        for row in slots:
                            if row is not None:
                                row.seq.request.cancel()
                                self._end_row(row.seq)
                        return
                    admitted = self._admit(slots)
                    self._running = [r.seq for r in slots if r is not None]
                for group in self._prefill_groups(admitted):
                    step_rows = [r.seq for r in group]
                    self._run_step(self._prefill, group, slots, "prefill")
                active = [r for r in slots if r is not None]
                step_rows = [r.seq for r in active]
                if active:
                    self._run_step(self._decode, active, slots, "decode step")
            except Exception:  # bookkeeping of our own failed: fail every running row, keep the loop alive
                log.exception("serve: engine step failed")
                seen = {id(seq) for seq in step_rows}
                running = step_rows + [r.seq for r in slots if r is not None and id(r.seq) not in seen]
                slots[:] = [None] * len(slots)
                self._fail_rows(running)
                time.sleep(0.01)  # should the failure repeat, do not spin
            finally:
                with self._cond:
                    self._running = [r.seq for r in slots if r is not None]

    def _run_step(self, step: Callable[[list["_Row"]], None], rows: list["_Row"], slots: list[Optional["_Row"]],
                  what: str) -> None:
        """Prefill or decode ``rows``; free the slots of the rows that finished, or of them all should it fail."""
        try:
            step(rows)
        except Exception:
            log.exception("serve: %s failed", what)
            for row in rows:
                slots[row.slot] = None
            self._fail_rows([r.seq for r in rows])
        else:
            for row in rows:
                if row.finished:
                    slots[row.slot] = None

    def _admit(self, slots: list[Optional["_Row"]]) -> list["_Row"]:
        """Move waiting rows into free slots; called with the lock held. First come, first served without
        ``fair_share``; with it, see ``_next_fair``."""
        admitted = []
        held = collections.Counter(r.seq.request.client for r in slots if r is not None)
        free = [i for i in range(len(slots)) if slots[i] is None]
        if self.fair_share and any(seq.request.cancelled for seq in self._waiting):  # rows are not taken in order
            self._drop_cancelled()
        for n, i in enumerate(free):
            self._drop_cancelled_head()
            if not self._waiting:
                break
            if self.fair_share:
                seq = self._next_fair(held, len(free) - n)
                if seq is None:
                    break
            else:
                seq = self._waiting.popleft()
            held[seq.request.client] += 1
            slots[i] = _Row(seq, i)
            admitted.append(slots[i])
        return admitted

    def _next_fair(self, held: collections.Counter, free: int) -> Optional[Sequence]:
        """Take the waiting row of the client holding the fewest slots (the oldest such row on a tie): a small
        request waits for one slot to free up, not behind every row a heavy client queued. The last
        ``reserved_slots`` free slots go only to a client that holds none."""
        best, best_key = None, None
        seen = set()
        for index, seq in enumerate(self._waiting):
            client = seq.request.client
            if client in seen or seq.request.cancelled:
                continue
            seen.add(client)
            key = (held[client], index)
            if best_key is None or key < best_key:
                best, best_key = index, key
        if best is None or (free <= self.reserved_slots and best_key[0] > 0):
            return None
        seq = self._waiting[best]
        del self._waiting[best]
        return seq

    def _row_cache(self) -> RowKVCache:
        if self._cache is None:
            self._cache = RowKVCache(self.model.config, self.max_batch, self.context_length, self.model.device,
                                     model_dtype(self.model))
        return self._cache

    def _prefill_groups(self, rows: list["_Row"]) -> list[list["_Row"]]:
        """Admitted rows in prefill batches of at most PREFILL_TOKENS padded tokens (one long prompt goes alone)."""
        groups: list[list[_Row]] = []
        for row in rows:
            n = len(row.seq.prompt_ids)
            if groups:
                group = groups[-1]
                width = max(n, max(len(r.seq.prompt_ids) for r in group))
                if (len(group) + 1) * width <= PREFILL_TOKENS:
                    group.append(row)
                    continue
            groups.append([row])
        return groups

    def _prefill(self, rows: list["_Row"]) -> None:
        """Run newly admitted rows' prompts into their slots (right-padded together) and take their first tokens."""
        device = self.model.device
        vocab = self.model.config.vocab_size
        for row in rows:
            seq, params = row.seq, row.seq.request.params
            if params.seed is not None:
                row.generator = torch.Generator(device=device).manual_seed(derive_seed(params.seed, seq.index))
            if params.repetition_penalty != 1.0:
                row.present = torch.zeros(vocab, dtype=torch.bool, device=device)
                row.present[torch.tensor(seq.prompt_ids, device=device)] = True
            if params.penalised:
                row.counts = torch.zeros(vocab, device=device)
        lengths = [len(r.seq.prompt_ids) for r in rows]
        width = max(lengths)
        ids = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :lengths[b]] = torch.tensor(r.seq.prompt_ids)
        positions = torch.arange(width).expand(len(rows), width)
        cache = self._row_cache()
        cache.rows = (slice(rows[0].slot, rows[0].slot + 1) if len(rows) == 1
                      else torch.tensor([r.slot for r in rows], device=device))
        scoring = any(r.seq.request.prompt_logprobs is not None for r in rows)
        every = scoring or min(lengths) != width  # right padding: the last real token is not the last position
        logits = self.model(ids.to(device), position_ids=positions.to(device), cache=cache,
                            logits_to_keep=0 if every else 1).logits
        self.stats.batches += 1
        last = logits[torch.arange(len(rows)), torch.tensor(lengths) - 1] if every else logits[:, -1]
        going = []
        for b, row in enumerate(rows):
            seq = row.seq
            if seq.request.prompt_logprobs is not None:
                self._score_prompt(seq, logits[b, :lengths[b]])
            row.position = lengths[b]
            if seq.max_tokens == 0 or self._row_done(seq):
                row.finished = True
                self._end_row(seq)
            else:
                going.append(b)
        if going:
            self._take_tokens([rows[b] for b in going], last[going].float())

    def _decode(self, rows: list["_Row"]) -> None:
        """One forward pass for every running row, each at its own position, then each row's next token."""
        width = max(r.slot for r in rows) + 1  # slots [0, width): free ones in between decode a dummy token
        ids, positions = [[self.tokenizer.pad_id]] * width, [[0]] * width
        for r in rows:
            ids[r.slot], positions[r.slot] = [r.next_token], [r.position]
        device = self.model.device
        cache = self._row_cache()
        cache.rows = slice(0, width)
        logits = self.model(torch.tensor(ids, device=device), position_ids=torch.tensor(positions, device=device),
                            cache=cache, logits_to_keep=1).logits[:, -1].float()
        for r in rows:
            r.position += 1
        self.stats.batches += 1
        self.stats.recent_batches.append(BatchRecord(len(rows), len({r.seq.request.id for r in rows}), len(rows), 0.0))
        if len(rows) < width or any(r.slot != i for i, r in enumerate(rows)):
            logits = logits[[r.slot for r in rows]]
        self._take_tokens(rows, logits)

    def _take_tokens(self, rows: list["_Row"], logits: torch.Tensor) -> None:
        """Sample each row's next token from its logits row (``logits`` [len(rows), V]) with its own settings;
        rows with the same settings and no generator of their own are sampled together."""
        logprobs: dict[int, torch.Tensor] = {}
        wanted = [i for i, r in enumerate(rows) if r.seq.request.params.logprobs]
        if wanted:
            all_lp = torch.log_softmax(logits[wanted], dim=-1)
            logprobs = {i: all_lp[j:j + 1] for j, i in enumerate(wanted)}
        penalised = [i for i, r in enumerate(rows) if r.counts is not None or r.present is not None]
        if penalised:
            logits = logits.clone()
            for i in penalised:
                logits[i] = _penalise(rows[i], logits[i])
        if any(r.seq.constraint is not None for r in rows):
            logits = _constrain(logits, [r.seq.constraint for r in rows])
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            p = r.seq.request.params
            groups.setdefault((p.temperature, p.top_k, p.top_p) if r.generator is None else ("row", i), []).append(i)
        picks: list[Optional[torch.Tensor]] = [None] * len(rows)
        for key, members in groups.items():
            p = rows[members[0]].seq.request.params
            drawn = sample_rows(logits[members], p.temperature, p.top_k, p.top_p, rows[members[0]].generator)
            for j, i in enumerate(members):
                picks[i] = drawn[j:j + 1]
        tokens = torch.cat(picks).tolist()  # one host sync for the whole step
        eos = set(self.eos_ids)
        for i, (r, token) in enumerate(zip(rows, tokens)):
            seq, p = r.seq, r.seq.request.params
            if token < 0:  # this row's numbers went bad (NaN / infinity): it fails alone, the others go on
                log.warning("serve: request %s choice %d: sampling produced no valid distribution (NaN or infinite "
                            "logits); that row failed, the rest of the batch goes on", seq.request.id, seq.index)
                r.finished = True
                self._fail_rows([seq])
                continue
            if token in eos and not p.ignore_eos:
                if i in logprobs:
                    self._keep_eos_logprob(seq, token_logprobs(logprobs[i], [token], p.top_logprobs)[0])
                r.finished = True
                self._end_row(seq)
                continue
            entry = token_logprobs(logprobs[i], [token], p.top_logprobs)[0] if i in logprobs else None
            if r.counts is not None:
                r.counts[token] += 1
            if r.present is not None:
                r.present[token] = True
            if seq.constraint is not None:
                seq.constraint.accept(token)
            self._keep_token(seq, token, entry)
            self.stats.tokens_generated += 1
            r.next_token = token
            if self._row_done(seq) or r.position >= self.context_length:
                r.finished = True
                self._end_row(seq)


@dataclass(eq=False)
class _Row:
    """A running row of the continuous scheduler: its slot in the KV cache and its sampling state."""

    seq: Sequence
    slot: int
    position: int = 0  # where the next token goes (= tokens in the cache)
    next_token: int = 0
    finished: bool = False
    generator: Optional[torch.Generator] = None
    present: Optional[torch.Tensor] = None  # [V] bool, tokens in the context (repetition penalty)
    counts: Optional[torch.Tensor] = None  # [V] generated-token counts (frequency/presence penalties)



def _penalise(row: _Row, logits: torch.Tensor) -> torch.Tensor:
    """OpenAI's frequency/presence penalties, then Hugging Face's repetition penalty, on one row's logits [V]."""
    p = row.seq.request.params
    if row.counts is not None:
        logits = logits - p.frequency_penalty * row.counts - p.presence_penalty * (row.counts > 0)
    if row.present is not None:
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(row.present, penalised, logits)
    return logits


def _constrain(logits: torch.Tensor, constraints: list) -> torch.Tensor:
    """``logits`` [B, V] with each row's grammar applied (rows whose constraint is None are left alone)."""
    logits = logits.clone()
    for i, constraint in enumerate(constraints):
        if constraint is not None:
            logits[i] = constraint.mask(logits[i])
    return logits
