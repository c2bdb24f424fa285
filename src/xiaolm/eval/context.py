"""How a model does along its context: bits per character by position, and passkey retrieval.

Both are the standard long-context checks. ``by_position`` scores windows cut from long documents (each window
starts its own positions at 0, as the model sees it) and reports bits per character in position buckets, so a model
that collapses past the length it was trained at shows it in the buckets beyond. ``passkey`` hides a number in
filler text at chosen depths and asks for it back: retrieval needs copying from far back, which small models learn
late, so read its figures with the rank-among-ten column (chance 10%) beside the exact one.
"""
from __future__ import annotations

import math
import random
import re
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from xiaolm.config import opt, parse_config
from xiaolm.utils import atomic_write_json, fail, pick_device

# ------------------------------------------------------------------------------------------------ by position


def long_windows(tokens: np.ndarray, eot_id: int, seq_len: int) -> np.ndarray:
    """Windows of ``seq_len + 1`` tokens cut one after another from each document longer than that (a document's
    tail shorter than a window is left out), so every position bucket holds the same windows."""
    ends = np.flatnonzero(tokens == eot_id)
    starts = np.concatenate([[0], ends + 1])
    stops = np.concatenate([ends, [len(tokens)]])
    windows = []
    for a, b in zip(starts, stops):
        for w in range(a, b - seq_len, seq_len):
            windows.append(tokens[w : w + seq_len + 1])
    if not windows:
        raise ValueError(f"no document is longer than {seq_len} tokens: by-position scoring needs long documents")
    return np.stack(windows).astype(np.int64)


