"""Device memory in a training run: what the run log reports, the creep warning, and the out-of-memory fallback.

- ``memory_stats``: allocated and peak allocated GiB at each log point on CUDA (nothing elsewhere: the CPU has no
  allocator to ask, and an absent key is clearer than a made-up figure);
- ``MemoryCreep``: warns once when allocated memory grows at every log point for a while -- in a steady training
  loop the caching allocator's allocated bytes are the same at every log point, so steady growth is a leak (a tensor
  kept across steps, a growing cache), the slow crash users of small cards report most;
- ``split_rows``: one micro-batch as ``parts`` smaller ones, for the engine's out-of-memory fallback (halve the
  micro-batch, double the accumulation: the same global batch, and since the loss is summed over its units and
  divided by the step's units, the same loss curve).
"""
from __future__ import annotations

from typing import Optional

import torch

GIB = 1024 ** 3
OOM_FALLBACK_STEPS = 3  # an out-of-memory error in a run's first steps halves the micro-batch; later, it is raised


def memory_stats(device: str) -> dict:
    """``{"mem_allocated_gib", "mem_peak_gib"}`` on CUDA (peak since the run started), ``{}`` elsewhere."""
    if not device.startswith("cuda"):
        return {}
    dev = torch.device(device)
    return {"mem_allocated_gib": round(torch.cuda.memory_allocated(dev) / GIB, 3),
            "mem_peak_gib": round(torch.cuda.max_memory_allocated(dev) / GIB, 3)}


class MemoryCreep:
    """Feed allocated bytes at each log point; ``observe`` returns a warning, once, when the last ``window`` points
    each grew and the growth adds up to more than ``min_growth`` of the first (``warmup`` points are skipped: the
    optimizer state and the allocator's first blocks arrive then)."""

    def __init__(self, window: int = 5, min_growth: float = 0.02, warmup: int = 2):
        self.window, self.min_growth, self.warmup = window, min_growth, warmup
        self.seen: list[float] = []
        self.warned = False

    def observe(self, allocated: float, step: Optional[int] = None) -> Optional[str]:
        self.seen.append(float(allocated))
        points = self.seen[self.warmup:][-(self.window + 1):]
        if self.warned or len(points) < self.window + 1:
            return None
        rising = all(b > a for a, b in zip(points, points[1:]))
        if not rising or points[-1] - points[0] <= self.min_growth * points[0]:
            return None
        self.warned = True
        where = f" by step {step}" if step is not None else ""
        return (f"warning: allocated GPU memory grew at each of the last {self.window} log points "
                f"({points[0] / GIB:.2f} -> {points[-1] / GIB:.2f} GiB{where}): something is kept across steps; "
                f"a long run may run out of memory")


def split_rows(batch: dict, parts: int) -> list[dict]:
    """``batch`` (tensors with one row per sequence, and 0-dim values shared by every row) as ``parts`` micro-batches
    of consecutive rows. Refuses a batch whose tensors do not all have the rows first (e.g. pairs of sequences)."""
    if parts == 1:
        return [batch]
    rows = batch["input_ids"].shape[0]
    if rows < parts:
        raise ValueError(f"a micro-batch of {rows} rows cannot be split in {parts}")
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] != rows:
            raise ValueError(f"batch field {k!r} has {v.shape[0]} rows where input_ids has {rows}")
    bounds = [rows * i // parts for i in range(parts + 1)]
    return [{k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
            for lo, hi in zip(bounds, bounds[1:])]

