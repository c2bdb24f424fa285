"""Checkpoints that survive crashes, and loading a model from any of the places one can live.

A checkpoint is a directory written under a temporary name and renamed into place, and only then named in
``checkpoints/latest``, so a crash at any moment leaves the previous checkpoint intact and findable. ``meta.json``
records the sha256 of every file, so a truncated or altered checkpoint is caught on load with a clear message.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from xiaolm.utils import atomic_output, atomic_write_text, log, sha256_file

MODEL_FILE = "model.safetensors"
MODEL_CONFIG = "model_config.json"
TRAINER_FILE = "trainer.pt"
META_FILE = "meta.json"


from xiaolm.errors import CheckpointError  # noqa: E402,F401 - a checkpoint that is missing, incomplete or corrupt


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


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


def find_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """RUNDIR (uses checkpoints/latest or /best) or a checkpoint directory -> the checkpoint directory."""
    path = Path(path)
    if (path / META_FILE).is_file() or (path / MODEL_FILE).is_file():
        return path
    root = checkpoints_dir(path)
    pointer = root / which
    if not pointer.is_file():
        if not path.exists():
            raise CheckpointError(f"{path}: no such run directory")
        if which == "latest" and step_checkpoints(root):
            return newest_verified_checkpoint(root)
        raise CheckpointError(f"{path}: no checkpoint found (expected {pointer})")
    ckpt = root / pointer.read_text().strip()
    if not ckpt.is_dir():
        raise CheckpointError(f"{pointer} names {ckpt.name}, which does not exist; pick another checkpoint "
                              f"with --resume-from STEP")
    return ckpt


def step_checkpoints(root: Path) -> list[Path]:
    """The ``step-N`` checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-"))


def newest_verified_checkpoint(root: Path) -> Path:
    """Without a ``latest`` pointer (a full disk can stop a save between the checkpoint and its pointer), the
    newest checkpoint whose files match their sha256."""
    for ckpt in reversed(step_checkpoints(root)):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as exc:
            log(f"note: passing over {ckpt.name}: {exc}")
            continue
        log(f"note: {root / 'latest'} is missing; using {ckpt.name}, the newest checkpoint that verifies")
        return ckpt
    raise CheckpointError(f"{root}: no latest pointer, and no checkpoint there verifies")


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


def verify_checkpoint(ckpt: Path) -> dict:
    """Check every file against the sha256 recorded in meta.json; return the meta."""
    meta_path = ckpt / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{ckpt}: incomplete checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: corrupt ({exc.msg})") from None
    for name, digest in meta.get("files", {}).items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"{ckpt}: corrupt checkpoint, {name} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(
                f"{ckpt}: corrupt checkpoint, {name} does not match its recorded sha256 "
                f"(truncated or altered); use an earlier checkpoint in {ckpt.parent}"
            )
    return meta


def load_trainer_state(ckpt: Path) -> Optional[dict]:
    f = ckpt / TRAINER_FILE
    if not f.is_file():
        return None
    return torch.load(f, map_location="cpu", weights_only=False)


@dataclass
class ModelInfo:
    """What ``load_model`` found: where the weights came from and what the checkpoint says about them."""

    path: Path
    kind: str  # "xiaolm" | "hf" | "quantized" | "lora"
    meta: dict = field(default_factory=dict)
    run_dir: Optional[Path] = None


def _find_tokenizer_dir(ckpt: Path) -> Optional[Path]:
    for cand in (ckpt / "tokenizer", ckpt.parent.parent / "tokenizer", ckpt.parent / "tokenizer", ckpt):
        if (cand / "tokenizer.json").is_file():
            return cand
    return None


def load_run_tokenizer(ckpt: Path, meta: dict):
    """The tokenizer saved beside checkpoint ``ckpt``, checked against the fingerprint the run trained with."""
    from xiaolm.tokenizer import load_tokenizer

    tok_dir = _find_tokenizer_dir(ckpt)
    if tok_dir is None:
        raise CheckpointError(f"{ckpt}: no tokenizer found beside the checkpoint")
    tokenizer = load_tokenizer(tok_dir)
    want = meta.get("tokenizer_fingerprint")
    if want and tokenizer.fingerprint != want:
        raise CheckpointError(f"{ckpt}: trained with tokenizer {want}, but {tok_dir} is {tokenizer.fingerprint}")
    return tokenizer


def load_model(
    path: str | Path,
    device: str = "cpu",
    dtype: Optional[torch.dtype] = None,
    which: str = "latest",
    verify: bool = True,
    with_tokenizer: bool = True,
) -> tuple[torch.nn.Module, Any, ModelInfo]:
    """Load ``(model, tokenizer, info)`` from a RUNDIR, a checkpoint directory, a quantised directory or a
    Hugging Face Llama directory (continued pretraining / fine-tuning from someone else's model)."""
    from xiaolm.model.llama import Llama, LlamaConfig

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if (path / "config.json").is_file() and not (path / MODEL_CONFIG).is_file() and not (path / "checkpoints").is_dir():
        from xiaolm.export.hf import load_hf_llama

        model, tokenizer = load_hf_llama(path, device=device, dtype=dtype, with_tokenizer=with_tokenizer)
        return model, tokenizer, ModelInfo(path=path, kind="hf")
    if (path / "quantization.json").is_file():
        from xiaolm.infer.quantize import load_quantized

        return load_quantized(path, device=device, with_tokenizer=with_tokenizer, dtype=dtype)
    ckpt = find_checkpoint(path, which)
    meta = verify_checkpoint(ckpt) if verify else json.loads((ckpt / META_FILE).read_text())
    if (ckpt / "adapter" / "adapter_config.json").is_file():
        from xiaolm.train.lora import load_lora_checkpoint

        return load_lora_checkpoint(ckpt, meta, device=device, dtype=dtype, with_tokenizer=with_tokenizer)
    cfg = LlamaConfig.from_dict(json.loads((ckpt / MODEL_CONFIG).read_text(encoding="utf-8")))
    model = Llama(cfg)
    sd = load_file(str(ckpt / MODEL_FILE))
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not fit the config (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    tokenizer = load_run_tokenizer(ckpt, meta) if with_tokenizer else None
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return model, tokenizer, ModelInfo(path=ckpt, kind="xiaolm", meta=meta, run_dir=run_dir)
