"""What the routes share: the served state and the steps of handling one completion request (check the model and
the lengths, submit rows to the engine, wait for a non-streamed answer, usage and logprobs of the answer)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional

from xiaolm.serve.body import DEFAULT_MAX_BODY_MB
from xiaolm.serve.engine import Engine
from xiaolm.serve.request import EngineClosed, GenerationRequest, QueueFull, SamplingParams, Sequence
from xiaolm.serve.errors import GENERATION_FAILED, LOG, APIError
from xiaolm.serve.logprobs import TextOffsets, completion_logprobs
from xiaolm.serve.schemas import CompletionRequest


@dataclass
class Served:
    """What the routes need; kept on ``app.state.served``."""

    engine: Engine
    tokenizer: Any
    model_name: str
    context_length: int
    default_max_tokens: int
    request_timeout: float
    created: int
    device: str
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2 ** 20)
    max_token_chars: Optional[int] = None  # no token covers more characters; None: no cheap bound
    _call_grammar: Any = None  # xiaolm.infer.constrain.CallGrammar, made on the first forced tool call

    def call_grammar(self):
        """The grammar compiler for forced tool calls (llguidance), made once; None if it cannot be."""
        if self._call_grammar is None:
            from xiaolm.infer.constrain import CallGrammar

            try:
                self._call_grammar = CallGrammar(self.tokenizer, self.engine.model.config.vocab_size,
                                                 self.engine.eos_ids)
            except (ImportError, ValueError) as exc:
                LOG.warning("serve: tool calls will not be constrained: %s", exc)
                self._call_grammar = False
        return self._call_grammar or None


def longest_token_chars(tokenizer) -> Optional[int]:
    """The most input characters one token can cover: with no normaliser, a token's string (bytes for byte-level
    BPE) is at least as long as the text it encodes. A prompt of C characters is then at least C / this tokens."""
    tok = getattr(tokenizer, "tok", None)
    if tok is None or tok.normalizer is not None:
        return None
    return max((len(t) for t in tok.get_vocab(with_added_tokens=False)), default=None)


def check_length_cheaply(chars: int, served: "Served", param: str) -> None:
    """Refuse a prompt whose character count alone proves it cannot fit, before tokenising it."""
    if served.max_token_chars and math.ceil(chars / served.max_token_chars) >= served.context_length:
        raise APIError(400, f"This model's maximum context length is {served.context_length} tokens. However, your "
                            f"prompt has {chars} characters, which is at least "
                            f"{math.ceil(chars / served.max_token_chars)} tokens. Please shorten it.",
                       param=param, code="context_length_exceeded")


@dataclass
class ResponseMeta:
    id: str
    created: int
    model: str


def check_model(name: str, served: Served) -> None:
    if name != served.model_name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{served.model_name}' "
                            f"(see GET /v1/models).", param="model", code="model_not_found")


def resolve_max_tokens(prompt_tokens: int, explicit: Optional[int], served: Served, prompt_param: str,
                        max_param: str, default: Optional[int] = None) -> int:
    """OpenAI's rule: a prompt plus an explicit max_tokens that overflow the context is rejected
    (context_length_exceeded); without an explicit max_tokens the default is clamped to what is left."""
    ctx = served.context_length
    if prompt_tokens >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your prompt is "
                            f"{prompt_tokens} tokens, which leaves no room for a completion. Please shorten it.",
                       param=prompt_param, code="context_length_exceeded")
    if explicit is not None:
        if prompt_tokens + explicit > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{prompt_tokens + explicit} tokens ({prompt_tokens} in the prompt, {explicit} in the "
                                f"completion). Please reduce the length of the prompt or of {max_param}.",
                           param=max_param, code="context_length_exceeded")
        return explicit
    wanted = default if default is not None else served.default_max_tokens
    return max(1, min(wanted, ctx - prompt_tokens))


def _logprob_settings(body) -> tuple[bool, int, Optional[int]]:
    """(logprobs, top_logprobs, prompt_logprobs) of a chat (``logprobs: bool``, ``top_logprobs: int``) or
    completions (``logprobs: int``; with ``echo`` the prompt is scored too) request."""
    if isinstance(body, CompletionRequest):
        if body.logprobs is None:
            return False, 0, None
        return True, body.logprobs, body.logprobs if body.echo else None
    return bool(body.logprobs), (body.top_logprobs or 0) if body.logprobs else 0, None


def submit(served: Served, prompts: list[list[int]], limits: list[int], body, rows_param: str,
           client: Optional[str], constraint=None, keep_ids: list[int] = ()) -> GenerationRequest:
    """Queue the request's rows for ``client`` (fair shares); ``constraint`` (each row's grammar) and ``keep_ids``
    (special tokens kept in the text) are the engine's."""
    if len(prompts) > served.engine.max_queue:  # would be refused however long the client waits: not a 429
        raise APIError(400, f"This request needs {len(prompts)} generation rows (prompts x n), more than this server "
                            f"ever queues ({served.engine.max_queue}, xiaolm serve --max-queue). Send fewer prompts "
                            f"or a smaller n.", param=rows_param, code="too_many_rows")
    logprobs, top_logprobs, prompt_logprobs = _logprob_settings(body)
    params = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        repetition_penalty=body.repetition_penalty or 1.0,
        seed=body.seed,
        ignore_eos=bool(body.ignore_eos),
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    gen = GenerationRequest(served.tokenizer, prompts, limits, params, body.stop_list(),
                            prompt_logprobs=prompt_logprobs, client=body.user or client, constraint=constraint,
                            keep_ids=keep_ids)
    try:
        served.engine.submit(gen)
    except QueueFull as exc:
        raise APIError(429, f"{exc}; retry shortly.", type="rate_limit_error", code="queue_full") from None
    except EngineClosed:
        raise APIError(503, "the server is shutting down.", type="server_error", code="shutting_down") from None
    except ValueError as exc:
        raise APIError(400, str(exc), code="context_length_exceeded") from None
    return gen