@torch.no_grad()
def bits_per_char_by_position(model, tokenizer, windows: np.ndarray, bucket: int, batch_size: int = 4) -> list[dict]:
    """Bits per character of the targets at positions [0, bucket), [bucket, 2 * bucket), ... of every window.

    Characters are counted by decoding each window's targets bucket by bucket (a character split by a bucket edge
    counts in both: at most one character per edge and window)."""
    seq_len = windows.shape[1] - 1
    edges = list(range(0, seq_len, bucket)) + [seq_len]
    nats = np.zeros(len(edges) - 1)
    chars = np.zeros(len(edges) - 1)
    device = model.device
    for i in range(0, len(windows), batch_size):
        rows = torch.from_numpy(windows[i : i + batch_size]).to(device)
        x, y = rows[:, :-1], rows[:, 1:]
        logits = model(x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        loss = loss.view(y.shape).sum(0).double().cpu().numpy()
        for j in range(len(edges) - 1):
            nats[j] += loss[edges[j] : edges[j + 1]].sum()
            for row in y[:, edges[j] : edges[j + 1]].tolist():
                chars[j] += len(tokenizer.decode(row, skip_special_tokens=True))
    return [{"start": edges[j], "end": edges[j + 1], "bits_per_char": float(nats[j] / math.log(2) / max(chars[j], 1)),
             "loss": float(nats[j] / (len(windows) * (edges[j + 1] - edges[j]))), "chars": int(chars[j])}
            for j in range(len(edges) - 1)]


# ------------------------------------------------------------------------------------------------ passkey

FILLER = ("草是绿的。", "天是蓝的。", "太阳是黄的。", "我们走吧。", "去那边再回来。")  # cycled, one at a time
NEEDLE = "通行密码是{key}。记住它，{key}就是通行密码。"
QUESTION = "通行密码是"


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """At most ``length`` tokens (as many filler sentences as fit): filler, the needle at ``depth`` (0 = start,
    1 = end of the filler), then the question."""
    from xiaolm.infer.generate import plain_prompt_ids

    needle = NEEDLE.format(key=key)

    def build(n: int) -> list[int]:
        filler = [FILLER[i % len(FILLER)] for i in range(n)]
        before = round(n * depth)
        return plain_prompt_ids(tokenizer, "".join(filler[:before]) + needle + "".join(filler[before:]) + QUESTION)

    per_filler = max(1.0, len(tokenizer.encode("".join(FILLER), allow_special=False)) / len(FILLER))
    n = max(0, int((length - len(build(0))) / per_filler))
    while n > 0 and len(build(n)) > length:
        n -= 1
    while len(build(n + 1)) <= length:
        n += 1
    return build(n)


@torch.no_grad()
def passkey(model, tokenizer, lengths: list[int], depths: list[float], trials: int, seed: int = 0) -> list[dict]:
    """For each (length, depth): exact retrieval (greedy answer starts with the key) and rank among ten (the key's
    likelihood beats nine other five-digit numbers'; chance 10%)."""
    from xiaolm.infer.generate import generate_ids

    rng = random.Random(seed)
    rows = []
    for length in lengths:
        for depth in depths:
            exact = ranked = 0
            for _ in range(trials):
                key = str(rng.randrange(10000, 100000))
                ids = passkey_prompt(tokenizer, length, depth, key)
                out = generate_ids(model, [ids], 8, pad_id=tokenizer.pad_id, temperature=0.0)[0]
                digits = re.match(r"\s*(\d+)", tokenizer.decode(out, skip_special_tokens=True))
                exact += bool(digits and digits.group(1).startswith(key))
                candidates = [key] + [str(rng.randrange(10000, 100000)) for _ in range(9)]
                scores = [_continuation_logprob(model, ids, tokenizer.encode(c, allow_special=False))
                          for c in candidates]
                ranked += int(np.argmax(scores) == 0)
            rows.append({"length": length, "depth": depth, "trials": trials, "exact": exact / trials,
                         "rank_of_ten": ranked / trials, "prompt_tokens": len(ids)})
    return rows


def _continuation_logprob(model, prompt: list[int], cont: list[int]) -> float:
    x = torch.tensor([prompt + cont[:-1]], device=model.device)
    logp = torch.log_softmax(model(x).logits[0, len(prompt) - 1 :].float(), dim=-1)
    return float(logp[torch.arange(len(cont)), torch.tensor(cont, device=model.device)].sum())


# ------------------------------------------------------------------------------------------------ the verb


@dataclass
class PasskeyConfig:
    """Passkey retrieval: a five-digit number hidden in filler text at chosen depths, asked for at the end."""

    run: str = opt(None, "RUNDIR, checkpoint, quantised or Hugging Face directory")
    lengths: list[int] = opt([256, 512, 1024], "prompt lengths in tokens")
    depths: list[float] = opt([0.0, 0.25, 0.5, 0.75, 1.0], "where the number sits in the filler (0 start, 1 end)")
    trials: int = opt(10, "numbers per length and depth")
    seed: int = opt(0, "seed of the numbers")
    rope_scaling: Optional[str] = opt(None, "evaluate with this RoPE scaling added (linear, dynamic, yarn, llama3), "
                                            "no training: the context becomes the longest --lengths")
    rope_factor: Optional[float] = opt(None, "its factor (default: longest length / the model's context)")
    out: Optional[str] = opt(None, "write the result as JSON here")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    checkpoint: str = opt("latest", "which checkpoint of a RUNDIR: latest or best")


def apply_eval_scaling(model, context: int, rope_scaling: Optional[str], rope_factor: Optional[float]) -> None:
    """``--rope-scaling`` on an evaluation verb: scale the loaded model's RoPE for ``context`` positions. Without
    it, a context past the model's is plain extrapolation (the positions simply go on)."""
    if not rope_scaling:
        if rope_factor is not None:
            raise fail("--rope-factor needs --rope-scaling")
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, context)
        return
    from xiaolm.model.rope import extend_context

    try:
        extend_context(model, context, rope_scaling, rope_factor)
    except ValueError as exc:
        raise fail(str(exc)) from None


def passkey_main(argv: list[str]) -> int:
    from xiaolm.model.io import load_model

    cfg, _ = parse_config(PasskeyConfig, argv, "xiaolm eval passkey", positionals={"run": "RUNDIR"})
    if not cfg.lengths or min(cfg.lengths) < 16:
        raise fail("--lengths: give prompt lengths of at least 16 tokens")
    if not cfg.depths or any(not 0.0 <= d <= 1.0 for d in cfg.depths):
        raise fail("--depths: each depth must lie in [0, 1]")
    if cfg.trials < 1:
        raise fail("--trials must be at least 1")
    model, tokenizer, info = load_model(cfg.run, device=pick_device(cfg.device), which=cfg.checkpoint)
    apply_eval_scaling(model, max(cfg.lengths), cfg.rope_scaling, cfg.rope_factor)
    rows = passkey(model, tokenizer, cfg.lengths, cfg.depths, cfg.trials, cfg.seed)
    result = {"model": str(info.path), "context": model.config.max_position_embeddings,
              "rope_scaling": model.config.rope_scaling, "rows": rows}
    if cfg.out:
        atomic_write_json(cfg.out, result)
    print("length  depth  exact  rank-of-ten (chance 0.10)", file=sys.stdout)
    for r in rows:
        print(f"{r['length']:>6}  {r['depth']:>5.2f}  {r['exact']:>5.2f}  {r['rank_of_ten']:>5.2f}", file=sys.stdout)
    return 0
