"""White-box distillation for ``xiaolm pretrain`` and ``xiaolm sft``: ``--teacher PATH`` (online) or
``--teacher-logits DIR`` (offline, pretraining).

The student's loss is ``alpha x CE + (1 - alpha) x T^2 x KL(teacher_T || student_T)`` on the same tokens the plain
loss covers (every position of a pretraining window, the assistant tokens of an SFT conversation); the sums come
from :func:`xiaolm.model.losses.distillation_sums`, which chunks over rows with ``--loss-chunk-size`` as the plain
loss does. It is a ``loss_fn`` for the shared engine (and, offline, a wrapper of the batch function), so the
engine's accumulation, DDP/FSDP, precision, resume and the optimisers work unchanged:

- online: the teacher (a RUNDIR, checkpoint, quantised or Hugging Face Llama directory) is loaded on every rank
  (replicated), runs each micro-batch in no-grad under the run's autocast, and its time and weight memory are
  reported in the summary and metrics;
- offline: the windows' top-k log-probabilities come from ``xiaolm data teacher-logits`` files, read by window id,
  a pure function of the step like the windows themselves, so resume and DDP need nothing more.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from xiaolm.config import opt


@dataclass
class DistillSection:
    teacher: Optional[str] = opt(None, "distil from this teacher (RUNDIR, checkpoint, quantised or HF Llama dir), "
                                       "run online each step; it must use the student's tokenizer")
    teacher_logits: Optional[str] = opt(None, "distil from offline teacher logits (xiaolm data teacher-logits DIR; "
                                              "pretraining with --windows random)")
    distill_alpha: float = opt(0.5, "weight of the data's cross-entropy; 1 - alpha weighs the KL to the teacher")
    distill_temperature: float = opt(1.0, "softmax temperature of the KL (the KL term is scaled by T^2)")

    @property
    def enabled(self) -> bool:
        return bool(self.teacher or self.teacher_logits)


class _TeacherClock:
    """Seconds spent in teacher forwards: CUDA events (read at the end, no host sync per step) or perf_counter."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.seconds, self.calls, self._pending = 0.0, 0, []

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, begun) -> None:
        self.calls += 1
        if not self.cuda:
            self.seconds += time.perf_counter() - begun
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((begun, end))
        if len(self._pending) > 256:  # long finished by now: folding them costs no stall
            self._fold(self._pending[:128])
            self._pending = self._pending[128:]

    def _fold(self, pairs) -> None:
        for a, b in pairs:
            b.synchronize()
            self.seconds += a.elapsed_time(b) / 1000.0

    def total(self) -> float:
        self._fold(self._pending)
        self._pending = []
        return self.seconds


def _fingerprint_refusal(flag: str, path: str, theirs, ours, tokenizer_path: str) -> str:
    return (f"{flag} {path} uses tokenizer {theirs}, the student uses {ours}: distillation compares the two models' "
            f"next-token distributions, so they need one tokenizer. Make a student with the teacher's: tokenise the "
            f"corpus with it (xiaolm data tokenize CORPUS --tokenizer {tokenizer_path} --out SHARDS) and train on "
            f"those shards")


