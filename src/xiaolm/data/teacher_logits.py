"""Offline teacher logits: a teacher's top-k log-probabilities per token position, written once beside the token
shards and read by any number of distillation runs (``xiaolm data teacher-logits``; ``xiaolm pretrain --teacher-logits
DIR``).

Which context a position's prediction sees must be fixed when the file is written, so the file follows pretraining's
``--windows random`` layout exactly: the split's stream is cut into windows of ``seq_len`` inputs (window ``w`` holds
positions ``w*seq_len .. w*seq_len + seq_len - 1``, its targets the next tokens, as ``WindowSampler`` reads them), and
position ``p`` stores the teacher's prediction of token ``p + 1`` from the start of its window (and, with document
masking, from the start of its document inside the window), which is exactly the context the student sees there.
Window ``w``'s rows are at a fixed offset whatever order a run visits the windows in, so the reader is a pure
function of the window id: a run's position in the file is its step, and resuming needs nothing more.

Layout of ``DIR`` (sizes bounded: k x (2 or 4 bytes of id + 2 bytes of fp16 log-probability) per token)::

    teacher_logits.json          k, seq_len, doc_mask, windows, the token shards' identity, the teacher, costs
    topk_NNNNN.ids.bin           uint16 (vocab <= 65536) or uint32 ids, [windows, seq_len, k], row-major
    topk_NNNNN.logp.bin          float16 log-probabilities at T = 1, same shape, each row sorted high to low
    topk_NNNNN.json              first window, windows, sha256 of both files

Opening refuses a directory made from other token shards (tokenizer fingerprint, token count or the shards'
sha256 digest differ), another ``seq_len`` or another document-masking choice, and truncated files; ``verify``
checks the checksums on demand, like ``xiaolm data verify`` for token shards.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from xiaolm.config import opt

META = "teacher_logits.json"
FORMAT_VERSION = 1


class TeacherLogitsMismatch(ValueError):
    pass


def token_shards_identity(shard_dir: str | Path, split: str = "train") -> dict:
    """What a teacher-logits directory must match: tokenizer fingerprint, token count and a sha256 over the split's
    shard checksums (as their sidecars record them; a sidecar without one contributes its token count)."""
    shard_dir = Path(shard_dir)
    meta = json.loads((shard_dir / "meta.json").read_text(encoding="utf-8"))
    digest, tokens = hashlib.sha256(), 0
    for sidecar in sorted((shard_dir / split).glob("shard_*.json")):
        s = json.loads(sidecar.read_text(encoding="utf-8"))
        digest.update(f"{sidecar.name}:{s.get('sha256') or s['tokens']};".encode())
        tokens += int(s["tokens"])
    return {"split": split, "fingerprint": meta["tokenizer"]["fingerprint"], "num_tokens": tokens,
            "sha256": digest.hexdigest()}


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def bytes_per_token(k: int, vocab_size: int) -> int:
    return k * (ids_dtype(vocab_size).itemsize + 2)


# ------------------------------------------------------------------------------------------------- reading


class TeacherLogits:
    """Read-only, memory-mapped view of a teacher-logits directory: ``read(window) -> (ids, logp)``, each
    ``[seq_len, k]`` (int64 and float32)."""

    def __init__(self, path: str | Path, shard_dir: str | Path, split: str = "train", seq_len: Optional[int] = None,
                 doc_mask: Optional[bool] = None):
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            raise TeacherLogitsMismatch(f"--teacher-logits {self.path}: not a teacher-logits directory (no {META}); "
                                        f"write one with xiaolm data teacher-logits")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        want = token_shards_identity(shard_dir, split)
        have = self.meta["token_shards"]
        for key in ("fingerprint", "num_tokens", "sha256", "split"):
            if have.get(key) != want[key]:
                raise TeacherLogitsMismatch(
                    f"--teacher-logits {self.path}: written for other token shards ({key} {have.get(key)!r}, the "
                    f"shards {shard_dir} have {want[key]!r}); write them again for these shards with xiaolm data "
                    f"teacher-logits")
        self.k, self.seq_len = int(self.meta["k"]), int(self.meta["seq_len"])
        self.doc_mask = bool(self.meta["doc_mask"])
        if seq_len is not None and seq_len != self.seq_len:
            raise TeacherLogitsMismatch(f"--teacher-logits {self.path}: written for --seq-len {self.seq_len}, the "
                                        f"run uses {seq_len}; use the same context or write them again")
        if doc_mask is not None and doc_mask != self.doc_mask:
            raise TeacherLogitsMismatch(
                f"--teacher-logits {self.path}: written {'with' if self.doc_mask else 'without'} document masking, "
                f"the run is {'with' if doc_mask else 'without'} (--doc-mask); the teacher's contexts would differ")
        self.num_windows = int(self.meta["windows"])
        self.dtype = np.dtype(self.meta["ids_dtype"])
        self._ids, self._logp, self._first = [], [], []
        for name in self.meta["shards"]:
            side = json.loads((self.path / f"{name}.json").read_text(encoding="utf-8"))
            shape = (int(side["windows"]), self.seq_len, self.k)
            for suffix, dtype, into in ((".ids.bin", self.dtype, self._ids), (".logp.bin", np.dtype("<f2"), self._logp)):
                f = self.path / f"{name}{suffix}"
                expected = int(np.prod(shape)) * dtype.itemsize
                actual = f.stat().st_size if f.is_file() else -1
                if actual != expected:
                    raise TeacherLogitsMismatch(f"{f}: {'missing' if actual < 0 else f'{actual} bytes'}, expected "
                                                f"{expected}; the file is truncated, write the directory again")
                into.append(np.memmap(f, dtype=dtype, mode="r", shape=shape))
            self._first.append(int(side["first_window"]))
        self._first.append(self.num_windows)

    def read(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= window < self.num_windows:
            raise IndexError(f"window {window} outside the {self.num_windows} windows of {self.path}")
        i = int(np.searchsorted(self._first, window, side="right")) - 1
        j = window - self._first[i]
        return self._ids[i][j].astype(np.int64), self._logp[i][j].astype(np.float32)


def verify_teacher_logits(path: str | Path) -> list[str]:
    """Checksum every file against its sidecar; returns the problems (empty when all match)."""
    from xiaolm.utils import sha256_file

    path = Path(path)
    meta = json.loads((path / META).read_text(encoding="utf-8"))
    problems = []
    for name in meta["shards"]:
        side = json.loads((path / f"{name}.json").read_text(encoding="utf-8"))
        for suffix, key in ((".ids.bin", "sha256_ids"), (".logp.bin", "sha256_logp")):
            f = path / f"{name}{suffix}"
            if not f.is_file() or sha256_file(f) != side[key]:
                problems.append(f"{f}: checksum does not match {name}.json")
    return problems


# ------------------------------------------------------------------------------------------------- writing


@dataclass
class TeacherLogitsConfig:
    """Write a teacher's top-k log-probabilities for every training position of token shards, once, for offline
    distillation (xiaolm pretrain --teacher-logits DIR)."""

    shards: Optional[str] = opt(None, "token shard directory (xiaolm data tokenize)")
    teacher: Optional[str] = opt(None, "the teacher: a RUNDIR, checkpoint, quantised or Hugging Face Llama directory")
    out: Optional[str] = opt(None, "output directory (default: SHARDS/teacher-logits)")
    split: str = opt("train", "which split of the shards")
    seq_len: int = opt(512, "the student's context: the same --seq-len the student run will use")
    doc_mask: bool = opt(True, "the student's --doc-mask: the teacher sees each document alone inside a window")
    top_k: int = opt(8, "log-probabilities kept per position (bytes per token: k x 4 with a vocab up to 65,536)")
    batch_size: int = opt(16, "windows per teacher forward pass")
    windows_per_file: int = opt(4096, "windows per file")
    max_windows: Optional[int] = opt(None, "write only the first N windows (tests; a run reading past them fails)")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: Literal["auto", "bf16", "fp32"] = opt("auto", "auto: bf16 autocast on GPUs that support it, else fp32")


def _device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def write_teacher_logits(cfg: TeacherLogitsConfig, model=None, teacher_tokenizer=None) -> dict:
    """Write the directory; returns its meta (with ``bytes_per_token`` and ``s_per_million_tokens``)."""
    import torch

    from xiaolm.data.shards import TokenShards
    from xiaolm.model.llama import doc_ids_from_tokens
    from xiaolm.utils import atomic_write_json, log, sha256_file

    if not cfg.shards or (not cfg.teacher and model is None):
        raise ValueError("xiaolm data teacher-logits needs --shards DIR and --teacher PATH")
    shard_dir = Path(cfg.shards)
    out = Path(cfg.out) if cfg.out else shard_dir / "teacher-logits"
    device = _device(cfg.device)
    if model is None:
        from xiaolm.model.io import load_model

        model, teacher_tokenizer, _ = load_model(cfg.teacher, device=device)
    model = model.to(device).eval()
    shards = TokenShards(shard_dir, cfg.split)
    if teacher_tokenizer is None or teacher_tokenizer.fingerprint != shards.fingerprint:
        theirs = getattr(teacher_tokenizer, "fingerprint", None)
        raise TeacherLogitsMismatch(
            f"--teacher {cfg.teacher}: its tokenizer is {theirs}, the shards {shard_dir} use {shards.fingerprint}; "
            f"distillation needs one tokenizer: tokenise the corpus with the teacher's tokenizer (xiaolm data "
            f"tokenize CORPUS --tokenizer {cfg.teacher}/tokenizer --out SHARDS)")
    if model.config.vocab_size != shards.vocab_size:
        raise TeacherLogitsMismatch(f"--teacher {cfg.teacher}: vocabulary {model.config.vocab_size}, the shards "
                                    f"{shards.vocab_size}")
    L, k = int(cfg.seq_len), int(cfg.top_k)
    if not 1 <= k < shards.vocab_size:
        raise ValueError(f"--top-k {k}: must be between 1 and the vocabulary size - 1 ({shards.vocab_size - 1})")
    windows = (shards.num_tokens - 1) // L
    if cfg.max_windows is not None:
        windows = min(windows, int(cfg.max_windows))
    if windows < 1:
        raise ValueError(f"{shard_dir}: {shards.num_tokens} tokens are too few for one window of {L + 1}")
    dt = ids_dtype(shards.vocab_size)
    amp = (torch.bfloat16 if cfg.precision == "bf16" or (cfg.precision == "auto" and device.startswith("cuda")
                                                          and torch.cuda.is_bf16_supported()) else None)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("topk_*")) + [out / META]:
        old.unlink(missing_ok=True)  # a rewrite replaces every file (the meta goes first, so a half-written dir fails)
    names, t0 = [], time.perf_counter()
    wpf = max(1, int(cfg.windows_per_file))
    for first in range(0, windows, wpf):
        n = min(wpf, windows - first)
        name = f"topk_{len(names):05d}"
        ids_path, logp_path = out / f"{name}.ids.bin", out / f"{name}.logp.bin"
        with open(ids_path, "wb") as f_ids, open(logp_path, "wb") as f_logp:
            for b in range(first, first + n, cfg.batch_size):
                rows = np.stack([shards.read(w * L, L) for w in range(b, min(b + cfg.batch_size, first + n))])
                x = torch.from_numpy(rows.astype(np.int64)).to(device)
                doc = doc_ids_from_tokens(x, shards.eot_id) if cfg.doc_mask else None
                with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=amp, enabled=amp is not None):
                    hidden = model.hidden_states(x, doc_ids=doc)
                    for row in hidden:  # one window's logits at a time: [seq_len, vocab] float32 at most
                        logp, top = torch.log_softmax(model.lm_head(row).float(), dim=-1).topk(k, dim=-1)
                        f_ids.write(top.cpu().numpy().astype(dt).tobytes())
                        f_logp.write(logp.cpu().numpy().astype("<f2").tobytes())
        atomic_write_json(out / f"{name}.json", {"first_window": first, "windows": n,
                                                  "sha256_ids": sha256_file(ids_path),
                                                  "sha256_logp": sha256_file(logp_path)})
        names.append(name)
        log(f"teacher-logits: {first + n}/{windows} windows")
    wall = time.perf_counter() - t0
    tokens = windows * L
    meta = {
        "format_version": FORMAT_VERSION, "k": k, "seq_len": L, "doc_mask": bool(cfg.doc_mask), "windows": windows,
        "positions": tokens, "ids_dtype": dt.str, "logp_dtype": "<f2", "temperature": 1.0,
        "token_shards": token_shards_identity(shard_dir, cfg.split),
        "teacher": {"path": str(cfg.teacher), "fingerprint": teacher_tokenizer.fingerprint,
                    "params": sum(p.numel() for p in model.parameters())},
        "shards": names, "bytes_per_token": bytes_per_token(k, shards.vocab_size),
        "bytes": tokens * bytes_per_token(k, shards.vocab_size), "wall_s": round(wall, 2),
        "s_per_million_tokens": round(wall / tokens * 1e6, 2), "device": device,
    }
    atomic_write_json(out / META, meta)
    return {**meta, "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    from xiaolm.config import parse_config
    from xiaolm.utils import fail, human, log

    cfg, _ = parse_config(TeacherLogitsConfig, argv, prog="xiaolm data teacher-logits",
                          epilog="example:\n  xiaolm data teacher-logits --shards shards/ --teacher runs/big "
                                 "--seq-len 512 --top-k 8\n  xiaolm pretrain --data shards/ --teacher-logits "
                                 "shards/teacher-logits ...")
    try:
        meta = write_teacher_logits(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    except Exception as exc:
        from xiaolm.model.io import CheckpointError

        if isinstance(exc, CheckpointError):
            raise fail(f"--teacher: {exc}") from None
        raise
    log(f"teacher-logits: {human(meta['positions'])} positions, top-{meta['k']}, {meta['bytes_per_token']} bytes/token "
        f"({human(meta['bytes'])}B), {meta['wall_s']} s = {meta['s_per_million_tokens']} s per million tokens on "
        f"{meta['device']} -> {meta['out']}")
    return 0
