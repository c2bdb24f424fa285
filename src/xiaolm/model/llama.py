"""The xiaolm model: a Llama-style decoder in one file.

Pre-norm RMSNorm, rotary position embeddings (Hugging Face's ``rotate_half`` convention), grouped-query attention
through the kernel ``xiaolm.model.attention`` picks (flash or FlexAttention on GPU), a SwiGLU MLP, no biases, tied or
untied embeddings.

Parameter names and config field names are those of ``transformers.LlamaForCausalLM`` / ``LlamaConfig``, so a
state dict exports to Hugging Face as a copy and imports from it the same way.

Decode caches live in ``xiaolm.infer.cache``; the network sees one only as an object with ``update(layer, k, v,
write)`` (and hands its whole pass to a cache whose ``drives_forward`` is true).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from xiaolm.model.attention import attend, build_attention_mask, document_block_mask, use_flex  # noqa: F401

# ------------------------------------------------------------------------------------------------ config


@dataclass
class LlamaConfig:
    vocab_size: int = 8192
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None  # defaults to hidden_size // num_attention_heads
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 0
    pad_token_id: int = 0

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def llama_mlp_size(hidden: int, multiple_of: int) -> int:
    """Llama's rule: 2/3 of 4*hidden, rounded up to a multiple (256 keeps GPU matmuls tile-aligned)."""
    size = int(2 * 4 * hidden / 3)
    return multiple_of * math.ceil(size / multiple_of)


# name -> (hidden, layers, heads, kv heads, MLP multiple); tiny-llm-zh's size table, Chinese_LLM_From_Scratch's
# microstories, and small CPU presets.
_PRESET_SHAPES = {
    "tiny": (64, 2, 4, 2, 32),  # unit tests
    "quickstart": (128, 4, 4, 2, 32),  # a few minutes on 2 CPU cores
    "9m": (64, 5, 8, 4, 32),
    "24m": (288, 6, 6, 6, 32),
    "58m": (512, 8, 8, 8, 256),
    "microstories": (512, 6, 8, 8, 256),
    "134m": (768, 12, 12, 12, 256),
    "256m": (1024, 16, 16, 16, 256),
}
PRESETS = tuple(_PRESET_SHAPES)


def preset_config(name: str, vocab_size: int = 8192, max_position_embeddings: int = 1024, **overrides) -> LlamaConfig:
    if name not in _PRESET_SHAPES:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    hidden, layers, heads, kv, multiple = _PRESET_SHAPES[name]
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=llama_mlp_size(hidden, multiple),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=max_position_embeddings,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def count_parameters(cfg: LlamaConfig) -> dict:
    """Parameter counts from the config alone (no allocation)."""
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = h * cfg.num_attention_heads * hd * 2 + h * cfg.num_key_value_heads * hd * 2
    mlp = 3 * h * i
    per_layer = attn + mlp + 2 * h
    embed = cfg.vocab_size * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    total = embed + head + cfg.num_hidden_layers * per_layer + h
    return {"total": total, "embedding": embed, "lm_head": head, "body": total - embed - head}


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N (N without the embedding lookup) + 12*L*d*T attention (PaLM appendix B)."""
    n = count_parameters(cfg)
    matmul_params = n["total"] - n["embedding"] + (n["embedding"] if cfg.tie_word_embeddings else 0)
    attn_dim = cfg.num_attention_heads * cfg.head_dim
    return 6 * matmul_params + 12 * cfg.num_hidden_layers * attn_dim * seq_len


# ------------------------------------------------------------------------------------------------ layers


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables indexed by position ids (so left padding and per-document positions work)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.max_positions = max_positions

    def _inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))

    def _apply(self, fn, recurse=True):
        # ``model.to(torch.bfloat16)`` (GPU serving) would round the frequencies to 8 bits of mantissa: position 500
        # would then rotate up to ~0.7 rad off the angle the model was trained with. They stay float32.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self._inv_freq().to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        # [B, T] -> cos, sin of shape [B, 1, T, head_dim]; computed in float32 like Hugging Face.
        freqs = position_ids.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache, write: Optional[torch.Tensor] = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        # RoPE runs in the tables' float32 under autocast; the kernels want one dtype (FlexAttention rejects a mix,
        # SDPA would run float32 kernels), so q/k go back to v's dtype (bf16 under autocast, a no-op in float32).
        q, k = apply_rotary(q, k, cos, sin)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, write)
        y = attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, write=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, write)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)


# ------------------------------------------------------------------------------------------------ masks


def doc_ids_from_tokens(input_ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Document index per position in a packed window: a new document starts after each end-of-text token."""
    ends = (input_ids == eot_id).long()
    return torch.cumsum(ends, dim=1) - ends


