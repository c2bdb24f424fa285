"""Language-model losses that avoid materialising the float32 logits of a whole batch.

With a 64k vocabulary, batch 64 x 512 tokens, the logits alone are 64*512*64793*4 bytes = 8.5 GB in float32,
plus as much again for their gradient. ``chunked_cross_entropy`` fuses the output projection with the loss: it walks
the rows in chunks, computes each chunk's logits, loss and gradients (with respect to the hidden states and the head
weight) in the forward pass, and keeps only the gradients, which are the size of the inputs. This is the idea of
Liger's fused linear cross-entropy, written in plain PyTorch so it runs (and is tested) on CPU too.
"""
from __future__ import annotations

import torch


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_valid = (targets != -100).sum().clamp(min=1).to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            logits = (h @ weight.t()).float()
            valid = t != -100
            safe_t = t.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            total = total + torch.where(valid, lse - target_logit, torch.zeros_like(lse)).sum()
            if need_h or need_w:
                # d loss / d logits = (softmax - onehot) / n_valid on valid rows, 0 elsewhere.
                g = torch.exp(logits - lse[:, None])
                g.scatter_add_(1, safe_t[:, None], -torch.ones_like(lse)[:, None])
                g = g * (valid.to(g.dtype) / n_valid)[:, None]
                g = g.to(h.dtype)
                if need_h:
                    grad_h[start : start + chunk_size] = g @ weight.to(h.dtype)
                if need_w:
                    grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.weight_dtype = weight.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 4096):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (-100 ignored), chunked over rows.

    ``hidden`` is [..., d] and ``targets`` the matching [...]; equals
    ``F.cross_entropy((hidden @ weight.T).float().flatten(0, -2), targets.flatten(), ignore_index=-100)``.
    """
    return _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), int(chunk_size)
    )


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token (``targets`` already shifted; -100 positions give 0)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    safe = targets.clamp(min=0)
    out = logp.gather(-1, safe[..., None]).squeeze(-1)
    return torch.where(targets != -100, out, torch.zeros_like(out))
