"""Decode caches: the keys and values of past positions, and the forward passes that depend on how they are kept.

The model (``xiaolm.model.llama``) does not import this module. Its attention layers call ``cache.update(layer, k,
v, write)``; a plain (dynamic) ``KVCache`` is driven by ``Llama.hidden_states`` itself (``valid``, ``length``), and a
cache whose ``drives_forward`` is true -- a static ``KVCache`` (fixed shapes for ``torch.compile``) or a
``RowKVCache`` (continuous batching) -- gets the whole pass through its ``hidden_states(model, ...)``, which runs the
model's modules (embedding, rotary tables, layers, final norm) with its own write positions and mask.
"""
from __future__ import annotations

from typing import Optional

import torch

from xiaolm.model.llama import LlamaConfig


class KVCache:
    """A preallocated key/value cache: one [B, kv_heads, max_len, head_dim] pair per layer.

    Slots fill left to right, at the same slot for every row (left padding keeps rows aligned); ``valid`` marks
    the slots that hold real tokens, so padding is never attended to.

    Two modes compute the same thing. The default attends over the filled slots only (shapes grow by one each
    step: cheapest in eager mode). ``static=True`` always attends over all ``max_len`` slots with a mask and keeps
    the write position in a tensor, so every decode step has identical shapes and no Python-side state changes:
    what ``torch.compile(mode="reduce-overhead")`` needs to capture the step in a CUDA graph.
    """

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_len: int, device, dtype, static: bool = False):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0  # dynamic mode: filled slots (static mode counts in ``slot`` instead)
        self.static = static
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # static mode: next slot to write
        self.slots = torch.arange(max_len, device=device)
        if static:
            # CUDA graphs skip a compiled step that mutates its inputs unless they have fixed addresses
            # ("skipping cudagraphs due to mutated inputs"); a new address later makes them re-record, not recompile.
            for t in (*self.k, *self.v, self.valid, self.slot, self.slots):
                torch._dynamo.mark_static_address(t)

    def reset(self) -> None:
        """Empty the cache for a new batch of prompts, keeping its tensors (and so any CUDA graph built on them)."""
        self.valid.zero_()
        self.slot.zero_()
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, write: Optional[torch.Tensor] = None):
        if self.static:
            self.k[layer].index_copy_(2, write, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, write, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len} slots")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (for dropping finished sequences or beam-style selection)."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]
        self.valid = self.valid.index_select(0, index)


    @property
    def drives_forward(self) -> bool:
        """Static mode runs its own fixed-shape forward pass (the model calls ``hidden_states``)."""
        return self.static

    def hidden_states(self, model, input_ids, position_ids, attention_mask) -> torch.Tensor:
        return _hidden_states_static(model, input_ids, position_ids, attention_mask, self)


class RowKVCache:
    """A key/value cache of ``slots`` independent rows, each at its own length (continuous batching).

    A row is one sequence; it is written at its own positions (``position_ids`` [B, T] of a forward pass say where),
    so a newly admitted row can be prefilled alone while the other rows keep their state, and a finished row's slot is
    reused at once. ``rows`` (a ``slice``, set by the caller before each forward pass) names the slots the batch's
    rows live in (or a tensor of slot ids); keys are read back up to the longest row, and each query sees the keys
    at positions up to its own, never what an earlier occupant (or right padding) left beyond it: every position is
    written again before a query of the row can reach it.
    """

    drives_forward = True  # the model hands a forward pass over to ``hidden_states`` (per-row positions)

    def __init__(self, cfg: LlamaConfig, slots: int, max_len: int, device, dtype):
        shape = (slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.slots, self.max_len = slots, max_len
        self.positions = torch.arange(max_len, device=device)
        self.rows = slice(0, slots)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, write):
        """``write`` = (position_ids [B, T], keys to return, row index [B, T]): store at each row's positions,
        return the rows' keys."""
        position_ids, length, b = write
        if isinstance(self.rows, slice):  # views: writes land in the cache, reads copy nothing
            ks, vs = self.k[layer][self.rows], self.v[layer][self.rows]
        else:  # a tensor of slot ids (rows admitted together that are not neighbours)
            ks, vs = self.k[layer], self.v[layer]
        ks[b, :, position_ids] = k.transpose(1, 2).to(ks.dtype)
        vs[b, :, position_ids] = v.transpose(1, 2).to(vs.dtype)
        if not isinstance(self.rows, slice):
            ks, vs = ks[self.rows], vs[self.rows]
        return ks[:, :, :length], vs[:, :, :length]

    def hidden_states(self, model, input_ids, position_ids, attention_mask) -> torch.Tensor:
        return _hidden_states_rows(model, input_ids, position_ids, self)


def model_dtype(model) -> torch.dtype:
    """The dtype a cache for ``model`` holds: a quantised model's compute dtype, else its embedding's (a wrapper
    around a model: its first floating-point parameter)."""
    dtype = getattr(model, "compute_dtype", None)  # a quantised model's
    weight = getattr(getattr(getattr(model, "model", None), "embed_tokens", None), "weight", None)
    if dtype is None:
        dtype = weight.dtype if weight is not None else next(
            (p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return dtype


def new_cache(model, batch_size: int, max_len: int, dtype: Optional[torch.dtype] = None,
              static: bool = False) -> KVCache:
    dtype = dtype or model_dtype(model)
    return KVCache(model.config, batch_size, max_len, model.device, dtype, static=static)


# ------------------------------------------------------------------------------------------------ forward passes


def _hidden_states_static(model, input_ids, position_ids, attention_mask, cache: KVCache) -> torch.Tensor:
    """Fixed-shape path: write at ``cache.slot`` and attend over every slot through a mask (see KVCache)."""
    B, T = input_ids.shape
    write = cache.slot + torch.arange(T, device=input_ids.device)
    new_valid = (attention_mask.bool() if attention_mask is not None
                 else torch.ones(B, T, dtype=torch.bool, device=input_ids.device))
    cache.valid.index_copy_(1, write, new_valid)
    if position_ids is None:
        position_ids = (cache.valid.long().cumsum(1) - 1).clamp(min=0).index_select(1, write)
    q_slot = write[None, None, :, None]
    k_slot = cache.slots[None, None, None, :]
    mask = ((k_slot <= q_slot) & cache.valid[:, None, None, :]) | (k_slot == q_slot)
    x = model.model.embed_tokens(input_ids)
    cos, sin = model.model.rotary_emb(position_ids, x.dtype)
    for layer in model.model.layers:
        x = layer(x, cos, sin, mask, cache, write)
    cache.slot.add_(T)  # a tensor, so a compiled step never sees changing Python state
    return model.model.norm(x)


def _hidden_states_rows(model, input_ids, position_ids, cache: RowKVCache) -> torch.Tensor:
    """Per-row positions in a :class:`RowKVCache`: a query sees its row's keys at positions up to its own."""
    if position_ids is None:
        raise ValueError("a RowKVCache needs position_ids (each row is at its own length)")
    length = int(position_ids.max()) + 1
    if length > cache.max_len:
        raise ValueError(f"KV cache full: {length} > {cache.max_len} positions")
    mask = (cache.positions[:length][None, None, None, :] <= position_ids[:, None, :, None])  # [B, 1, T, keys]
    if isinstance(cache.rows, slice):
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    else:
        rows = cache.rows
    write = (position_ids, length, rows[:, None].expand_as(position_ids))
    x = model.model.embed_tokens(input_ids)
    cos, sin = model.model.rotary_emb(position_ids, x.dtype)
    for layer in model.model.layers:
        x = layer(x, cos, sin, mask, cache, write)
    return model.model.norm(x)
