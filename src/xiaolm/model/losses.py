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


# ------------------------------------------------------------------------------------------------ distillation
#
# White-box distillation (Hinton et al. 2015; minimind's distill stage): the student's loss is
#     alpha * CE(data) + (1 - alpha) * T^2 * KL(teacher_T || student_T)
# where _T is the distribution at temperature T (logits / T). The T^2 keeps the KL's gradient on the scale of the
# CE's as T grows (d KL / d z = (p_s - p_t) / T). Everything here returns SUMS over the valid positions (targets
# != -100), like the training engine's loss_fn contract; the engine divides by the step's token count.


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """Sum over valid rows of T^2 x KL(softmax(teacher / T) || softmax(student / T)); logits [N, V], valid [N]."""
    t = float(temperature)
    s_logp = torch.log_softmax(student_logits.float() / t, dim=-1)
    t_logp = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return torch.where(valid, kl, torch.zeros_like(kl)).sum() * (t * t)


def topk_bucket_logprobs(topk_logp: torch.Tensor) -> torch.Tensor:
    """The teacher's top-k log-probabilities [N, k] (at T = 1) plus the remaining mass as one bucket: [N, k + 1]
    (log 0 = -inf where the top-k hold all of it; fp16 storage can push their sum a hair past 1)."""
    logp = topk_logp.float()
    rest = (1.0 - logp.exp().sum(-1)).clamp(min=0.0)
    return torch.cat([logp, rest.log()[:, None]], dim=-1)


def kl_to_teacher_topk(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor,
                       valid: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``kl_to_teacher`` against offline top-k logits: the KL over k + 1 buckets (the teacher's top-k tokens and the
    rest of the vocabulary as one). Both sides are bucketed at T = 1 and the buckets then tempered alike (the
    teacher's rest is not stored token by token), so the term is zero when the student matches the teacher at any
    T; at T = 1 it is the KL between the bucketed distributions, a lower bound of the full KL that equals it when
    the top-k hold the teacher's mass."""
    t = float(temperature)
    z = student_logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    ids = topk_ids.long()
    s_top = z.gather(1, ids) - lse
    # -1e4, not -inf: a finite rest even when the top-k cover the vocabulary keeps the backward pass free of NaNs
    s_rest = torch.logsumexp(z.scatter(1, ids, -1e4), dim=-1, keepdim=True) - lse
    s_logp = torch.log_softmax(torch.cat([s_top, s_rest], dim=-1) / t, dim=-1)
    t_logp = torch.log_softmax(topk_bucket_logprobs(topk_logp) / t, dim=-1)
    p_t = t_logp.exp()
    terms = torch.where(p_t > 0, p_t * (t_logp - s_logp), torch.zeros_like(p_t))
    kl = terms.sum(-1)
    return torch.where(valid, kl, torch.zeros_like(kl)).sum() * (t * t)


def _distill_rows(h, weight, targets, temperature, teacher_h, teacher_head, topk_ids, topk_logp):
    """(CE sum, T^2 KL sum) of one chunk of rows."""
    logits = (h @ weight.t()).float()
    valid = targets != -100
    ce = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    if topk_ids is not None:
        kl = kl_to_teacher_topk(logits, topk_ids, topk_logp, valid, temperature)
    else:
        with torch.no_grad():
            t_logits = teacher_head(teacher_h).float()
        kl = kl_to_teacher(logits, t_logits, valid, temperature)
    return ce, kl


def distillation_sums(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                      teacher_hidden: torch.Tensor | None = None, teacher_head=None,
                      topk_ids: torch.Tensor | None = None, topk_logp: torch.Tensor | None = None,
                      chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE, sum of T^2 x KL) over the valid rows of ``hidden @ weight.T`` ([..., d] and [...] targets).

    The teacher is either online (``teacher_hidden`` [..., d_t] and ``teacher_head``, its output layer, applied
    without gradients) or offline (``topk_ids`` / ``topk_logp`` [..., k]). ``chunk_size > 0`` walks the rows in
    chunks and recomputes each chunk's logits in the backward pass (activation checkpointing), so neither the
    student's nor the teacher's float32 logits of the whole batch are ever held at once, as with
    ``chunked_cross_entropy``."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if teacher_hidden is not None else None
    ids = topk_ids.reshape(-1, topk_ids.shape[-1]) if topk_ids is not None else None
    lp = topk_logp.reshape(-1, topk_logp.shape[-1]) if topk_logp is not None else None
    if chunk_size <= 0 or h.shape[0] <= chunk_size:
        return _distill_rows(h, weight, t, temperature, th, teacher_head, ids, lp)
    from torch.utils.checkpoint import checkpoint

    ce = kl = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk_size):
        e = s + chunk_size
        part = (h[s:e], weight, t[s:e], temperature, th[s:e] if th is not None else None, teacher_head,
                ids[s:e] if ids is not None else None, lp[s:e] if lp is not None else None)
        c, k = checkpoint(_distill_rows, *part, use_reentrant=False) if torch.is_grad_enabled() \
            else _distill_rows(*part)
        ce, kl = ce + c, kl + k
    return ce, kl
