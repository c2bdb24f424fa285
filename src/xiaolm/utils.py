"""Small helpers every stage uses: atomic files, JSON Lines, devices, seeds, console output."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from xiaolm.errors import XiaolmError

# ------------------------------------------------------------------------------------------------ files


def _publish(tmp: str, path: Path) -> None:
    """Give a temporary file the usual permissions (mkstemp makes it 0600), then rename it into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename: readers see the old or the new file."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that want a file name (safetensors' ``save_file``). When the
    block succeeds the file is fsynced, given the usual permissions (safetensors, like mkstemp, makes it 0600)
    and renamed into place; when it fails the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write records as JSON Lines (UTF-8, Chinese unescaped), atomically. Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return n


def read_log_lines(path: str | Path, truncate: bool = False, strict: bool = True) -> list[str]:
    """The complete lines of an append-only log (metrics.jsonl, a cache.jsonl). A crash can cut the last line, even
    mid-character: it is dropped, said in one line, and with ``truncate`` cut from the file too, so that the next
    append starts on a line of its own. A line elsewhere that is not UTF-8 is an error naming the file and line
    (``strict``) or dropped with a warning that names them."""
    path = Path(path)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    tail = data[end:]
    if tail:
        log(f"{path}: dropped an incomplete last line ({len(tail)} bytes, cut by a crash or a kill)")
        if truncate:
            os.truncate(path, end)
    lines = []
    for lineno, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            message = f"{path}:{lineno}: not UTF-8 ({exc.reason} at byte {exc.start} of the line)"
            if strict:
                raise fail(message)
            log(f"warning: {message}; line skipped")
    return lines


def read_jsonl(path: str | Path, strict: bool = True) -> Iterator[dict]:
    """Yield the JSON objects of a JSON Lines file. Errors name the file and line."""
    path = Path(path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if strict:
                    raise ValueError(f"{path}:{lineno}: not UTF-8 ({exc.reason} at byte {exc.start} of the line); "
                                     f"convert the file to UTF-8") from None
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                if strict:
                    raise ValueError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
                continue
            yield rec


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process and Python version (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


# ------------------------------------------------------------------------------------------- torch bits


def pick_device(requested: str = "auto") -> str:
    """``auto`` picks CUDA, then Apple MPS, then CPU."""
    import torch

    if requested and requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {requested!r} was asked for but CUDA is not available")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def count_params(model, exclude_embeddings: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" in name)
    return n


def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}" if suffix else f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"


# -------------------------------------------------------------------------------------------- console


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(*parts: Any, file=None) -> None:
    """Print on rank 0 only (every rank under torchrun would otherwise repeat each line)."""
    if is_main_process():
        print(*parts, file=file or sys.stderr, flush=True)


def fail(message: str, code: int = 2, kind: "type[XiaolmError]" = XiaolmError) -> "XiaolmError":
    """A clear, single-line error for bad input; raise what this returns (the CLI prints it and exits ``code``)."""
    return kind(message, code)
