"""One owner per run directory, and no run started on top of another by accident.

``claim_run_dir(out, resume=..., overwrite=...)`` is every writing verb's first step:

- the lock: ``OUT/.xiaolm.lock`` is held with ``fcntl.flock`` for the life of the process (or until
  ``release_run_dirs()``; ``xiaolm.cli`` releases after each verb). The kernel drops a flock when its holder dies,
  however it dies, so a lock left by a killed run never blocks; the file records the holder's PID and host so that
  the refusal can name them. Where flock is unavailable (some network filesystems) the recorded PID decides: a dead
  PID on this host is stale. A process re-claiming a directory it already holds is not refused (the pipeline's
  stages and in-process callers do that).
- the run: a directory that already holds a run (``config.yaml``, ``checkpoints/`` or ``metrics.jsonl``) is
  refused unless the run continues it (``--resume``) or asks for it to be emptied first (``--overwrite``); a
  non-empty directory that is not a run is never emptied.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from xiaolm.utils import fail

LOCK_NAME = ".xiaolm.lock"
RUN_MARKERS = ("config.yaml", "checkpoints", "metrics.jsonl")

_HELD: dict[str, int] = {}  # resolved directory -> the open lock file's descriptor


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_MARKERS)


def _is_run_or_checkpoint(path: Path) -> bool:
    return (path / "checkpoints").is_dir() or ((path / "meta.json").is_file() and (path / "model_config.json").is_file())


def inside_run(path: str | Path) -> bool:
    """A RUNDIR, a checkpoint directory, a run's tokenizer/ or checkpoints/ folder, or anything inside those: no
    export or quantised copy may be written there (a new folder beside them, RUNDIR/hf, is fine)."""
    path = Path(path).resolve()
    if _is_run_or_checkpoint(path):
        return True
    for p in path.parents:
        if _is_run_or_checkpoint(p) and (path == p / "tokenizer" or p / "checkpoints" in (path, *path.parents)):
            return True
    return False


def check_parent(path: Path, what: str) -> None:
    """The first existing ancestor must be a writable directory (missing ones are created)."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise fail(f"{what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise fail(f"{what} {path}: {parent} is not writable")


def prepare_model_dir(out: str | Path, source: str | Path, overwrite: bool, *, what: str, noun: str,
                      source_noun: str, earlier_noun: str, earlier, earlier_files) -> Path:
    """Where a verb that writes a model directory (``export hf``, ``quantize``) may write, created; returns it.

    Never a file, the source itself or (inside) a run directory; a non-empty directory only when ``earlier(out)``
    describes an earlier output of this verb there (a string; None: someone else's, refused), and then only with
    ``overwrite``, which removes ``earlier_files(out)`` (names directly in ``out``) and nothing else. ``what`` opens
    each refusal (``"export hf:"``), ``noun`` names what is written (``"the export"``), ``source_noun`` what is read
    (``"the directory being exported"``), ``earlier_noun`` what
    this verb leaves (``"an earlier xiaolm export"``)."""
    out, src = Path(out), Path(source).resolve()
    if out.exists() and not out.is_dir():
        raise fail(f"{what} {out} is a file; give a directory to write {noun} into")
    if out.resolve() == src:
        raise fail(f"{what} {out} is {source_noun}; write {noun} somewhere else")
    if inside_run(out):
        raise fail(f"{what} {out} is (inside) a run directory; writing there would replace the run's config.yaml "
                   f"and tokenizer. Write {noun} somewhere else")
    check_parent(out, what)
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        found = earlier(out)
        if found is None:
            raise fail(f"{what} {out} is not empty and is not {earlier_noun}; choose an empty or new directory "
                       f"(nothing was written)")
        if not overwrite:
            raise fail(f"{what} {out} holds {found}; pass --overwrite to replace it")
        for name in earlier_files(out):
            p = out / str(name)
            if p.resolve().parent != out.resolve():  # a name pointing elsewhere is not trusted
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(f"{what} cannot create {out}: {exc.strerror}")
    if not os.access(out, os.W_OK | os.X_OK):
        raise fail(f"{what} {out} is not writable")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        data = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        data = {}
    return data if isinstance(data, dict) else {}


def _refusal(out: Path, holder: dict, verb: str) -> Exception:
    who = f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}"
    what = f" ({holder['verb']}, since {holder['since']})" if holder.get("verb") and holder.get("since") else ""
    return fail(f"{verb}: {out} is in use by another xiaolm process: {who}{what}; wait for it to finish, stop it, "
                f"or write to another --out")


def lock_run_dir(out: str | Path, verb: str = "xiaolm") -> Path:
    """Create ``out`` and hold its lock for this process; refuses (one line naming the holder) when another live
    process holds it. Re-entrant within one process."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise fail(f"{verb}: {out} is a file; give a directory for the run")
    except OSError as exc:
        raise fail(f"{verb}: cannot create {out}: {exc.strerror}")
    key = str(out.resolve())
    if key in _HELD:
        return out
    path = out / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise fail(f"{verb}: cannot create the lock file {path}: {exc.strerror}")
    host = socket.gethostname()
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _holder(fd)
            os.close(fd)
            raise _refusal(out, holder, verb)
        # No flock here: the recorded PID decides (a dead process on this host left a stale lock).
        holder = _holder(fd)
        pid = holder.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and not (holder.get("host") == host and not _pid_alive(pid)):
            os.close(fd)
            raise _refusal(out, holder, verb)
    record = {"pid": os.getpid(), "host": host, "verb": verb, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    _HELD[key] = fd
    return out


def release_run_dirs() -> None:
    """Drop every lock this process holds (closing the descriptor releases the flock)."""
    while _HELD:
        _key, fd = _HELD.popitem()
        try:
            os.close(fd)
        except OSError:
            pass


def holds(out: str | Path) -> bool:
    return str(Path(out).resolve()) in _HELD


def _empty(out: Path) -> None:
    for p in out.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def claim_run_dir(out: str | Path, *, resume: bool, overwrite: bool, verb: str) -> Path:
    """Lock ``out`` (``lock_run_dir``) and check that this run may write there; with ``overwrite`` empty it first.
    A second claim by the same process only checks the lock (the first one decided)."""
    out = Path(out)
    if resume and overwrite:
        raise fail(f"{verb}: --resume continues the run in {out} and --overwrite empties it; give one of them")
    if out.exists() and not out.is_dir():
        raise fail(f"{verb}: {out} is a file; give a directory for the run")
    if holds(out):
        return out
    lock_run_dir(out, verb)
    if resume:
        return out
    if is_run_dir(out):
        if not overwrite:
            raise fail(f"{verb}: {out} already holds a run; continue it with --resume, start a new one with another "
                       f"--out, or pass --overwrite to empty {out} first")
        _empty(out)
    elif overwrite and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise fail(f"{verb}: --overwrite empties run directories only, and {out} is not one (no config.yaml, "
                   f"checkpoints/ or metrics.jsonl); choose a new --out")
    return out
