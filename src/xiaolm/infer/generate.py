"""Text generation: KV cache, sampling controls, stop strings, batched prompts, and streaming that never prints a
broken character.

A Han character is three UTF-8 bytes and a byte-level BPE token may hold only part of one, so decoding token by
token can produce U+FFFD halfway through a character. ``StreamDecoder`` prints only text that is complete and cannot
still turn into a stop string.
"""
from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from xiaolm.config import opt
from xiaolm.infer.cache import new_cache
from xiaolm.infer.limits import limit_problem

# ------------------------------------------------------------------------------------------------ sampling


@dataclass
class SamplingConfig:
    max_new_tokens: int = opt(200, "tokens to generate at most")
    temperature: float = opt(0.8, "sampling temperature; 0 is greedy")
    top_k: int = opt(0, "sample from the k most likely tokens (0: off)")
    top_p: float = opt(1.0, "nucleus sampling: smallest set of tokens with this much probability (1: off)")
    repetition_penalty: float = opt(1.0, "divide the logits of tokens already present by this (1: off)")
    stop: list[str] = opt([], "stop strings (the text ends before the first one)")
    seed: Optional[int] = opt(None, "random seed for sampling (default: nondeterministic)")


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float, valid=None) -> torch.Tensor:
    """Hugging Face's rule: logits of tokens present in ``context`` are divided by ``penalty`` when positive and
    multiplied when negative. ``valid`` [B, S] excludes padding from the context."""
    if penalty == 1.0:
        return logits
    weight = torch.ones_like(context) if valid is None else valid.long()
    present = torch.zeros(logits.shape, dtype=torch.long, device=logits.device).scatter_add_(1, context, weight) > 0
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(present, penalised, logits)


def sample_rows(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]; -1 for a row whose numbers went bad (a NaN or an
    infinite logit, or no token left with any probability), so a batch can fail that row alone.

    ``temperature`` 0 or ``top_p`` 0 is greedy. A bad row is given a harmless distribution before drawing, so the
    other rows draw exactly what they would have drawn without it."""
    logits = logits.float()
    if temperature <= 0 or top_p <= 0:
        ok = ~(logits.isnan() | logits.isposinf()).any(-1) & logits.isfinite().any(-1)
        return torch.where(ok, logits.argmax(dim=-1), -1)
    logits = logits / temperature
    ok = ~(logits.isnan() | logits.isposinf()).any(-1)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p (so the first token always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    ok &= probs.isfinite().all(-1) & (probs.sum(-1) > 0)
    if not bool(ok.all()):
        probs = torch.where(ok[:, None], probs, torch.ones_like(probs))
    return torch.where(ok, torch.multinomial(probs, 1, generator=generator).squeeze(1), -1)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]; raises ``FloatingPointError`` naming the rows whose
    numbers went bad (``sample_rows`` reports them instead)."""
    tokens = sample_rows(logits, temperature, top_k, top_p, generator)
    bad = (tokens < 0).nonzero().flatten().tolist()
    if bad:
        raise FloatingPointError(f"sampling failed for row(s) {bad}: their logits are NaN or infinite")
    return tokens


# ------------------------------------------------------------------------------------------------ core loop


