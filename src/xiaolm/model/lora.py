"""LoRA (peft) pieces the model layer needs to load an adapter checkpoint: its layout and the merge. Training with
LoRA (wrapping, trainable parameters, checkpoint files, a merged save) is ``xiaolm.train.lora``; loading a LoRA
checkpoint is ``xiaolm.model.io.load_lora_checkpoint``."""
from __future__ import annotations

import torch

ADAPTER_DIR = "adapter"
_PEFT_PREFIX = "base_model.model."


def base_weights_from_peft_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain Llama weights from a peft-wrapped state dict: strip the wrapper prefix and ``base_layer.``, drop LoRA."""
    out = {}
    for key, value in sd.items():
        if ".lora_" in key:
            continue
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        out[name.replace(".base_layer.", ".")] = value
    return out


def merge_lora(peft_model) -> torch.nn.Module:
    """Fold the adapter into the base weights (W + B A * alpha / r) and return the plain ``Llama``."""
    model = peft_model.merge_and_unload()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model
