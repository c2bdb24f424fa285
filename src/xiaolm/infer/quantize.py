"""``xiaolm quantize``: write a quantised directory (QDIR) from a run. The schemes, the file format and the modules
are described in ``xiaolm.model.quant``; ``xiaolm.model.io.load_model`` reads a QDIR wherever it reads a RUNDIR."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from xiaolm.config import opt, parse_config, save_config
from xiaolm.model.llama import Llama
from xiaolm.model.quant import FORMAT, FORMAT_VERSION, GROUP_SIZES, QUANT_FILE, quantize_int4, quantize_int8
from xiaolm.rundir import lock_run_dir, prepare_model_dir
from xiaolm.utils import atomic_output, atomic_write_json, fail, log

# ================================================================================================== quantise

EMBEDDING_BITS = (4, 8, 16, 32)


def _linear_names(model: Llama) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def quantize_state_dict(model: Llama, bits: int, group_size: int = 64, embedding_bits: int = 8) -> tuple[dict, dict]:
    """Quantise a float model's matrices. Returns (tensors to save, per-module table for quantization.json)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if embedding_bits not in EMBEDDING_BITS:
        raise ValueError(f"embedding bits must be 4, 8, 16 or 32, got {embedding_bits}")
    cfg = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()
          if not k.endswith("rotary_emb.inv_freq")}
    out: dict[str, torch.Tensor] = {}
    table: dict[str, dict] = {}

    def put(name: str, w: torch.Tensor, b: int) -> None:
        g = group_size if b == 4 else w.shape[1]
        if b == 4 and w.shape[1] % g:
            g = next((s for s in sorted(GROUP_SIZES, reverse=True) if w.shape[1] % s == 0), None)
            if g is None:  # no group size fits: int8 keeps the matrix quantised
                b, g = 8, w.shape[1]
        q, s = quantize_int8(w) if b == 8 else quantize_int4(w, g)
        out[f"{name}.qweight"], out[f"{name}.scales"] = q, s
        table[name] = {"bits": b, "group_size": g, "shape": list(w.shape)}

    for name in _linear_names(model):
        put(name, sd.pop(f"{name}.weight"), bits)
    heads = ["model.embed_tokens"] + ([] if cfg.tie_word_embeddings else ["lm_head"])
    for name in heads:
        w = sd.pop(f"{name}.weight")
        if embedding_bits >= 16:
            out[f"{name}.weight"] = w.to(torch.float16 if embedding_bits == 16 else torch.float32)
            table[name] = {"bits": embedding_bits, "shape": list(w.shape)}
        else:
            put(name, w, embedding_bits)
    sd.pop("lm_head.weight", None)
    out.update(sd)  # norms
    return {k: v.contiguous() for k, v in out.items()}, table


# What a QDIR holds: an earlier one is replaced file by file with --overwrite, and nothing else is ever removed.
QDIR_FILES = ("model.safetensors", "model_config.json", "tokenizer", QUANT_FILE, "config.yaml")


def prepare_qdir_target(out: str | Path, overwrite: bool, source: str | Path) -> Path:
    """The rules ``export hf`` follows (``xiaolm.rundir.prepare_model_dir``): never the source or a run directory,
    never a non-empty directory that is not an earlier QDIR, and an earlier QDIR only with ``overwrite``."""
    return prepare_model_dir(out, source, overwrite, what="quantize: --out", noun="the QDIR",
                             source_noun="the run being quantised",
                             earlier_noun="an earlier quantised directory",
                             earlier=lambda p: "an earlier quantised model" if (p / QUANT_FILE).is_file() else None,
                             earlier_files=lambda p: QDIR_FILES)