def log_disconnect(gen: GenerationRequest) -> None:
    """One line, no traceback: a client hanging up is routine."""
    LOG.info("serve: request %s: the client disconnected after %d tokens; its generation stopped", gen.id,
              sum(s.tokens for s in gen.sequences))


def check_completion_scoring(body: CompletionRequest) -> None:
    """max_tokens 0 only scores a prompt (echo); a streamed echo does not carry the prompt's logprobs."""
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be at least 1 (0 is allowed only with echo, to score the prompt).",
                       param="max_tokens", code="invalid_value")
    if body.stream and body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported when streaming; send it without stream.",
                       param="logprobs", code="unsupported_parameter")


def completion_choice_logprobs(tokenizer, seq: Sequence, body: CompletionRequest, prepended: bool) -> Optional[dict]:
    """The legacy logprobs of one choice: the prompt's tokens first when echoed (without the ``<|endoftext|>``
    we prepended to a text prompt, which is not part of the echoed text), then the generated ones."""
    if body.logprobs is None:
        return None
    entries, tokens = [], []
    if body.echo and seq.prompt_logprobs is not None:
        skip = 1 if prepended else 0
        entries, tokens = list(seq.prompt_logprobs[skip:]), list(seq.prompt_ids[skip:])
    entries += seq.logprobs
    tokens += [e.token for e in seq.logprobs]
    return completion_logprobs(tokenizer, entries, tokens, TextOffsets(), body.logprobs)


def usage_body(prompt_tokens: int, sequences: list[Sequence]) -> dict:
    completion = sum(s.tokens for s in sequences)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def collect(gen: GenerationRequest, request, served: Served) -> None:
    """Wait for a non-streamed request; a client that hangs up cancels it, and so does the timeout."""
    deadline = time.monotonic() + served.request_timeout
    errors: list[str] = []
    try:
        while True:
            event = await gen.next_event(timeout=0.5)
            if event is None:
                if await request.is_disconnected():
                    if not gen.cancelled:
                        log_disconnect(gen)
                    gen.cancel()
                if time.monotonic() > deadline:
                    gen.cancel()
                    raise APIError(504, f"the request did not finish within {served.request_timeout:.0f} s.",
                                   type="server_error", code="timeout")
                continue
            if event.kind == "done":
                break
            if event.kind == "error":
                errors.append(event.text)
    finally:
        gen.cancel()  # no-op when finished; frees the rows if this handler was cancelled
    if errors:
        LOG.error("serve: request %s: %s", gen.id, errors[0])
        raise APIError(500, GENERATION_FAILED, type="server_error", code="generation_failed")
    if any(s.finish_reason == "cancelled" for s in gen.sequences) and not await request.is_disconnected():
        raise APIError(503, "the request was cancelled because the server is shutting down.", type="server_error",
                       code="shutting_down")