@torch.no_grad()
def generate_ids(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    pad_id: int,
    eos_ids: Iterable[int] = (),
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    should_stop: Optional[Callable[[int, list[int]], bool]] = None,
    on_token: Optional[Callable[[int, int], None]] = None,
    static_cache: bool = False,
    compile_step: bool = False,
    logits_processor: Optional[Callable[[torch.Tensor, list[list[int]]], torch.Tensor]] = None,
    on_eos: Optional[Callable[[int, int], None]] = None,
    on_bad_row: Optional[Callable[[int], None]] = None,
) -> list[list[int]]:
    """Generate for a batch of token-id prompts (left-padded together); returns each row's new tokens.

    A row ends at an ``eos_ids`` token (not included in its output), when ``should_stop(row, new_ids)`` says so,
    or after ``max_new_tokens``. ``on_token(row, id)`` is called for every token kept (for streaming).
    ``static_cache`` keeps every decode step's shapes fixed and ``compile_step`` compiles that step (on CUDA with
    CUDA graphs, ``mode="reduce-overhead"``): the fast path for GPUs, where a small model's decode is launch-bound.
    ``logits_processor(logits [B, V] float32, outputs)`` sees each step's raw logits first and returns the logits
    to sample from (the server records log-probabilities and applies frequency/presence penalties there).
    ``on_eos(row, id)`` is called when a row ends at an end-of-text token (which is not part of its output).
    A row whose numbers go bad (NaN or infinite logits) raises ``FloatingPointError``; with ``on_bad_row(row)`` it
    ends there instead and the other rows go on as if it were not there.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.device
    B = len(prompts)
    longest = max(len(p) for p in prompts)
    limit = model.config.max_position_embeddings
    if longest + max_new_tokens > limit:
        max_new_tokens = max(0, limit - longest)
    input_ids = torch.full((B, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((B, longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    eos_set = set(eos_ids)
    outputs: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    context, context_mask = input_ids, mask
    padded = not bool(mask.all())

    static = static_cache or compile_step
    cache = None
    if use_cache and max_new_tokens > 0:
        if compile_step:
            cache = _reused_static_cache(model, B, longest + max_new_tokens)
        else:
            cache = new_cache(model, B, longest + max_new_tokens, static=static)
    decode = _decode_step(model, compile_step) if cache is not None and static else None
    step_ids, step_mask = input_ids, (mask if padded else None)
    for t in range(max_new_tokens):
        if decode is not None and t > 0:
            logits = decode(step_ids, cache)
        elif cache is not None:
            logits = model(step_ids, attention_mask=step_mask, cache=cache, logits_to_keep=1).logits[:, -1]
        else:
            logits = model(context, attention_mask=context_mask if padded else None, logits_to_keep=1).logits[:, -1]
        logits = logits.float()
        if logits_processor is not None:
            logits = logits_processor(logits, outputs)
        logits = apply_repetition_penalty(logits, context, repetition_penalty, context_mask if padded else None)
        nxt = sample_rows(logits, temperature, top_k, top_p, generator)
        tokens = nxt.tolist()  # the one host sync per step: the host decides who stops (eos, stop strings)
        bad = [i for i, tok in enumerate(tokens) if tok < 0 and not done[i]]
        if bad and on_bad_row is None:
            raise FloatingPointError(f"sampling failed for row(s) {bad}: their logits are NaN or infinite")
        for i, tok in enumerate(tokens):
            if done[i]:
                continue
            if tok < 0:
                done[i] = True
                on_bad_row(i)
                continue
            if tok in eos_set:
                done[i] = True
                if on_eos is not None:
                    on_eos(i, tok)
                continue
            outputs[i].append(tok)
            if on_token is not None:
                on_token(i, tok)
            if should_stop is not None and should_stop(i, outputs[i]):
                done[i] = True
        if all(done):
            break
        if any(done):  # finished rows keep decoding padding (cheaper than reshaping the batch)
            nxt = torch.where(torch.tensor(done, device=device), torch.full_like(nxt, pad_id), nxt)
        step_ids = nxt[:, None]
        step_mask = torch.ones_like(step_ids) if padded else None
        context = torch.cat([context, step_ids], dim=1)
        context_mask = torch.cat([context_mask, torch.ones_like(step_ids)], dim=1)
    return outputs


_STATE_ATTR = "_xiaolm_decode_state"
MAX_STATIC_CACHES = 8  # per model: batch sizes x power-of-two lengths kept for the compiled step


def _decode_state(model) -> dict:
    """The compiled decode step and static caches of ``model``, kept on the model itself so they go when it goes
    (module-level dicts keyed by ``id(model)`` kept every model that ever generated alive, and could hand a new
    model at a reused id another model's step). ``owner`` catches a ``copy.deepcopy`` of the model, whose copied
    attribute would still point at the original's step."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None or state["owner"]() is not model:
        state = {"owner": weakref.ref(model), "compiled": None, "caches": {}}
        object.__setattr__(model, _STATE_ATTR, state)  # plain attribute: not a submodule, not in the state_dict
    return state


def _reused_static_cache(model, batch: int, need: int):
    """A static cache of at least ``need`` slots for the compiled step, reused across calls.

    The length is rounded up to a power of two (masked slots change nothing), so varying prompt lengths do not
    recompile the step for every new shape (dynamo gives up after ``recompile_limit`` shapes), and the same
    tensors are reused, so a CUDA graph captured on them replays instead of being recorded again.
    """
    limit = model.config.max_position_embeddings
    size = min(max(64, 1 << (need - 1).bit_length()), max(limit, need))
    caches = _decode_state(model)["caches"]
    key = (batch, size, model.model.embed_tokens.weight.dtype, str(model.device))
    cache = caches.get(key)
    if cache is None:
        if len(caches) >= MAX_STATIC_CACHES:  # bounded: drop the oldest
            caches.pop(next(iter(caches)))
        cache = caches[key] = new_cache(model, batch, size, static=True)
    else:
        cache.reset()
    return cache


def _decode_step(model, compile_step: bool):
    """One decode step with fixed shapes (static cache, one token per row, every row valid)."""

    def step(ids, cache):
        return model(ids, cache=cache, logits_to_keep=1).logits[:, -1]

    if not compile_step:
        return step
    state = _decode_state(model)
    if state["compiled"] is None:
        mode = "reduce-overhead" if model.device.type == "cuda" else "default"
        state["compiled"] = torch.compile(step, mode=mode, dynamic=False)
    return state["compiled"]


# ------------------------------------------------------------------------------------------------ text level


class StreamDecoder:
    """Turns generated token ids into text deltas that are safe to print.

    Characters come from the shared incremental detokenizer (``xiaolm.tokenizer.detok.Detokenizer``: an incomplete
    UTF-8 tail waits for the token that completes it, a sequence that can never complete is dropped and counted);
    a tail that might be the beginning of a stop string is held back too. ``finish()`` flushes the rest and drops an
    incomplete character the generation ended inside (counted in ``dropped_bytes``). ``keep_ids``: special tokens
    whose text is kept (the detokenizer drops special tokens).
    """

    def __init__(self, tokenizer, stop: Iterable[str] = (), keep_ids: Iterable[int] = ()):
        from xiaolm.tokenizer.detok import Detokenizer

        self.detok = Detokenizer(tokenizer)
        self.stop = [s for s in stop if s]
        # special tokens that stay in the text (the thinking and tool-call markers: their parser reads them)
        self.kept = {i: tokenizer.decode([i]) for i in keep_ids}
        self.ids: list[int] = []
        self.full = ""                   # every completed character so far
        self.cut: Optional[int] = None   # where the first stop string starts in ``full``
        self.emitted = 0
        self.stopped = False
        self.finished = False

    @property
    def dropped_bytes(self) -> int:
        return self.detok.dropped_bytes

    def _append(self, piece: str) -> None:
        if not piece:
            return
        # text before ``start`` was searched already: a new match must end in the new piece
        start = max(0, len(self.full) - max((len(s) for s in self.stop), default=1) + 1)
        self.full += piece
        if self.stopped:
            return
        for s in self.stop:
            i = self.full.find(s, start)
            if i != -1 and (self.cut is None or i < self.cut):
                self.cut = i
        self.stopped = self.cut is not None

    def text(self) -> str:
        return self.full if self.cut is None else self.full[:self.cut]

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        self._append(self.kept[token_id] if token_id in self.kept else self.detok.push(token_id))
        text = self.text()
        safe = len(text)
        if not self.stopped:
            for s in self.stop:  # keep back a tail that could still grow into a stop string
                for k in range(min(len(s) - 1, safe - self.emitted), 0, -1):
                    if text[safe - k : safe] == s[:k]:
                        safe -= k
                        break
        delta = text[self.emitted : safe]
        self.emitted = safe
        return delta

    def finish(self) -> str:
        if not self.finished:
            self.finished = True
            self.detok.finish()
        text = self.text()
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta


# ------------------------------------------------------------------------------------------------ prompts

def plain_prompt_ids(tokenizer, text: str) -> list[int]:
    """A plain (non-chat) prompt: ``<|endoftext|>`` first, since every training document starts after one, then the
    text encoded as text (a literal ``<|im_start|>`` in it stays text). ``xiaolm generate`` and the server's
    ``/v1/completions`` share this rule."""
    return [tokenizer.eot_id] + tokenizer.encode(text, allow_special=False)


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    """The chat prompt for ``messages``, ending with ``<|im_start|>assistant\\n``, encoded exactly as ``xiaolm sft``
    trains: only the template's markers are control tokens, so a content that spells ``<|im_end|>`` cannot forge a
    turn. ``xiaolm chat``, ``generate --chat`` and the server's chat endpoint share this rule."""
    from xiaolm.tokenizer.chat import prompt_ids

    return prompt_ids(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])


