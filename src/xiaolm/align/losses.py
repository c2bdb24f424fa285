"""Preference and policy-gradient losses, as pure functions of log-probabilities.

Nothing here runs a model: every function takes per-sequence (or per-token) log-probabilities that the caller
computed, so each formula can be checked on hand-computed numbers (tests/test_align_losses.py).

Notation: ``pc``, ``pr`` are the policy's log-probabilities of the chosen and the rejected response given the prompt,
``rc``, ``rr`` the reference model's. "Sequence" log-probabilities are sums over the response tokens; "average"
log-probabilities are those sums divided by the number of response tokens.

- DPO (Rafailov et al. 2023): ``h = (pc - rc) - (pr - rr)``, loss ``-log σ(β h)``. With label smoothing ε
  (conservative DPO, Mitchell 2023: each label is wrong with probability ε) the loss is
  ``-(1-ε) log σ(β h) - ε log σ(-β h)``. At step 0 the policy is the reference, h = 0 and the loss is ln 2.
- IPO (Azar et al. 2023): ``(h - 1/(2β))²``: a squared loss that stops pushing once the margin reaches 1/(2β), so it
  cannot drive the rejected response's probability to zero the way DPO can overfit. The caller decides whether
  ``h`` is built from sequence or average log-probabilities (``xiaolm dpo`` uses averages, as TRL does).
- SimPO (Meng et al. 2024): reference-free, length-normalised: ``-log σ(β (avg_c - avg_r) - γ)``, with the
  target margin γ.
- ORPO (Hong et al. 2024): no reference; the SFT loss on the chosen response plus an odds-ratio term:
  ``nll_c - λ log σ(log odds(c) - log odds(r))`` with ``odds(y) = p/(1-p)`` and ``log p`` the average
  log-probability per token (as in the paper and TRL).
- KTO (Ethayarajh et al. 2024): unpaired good / bad responses. With ``r = policy - reference`` (sequence log-ratio)
  and the reference point ``z0`` (an estimate of KL(policy‖reference), detached, never below 0), a desirable response
  costs ``λ_D (1 - σ(β (r - z0)))`` and an undesirable one ``λ_U (1 - σ(β (z0 - r)))``. ``z0`` is estimated per
  batch from mismatched prompt/response pairs (TRL's recipe): ``mean(policy - reference)`` over those, clamped at 0.
- Bradley-Terry (reward model): ``-log σ(s_c - s_r - m)`` for scalar scores and an optional margin m.
- GRPO (Shao et al. 2024): group-normalised advantages ``(r - mean_group) / (std_group + eps)``, the PPO clipped
  ratio objective per token ``min(ρ A, clip(ρ, 1-ε, 1+ε) A)`` with ``ρ = exp(logp - logp_old)``, minus
  ``β_KL`` times the k3 estimator of KL(policy‖reference): ``exp(ref - logp) - (ref - logp) - 1`` (unbiased,
  always ≥ 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _smoothed_logsigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1-ε) log σ(z) - ε log σ(-z)`` (ε = 0: the plain logistic loss)."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


# -------------------------------------------------------------------------------------------- paired, with a reference


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0):
    """Per-pair DPO losses and the implicit rewards ``β (policy - reference)`` of both responses (detached).

    Returns ``(losses [B], chosen_rewards [B], rejected_rewards [B])``."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    losses = _smoothed_logsigmoid_loss(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1):
    """Per-pair IPO losses ``(h - 1/(2β))²`` and the implicit rewards (as ``dpo_loss``)."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ---------------------------------------------------------------------------------------------- paired, reference-free


def simpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0):
    """Per-pair SimPO losses ``-log σ(β (avg_c - avg_r) - γ)`` from average log-probabilities, and the rewards
    ``β avg`` (detached)."""
    losses = _smoothed_logsigmoid_loss(beta * (avg_chosen - avg_rejected) - gamma, label_smoothing)
    return losses, beta * avg_chosen.detach(), beta * avg_rejected.detach()


def log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` for ``log p`` = an average log-probability (< 0), computed stably."""
    avg_logp = avg_logp.clamp(max=-1e-6)  # p = 1 would make the odds infinite
    return avg_logp - torch.log(-torch.expm1(avg_logp))


def orpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, nll_chosen: torch.Tensor, lam: float = 0.1):
    """Per-pair ORPO losses ``nll_c - λ log σ(log odds(c) - log odds(r))``.

    ``nll_chosen`` is the SFT loss of each chosen response (mean negative log-likelihood per token, or a batch mean
    broadcast). Returns ``(losses [B], log_odds_ratio [B] (detached), odds_ratio_term [B] (detached))``."""
    ratio = log_odds(avg_chosen) - log_odds(avg_rejected)
    term = F.logsigmoid(ratio)
    return nll_chosen - lam * term, ratio.detach(), term.detach()


# ------------------------------------------------------------------------------------------------ unpaired


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: mean ``policy - reference`` log-ratio over mismatched prompt/response pairs,
    clamped at 0 and detached (no gradient flows through it)."""
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float = 0.1, lambda_desirable: float = 1.0, lambda_undesirable: float = 1.0):
    """Per-example KTO losses and the implicit rewards ``β (policy - reference)`` (detached).

    ``desirable`` is a bool tensor; ``kl`` the reference point from ``kto_kl_estimate`` (a scalar)."""
    ratio = policy_logps - ref_logps
    good = lambda_desirable * (1.0 - torch.sigmoid(beta * (ratio - kl)))
    bad = lambda_undesirable * (1.0 - torch.sigmoid(beta * (kl - ratio)))
    losses = torch.where(desirable.bool(), good, bad)
    return losses, beta * ratio.detach()


# ------------------------------------------------------------------------------------------------ reward model


def bradley_terry_loss(score_chosen: torch.Tensor, score_rejected: torch.Tensor, margin: float | torch.Tensor = 0.0):
    """Per-pair Bradley-Terry losses ``-log σ(s_c - s_r - m)``."""
    return -F.logsigmoid(score_chosen - score_rejected - margin)


# ------------------------------------------------------------------------------------------------ GRPO


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """Group-relative advantages for rewards shaped ``[groups, group_size]``: each reward minus its group's mean,
    divided by the group's standard deviation (+ eps) when ``scale``. A group whose samples all score the same gets
    advantage 0 everywhere (it carries no signal)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, group_size], got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    std = rewards.std(dim=1, keepdim=True, unbiased=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards)
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy‖reference) on samples from the policy: ``e^d - d - 1``, d = ref - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    ref_logp: torch.Tensor | None = None, clip_eps: float = 0.2, kl_beta: float = 0.0):
    """Per-token GRPO loss ``-(min(ρ A, clip(ρ, 1-ε, 1+ε) A) - β_KL k3)``.

    ``logp``, ``old_logp``, ``ref_logp`` are per-token log-probabilities ``[B, T]``; ``advantages`` is ``[B]``
    (one per sequence, shared by its tokens). Returns ``(loss [B, T], stats)`` with per-token ``ratio``,
    ``clipped`` (bool: the clip was active) and ``kl`` (k3, zeros without a reference)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    surrogate = torch.minimum(unclipped, clipped)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    loss = -(surrogate - kl_beta * kl)
    return loss, {"ratio": ratio.detach(), "clipped": (clipped < unclipped).detach(), "kl": kl.detach()}
