"""Where an export may write: never over a user's files, never into a run, and one clear line when it cannot.

An HF export directory carries ``xiaolm_export.json`` (what was exported, from where, and the files written). A
non-empty directory without it is someone else's and is refused; one with it is replaced only with ``--overwrite``,
and then only the files of the earlier export are removed. A GGUF file is ours when its ``general.basename`` is
``xiaolm``; the same rule applies to it and its Modelfile. Run and checkpoint directories are refused outright:
exporting into one would replace its ``config.yaml`` and tokenizer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from xiaolm.rundir import check_parent, prepare_model_dir
from xiaolm.utils import fail

MARKER = "xiaolm_export.json"
GGUF_BASENAME = "xiaolm"
MODELFILE_HEAD = "# Ollama Modelfile: ollama create "


def read_marker(out: Path) -> Optional[dict]:
    try:
        data = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def prepare_hf_target(out: str | Path, overwrite: bool, source: str | Path) -> Path:
    """Check ``out`` for ``export hf`` and create it; returns it. Removes an earlier export's files with
    ``overwrite``. Exits with one line when ``out`` must not be written."""
    def earlier(path: Path) -> Optional[str]:
        marker = read_marker(path)
        return None if marker is None else f"an earlier export ({marker.get('source', '?')})"

    return prepare_model_dir(out, source, overwrite, what="export hf:", noun="the export",
                             source_noun="the directory being exported",
                             earlier_noun="an earlier xiaolm export", earlier=earlier,
                             earlier_files=lambda path: (read_marker(path) or {}).get("files") or [])


def is_our_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                return False
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get("general.basename")
        return field is not None and field.contents() == GGUF_BASENAME
    except Exception:  # unreadable, truncated or not a GGUF at all: not ours
        return False


def prepare_gguf_target(out: str | Path, overwrite: bool) -> tuple[Path, Path]:
    """Check ``out`` (.gguf) and its Modelfile for ``export gguf``; returns both paths."""
    out = Path(out)
    modelfile = out.with_name(out.stem + ".Modelfile")
    if out.is_dir():
        raise fail(f"export gguf: {out} is a directory; give the .gguf file to write")
    check_parent(out, "export gguf:")
    if out.exists():
        if not is_our_gguf(out):
            raise fail(f"export gguf: {out} exists and is not a GGUF written by xiaolm; choose another name "
                       f"(nothing was written)")
        if not overwrite:
            raise fail(f"export gguf: {out} exists (an earlier export); pass --overwrite to replace it")
    if modelfile.exists():
        try:
            ours = modelfile.read_text(encoding="utf-8").startswith(MODELFILE_HEAD)
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours or modelfile.is_dir():
            raise fail(f"export gguf: {modelfile} exists and was not written by xiaolm; choose another name "
                       f"(nothing was written)")
        if not overwrite:
            raise fail(f"export gguf: {modelfile} exists (an earlier export); pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(f"export gguf: cannot create {out.parent}: {exc.strerror}")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise fail(f"export gguf: {out.parent} is not writable")
    return out, modelfile
