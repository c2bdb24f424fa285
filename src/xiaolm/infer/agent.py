"""Episodes with tools in the loop: generate an assistant turn; if it calls tools, run them (sandboxed), append the
results as a ``tool`` turn and the next generation prompt, and generate again, until a turn answers without a call,
a call is malformed, the turn limit, or the context is reached. Batched over all live episodes at each turn.

Every token is kept with whether the model produced it (``Episode.labels``): GRPO learns from exactly those (its
turns and their ``<|im_end|>``) and never from the tool responses or the prompts between turns; ``xiaolm eval tools``
reads the calls and the final answer. The text appended between turns is the chat format's own rendering
(``conversation_segments`` of the tool turns), so an episode's ids are what a full rendering would encode.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from xiaolm.tokenizer.chat import SegmentEncoder, Segment, conversation_segments, parse_assistant_text


@dataclass
class Episode:
    ids: list[int]  # the prompt and everything after it
    labels: list[bool]  # True on the tokens the model produced
    prompt_len: int
    calls: list[dict] = field(default_factory=list)  # {"name", "arguments"} of every parsed call, in order
    results: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # malformed calls
    turns: list[str] = field(default_factory=list)  # each generated turn's text (markers kept)
    final: Optional[str] = None  # the answer of the last turn (None: the episode never answered)
    reasoning: Optional[str] = None  # the last turn's think block
    ended: str = "running"  # answered | malformed | turn_limit | length

    @property
    def done(self) -> bool:
        return self.ended != "running"


@dataclass
class EpisodeStats:
    episodes: int = 0
    turns: int = 0
    tokens: int = 0
    tool_calls: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"episodes": self.episodes, "turns": self.turns, "tokens": self.tokens, "tool_calls": self.tool_calls,
                "seconds": round(self.seconds, 2), "tokens_per_s": round(self.tokens / max(self.seconds, 1e-9), 1)}


def tool_turn_ids(tokenizer, results: list[str], enable_thinking: Optional[bool], encoder: SegmentEncoder,
                  ) -> list[int]:
    """Ids after an assistant's ``<|im_end|>``: the newline, the tool turn holding ``results`` and the generation
    prompt (results are literal text: a marker they spell stays text)."""
    segs = [Segment("\n")] + conversation_segments([{"role": "tool", "content": r} for r in results],
                                                   enable_thinking=enable_thinking, add_generation_prompt=True)
    return encoder.encode_many([segs], drop_final_newline=False)[0][0]


@torch.no_grad()
def run_episodes(model, tokenizer, prompts: list[list[int]], execute: Callable[[str, dict], str], *,
                 enable_thinking: Optional[bool] = None, max_turns: int = 4, max_new_tokens: int = 128,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
                 stats: Optional[EpisodeStats] = None) -> list[Episode]:
    """One episode per prompt (token ids ending with the generation prompt). ``execute(name, arguments) -> str``
    runs a call (``xiaolm.tasks.toolbox.call_tool``: the sandbox). Seeded per (seed, turn, batch)."""
    from xiaolm.infer.generate import generate_ids

    stats = stats if stats is not None else EpisodeStats()
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    context = model.config.max_position_embeddings
    eos = {tokenizer.eot_id, tokenizer.im_end_id}
    encoder = SegmentEncoder(tokenizer)
    episodes = [Episode(list(p), [False] * len(p), len(p)) for p in prompts]
    for turn in range(max_turns):
        live = [e for e in episodes if not e.done]
        for e in live:
            if len(e.ids) + 8 > context:  # no room for a useful turn
                e.ended = "length"
        live = [e for e in live if not e.done]
        if not live:
            break
        order = sorted(range(len(live)), key=lambda i: len(live[i].ids))  # similar lengths batch together
        for b, start in enumerate(range(0, len(order), max(1, batch_size))):
            chunk = [live[i] for i in order[start:start + batch_size]]
            gen = torch.Generator(device=model.device).manual_seed(int(seed) * 1_000_003 + turn * 10_007 + b)
            rows = generate_ids(model, [e.ids for e in chunk], max_new_tokens, pad_id=tokenizer.pad_id, eos_ids=(),
                                temperature=temperature, top_k=top_k, top_p=top_p, generator=gen,
                                should_stop=lambda _row, new: new[-1] in eos)
            for e, row in zip(chunk, rows):
                stats.tokens += len(row)
                stats.turns += 1
                finished = bool(row) and row[-1] in eos
                body = row[:-1] if finished else row
                e.ids += row
                e.labels += [True] * len(row)
                text = tokenizer.decode(body, skip_special_tokens=False)
                e.turns.append(text)
                parsed = parse_assistant_text(text)
                e.reasoning = parsed.reasoning
                e.errors += parsed.errors
                e.calls += parsed.tool_calls
                if not finished:
                    e.ended = "length"
                elif parsed.errors and not parsed.tool_calls:
                    e.ended = "malformed"
                elif parsed.tool_calls:
                    results = [execute(c["name"], c["arguments"]) for c in parsed.tool_calls]
                    stats.tool_calls += len(results)
                    e.results += results
                    more = tool_turn_ids(tokenizer, results, enable_thinking, encoder)
                    e.ids += more
                    e.labels += [False] * len(more)
                    if turn == max_turns - 1:
                        e.ended = "turn_limit"
                else:
                    e.final = parsed.content
                    e.ended = "answered"
    for e in episodes:
        if not e.done:
            e.ended = "turn_limit"
        if len(e.ids) > context:  # the last tool turn may overrun the context: keep what the model can see
            e.ids, e.labels = e.ids[:context], e.labels[:context]
    stats.episodes += len(episodes)
    stats.seconds += time.perf_counter() - t0
    model.train(was_training)
    return episodes