def positions_from_docs(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every document start."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - first


# ------------------------------------------------------------------------------------------------ model


class CausalLMOutput(NamedTuple):
    logits: Optional[torch.Tensor]
    loss: Optional[torch.Tensor]


class Llama(nn.Module):
    """Decoder-only language model; ``model.*`` and ``lm_head`` match ``transformers.LlamaForCausalLM``."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.attn_impl = "auto"  # auto, sdpa or flex (xiaolm.model.attention; a runtime choice, not saved)
        self.apply(self._init_weights)
        # GPT-2 style: scale the residual-stream output projections by depth so activations stay O(1).
        scale = cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers)
        for layer in self.model.layers:
            nn.init.normal_(layer.self_attn.o_proj.weight, std=scale)
            nn.init.normal_(layer.mlp.down_proj.weight, std=scale)

    def zero_init_residual_(self) -> None:
        """Zero every residual branch's output projection (o_proj, down_proj), as modded-nanogpt and nanochat do:
        each block starts as the identity. An initialisation only; the weights stay a standard Llama's."""
        for layer in self.model.layers:
            nn.init.zeros_(layer.self_attn.o_proj.weight)
            nn.init.zeros_(layer.mlp.down_proj.weight)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def tie_weights(self) -> None:
        """Re-tie the head to the embedding (after loading a state dict or moving devices)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        cache=None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden].

        ``attention_mask`` [B, T] (1 = token, 0 = padding) follows Hugging Face; with a cache it covers the new
        tokens only and is recorded in the cache. ``doc_ids`` [B, T] restricts attention to each packed document.
        """
        B, T = input_ids.shape
        write = None
        if getattr(cache, "drives_forward", False):  # a static or per-row cache runs its own pass (xiaolm.infer.cache)
            return cache.hidden_states(self, input_ids, position_ids, attention_mask)
        past = cache.length if cache is not None else 0
        key_valid = attention_mask.bool() if attention_mask is not None else None
        if cache is not None:
            cache.valid[:, past : past + T] = True if key_valid is None else key_valid
            if past > 0 or key_valid is not None:  # cached keys: the mask must be explicit
                key_valid = cache.valid[:, : past + T]
        if position_ids is None:
            if doc_ids is not None:
                position_ids = positions_from_docs(doc_ids)
            elif key_valid is not None:
                # Positions count real tokens only, so a left-padded row numbers its text from 0.
                position_ids = (key_valid.long().cumsum(1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        if doc_ids is not None and cache is None and key_valid is None and use_flex(self.attn_impl, input_ids.device):
            mask = document_block_mask(doc_ids)  # once per forward pass; every layer shares it
        else:
            mask = build_attention_mask(T, past + T, input_ids.device, key_valid=key_valid, doc_ids=doc_ids)

        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, write)
        if cache is not None:
            cache.length = past + T
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        cache=None,
        logits_to_keep: int = 0,
        loss_chunk_size: int = 0,
        head_loss=None,
    ) -> CausalLMOutput:
        """Logits and, given ``targets`` (already shifted: ``targets[:, t]`` is the token after position t; -100 is
        ignored), the mean cross-entropy. ``loss_chunk_size > 0`` computes the loss in row chunks without keeping the
        float32 logits of the whole batch (returns no logits). ``logits_to_keep`` = n keeps only the last n positions.
        ``head_loss(hidden, lm_head_weight)``, given, replaces the head and the loss (its result is the ``loss``): a
        caller's own loss over the output layer (distillation) inside the one forward call DDP and FSDP wrap.
        """
        h = self.hidden_states(input_ids, position_ids, attention_mask, doc_ids, cache)
        if head_loss is not None:
            return CausalLMOutput(None, head_loss(h, self.lm_head.weight))
        if targets is not None and loss_chunk_size > 0:
            from xiaolm.model.losses import chunked_cross_entropy

            return CausalLMOutput(None, chunked_cross_entropy(h, self.lm_head.weight, targets, loss_chunk_size))
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return CausalLMOutput(logits, loss)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices only (not norms, not the embedding): the usual AdamW split."""
        decay, no_decay, seen = [], [], set()
        for name, p in self.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
