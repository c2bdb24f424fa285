"""Weight-only quantisation (``xiaolm quantize``): int8 per output channel, int4 group-wise, for CPU and GPU.

Schemes (symmetric, no zero points; activations stay in floating point):

- **int8**: one scale per output channel (row of the ``[out, in]`` weight), ``scale = max|w| / 127``,
  ``q = round(w / scale)`` in [-127, 127]; float32 scales.
- **int4**: one scale per group of ``group_size`` consecutive input values of a row (32, 64 or 128), set the way
  llama.cpp's Q4_0 does: ``scale = m / -8`` where ``m`` is the group's value of largest magnitude *with its sign*, so
  that value lands exactly on -8 and the 16 levels [-8, 7] cover the group; float16 scales. Two values per byte:
  the low nibble holds the even column, the high nibble the odd one, each stored as ``q + 8``.

The token embedding (also the output head when tied) is quantised separately with ``--embedding-bits`` (default 8
for both schemes: the head's logits feel 4-bit error most, the reason llama.cpp keeps its output matrix at higher
precision; 16 or 32 keeps it in float). Norm weights stay float32.

Inference dequantises on the fly (no custom kernels, any device): int8 multiplies by the int8 matrix cast to the
compute dtype and scales the output rows, int4 unpacks and scales the group. ``kernel="aten"`` instead uses
PyTorch's fused CPU kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``), which are fast with bfloat16
activations; ``kernel="torchao"`` hands int8 weights to torchao's ``Int8Tensor`` (torchao 0.18 works for int8
weight-only on CPU; it is optional, and its tensors cannot be written to safetensors, so the file format is ours).

A quantised directory (QDIR) holds ``model.safetensors`` (``<module>.qweight`` / ``<module>.scales`` per quantised
matrix, float tensors under their usual names), ``model_config.json``, ``quantization.json`` (bits, group size,
method, per-module table, sizes), ``tokenizer/`` and ``config.yaml``. ``xiaolm.train.checkpoint.load_model``
recognises it by ``quantization.json`` and calls ``load_quantized``, so ``generate``, ``chat``, ``serve`` and
``eval`` take a QDIR wherever they take a RUNDIR.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from xiaolm.config import opt, parse_config, save_config
from xiaolm.model.llama import Llama
from xiaolm.utils import atomic_output, atomic_write_json, fail, log

QUANT_FILE = "quantization.json"
FORMAT = "xiaolm-weight-only"
FORMAT_VERSION = 1
GROUP_SIZES = (32, 64, 128)
KERNELS = ("auto", "dequant", "aten", "torchao")


# ================================================================================================== math


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` float -> (int8 ``[out, in]``, float32 scales ``[out]``), symmetric per output channel."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` float -> (uint8 ``[out, in/2]`` packed, float16 scales ``[out, in/group]``), Q4_0-style."""
    w = w.detach().float()
    n, k = w.shape
    if k % group_size or group_size % 2:
        raise ValueError(f"int4 needs the input size ({k}) to be a multiple of the group size ({group_size})")
    groups = w.view(n, k // group_size, group_size)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    scale = (extreme / -8.0).to(torch.float16)  # round first, so the codes are chosen for the scale we store
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    q = torch.round(groups / scale.float()[..., None]).clamp_(-8, 7).to(torch.int16) + 8
    q = q.view(n, k).to(torch.uint8)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), scale


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., in/2]`` -> codes 0..15 ``[..., in]`` (value + 8)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group_size: int, dtype=torch.float32) -> torch.Tensor:
    q = unpack_int4(packed)
    shape = q.shape
    groups = q.view(*shape[:-1], shape[-1] // group_size, group_size).to(dtype) - 8
    return (groups * scale.to(dtype)[..., None]).view(shape)


# ================================================================================================== modules


class QuantWeight(nn.Module):
    """A quantised ``[out, in]`` matrix: ``qweight`` (int8, or uint8 holding two int4 codes) and ``scales``."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, in_features: int,
                 compute_dtype: torch.dtype = torch.float32, kernel: str = "dequant"):
        super().__init__()
        self.bits, self.group_size, self.in_features = bits, group_size, in_features
        self.out_features = qweight.shape[0]
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.kernel = "dequant"
        self._fast: dict = {}
        if kernel != "dequant":
            self.set_kernel(kernel)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}{group}, kernel={self.kernel}"

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales, dtype)
        return dequantize_int4(self.qweight, self.scales, self.group_size, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised matrix (for code that reads ``.weight``; costs a full dequantisation)."""
        return self.dequantize()

    def set_kernel(self, kernel: str) -> None:
        """Switch to a fused kernel where it exists for this device (prepares its weight layout)."""
        self._fast = {}
        if kernel in ("dequant", "auto"):
            self.kernel = "dequant"
            return
        if kernel == "aten":
            if self.qweight.device.type != "cpu":
                raise ValueError("kernel 'aten' is for the CPU; on a GPU use the default dequantising path")
            if self.bits == 8:
                # A fresh allocation: tensors read from safetensors may sit at unaligned addresses, which this
                # kernel's vector loads do not survive (segfault).
                self.qweight = self.qweight.clone()
                self._fast["q"] = self.qweight
            else:
                codes = unpack_int4(self.qweight).to(torch.int32)
                self._fast["packed"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
                self._fast["sz"] = torch.stack([self.scales.float().t(), torch.zeros_like(self.scales.float().t())],
                                               dim=-1).contiguous()
            self.kernel = "aten"
            return
        if kernel == "torchao":
            if self.bits != 8:
                raise ValueError("torchao is used for int8 only (its int4 weight-only path does not run on CPU)")
            from torchao.quantization import Int8Tensor

            self._fast["w"] = Int8Tensor(self.qweight, self.scales.float(), [1, self.in_features], self.compute_dtype)
            self.kernel = "torchao"
            return
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "aten":
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            if self.bits == 8:
                y = torch.ops.aten._weight_int8pack_mm(x2, self._fast["q"], self.scales.to(x.dtype))
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self._fast["packed"], self.group_size,
                                                               self._fast["sz"].to(x.dtype))
            return y.reshape(*shape[:-1], self.out_features)
        if self.kernel == "torchao":
            return F.linear(x, self._fast["w"])
        if self.bits == 8:  # scale the output rows instead of the weight: one multiply per output, not per weight
            return F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantised rows ``ids`` (an embedding lookup)."""
        q, s = self.qweight[ids], self.scales[ids]
        if self.bits == 8:
            return q.to(self.compute_dtype) * s.to(self.compute_dtype)[..., None]
        return dequantize_int4(q, s, self.group_size, self.compute_dtype)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.kernel != "dequant":  # fused layouts are device-specific: rebuild after a move
            self.set_kernel(self.kernel)
        return out


class QuantLinear(QuantWeight):
    """``nn.Linear`` (no bias) over a quantised matrix."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class QuantEmbedding(QuantWeight):
    """``nn.Embedding`` over a quantised matrix."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids)


class TiedQuantHead(nn.Module):
    """The output head of a tied model: the embedding's quantised matrix used as a linear layer. The embedding is
    held outside the module tree, so its buffers exist (and move) once."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        self._embedding = [embedding]

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._embedding[0].linear(x)


class QuantizedLlama(Llama):
    """``Llama`` whose matrices are ``QuantLinear`` / ``QuantEmbedding``; everything else is unchanged."""

    compute_dtype: torch.dtype = torch.float32

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def tie_weights(self) -> None:  # the tie is built in (TiedQuantHead)
        return None


# ================================================================================================== quantise


def _linear_names(model: Llama) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def quantize_state_dict(model: Llama, bits: int, group_size: int = 64, embedding_bits: int = 8) -> tuple[dict, dict]:
    """Quantise a float model's matrices. Returns (tensors to save, per-module table for quantization.json)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if embedding_bits not in (4, 8, 16, 32):
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


def quantize_run(run: str | Path, out: str | Path, bits: int, group_size: int = 64, embedding_bits: int = 8,
                 which: str = "latest", config=None) -> dict:
    """Quantise a run's checkpoint into QDIR ``out``; returns quantization.json's content."""
    from safetensors.torch import save_file

    from xiaolm.train.checkpoint import CheckpointError, load_model
    from xiaolm.utils import atomic_write_text

    if bits == 4 and group_size not in GROUP_SIZES:
        raise fail(f"--group-size {group_size}: choose one of {', '.join(map(str, GROUP_SIZES))}")
    run = Path(run)
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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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


# ================================================================================================== load


def _default_dtype(device: str) -> torch.dtype:
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.float32


def load_quantized(path: str | Path, device: str = "cpu", with_tokenizer: bool = True,
                   dtype: Optional[torch.dtype] = None, kernel: str = "auto"):
    """``(model, tokenizer, ModelInfo(kind="quantized"))`` from a QDIR. ``dtype`` is the compute dtype (default:
    float32 on the CPU, bfloat16 / float16 on a GPU); ``kernel`` picks the matmul (see the module docstring)."""
    from safetensors.torch import load_file

    from xiaolm.model.llama import LlamaConfig, RotaryEmbedding
    from xiaolm.train.checkpoint import CheckpointError, ModelInfo

    path = Path(path)
    try:
        qconf = json.loads((path / QUANT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / QUANT_FILE}: unreadable ({exc})") from None
    if qconf.get("format") != FORMAT:
        raise CheckpointError(f"{path / QUANT_FILE}: format {qconf.get('format')!r} is not {FORMAT!r}")
    if qconf.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer xiaolm (format version {qconf['version']})")
    for name in ("model.safetensors", "model_config.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: incomplete quantised directory ({name} is missing)")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    device = str(device)
    dtype = dtype or _default_dtype(device)
    cfg = LlamaConfig.from_dict(json.loads((path / "model_config.json").read_text(encoding="utf-8")))
    sd = load_file(str(path / "model.safetensors"), device=device)

    with torch.device("meta"):
        model = QuantizedLlama(cfg)
    model.compute_dtype = dtype
    modules = qconf.get("modules", {})

    def parent_of(name: str):
        parent_name, _, child = name.rpartition(".")
        return model.get_submodule(parent_name) if parent_name else model, child

    for name, spec in modules.items():
        if spec["bits"] >= 16:
            continue
        if f"{name}.qweight" not in sd:
            raise CheckpointError(f"{path}/model.safetensors: {name}.qweight is missing")
        cls = QuantEmbedding if name == "model.embed_tokens" else QuantLinear
        mod = cls(sd.pop(f"{name}.qweight"), sd.pop(f"{name}.scales"), spec["bits"], spec["group_size"],
                  spec["shape"][1], compute_dtype=dtype)
        parent, child = parent_of(name)
        setattr(parent, child, mod)
    if cfg.tie_word_embeddings:
        emb = model.model.embed_tokens
        if isinstance(emb, QuantEmbedding):
            model.lm_head = TiedQuantHead(emb)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    quant_keys = {f"{n}.{b}" for n in modules for b in ("qweight", "scales")}
    missing = [k for k in missing if k not in quant_keys and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the config (missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]})")
    if cfg.tie_word_embeddings and isinstance(model.model.embed_tokens, nn.Embedding):
        model.lm_head.weight = model.model.embed_tokens.weight  # a float embedding stays tied the usual way
    model.model.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta).to(device)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise CheckpointError(f"{path}: tensors without values after loading: {leftovers[:6]}")
    chosen = "dequant" if kernel == "auto" else kernel
    if chosen != "dequant":
        for m in model.modules():
            if isinstance(m, QuantWeight):
                m.compute_dtype = dtype
                try:
                    m.set_kernel(chosen)
                except (RuntimeError, ValueError) as exc:
                    raise CheckpointError(f"{path}: kernel {chosen!r} is not available here: {exc}") from None
    model.eval()

    tokenizer = None
    if with_tokenizer:
        from xiaolm.tokenizer import load_tokenizer

        tok_dir = path / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file():
            raise CheckpointError(f"{path}: no tokenizer/ in the quantised directory")
        tokenizer = load_tokenizer(tok_dir)
        want = qconf.get("tokenizer_fingerprint")
        if want and tokenizer.fingerprint != want:
            raise CheckpointError(f"{path}: quantised with tokenizer {want}, but tokenizer/ is {tokenizer.fingerprint}")
    return model, tokenizer, ModelInfo(path=path, kind="quantized", meta=qconf, run_dir=None)


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
    run: str = opt(None, "RUNDIR or checkpoint directory to quantise")
    bits: Literal[8, 4] = opt(8, "8: int8 per output channel; 4: int4 group-wise")
    out: str = opt(None, "output directory (QDIR), usable wherever a RUNDIR is")
    group_size: int = opt(64, "int4 group size: 32, 64 or 128 (smaller: more accurate, slightly larger)")
    embedding_bits: int = opt(8, "bits for the token embedding / output head: 8, 4, or 16 / 32 to keep it float")
    checkpoint: str = opt("latest", "which checkpoint of a RUNDIR: latest or best")


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(
        QuantizeConfig, argv, "xiaolm quantize",
        "Weight-only quantisation: int8 (per output channel) or int4 (group-wise, packed two per byte). The output "
        "directory works with generate, chat, serve and eval like a run directory.",
        positionals={"run": "RUNDIR"},
    )
    if not cfg.out:
        raise fail("--out QDIR is required")
    qconf = quantize_run(cfg.run, cfg.out, int(cfg.bits), cfg.group_size, cfg.embedding_bits, cfg.checkpoint,
                         config=cfg)
    size = (Path(cfg.out) / "model.safetensors").stat().st_size
    log(f"quantize: {qconf['method']}")
    log(f"quantize: linear weights {qconf['linear_bytes_float32'] / 1e6:.2f} MB (float32) -> "
        f"{qconf['linear_bytes_quantized'] / 1e6:.2f} MB ({qconf['linear_compression']:.2f}x smaller); "
        f"model.safetensors {size / 1e6:.2f} MB")
    print(cfg.out, file=sys.stdout)
    return 0
