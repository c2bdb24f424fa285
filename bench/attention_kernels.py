"""Attention kernels on this machine: what ``attn_impl auto`` should pick for the CPU (issue 23).

One GQA attention (batch 4, 8 query heads, 4 KV heads, 256 tokens, head dim 32; documents of 60 tokens), forward
alone and forward + backward, in milliseconds (mean of 20 after a warm-up): SDPA with K/V repeated
(``repeat_interleave``, the old path) against SDPA's ``enable_gqa``, causal without a mask and with the dense
document mask; FlexAttention with a block mask, eager and compiled (forward only: torch has no CPU backward for it).

    python bench/attention_kernels.py
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def ms(fn, n=20) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.manual_seed(0)
    B, H, KV, T, D = 4, 8, 4, 256, 32
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, KV, T, D), torch.randn(B, KV, T, D)
    doc = (torch.arange(T) // 60).expand(B, T)
    causal = torch.arange(T)[None, :] <= torch.arange(T)[:, None]
    mask = causal[None, None] & (doc[:, None, :, None] == doc[:, None, None, :])
    rep = lambda x: x.repeat_interleave(H // KV, 1)  # noqa: E731
    print(f"{'kernel':<34}{'forward ms':>12}{'fwd+bwd ms':>12}")
    for name, fn in [
        ("sdpa causal, K/V repeated", lambda qq: F.scaled_dot_product_attention(qq, rep(k), rep(v), is_causal=True)),
        ("sdpa causal, enable_gqa", lambda qq: F.scaled_dot_product_attention(qq, k, v, is_causal=True,
                                                                             enable_gqa=True)),
        ("sdpa dense mask, K/V repeated",
         lambda qq: F.scaled_dot_product_attention(qq, rep(k), rep(v), attn_mask=mask)),
        ("sdpa dense mask, enable_gqa", lambda qq: F.scaled_dot_product_attention(qq, k, v, attn_mask=mask,
                                                                                 enable_gqa=True)),
    ]:
        with torch.no_grad():
            fwd = ms(lambda: fn(q))
        qg = q.clone().requires_grad_(True)
        both = ms(lambda: fn(qg).sum().backward())
        print(f"{name:<34}{fwd:>12.1f}{both:>12.1f}")
    def docs(b, h, qi, ki):
        return (ki <= qi) & (doc[b, qi] == doc[b, ki])

    block = create_block_mask(docs, B, None, T, T, device="cpu")
    compiled = torch.compile(flex_attention)
    with torch.no_grad():
        eager_ms = ms(lambda: flex_attention(q, k, v, block_mask=block, enable_gqa=True), 5)
        compiled_ms = ms(lambda: compiled(q, k, v, block_mask=block, enable_gqa=True))
    print(f"{'flex block mask, eager':<34}{eager_ms:>12.1f}{'-':>12}")
    print(f"{'flex block mask, compiled':<34}{compiled_ms:>12.1f}{'-':>12}")
    print(f"create_block_mask (eager): {ms(lambda: create_block_mask(docs, B, None, T, T, device='cpu'), 5):.1f} ms")


if __name__ == "__main__":
    main()
