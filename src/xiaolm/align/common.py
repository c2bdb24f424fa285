"""Pieces every alignment verb shares: encoding prompt + response, per-sequence log-probabilities with the prompt
masked out, padded batches, reference log-probabilities computed once, on-policy sampling, and the rule reward.

Encoding. A response to chat ``messages`` is the ChatML prompt (exactly what ``xiaolm sft`` trains on and
``apply_chat_template(..., add_generation_prompt=True)`` gives at inference; contents encoded with
``allow_special=False``), then the response tokens, then ``<|im_end|>`` when the response finished (a response cut
off at the length limit gets no end marker: the model must not learn to stop there). Only the response tokens and
that end marker carry labels. A sequence longer than ``seq_len + 1`` tokens loses the end of its response (counted);
one whose prompt alone fills the context is dropped (counted).

Log-probabilities. ``response_logps`` returns, for a right-padded batch, the per-token log-probabilities of the
labelled tokens; summing them gives the sequence log-probability, dividing by the count the average one.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from xiaolm.config import opt
from xiaolm.infer.generate import SamplingConfig
from xiaolm.model.losses import token_logprobs
from xiaolm.train.engine import TrainConfig
from xiaolm.tokenizer.chat import prompt_ids
from xiaolm.tokenizer.detok import decode_clean

# ------------------------------------------------------------------------------------------------ encoding


@dataclass
class Sequence:
    """One prompt + response: ``inputs[t]`` predicts ``targets[t]``; -100 marks the prompt (no label)."""

    inputs: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def response_tokens(self) -> int:
        return int((self.targets != -100).sum())


@dataclass
class EncodeCounts:
    sequences: int = 0
    truncated: int = 0
    dropped: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def build_sequence(prompt: list[int], response: list[int], finished: bool, end_id: int, seq_len: int,
                   counts: Optional[EncodeCounts] = None) -> Optional[Sequence]:
    """Prompt ids + response ids (+ ``end_id`` when finished) as a Sequence of at most ``seq_len`` inputs, or None
    when the prompt leaves no room for a single response token."""
    full = list(prompt) + list(response) + ([end_id] if finished else [])
    n_prompt = len(prompt)
    if counts is not None:
        counts.sequences += 1
    if len(full) - 1 > seq_len:
        if n_prompt > seq_len:  # not even one labelled target would fit
            if counts is not None:
                counts.dropped += 1
            return None
        full = full[: seq_len + 1]
        if counts is not None:
            counts.truncated += 1
    if len(full) <= n_prompt:
        if counts is not None:
            counts.dropped += 1
        return None
    arr = np.asarray(full, dtype=np.int64)
    targets = arr[1:].copy()
    targets[: n_prompt - 1] = -100
    return Sequence(arr[:-1].copy(), targets)


def encode_response(tokenizer, messages: list[dict], response: str, seq_len: int, finished: bool = True,
                    counts: Optional[EncodeCounts] = None, prompt: Optional[list[int]] = None) -> Optional[Sequence]:
    """``messages`` (the prompt turns) answered by ``response`` text; see ``build_sequence``."""
    p = prompt if prompt is not None else prompt_ids(tokenizer, messages)
    r = tokenizer.encode(response, allow_special=False)
    return build_sequence(p, r, finished, tokenizer.im_end_id, seq_len, counts)


def pad_batch(seqs: list[Sequence], pad_id: int) -> dict:
    """Right-padded ``input_ids`` / ``targets`` [B, T] (causal attention never looks at the padding on the right)."""
    width = max(len(s) for s in seqs)
    x = np.full((len(seqs), width), pad_id, dtype=np.int64)
    y = np.full((len(seqs), width), -100, dtype=np.int64)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = s.inputs
        y[i, : len(s)] = s.targets
    return {"input_ids": torch.from_numpy(x), "targets": torch.from_numpy(y)}


# ------------------------------------------------------------------------------------------------ log-probabilities


def response_logps(model, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities [B, T] of the labelled tokens (0 where ``targets`` is -100)."""
    logits = model(input_ids).logits
    return token_logprobs(logits, targets)


