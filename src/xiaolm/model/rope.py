"""RoPE scaling: longer context than a model was pretrained with, in transformers' semantics.

``LlamaConfig.rope_scaling`` is a dict in Hugging Face's layout (``rope_type`` linear, dynamic, yarn or llama3, with
``factor``, ``original_max_position_embeddings`` and the type's own keys), so an export carries it unchanged and
``transformers``, ``llama.cpp`` (linear, yarn, llama3) and vLLM read it. The frequencies below follow
``transformers.modeling_rope_utils`` line for line (the tests compare logits with transformers at positions past
the original context), written out here because the network's math is the point of this project.

One difference of layout, kept at the export boundary: our ``max_position_embeddings`` is always the context the
model accepts. For ``dynamic`` transformers reads ``max_position_embeddings`` as the *original* length, so the
Hugging Face export writes the original there and the import multiplies it back (``model/hf.py``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
# Defaults transformers (and the papers) use when a key is absent.
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0
LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR = 1.0, 4.0


def normalize_rope_scaling(scaling: Optional[dict], max_position_embeddings: int) -> Optional[dict]:
    """A validated copy with every key our math reads made explicit; None or ``default`` means plain RoPE.

    Raises ValueError naming the field. ``original_max_position_embeddings`` defaults to the context divided by
    the factor (a model extended from N to factor x N positions)."""
    if not scaling:
        return None
    s = dict(scaling)
    rope_type = s.pop("type", None) or s.get("rope_type")  # "type": transformers 4.3x spelling
    if rope_type in (None, "default"):
        return None
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type {rope_type!r} is not supported (one of {', '.join(ROPE_TYPES)})")
    s["rope_type"] = rope_type
    s.pop("rope_theta", None)  # lives in LlamaConfig.rope_theta
    factor = s.get("factor")
    if factor is None and rope_type == "yarn" and s.get("original_max_position_embeddings"):
        factor = max_position_embeddings / s["original_max_position_embeddings"]  # transformers' rule for yarn
    try:
        factor = float(factor)
    except (TypeError, ValueError):
        raise ValueError(f"rope_scaling.factor must be a number >= 1, got {s.get('factor')!r}") from None
    if not math.isfinite(factor) or factor < 1:
        raise ValueError(f"rope_scaling.factor must be a number >= 1, got {factor}")
    s["factor"] = factor
    original = s.get("original_max_position_embeddings") or max(1, round(max_position_embeddings / factor))
    if int(original) != original or original < 1:
        raise ValueError(f"rope_scaling.original_max_position_embeddings must be a positive integer, got {original!r}")
    s["original_max_position_embeddings"] = int(original)
    if rope_type == "yarn":
        s["beta_fast"] = float(s.get("beta_fast") or YARN_BETA_FAST)
        s["beta_slow"] = float(s.get("beta_slow") or YARN_BETA_SLOW)
    if rope_type == "llama3":
        s["low_freq_factor"] = float(s.get("low_freq_factor", LLAMA3_LOW_FREQ_FACTOR))
        s["high_freq_factor"] = float(s.get("high_freq_factor", LLAMA3_HIGH_FREQ_FACTOR))
        if s["high_freq_factor"] <= s["low_freq_factor"]:
            raise ValueError("rope_scaling.high_freq_factor must exceed low_freq_factor")
    return s


def base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (eq. 21 of the paper): 0.1 * mscale * ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def scaled_inv_freq(head_dim: int, theta: float, scaling: Optional[dict]) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the factor cos/sin are multiplied by, for every static type.

    ``dynamic`` depends on the sequence length and is computed per forward (``dynamic_inv_freq``); here it returns
    the plain frequencies, which it uses up to the original context."""
    inv_freq = base_inv_freq(head_dim, theta)
    if scaling is None or scaling["rope_type"] == "dynamic":
        return inv_freq, 1.0
    kind, factor = scaling["rope_type"], scaling["factor"]
    original = scaling["original_max_position_embeddings"]
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv_freq
        out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, out), 1.0
    # yarn: interpolate the low frequencies, keep the high ones, ramp in between; temper attention by mscale
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)) if mscale and mscale_all \
            else yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, float(attention)