def sampling_problem(s: SamplingConfig) -> Optional[str]:
    """What is wrong with sampling settings given as flags (one line naming the flag), or None. The ranges are
    ``SAMPLING_LIMITS``', the server's too."""
    checks = [("max_tokens", "--max-new-tokens", s.max_new_tokens), ("temperature", "--temperature", s.temperature),
              ("top_p", "--top-p", s.top_p), ("top_k", "--top-k", s.top_k),
              ("repetition_penalty", "--repetition-penalty", s.repetition_penalty)]
    if s.seed is not None:
        checks.append(("seed", "--seed", s.seed))
    for name, flag, value in checks:
        problem = limit_problem(name, value, flag)
        if problem:
            return problem
    return None


def load_sampling_model(cfg, problem: Optional[str] = None):
    """The model and tokenizer of ``cfg.run`` (on ``cfg.device``) for chat and generate, once the sampling flags
    and then ``problem`` (the caller's own check, None when it passed) are fine; any failure is a one-line error."""
    from xiaolm.model.io import CheckpointError, load_model
    from xiaolm.utils import fail, pick_device

    problem = sampling_problem(cfg.sampling) or problem
    if problem:
        raise fail(problem)
    try:
        model, tokenizer, _info = load_model(cfg.run, device=pick_device(cfg.device), which=cfg.checkpoint)
    except CheckpointError as exc:
        raise fail(str(exc))
    return model, tokenizer


