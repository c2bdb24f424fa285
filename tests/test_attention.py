"""The attention kernels of ``xiaolm.model.attention`` (issue 23): every choice equals a written-out dense
reference forward and backward, ``auto`` picks the fast path (no mask tensor and no K/V copy when nothing is masked,
FlexAttention for document masks on CUDA), one block mask per forward pass, and one dtype into the kernel under
bf16 autocast."""
from __future__ import annotations

import math

import pytest
import torch

import xiaolm.model.attention as attention
import xiaolm.model.llama as llama
from xiaolm.model.attention import attend, build_attention_mask, document_block_mask, flex, use_flex
from xiaolm.model.llama import Llama, LlamaConfig


def reference(q, k, v, allowed):
    """Attention written out in float64: softmax(q k^T / sqrt(d) masked) v, K/V repeated per query group."""
    rep = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


def qkv(B=2, H=4, KV=2, T=64, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, T, D, generator=g, requires_grad=True) for n in (H, KV, KV)]


def docs(B, T, seed=1):
    return torch.cumsum((torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 0.06).long(), 1)


@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_paths_equal_the_dense_reference_forward_and_backward(kv, masked):
    q, k, v = qkv(KV=kv)
    B, _, T, _ = q.shape
    doc_ids = docs(B, T)
    mask = build_attention_mask(T, T, "cpu", doc_ids=doc_ids) if masked else None
    allowed = build_attention_mask(T, T, "cpu", doc_ids=doc_ids if masked else None,
                                   key_valid=torch.ones(B, T, dtype=torch.bool))
    out = attend(q, k, v, mask)
    ref = reference(q, k, v, allowed)
    assert (out.double() - ref).abs().max() < 1e-5
    w = torch.randn_like(ref)
    got = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for g1, g2, name in zip(got, want, "qkv"):
        assert (g1.double() - g2).abs().max() < 1e-5, name


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_block_mask_equals_the_dense_reference(compiled):
    """FlexAttention forward on the CPU (torch has no CPU backward; the CUDA backward is tests/test_gpu.py's), eager
    and compiled with inductor."""
    q, k, v = (t.detach() for t in qkv(KV=2, T=128))
    doc_ids = docs(2, 128)
    with torch.no_grad():
        out = flex(q, k, v, document_block_mask(doc_ids), gqa=True, compiled=compiled)
        ref = reference(q, k, v, build_attention_mask(128, 128, "cpu", doc_ids=doc_ids))
    assert (out.double() - ref).abs().max() < 1e-5


def test_auto_sends_no_mask_tensor_and_no_kv_copy_to_sdpa_when_nothing_is_masked(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1], kw))
        return real(q, k, v, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = Llama(cfg)
    assert model.attn_impl == "auto"
    x = torch.randint(0, 64, (2, 16))
    model(x, targets=x).loss.backward()
    assert len(calls) == 2
    for heads, kv_heads, kw in calls:
        assert (heads, kv_heads) == (4, 2)  # K/V not repeated: SDPA's enable_gqa
        assert kw.get("is_causal") is True and kw.get("attn_mask") is None and kw.get("enable_gqa") is True
    calls.clear()
    model(x, doc_ids=docs(2, 16)).logits.sum().backward()  # on the CPU auto keeps the dense mask (measured faster)
    assert all(kv_heads == 2 and isinstance(kw.get("attn_mask"), torch.Tensor) for _, kv_heads, kw in calls)


def test_auto_picks_flex_for_document_masks_on_cuda_only():
    assert use_flex("auto", torch.device("cuda")) and use_flex("flex", "cpu")
    assert not use_flex("auto", "cpu") and not use_flex("sdpa", "cuda")
    with pytest.raises(ValueError, match="unknown attn_impl"):
        use_flex("flash", "cpu")


def test_one_block_mask_per_forward_shared_by_every_layer(monkeypatch):
    built = []
    real = llama.document_block_mask
    monkeypatch.setattr(llama, "document_block_mask", lambda d: built.append(d) or real(d))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    model = Llama(cfg).eval()
    x = torch.randint(0, 64, (2, 128))
    doc_ids = docs(2, 128)
    with torch.no_grad():
        dense = model(x, doc_ids=doc_ids).logits
        model.attn_impl = "flex"
        blocks = model(x, doc_ids=doc_ids).logits
    assert len(built) == 1
    assert (dense - blocks).abs().max() < 1e-5


def test_one_dtype_reaches_the_kernel_under_bf16_autocast(monkeypatch):
    """RoPE's float32 tables would leave q/k in float32 beside a bf16 v: FlexAttention rejects that, SDPA runs a
    float32 kernel. q and k are cast back to v's dtype."""
    seen = []
    real = llama.attend
    monkeypatch.setattr(llama, "attend", lambda q, k, v, mask: seen.append((q.dtype, k.dtype, v.dtype))
                        or real(q, k, v, mask))
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2))
    x = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, targets=x, doc_ids=docs(2, 16)).loss.backward()
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen), seen
    seen.clear()
    model(x)  # float32 without autocast: unchanged
    assert all(d == (torch.float32,) * 3 for d in seen)