def dynamic_inv_freq(head_dim: int, theta: float, scaling: dict, seq_len: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK: the base grows with the sequence once it passes the original context (no host sync: the
    length stays a tensor). Equal to transformers for a forward pass whose longest position is ``seq_len - 1``."""
    original, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    seq_len = seq_len.float().clamp(min=original)
    base = theta * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=seq_len.device).float() / head_dim
    return 1.0 / (base ** exponents)


def hf_rope_fields(scaling: Optional[dict], theta: float, max_position_embeddings: int) -> dict:
    """The rope fields of a Hugging Face config.json (both spellings: ``rope_scaling`` for transformers 4.x,
    ``rope_parameters`` for 5.x) and the ``max_position_embeddings`` it must carry."""
    if scaling is None:
        return {"rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": float(theta)},
                "max_position_embeddings": max_position_embeddings}
    s = dict(scaling)
    if s["rope_type"] == "dynamic":
        # transformers' dynamic NTK takes max_position_embeddings as the original length and has no key for it
        max_position_embeddings = s.pop("original_max_position_embeddings")
    if s["rope_type"] == "linear":
        s.pop("original_max_position_embeddings")  # not a linear key in transformers (it warns on unknown keys)
    return {"rope_scaling": s, "rope_parameters": {**s, "rope_theta": float(theta)},
            "max_position_embeddings": max_position_embeddings}


def rope_scaling_from_hf(conf: dict) -> tuple[Optional[dict], Optional[int]]:
    """(our rope_scaling, our max_position_embeddings or None to keep the file's) from a config.json dict."""
    scaling = conf.get("rope_scaling") or None
    if scaling is None:
        params = conf.get("rope_parameters") or {}
        if params.get("rope_type", "default") not in ("default", None):
            scaling = params
    if not scaling:
        return None, None
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    kind = scaling.get("rope_type") or scaling.get("type")
    max_pos = int(conf.get("max_position_embeddings", 2048))
    if kind == "dynamic":
        scaling.setdefault("original_max_position_embeddings", max_pos)
        factor = float(scaling.get("factor", 1.0))
        return normalize_rope_scaling(scaling, int(max_pos * factor)), int(scaling["original_max_position_embeddings"] * factor)
    if kind in ("yarn", "llama3"):
        scaling.setdefault("original_max_position_embeddings", max_pos)  # transformers' default for these types
    return normalize_rope_scaling(scaling, max_pos), None


def extend_context(model, context: int, rope_type: str, factor: Optional[float] = None) -> dict:
    """Give ``model`` RoPE scaling for ``context`` positions, in place; returns the new ``rope_scaling``.

    The original context is the one the model was pretrained with (kept from an earlier scaling, so extending twice
    scales from the first length); ``factor`` defaults to ``context`` / original."""
    cfg = model.config
    original = (cfg.rope_scaling or {}).get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = float(factor) if factor is not None else context / original
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"--rope-scaling {rope_type!r} is not one of {', '.join(ROPE_TYPES)}")
    if not factor >= 1:
        raise ValueError(f"--rope-factor {factor:g} must be >= 1 (the context {context} is shorter than the model's "
                         f"original {original})")
    scaling = {"rope_type": rope_type, "factor": factor, "original_max_position_embeddings": int(original)}
    cfg.rope_scaling = normalize_rope_scaling(scaling, context)
    cfg.max_position_embeddings = max(int(context), cfg.max_position_embeddings)
    device = model.model.embed_tokens.weight.device
    model.model.rotary_emb = type(model.model.rotary_emb).for_config(cfg).to(device)  # llama.RotaryEmbedding
    return cfg.rope_scaling