def _eos_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eot_id]
    if getattr(tokenizer, "im_end_id", None) is not None:
        ids.append(tokenizer.im_end_id)
    return ids


@dataclass
class Generated:
    """One generation: its text (cut at the first stop string), why it ended (``"eos"``: the model's end-of-text or
    end-of-turn, ``"stop"``: a stop string, ``"length"``: the token budget), its token count and the bytes of broken
    characters dropped (never shown as U+FFFD)."""

    text: str
    ended: str
    tokens: int
    dropped_bytes: int = 0


def _budget_groups(ids: list[list[int]], max_new_tokens: int, context: int) -> list[list[int]]:
    """Rows that can be generated together without one taking another's budget: a batch shares the positions of
    its longest prompt, so a prompt that leaves less than ``max_new_tokens`` of the context runs alone (with what is
    left to it) instead of cutting every other row of the batch short."""
    fits = [r for r, p in enumerate(ids) if len(p) + max_new_tokens <= context]
    return ([fits] if fits else []) + [[r] for r, p in enumerate(ids) if len(p) + max_new_tokens > context]


def generate_samples(
    model,
    tokenizer,
    prompts: list[str],
    sampling: Optional[SamplingConfig] = None,
    *,
    stream: Optional[Callable[[int, str], None]] = None,
    prompt_ids: Optional[list[list[int]]] = None,
    eos_ids: Optional[Iterable[int]] = None,
    use_cache: bool = True,
    keep_ids: Iterable[int] = (),
) -> list[Generated]:
    """Continue each prompt; returns a ``Generated`` per prompt (prompt excluded).

    ``stream(row, delta)`` receives printable text as it is produced. ``prompt_ids`` overrides the encoding of
    ``prompts`` (e.g. a chat template already rendered and encoded). ``keep_ids``: special tokens that stay in the
    text (the thinking and tool-call markers, for a caller that parses them).
    """
    s = sampling or SamplingConfig()
    ids = prompt_ids if prompt_ids is not None else [plain_prompt_ids(tokenizer, p) for p in prompts]
    generator = None
    if s.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(s.seed)
    decoders = [StreamDecoder(tokenizer, s.stop, keep_ids) for _ in ids]
    at_eos = [False] * len(ids)

    def on_token(row: int, tok: int) -> None:
        delta = decoders[row].push(tok)
        if stream is not None and delta:
            stream(row, delta)

    outputs: list[list[int]] = [[] for _ in ids]
    eos = list(_eos_ids(tokenizer) if eos_ids is None else eos_ids)  # an iterator would be spent by the first group
    for rows in _budget_groups(ids, s.max_new_tokens, model.config.max_position_embeddings):
        group = generate_ids(
            model, [ids[r] for r in rows], s.max_new_tokens, pad_id=tokenizer.pad_id, eos_ids=eos,
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
            generator=generator, use_cache=use_cache, on_token=lambda i, tok, rows=rows: on_token(rows[i], tok),
            should_stop=(lambda i, _ids, rows=rows: decoders[rows[i]].stopped) if s.stop else None,
            on_eos=lambda i, _tok, rows=rows: at_eos.__setitem__(rows[i], True),
        )
        for r, out in zip(rows, group):
            outputs[r] = out
    results = []
    for row, dec in enumerate(decoders):
        tail = dec.finish()
        if stream is not None and tail:
            stream(row, tail)
        ended = "eos" if at_eos[row] else ("stop" if dec.stopped else "length")
        results.append(Generated(dec.text(), ended, len(outputs[row]), dec.dropped_bytes))
    return results


def generate(model, tokenizer, prompts: list[str], sampling: Optional[SamplingConfig] = None, **options) -> list[str]:
    """The texts of ``generate_samples`` (same arguments): each prompt's continuation, cut at the first stop
    string, broken characters dropped."""
    return [g.text for g in generate_samples(model, tokenizer, prompts, sampling, **options)]


# ------------------------------------------------------------------------------------------------ CLI


