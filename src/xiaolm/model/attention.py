"""Attention kernels and masks for ``xiaolm.model.llama``: which kernel runs, and the masks it takes.

``attn_impl`` (a runtime choice of the model, not saved with it):

- ``auto`` (default): the fastest exact kernel for the device and the mask. No mask: SDPA with ``is_causal=True``
  and no mask tensor (the flash kernel on a GPU). Packed documents (``doc_ids``) on CUDA: FlexAttention with a block
  mask built once per forward pass and shared by every layer (fully masked blocks are skipped). Packed documents on
  the CPU: SDPA with the dense boolean mask, the only CPU kernel with a backward (bench/attention_kernels.py: eager
  FlexAttention is ~5-20x slower forward; compiled FlexAttention is within the load noise of a shared 2-core
  machine, forward only, after a compile of tens of seconds). Padding and decode caches: SDPA with the dense mask.
- ``sdpa``: SDPA with the dense boolean mask whenever anything is masked: the reference the others are tested
  against.
- ``flex``: FlexAttention for packed documents on any device (CPU: forward only, torch has no CPU backward).

Grouped-query attention goes through SDPA's ``enable_gqa`` (no copy of K/V), except with a dense mask on CUDA,
where only the math kernel takes ``enable_gqa`` and repeating K/V keeps the memory-efficient kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ATTN_IMPLS = ("auto", "sdpa", "flex")

_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa arrived in torch 2.5


def use_flex(attn_impl: str, device: torch.device) -> bool:
    """Whether packed-document masks go to FlexAttention (else a dense mask goes to SDPA)."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attn_impl {attn_impl!r}; choose one of {', '.join(ATTN_IMPLS)}")
    return attn_impl == "flex" or (attn_impl == "auto" and torch.device(device).type == "cuda")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, KV, S, D] (KV divides H). ``mask``: None (causal, T == S), a
    boolean tensor [B or 1, 1, T, S] (True = may attend) or a FlexAttention ``BlockMask``."""
    gqa = k.shape[1] != q.shape[1]
    if mask is not None and not isinstance(mask, torch.Tensor):
        return flex(q, k, v, mask, gqa)
    if gqa and (not _SDPA_GQA or (mask is not None and q.is_cuda)):
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        gqa = False
    extra = {"enable_gqa": True} if gqa else {}
    if mask is None:  # plain causal: no mask tensor, so SDPA may pick the flash kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **extra)


_COMPILED_FLEX = {}


def flex(q, k, v, block_mask, gqa: bool, compiled: Optional[bool] = None):
    """FlexAttention. Inside a compiled model it is traced into the model's graph (no second compile wrapper);
    called eagerly on a GPU (the evaluation pass runs the uncompiled model) it goes through one compiled kernel
    specialised to the shape (``dynamic=False``: inductor's dynamic-shape flex kernel fails to build on CPU in
    torch 2.13, so static shapes are the tested path); the callers keep the shapes few (the evaluator pads its last
    batch to full size). Elsewhere the eager implementation (it materialises the scores; the CPU's reference)."""
    from torch.nn.attention.flex_attention import flex_attention

    if compiled is None:
        compiled = q.is_cuda and not torch.compiler.is_compiling()
    if not compiled:
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if "fn" not in _COMPILED_FLEX:
        _COMPILED_FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX["fn"](q, k, v, block_mask=block_mask, enable_gqa=gqa)


def document_block_mask(doc_ids: torch.Tensor):
    """A FlexAttention block mask: causal and inside each packed document (the rule of build_attention_mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = doc_ids.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device)


def build_attention_mask(
    q_len: int,
    k_len: int,
    device,
    key_valid: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Boolean mask [B or 1, 1, q_len, k_len] (True = may attend), or None for plain causal attention.

    Queries are the last ``q_len`` of ``k_len`` positions. ``key_valid`` [B, k_len] hides padding; ``doc_ids``
    [B, k_len] keeps attention inside each document of a packed sequence. Every query may always see itself, so no
    row is fully masked (a fully masked row would make SDPA return NaN, and 0 * NaN poisons the values).
    """
    if key_valid is None and doc_ids is None and q_len == k_len:
        return None
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, q, k]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :].bool()
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, -q_len:, None] == doc_ids[:, None, None, :])
    return mask | (k_pos[None, :] == q_pos[:, None])[None, None]
