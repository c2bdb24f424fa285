"""LoRA through ``peft`` on the xiaolm model: wrap, checkpoint, load, merge.

Our model's parameter names are Hugging Face Llama's, so a peft adapter trained here is an ordinary peft adapter:
``adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``, written by ``save_pretrained``) loads onto a
``transformers.LlamaForCausalLM`` holding the same base weights with ``PeftModel.from_pretrained``.

A LoRA checkpoint is a normal xiaolm checkpoint directory (atomic, sha256-verified, resumable) whose
``model.safetensors`` holds the peft-wrapped model's full state (frozen base weights and adapter weights, under
peft's names, so ``--resume`` restores both exactly), plus ``adapter/`` in peft's format.
``xiaolm.model.io.load_model`` hands such a checkpoint to ``load_lora_checkpoint``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch

from xiaolm.model.lora import ADAPTER_DIR, _PEFT_PREFIX
from xiaolm.train.engine import Trainer

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def apply_lora(model: torch.nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05,
               target_modules: Optional[list[str]] = None, base_name: Optional[str] = None):
    """Wrap ``model`` (a ``Llama``) in a peft ``PeftModel`` with LoRA on ``target_modules``.

    Only the adapter weights are trainable afterwards. The B matrices start at zero, so at step 0 the wrapped model
    computes exactly what the base model does."""
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules or DEFAULT_TARGETS)
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ValueError(f"LoRA target modules {unknown} are not linear layers of the model; "
                         f"choose from {sorted(names)}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        base_model_name_or_path=base_name)
    return get_peft_model(model, config)


def base_model_of(peft_model) -> torch.nn.Module:
    """The wrapped ``Llama`` (with LoRA layers injected) inside a ``PeftModel``."""
    return peft_model.get_base_model()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def peft_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The wrapped model's full state (base + adapter, peft's names) for a checkpoint; a tied ``lm_head`` is left
    out (safetensors stores no shared tensors; loading re-ties it)."""
    sd = peft_model.state_dict()
    if getattr(base_model_of(peft_model).config, "tie_word_embeddings", False):
        sd.pop(_PEFT_PREFIX + "lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def adapter_files(peft_model) -> dict[str, bytes]:
    """``adapter/adapter_config.json`` and ``adapter/adapter_model.safetensors`` as peft's ``save_pretrained``
    writes them, as bytes (for the checkpoint writer, which adds them atomically with their sha256)."""
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        return {f"{ADAPTER_DIR}/{p.name}": p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def save_merged(model: torch.nn.Module, out_dir: str | Path, meta: dict, tokenizer=None) -> Path:
    """Write a merged (plain) model as a weights-only checkpoint directory that ``load_model`` reads."""
    from xiaolm.train.checkpoint import save_checkpoint, state_dict_for_save

    out_dir = Path(out_dir)
    step = int(meta.get("step", 0))
    # save_checkpoint writes RUN/checkpoints/step-N atomically; we give it a private run dir and move the result.
    staging = out_dir.parent / f".{out_dir.name}.staging"
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    path = save_checkpoint(staging, step, model, model.config.to_dict(),
                           {k: v for k, v in meta.items() if k not in ("files", "step", "saved_at")},
                           trainer_state=None, keep_last=0, state_dict=state_dict_for_save(model))
    import os
    import shutil

    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(path, out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    if tokenizer is not None:
        tokenizer.save(out_dir / "tokenizer")
    return out_dir


class LoraTrainer(Trainer):
    """The shared Trainer for a peft-wrapped model: checkpoints hold its state dict and, written atomically with it,
    the adapter directory (``adapter_files``)."""

    def model_state(self) -> dict:
        return peft_state_dict(self.raw_model)

    def checkpoint_files(self) -> dict[str, bytes]:
        return {**super().checkpoint_files(), **adapter_files(self.raw_model)}
