"""The model/cache boundary: the network drives any object with ``update(layer, k, v, write)``, and a cache with
``drives_forward`` runs its own pass over the model's modules (xiaolm.infer.cache; model/ does not import it)."""
from __future__ import annotations

import torch

from xiaolm.infer.cache import KVCache, RowKVCache, model_dtype, new_cache
from xiaolm.model.llama import Llama, build_attention_mask, preset_config


class ConcatCache:
    """The smallest cache the model accepts: keys appended per layer (no preallocation), its own forward pass."""

    drives_forward = True

    def __init__(self, layers: int):
        self.k, self.v, self.length, self.calls = [None] * layers, [None] * layers, 0, []

    def update(self, layer, k, v, write):
        self.calls.append(layer)
        self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], 2)
        self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], 2)
        return self.k[layer], self.v[layer]

    def hidden_states(self, model, input_ids, position_ids, attention_mask):
        B, T = input_ids.shape
        positions = torch.arange(self.length, self.length + T).expand(B, T)
        mask = build_attention_mask(T, self.length + T, input_ids.device)
        x = model.model.embed_tokens(input_ids)
        cos, sin = model.model.rotary_emb(positions, x.dtype)
        for layer in model.model.layers:
            x = layer(x, cos, sin, mask, self, None)
        self.length += T
        return model.model.norm(x)


def test_model_runs_a_duck_typed_cache_that_drives_its_own_pass():
    torch.manual_seed(4)
    model = Llama(preset_config("tiny", vocab_size=120, max_position_embeddings=64)).eval()
    x = torch.randint(0, 120, (2, 20))
    cache = ConcatCache(model.config.num_hidden_layers)
    with torch.no_grad():
        full = model(x).logits
        parts = [model(x[:, :9], cache=cache).logits]
        for t in range(9, 20):
            parts.append(model(x[:, t: t + 1], cache=cache).logits)
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5
    assert cache.calls == list(range(model.config.num_hidden_layers)) * 12   # every layer, every pass


class Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    @property
    def device(self):
        return self.inner.device


def test_new_cache_takes_the_dtype_the_model_computes_in():
    model = Llama(preset_config("tiny", vocab_size=50, max_position_embeddings=32)).to(torch.bfloat16)
    assert model_dtype(model) == torch.bfloat16
    assert model_dtype(Wrapper(model)) == torch.bfloat16                # a test or serving wrapper: its parameters
    model.compute_dtype = torch.float16                                 # a quantised model's compute dtype wins
    assert model_dtype(model) == torch.float16
    cache = new_cache(model, 3, 16, static=True)
    assert isinstance(cache, KVCache) and cache.static and cache.drives_forward
    assert cache.k[0].shape == (3, 2, 16, 16) and cache.k[0].dtype == torch.float16
    assert not new_cache(model, 1, 8, dtype=torch.float32).drives_forward   # dynamic: Llama.hidden_states drives it
    assert RowKVCache.drives_forward