def sequence_logps(model, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of response log-probabilities [B], response token counts [B])``."""
    tok = response_logps(model, input_ids, targets)
    return tok.sum(-1), (targets != -100).sum(-1)


@torch.no_grad()
def precompute_logps(model, seqs: list[Sequence], pad_id: int, batch_size: int = 32,
                     autocast: Optional[Callable] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probabilities and token counts of ``seqs`` under ``model`` (float64 sums on CPU), computed in
    length-sorted batches. This is how the reference model's numbers are made once, before training, so the
    reference never has to stay in memory beside the policy."""
    was_training = model.training
    model.eval()
    device = model.device
    sums = torch.zeros(len(seqs), dtype=torch.float64)
    counts = torch.zeros(len(seqs), dtype=torch.long)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pad_batch([seqs[i] for i in idx], pad_id)
        ctx = autocast() if autocast is not None else _null()
        with ctx:
            s, c = sequence_logps(model, batch["input_ids"].to(device), batch["targets"].to(device))
        sums[idx] = s.double().cpu()
        counts[idx] = c.cpu()
    model.train(was_training)
    return sums, counts


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------ rule reward


@dataclass
class RewardWeights:
    """How the rule-based verifier's checks become one number (``rule_reward``)."""

    repetition_weight: float = 1.0  # minus this times the share of repeated 4-grams
    all_met_bonus: float = 0.5  # added when every counted check passes
    word_credit: float = 0.0  # plus this times the share of the 词汇 words present (partial credit)
    markers: bool = False  # count the marker checks (悲伤的结局, 寓意, ...) too

    @classmethod
    def of(cls, cfg) -> "RewardWeights":
        """The weights a stage's config carries under the same names (pairs, DPO rounds, GRPO)."""
        return cls(cfg.repetition_weight, cfg.all_met_bonus, cfg.word_credit, cfg.markers)


def rule_reward(constraints: dict, text: str, weights: Optional[RewardWeights] = None) -> float:
    """``xiaolm.tasks.constraints.constraint_reward`` (share of checks met + bonus when all are met - repetition; -1
    for an empty answer), plus optional partial credit for each required word that appears."""
    from xiaolm.tasks.constraints import constraint_reward, words_present

    w = weights or RewardWeights()
    score = constraint_reward(constraints, text, repetition_weight=w.repetition_weight,
                              all_met_bonus=w.all_met_bonus, markers=w.markers)
    words = constraints.get("词汇") or []
    if w.word_credit and words and text.strip():
        score += w.word_credit * words_present(text, words) / len(words)
    return score


# ------------------------------------------------------------------------------------------------ sampling


@dataclass
class PolicySampling(SamplingConfig):
    """Sampling from the policy for pairs and GRPO: its own distribution (temperature 1) and a fixed seed by default.
    (A subclass, not a factory default: a config section given any flag is rebuilt from its class's defaults.)"""

    max_new_tokens: int = opt(256, "tokens to generate at most")
    temperature: float = opt(1.0, "sampling temperature (1: the policy's own distribution)")
    seed: Optional[int] = opt(0, "random seed for sampling (each batch gets its own stream derived from it)")


@dataclass
class Sample:
    """One sampled response: its token ids (without the end marker), text, and whether it ended by itself (then
    ``end`` is the end-of-turn / end-of-text token it ended with)."""

    ids: list[int]
    text: str
    finished: bool
    end: Optional[int] = None


@dataclass
class SamplingStats:
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    finished: int = 0
    batches: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        return {"samples": self.samples, "tokens": self.tokens, "seconds": round(self.seconds, 2),
                "samples_per_s": round(self.samples_per_s, 2), "tokens_per_s": round(self.tokens_per_s, 1),
                "finished_share": round(self.finished / max(1, self.samples), 4), "batches": self.batches}