def quantize_run(run: str | Path, out: str | Path, bits: int, group_size: int = 64, embedding_bits: int = 8,
                 which: str = "latest", config=None, overwrite: bool = False) -> dict:
    """Quantise a run's checkpoint into QDIR ``out``; returns quantization.json's content."""
    from safetensors.torch import save_file

    from xiaolm.model.io import CheckpointError, load_model
    from xiaolm.utils import atomic_write_text

    if bits not in (4, 8):
        raise fail(f"--bits {bits}: choose 8 or 4")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise fail(f"--group-size {group_size}: choose one of {', '.join(map(str, GROUP_SIZES))}")
    if embedding_bits not in EMBEDDING_BITS:
        raise fail(f"--embedding-bits {embedding_bits}: choose one of {', '.join(map(str, EMBEDDING_BITS))}")
    run = Path(run)
    if not run.exists():
        raise fail(f"{run}: no such run or checkpoint directory")
    out = prepare_qdir_target(out, overwrite, run)
    if (run / QUANT_FILE).is_file():
        raise fail(f"{run}: already quantised; quantise the original run")
    try:
        model, tokenizer, info = load_model(run, device="cpu", dtype=torch.float32, which=which)
    except CheckpointError as exc:
        raise fail(str(exc))
    if not isinstance(model, Llama) or hasattr(model, "peft_config"):  # a LoRA model: merge it first
        merge = getattr(model, "merge_and_unload", None)
        if merge is None:
            raise fail(f"{run}: cannot quantise a {type(model).__name__}")
        model = merge()
    tensors, table = quantize_state_dict(model, bits, group_size, embedding_bits)
    lock_run_dir(out, "quantize")  # creates it; a second quantize into the same QDIR at once is refused
    with atomic_output(out / "model.safetensors") as part:  # normal permissions, never a half-written file
        save_file(tensors, str(part), metadata={"format": "pt", "quantization": FORMAT})
    atomic_write_text(out / "model_config.json", json.dumps(model.config.to_dict(), indent=2))
    if tokenizer is not None:
        tokenizer.save(out / "tokenizer")

    linear_names = set(_linear_names(model))
    float_bytes = sum(4 * v["shape"][0] * v["shape"][1] for n, v in table.items() if n in linear_names)
    quant_bytes = sum(tensors[f"{n}.qweight"].numel() * tensors[f"{n}.qweight"].element_size()
                      + tensors[f"{n}.scales"].numel() * tensors[f"{n}.scales"].element_size()
                      for n in linear_names)
    qconf = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "bits": bits,
        "group_size": group_size if bits == 4 else None,
        "embedding_bits": embedding_bits,
        "method": ("int8 symmetric per output channel, float32 scales" if bits == 8 else
                   f"int4 symmetric per group of {group_size} (Q4_0-style signed-absmax scale / -8), "
                   "float16 scales, two codes per byte (low nibble = even column, code = q + 8)"),
        "weight_only": True,
        "modules": table,
        "linear_bytes_float32": float_bytes,
        "linear_bytes_quantized": quant_bytes,
        "linear_compression": round(float_bytes / max(quant_bytes, 1), 3),
        "source": str(info.path),
        "source_meta": {k: v for k, v in info.meta.items() if k not in ("files",)},
        "tokenizer_fingerprint": getattr(tokenizer, "fingerprint", None),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_json(out / QUANT_FILE, qconf)
    if config is not None:
        save_config(config, out / "config.yaml")
    return qconf


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (each tensor once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ================================================================================================== CLI


@dataclass
class QuantizeConfig:
    """Weight-only quantisation: int8 (per output channel) or int4 (group-wise, packed two per byte). The output \
directory works with generate, chat, serve and eval like a run directory."""

    run: str = opt(None, "RUNDIR or checkpoint directory to quantise")
    bits: Literal[8, 4] = opt(8, "8: int8 per output channel; 4: int4 group-wise")
    out: str = opt(None, "output directory (QDIR), usable wherever a RUNDIR is", required="--out QDIR is required")
    group_size: int = opt(64, "int4 group size: 32, 64 or 128 (smaller: more accurate, slightly larger)")
    embedding_bits: int = opt(8, "bits for the token embedding / output head: 8, 4, or 16 / 32 to keep it float")
    checkpoint: str = opt("latest", "which checkpoint of a RUNDIR: latest or best")
    overwrite: bool = opt(False, "replace an earlier quantised directory at --out (any other non-empty one is refused)")


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(QuantizeConfig, argv, "xiaolm quantize", positionals={"run": "RUNDIR"})
    qconf = quantize_run(cfg.run, cfg.out, int(cfg.bits), cfg.group_size, cfg.embedding_bits, cfg.checkpoint,
                         config=cfg, overwrite=cfg.overwrite)
    size = (Path(cfg.out) / "model.safetensors").stat().st_size
    log(f"quantize: {qconf['method']}")
    log(f"quantize: linear weights {qconf['linear_bytes_float32'] / 1e6:.2f} MB (float32) -> "
        f"{qconf['linear_bytes_quantized'] / 1e6:.2f} MB ({qconf['linear_compression']:.2f}x smaller); "
        f"model.safetensors {size / 1e6:.2f} MB")
    print(cfg.out, file=sys.stdout)
    return 0