class Distiller:
    """The loss, the offline batch wrapper and the figures of one distillation setup (see the module docstring)."""

    def __init__(self, section: DistillSection, tokenizer, vocab_size: int, device: str, *, shard_dir=None,
                 split: str = "train", seq_len: Optional[int] = None, doc_mask: Optional[bool] = None):
        from xiaolm.utils import fail

        self.section = section
        self.alpha = float(section.distill_alpha)
        self.temperature = float(section.distill_temperature)
        if not 0.0 <= self.alpha <= 1.0:
            raise fail(f"--distill-alpha {self.alpha}: must be between 0 and 1")
        if self.temperature <= 0:
            raise fail(f"--distill-temperature {self.temperature}: must be positive")
        if section.teacher and section.teacher_logits:
            raise fail("--teacher and --teacher-logits: give one (online teacher or offline logits), not both")
        self.teacher, self.logits, self.clock = None, None, _TeacherClock(device)
        self.teacher_bytes = 0
        if section.teacher:
            from xiaolm.model.io import CheckpointError, load_model

            try:
                teacher, t_tok, _ = load_model(section.teacher, device=device, dtype=torch.float32)
            except CheckpointError as exc:
                raise fail(f"--teacher: {exc}") from None
            theirs = getattr(t_tok, "fingerprint", None)
            if theirs != tokenizer.fingerprint:
                raise fail(_fingerprint_refusal("--teacher", section.teacher, theirs, tokenizer.fingerprint,
                                                f"{section.teacher}/tokenizer"))
            if teacher.config.vocab_size != vocab_size:
                raise fail(f"--teacher {section.teacher}: vocabulary {teacher.config.vocab_size}, the student's "
                           f"{vocab_size}")
            teacher.eval().requires_grad_(False)
            self.teacher = teacher
            self.teacher_bytes = sum(t.numel() * t.element_size()
                                     for t in list(teacher.parameters()) + list(teacher.buffers()))
            self.teacher_params = sum(p.numel() for p in teacher.parameters())
        elif section.teacher_logits:
            from xiaolm.data.teacher_logits import TeacherLogits, TeacherLogitsMismatch

            try:
                self.logits = TeacherLogits(section.teacher_logits, shard_dir, split, seq_len, doc_mask)
            except (TeacherLogitsMismatch, FileNotFoundError) as exc:
                raise fail(str(exc)) from None
            if self.logits.meta["token_shards"]["fingerprint"] != tokenizer.fingerprint:
                raise fail(_fingerprint_refusal("--teacher-logits", section.teacher_logits,
                                                self.logits.meta["token_shards"]["fingerprint"],
                                                tokenizer.fingerprint, "TEACHER/tokenizer"))

    # ---------------------------------------------------------------------------------------------- identity

    def describe(self) -> dict:
        """What a resume must match (a checkpoint saved with one teacher does not continue with another)."""
        return {"teacher": self.section.teacher, "teacher_logits": self.section.teacher_logits,
                "alpha": self.alpha, "temperature": self.temperature}

    # ---------------------------------------------------------------------------------------------- batches

    def wrap_windows(self, sampler):
        """Offline: add each window's top-k (``teacher_ids``, ``teacher_logp``) to the pretraining batches."""
        if self.logits is None:
            return sampler
        logits = self.logits

        def batch_fn(step: int, micro: int) -> dict:
            batch = sampler(step, micro)
            rows = [logits.read(w) for w in sampler.window_ids(step, micro)]
            batch["teacher_ids"] = torch.from_numpy(np.stack([r[0] for r in rows]))
            batch["teacher_logp"] = torch.from_numpy(np.stack([r[1] for r in rows]))
            return batch

        return batch_fn

    # ---------------------------------------------------------------------------------------------- loss

    def loss_fn(self, chunk: int = 0):
        """``loss_fn(model, batch) -> (loss_sum, label_tokens, metrics)`` for the engine."""
        alpha, temp = self.alpha, self.temperature

        def loss(model, batch: dict):
            ids, doc, targets = batch["input_ids"], batch.get("doc_ids"), batch["targets"]
            extra = {}
            if self.teacher is not None:
                begun = self.clock.start()
                with torch.no_grad():
                    t_hidden = self.teacher.hidden_states(ids, doc_ids=doc)
                self.clock.stop(begun)
                extra = {"teacher_hidden": t_hidden, "teacher_head": self.teacher.lm_head}
            else:
                extra = {"topk_ids": batch["teacher_ids"], "topk_logp": batch["teacher_logp"]}

            def head_loss(h, weight):
                from xiaolm.model.losses import distillation_sums

                return distillation_sums(h, weight, targets, temperature=temp, chunk_size=chunk, **extra)

            ce, kl = model(ids, doc_ids=doc, head_loss=head_loss).loss
            n = (targets != -100).sum()
            per = n.clamp(min=1).float()
            metrics = {"ce": ce.detach() / per, "kl": kl.detach() / per / (temp * temp)}
            return alpha * ce + (1.0 - alpha) * kl, n, metrics

        return loss

    # ---------------------------------------------------------------------------------------------- figures

    def summary(self, wall_s: float) -> dict:
        out = {"distill": {"mode": "online" if self.teacher is not None else "offline", **self.describe()}}
        if self.teacher is not None:
            secs = self.clock.total()
            out["distill"].update({
                "teacher_params": self.teacher_params, "teacher_weight_bytes": self.teacher_bytes,
                "teacher_forward_s": round(secs, 2), "teacher_share_of_wall": round(secs / max(wall_s, 1e-9), 3),
            })
        else:
            m = self.logits.meta
            out["distill"].update({"top_k": m["k"], "bytes_per_token": m["bytes_per_token"],
                                   "logits_write_s": m["wall_s"], "s_per_million_tokens": m["s_per_million_tokens"]})
        return out