def sample_responses(model, tokenizer, prompts: list[list[int]], k: int, *, max_new_tokens: int,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                     batch_size: int = 64, seed: int = 0, stats: Optional[SamplingStats] = None,
                     ) -> list[list[Sample]]:
    """``k`` sampled responses to each prompt (token ids), generated ``batch_size`` sequences at a time on the
    model's device with the KV cache. Each batch has its own generator seeded by ``(seed, batch index)``, so the
    same weights and seed give the same samples. Returns one list of ``k`` samples per prompt."""
    from xiaolm.infer.generate import generate_ids

    stats = stats if stats is not None else SamplingStats()
    was_training = model.training
    model.eval()
    eos = {tokenizer.eot_id, tokenizer.im_end_id}
    jobs = [(p, j) for p in range(len(prompts)) for j in range(k)]
    out: list[list[Optional[Sample]]] = [[None] * k for _ in prompts]
    device = model.device
    t0 = time.perf_counter()
    for b, start in enumerate(range(0, len(jobs), max(1, batch_size))):
        chunk = jobs[start : start + batch_size]
        gen = torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + b)
        ids = generate_ids(
            model, [prompts[p] for p, _ in chunk], max_new_tokens, pad_id=tokenizer.pad_id, eos_ids=(),
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
            generator=gen, should_stop=lambda _row, new: new[-1] in eos,
        )
        for (p, j), row in zip(chunk, ids):
            finished = bool(row) and row[-1] in eos
            body = row[:-1] if finished else row
            # the shared detokenizer's text: a character cut off at the budget is left out, not U+FFFD
            out[p][j] = Sample(body, decode_clean(tokenizer, body)[0], finished,
                               row[-1] if finished else None)
            stats.samples += 1
            stats.tokens += len(row)
            stats.finished += int(finished)
        stats.batches += 1
    stats.seconds += time.perf_counter() - t0
    model.train(was_training)
    return out  # type: ignore[return-value]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of ``n`` items for ``epoch`` (a pure function: resume sees the same order)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def items_for(n: int, seed: int, first: int, count: int) -> list[int]:
    """Global item indices ``first .. first+count`` mapped through per-epoch permutations of ``n`` items."""
    out = []
    cache: dict[int, np.ndarray] = {}
    for g in range(first, first + count):
        epoch, pos = divmod(g, n)
        if epoch not in cache:
            cache[epoch] = epoch_order(n, seed, epoch)
        out.append(int(cache[epoch][pos]))
    return out


class SeededBatches:
    """The item indices of ``batch_fn(step, micro)``: ``micro_batch`` items per micro-batch per rank, a pure function
    of (step, micro, rank) over per-epoch seeded permutations, so a resumed run or another world size sees the same
    global batches. Subclasses turn ``indices`` into tensors in ``__call__``."""

    empty = "no training examples"

    def __init__(self, data, micro_batch: int, accum: int, env, seed: int, pad_id: int):
        if not len(data):
            raise ValueError(self.empty)
        self.data, self.micro_batch, self.accum, self.env = data, micro_batch, accum, env
        self.seed, self.pad_id = seed, pad_id

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accum * self.env.world_size

    def indices(self, step: int, micro: int) -> list[int]:
        first = step * self.global_batch + (micro * self.env.world_size + self.env.rank) * self.micro_batch
        return items_for(len(self.data), self.seed, first, self.micro_batch)


def steps_for_epochs(epochs: float, n: int, global_batch: int) -> int:
    return max(1, math.ceil(epochs * n / max(1, global_batch)))


# ------------------------------------------------------------------------------------------------ training


@dataclass
class PairTrainConfig(TrainConfig):
    """The shared training options with defaults for training on preference pairs from a trained model (DPO and
    the reward model): short warmup, no weight decay; each verb sets its own lr (and micro-batch)."""

    warmup_steps: int = opt(10, "linear warmup steps (capped at 10% of the run)")
    micro_batch_size: int = opt(16, "pairs per forward/backward on each device")
    weight_decay: float = opt(0.0, "AdamW weight decay (matrices only)")
    eval_every: int = opt(100, "evaluate (and save) every N steps; 0: only at the end")
    # Pairs padded to each batch's longest row change shape every step (a compile per shape): eager until they are
    # bucketed. No language-model loss to chunk: 0, so that device resolution leaves these unused fields alone.
    compile: Optional[bool] = opt(False, "torch.compile the model")
    loss_chunk_size: Optional[int] = opt(0, "unused: the pair losses need every token's log-probability")