@dataclass
class GenerateConfig:
    """Continue a prompt with a trained model (streams to stdout)."""

    run: str = opt(None, "RUNDIR, checkpoint, quantised or Hugging Face directory")
    prompt: list[str] = opt([], "prompt text (repeat for several prompts, generated as one batch)")
    prompts_file: Optional[str] = opt(None, "file with one prompt per line (UTF-8; - reads them from stdin)")
    num_samples: int = opt(1, "samples per prompt")
    chat: bool = opt(False, "wrap each prompt in the chat template as a user turn")
    system: Optional[str] = opt(None, "system message for --chat")
    sampling: SamplingConfig = opt(factory=SamplingConfig)
    device: str = opt("auto", "auto, cpu, cuda or mps")
    checkpoint: str = opt("latest", "which checkpoint of a RUNDIR: latest or best")


def _decode_prompts(data: bytes, where: str) -> str:
    from xiaolm.utils import fail

    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise fail(f"{where}:{line}: not UTF-8 ({exc.reason}); convert it first, e.g. iconv -f GB18030 -t UTF-8")


def read_prompts_file(path: str) -> list[str]:
    """One prompt per non-blank line of ``path`` (``-``: stdin). A file without any is refused: generating from
    nothing is never what a prompts file asked for."""
    from xiaolm.utils import fail

    where = "stdin" if path == "-" else path
    if path == "-":
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    else:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise fail(f"--prompts-file {path}: {exc.strerror}")
    prompts = [line.rstrip("\r") for line in _decode_prompts(data, where).split("\n") if line.strip()]
    if not prompts:
        raise fail(f"--prompts-file {where}: no prompts (the file is empty or has blank lines only)")
    return prompts


def _piped_stdin() -> str:
    """Text piped on stdin, or "" on a terminal (or where stdin cannot be read, as under a test runner)."""
    try:
        if sys.stdin is None or sys.stdin.isatty():
            return ""
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    except (OSError, ValueError, AttributeError):
        return ""
    return _decode_prompts(data, "stdin")


def main(argv: list[str]) -> int:
    from xiaolm.config import parse_config
    from xiaolm.utils import fail

    cfg, _ = parse_config(
        GenerateConfig, argv, "xiaolm generate", positionals={"run": "RUNDIR"},
    )
    prompts = list(cfg.prompt)
    if cfg.prompts_file:
        prompts += read_prompts_file(cfg.prompts_file)
    elif not prompts:
        piped = _piped_stdin()  # `echo 从前 | xiaolm generate RUN`: the piped text is the prompt
        prompts = [piped.rstrip("\r\n")] if piped else [""]
    problem = f"--num-samples must be at least 1, got {cfg.num_samples}" if cfg.num_samples < 1 else None
    model, tokenizer = load_sampling_model(cfg, problem)
    prompts = [p for p in prompts for _ in range(cfg.num_samples)]
    prompt_ids = None
    if cfg.chat:
        prompt_ids = []
        for p in prompts:
            msgs = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [{"role": "user", "content": p}]
            prompt_ids.append(chat_prompt_ids(tokenizer, msgs))
    else:
        prompt_ids = [plain_prompt_ids(tokenizer, p) for p in prompts]
    context = model.config.max_position_embeddings
    for p, ids in zip(prompts, prompt_ids):
        if len(ids) >= context:
            shown = p if len(p) <= 40 else p[:40] + "..."
            raise fail(f"the prompt {shown!r} is {len(ids)} tokens, but the model's context window is {context} "
                       f"tokens, which leaves no room to generate; shorten it")
    if len(prompts) == 1:
        if not cfg.chat:
            sys.stdout.write(prompts[0])
        results = generate_samples(model, tokenizer, prompts, cfg.sampling, prompt_ids=prompt_ids,
                                   stream=lambda _row, delta: (sys.stdout.write(delta), sys.stdout.flush()))
        sys.stdout.write("\n")
    else:
        results = generate_samples(model, tokenizer, prompts, cfg.sampling, prompt_ids=prompt_ids)
        for i, (p, r) in enumerate(zip(prompts, results)):
            print(f"--- [{i}] ---")
            print(("" if cfg.chat else p) + r.text)
    note = dropped_note(results)
    if note:
        print(note, file=sys.stderr)
    return 0


def dropped_note(results: list[Generated]) -> Optional[str]:
    """One line saying how many bytes of broken characters were left out, or None when there were none."""
    dropped = sum(r.dropped_bytes for r in results)
    if not dropped:
        return None
    return (f"[{dropped} byte(s) of unfinished UTF-8 characters left out: the model ended or broke off inside a "
            f"character]")
