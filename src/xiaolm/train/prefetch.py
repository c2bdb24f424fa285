"""Batches prepared ahead on a background thread, pinned and copied to the device."""
from __future__ import annotations

import queue
import threading

import torch


def _to_device(batch: dict, device: str) -> dict:
    non_blocking = device.startswith("cuda")
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _pin(batch: dict) -> dict:
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _Prefetcher:
    """Prepares the next batches on a background thread so the device never waits for data.

    ``batch_fn`` is a pure function of (step, micro), so batches can be made ahead in order; with ``depth`` 0
    they are made on demand. Pinned host memory lets the copy to the GPU overlap with compute.
    """

    _END = object()

    def __init__(self, batch_fn, start_step: int, total_steps: int, accum: int, depth: int, pin: bool):
        self.batch_fn, self.pin, self.depth = batch_fn, pin, depth
        if depth <= 0:
            return
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        order = ((s, m) for s in range(start_step, total_steps) for m in range(accum))
        self.thread = threading.Thread(target=self._run, args=(order,), daemon=True, name="xiaolm-prefetch")
        self.thread.start()

    def _make(self, step, micro):
        batch = self.batch_fn(step, micro)
        return _pin(batch) if self.pin else batch

    def _run(self, order):
        try:
            for step, micro in order:
                item = (step, micro, self._make(step, micro))
                while not self.stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as exc:  # surfaced in get()
            self.q.put((None, None, exc))

    def get(self, step: int, micro: int) -> dict:
        if self.depth <= 0:
            return self._make(step, micro)
        s, m, item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        if (s, m) != (step, micro):
            raise RuntimeError(f"prefetcher out of order: wanted {(step, micro)}, got {(s, m)}")
        return item

    def close(self) -> None:
        if self.depth > 0:
            self.stop.set()
            self.thread.join(timeout=5)
