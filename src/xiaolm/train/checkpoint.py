"""Checkpoints that survive crashes: atomic save, pointers, pruning, trainer state (loading one:
``xiaolm.model.io``).

A checkpoint is a directory written under a temporary name and renamed into place, and only then named in
``checkpoints/latest``, so a crash at any moment leaves the previous checkpoint intact and findable. ``meta.json``
records the sha256 of every file, so a truncated or altered checkpoint is caught on load with a clear message.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import save_file

from xiaolm.model.io import (META_FILE, MODEL_CONFIG, MODEL_FILE, CheckpointError, checkpoints_dir, find_checkpoint,
                             step_checkpoints)
from xiaolm.utils import atomic_output, atomic_write_text, sha256_file

TRAINER_FILE = "trainer.pt"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; a tied ``lm_head.weight`` is dropped (safetensors stores no shared tensors)."""
    sd = model.state_dict()
    cfg = getattr(model, "config", None)
    if getattr(cfg, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    model_config: dict,
    meta: dict,
    trainer_state: Optional[dict] = None,
    keep_last: int = 3,
    best: bool = False,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    extra_files: Optional[dict[str, bytes]] = None,
) -> Path:
    """Write ``checkpoints/step-N`` atomically, update ``latest`` (and ``best``), prune old ones."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    previous = _pointed(root, "latest")
    published = False
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        sd = state_dict if state_dict is not None else state_dict_for_save(model)
        for name, tensor in sd.items():
            if not torch.isfinite(tensor).all():
                raise CheckpointError(f"refusing to save a checkpoint with non-finite values in {name}")
        _write_files(tmp, step, sd, model_config, meta, trainer_state, extra_files)
        if final.exists():  # re-saving the same step (e.g. resumed then interrupted at once)
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        published = True
        atomic_write_text(root / "latest", final.name + "\n")
        if best:
            atomic_write_text(root / "best", final.name + "\n")
    except Exception as exc:  # safetensors raises its own SafetensorError, torch a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint only takes space a retry needs
        if not _disk_full(exc):
            raise
        if published:  # the checkpoint is complete; only a pointer could not be written
            raise CheckpointError(f"no space left on device while updating the pointers in {root}; checkpoint "
                                  f"{final.name} is complete (--resume-from {step} continues from it)") from None
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        raise CheckpointError(f"no space left on device while writing {final}; {kept}") from None
    _prune(root, keep_last)
    return final


def _write_files(tmp: Path, step: int, sd: dict, model_config: dict, meta: dict,
                 trainer_state: Optional[dict], extra_files: Optional[dict[str, bytes]]) -> None:
    with atomic_output(tmp / MODEL_FILE) as part:
        save_file(sd, str(part), metadata={"format": "pt"})
    (tmp / MODEL_CONFIG).write_text(json.dumps(model_config, indent=2), encoding="utf-8")
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_FILE)
    for name, data in (extra_files or {}).items():
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    files = {
        str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != META_FILE
    }
    meta = dict(meta, step=step, files=files, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def _pointed(root: Path, pointer: str) -> Optional[str]:
    """The checkpoint a pointer file names, if it names one that exists."""
    p = root / pointer
    name = p.read_text().strip() if p.is_file() else ""
    return name if name and (root / name).is_dir() else None


# A full disk shows as ENOSPC (EDQUOT for a quota) from Python, as "No space left on device (os error 28)" in a
# SafetensorError, and from torch.save only as a short write: "[enforce fail at inline_container.cc:672] .
# unexpected pos N vs M" (all three seen on a full tmpfs).
_DISK_FULL_TEXT = ("no space left", "os error 28", "storagefull", "unexpected pos", "failed writing file")


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return any(t in text for t in _DISK_FULL_TEXT)


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    keep = set()
    for pointer in ("latest", "best"):
        p = root / pointer
        if p.exists():
            keep.add(p.read_text().strip())
    steps = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-"))
    for d in steps[:-keep_last]:
        if d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)
    for d in root.iterdir():  # leftovers of a crash mid-save
        if d.is_dir() and d.name.startswith(".step-"):
            shutil.rmtree(d, ignore_errors=True)


def resolve_checkpoint_choice(run_dir: str | Path, choice: str) -> Path:
    """``--resume-from``: a step number of RUNDIR's checkpoints, or a checkpoint (or run) directory."""
    text = str(choice).strip()
    if text.isdigit():
        root = checkpoints_dir(run_dir)
        ckpt = root / step_dir_name(int(text))
        if not ckpt.is_dir():
            have = ", ".join(d.name.removeprefix("step-").lstrip("0") or "0" for d in step_checkpoints(root))
            raise CheckpointError(f"--resume-from {text}: no checkpoint {ckpt} (steps saved: {have or 'none'})")
        return ckpt
    path = Path(text)
    if not path.is_dir():
        raise CheckpointError(f"--resume-from {text}: not a step number or a checkpoint directory")
    return find_checkpoint(path)


def load_trainer_state(ckpt: Path) -> Optional[dict]:
    f = ckpt / TRAINER_FILE
    if not f.is_file():
        return None
    return torch.load(f, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------- trainer state for an exact resume

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_model_state(raw_model: torch.nn.Module, fsdp: bool) -> dict:
    """The whole model's weights as one state dict (under FSDP gathered to CPU on every rank)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if getattr(raw_model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        return {k: v.contiguous() for k, v in sd.items()}
    return state_dict_for_save(raw_model)


def full_optimizer_state(raw_model: torch.nn.Module, optimizer, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            raw_model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_model_and_optimizer(raw_model: torch.nn.Module, optimizer, model_state: dict, optimizer_state: dict,
                             fsdp: bool) -> None:
    """The inverse of ``full_model_state`` + ``full_optimizer_state``."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(raw_model, model_state, options=opts)
        set_optimizer_state_dict(raw_model, optimizer, optimizer_state, options=opts)
    else:
        raw_model.load_state_dict(model_state, strict=False)
        if hasattr(raw_model, "tie_weights"):
            raw_model.tie_weights()
        optimizer.load_state_dict(optimizer_state)
