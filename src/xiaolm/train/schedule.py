"""The learning-rate schedule and the run's length in optimizer steps."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from xiaolm.train.engine import TrainConfig


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Warmup then decay to ``min_lr_ratio * lr`` exactly at ``total_steps`` (the run's real length)."""
    warmup = min(cfg.warmup_steps, max(1, total_steps // 10))
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "constant":
        return peak
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if cfg.schedule == "cosine":
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return peak - (peak - floor) * progress
    # wsd: warmup, stable, then linear decay over the last decay_fraction of the run
    decay_start = 1.0 - min(1.0, max(0.0, cfg.decay_fraction))
    if progress < decay_start or decay_start >= 1.0:
        return peak
    return peak - (peak - floor) * (progress - decay_start) / (1 - decay_start)


def resolve_steps(cfg: TrainConfig, tokens_per_step: int, default_steps: Optional[int] = None) -> int:
    """max_steps if given; else max_tokens / tokens per step; else the verb's default (e.g. from epochs)."""
    if cfg.max_steps is not None:
        return int(cfg.max_steps)
    if cfg.max_tokens is not None:
        return max(1, math.ceil(cfg.max_tokens / tokens_per_step))
    if default_steps is not None:
        return int(default_steps)
    raise ValueError("set --max-steps or --max-tokens")
