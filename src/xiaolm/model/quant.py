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
method, per-module table, sizes), ``tokenizer/`` and ``config.yaml``. ``xiaolm.model.io.load_model``
recognises it by ``quantization.json`` and calls ``load_quantized``, so ``generate``, ``chat``, ``serve`` and
``eval`` take a QDIR wherever they take a RUNDIR.

This module is the representation (the math, the modules, ``QuantizedLlama``); ``xiaolm.infer.quantize`` writes a
QDIR, ``xiaolm.model.io.load_quantized`` reads one.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from xiaolm.model.llama import Llama

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
