"""Every preference / policy-gradient loss against its formula on numbers worked out by hand (with ``math``, not
torch), plus the properties that make each one what it is (DPO is ln 2 when policy = reference, label smoothing
pulls towards the other label, IPO stops at its target margin, KTO's reference point never goes below zero, GRPO's
clip only bites in the direction the advantage pushes)."""
from __future__ import annotations

import math

import pytest
import torch

from xiaolm.align import losses as L


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def softplus(x: float) -> float:  # -log σ(x) = log(1 + e^-x)
    return math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_is_ln2_when_policy_equals_reference():
    pc, pr = t(-10.0, -55.5, -3.0), t(-12.0, -40.0, -9.0)
    losses, rc, rr = L.dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))
    assert torch.all(rc == 0) and torch.all(rr == 0)
    # label smoothing does not move the starting point either
    losses, _, _ = L.dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.5, label_smoothing=0.2)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))


def test_dpo_matches_hand_computed_numbers():
    # chosen gained 1 nat over the reference, rejected lost 1: h = 2, β h = 0.2
    losses, rc, rr = L.dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    assert losses.item() == pytest.approx(softplus(0.2), abs=1e-12)  # 0.598139...
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    # conservative DPO: (1-ε) * -log σ(βh) + ε * -log σ(-βh)
    losses, _, _ = L.dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9 * softplus(0.2) + 0.1 * softplus(-0.2), abs=1e-12)
    with pytest.raises(ValueError):
        L.dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), label_smoothing=0.5)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = t(-10.0).requires_grad_(), t(-12.0).requires_grad_()
    loss, _, _ = L.dpo_loss(pc, pr, t(-10.0), t(-12.0), beta=0.1)
    loss.sum().backward()
    # d/dpc of -log σ(β h) at h = 0 is -β/2
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)


def test_ipo_matches_formula_and_stops_at_its_margin():
    losses, _, _ = L.ipo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    assert losses.item() == pytest.approx((2.0 - 1.0 / 0.2) ** 2)  # (h - 1/(2β))² = (2 - 5)² = 9
    # at h = 1/(2β) the loss and its gradient are zero: IPO does not push further
    pc = t(-9.5).requires_grad_()
    losses, _, _ = L.ipo_loss(pc, t(-12.0), t(-11.0), t(-11.0), beta=0.2)  # h = 1.5 + 1 = 2.5 = 1/(2*0.2)
    losses.sum().backward()
    assert losses.item() == pytest.approx(0.0) and pc.grad.item() == pytest.approx(0.0)


def test_simpo_matches_formula():
    # β (avg_c - avg_r) - γ = 2 * 0.5 - 0.5 = 0.5
    losses, rc, rr = L.simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(softplus(0.5), abs=1e-12)
    assert rc.item() == pytest.approx(-2.0) and rr.item() == pytest.approx(-3.0)
    # equal average log-probabilities still cost more than ln 2: the margin γ is required
    losses, _, _ = L.simpo_loss(t(-1.0), t(-1.0), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(softplus(-0.5)) and losses.item() > math.log(2)


def test_orpo_matches_formula():
    def odds(avg):
        return avg - math.log(1 - math.exp(avg))

    ratio = odds(-0.5) - odds(-1.0)
    losses, got_ratio, term = L.orpo_loss(t(-0.5), t(-1.0), nll_chosen=t(0.5), lam=0.1)
    assert got_ratio.item() == pytest.approx(ratio, abs=1e-12)
    assert term.item() == pytest.approx(-softplus(ratio), abs=1e-12)
    assert losses.item() == pytest.approx(0.5 + 0.1 * softplus(ratio), abs=1e-12)
    # the odds stay finite for a probability of (almost) one
    assert torch.isfinite(L.log_odds(t(0.0))).all()


def test_kto_matches_formula_and_reference_point():
    policy, ref = t(-10.0, -20.0), t(-11.0, -19.0)  # log-ratios +1 (desirable) and -1 (undesirable)
    desirable = torch.tensor([True, False])
    kl = torch.tensor(0.2, dtype=torch.float64)
    losses, rewards = L.kto_loss(policy, ref, desirable, kl, beta=0.1, lambda_desirable=1.0, lambda_undesirable=1.5)
    assert losses[0].item() == pytest.approx(1 - sigmoid(0.1 * (1.0 - 0.2)), abs=1e-12)
    assert losses[1].item() == pytest.approx(1.5 * (1 - sigmoid(0.1 * (0.2 + 1.0))), abs=1e-12)
    assert rewards.tolist() == pytest.approx([0.1, -0.1])
    # z0: mean log-ratio of the mismatched pairs, never below zero, no gradient
    p = t(-5.0, -7.0).requires_grad_()
    z = L.kto_kl_estimate(p, t(-5.5, -7.5))
    assert z.item() == pytest.approx(0.5) and not z.requires_grad
    assert L.kto_kl_estimate(t(-6.0), t(-5.0)).item() == 0.0


def test_bradley_terry():
    assert L.bradley_terry_loss(t(2.0), t(1.0)).item() == pytest.approx(softplus(1.0))
    assert L.bradley_terry_loss(t(0.0), t(0.0)).item() == pytest.approx(math.log(2))
    assert L.bradley_terry_loss(t(2.0), t(1.0), margin=1.0).item() == pytest.approx(math.log(2))


def test_group_advantages():
    adv = L.group_advantages(t(1.0, 2.0, 3.0, 5.0, 5.0, 5.0).view(2, 3), eps=0.0)
    assert adv[0].tolist() == pytest.approx([-1.0, 0.0, 1.0])  # mean 2, sample std 1
    assert adv[1].tolist() == [0.0, 0.0, 0.0]  # no spread: no signal, and no division by zero
    assert L.group_advantages(t(1.0, 3.0).view(1, 2), scale=False).tolist() == [[-1.0, 1.0]]
    with pytest.raises(ValueError):
        L.group_advantages(t(1.0, 2.0))


def test_grpo_token_loss_clip_and_k3():
    logp = t(-1.0, -1.0, -1.0)[None].repeat(3, 1)
    old = torch.stack([t(-1.0, -1.0, -1.0), t(-1.5, -1.5, -1.5), t(-1.5, -1.5, -1.5)])  # ratios 1, e^0.5, e^0.5
    adv = t(2.0, 1.0, -1.0)
    loss, st = L.grpo_token_loss(logp, old, adv, clip_eps=0.2)
    assert loss[0].tolist() == pytest.approx([-2.0] * 3)  # ratio 1: plain -A
    assert loss[1].tolist() == pytest.approx([-1.2] * 3)  # A > 0, ratio above 1+ε: clipped, no further push
    assert st["clipped"][1].all() and not st["clipped"][0].any()
    assert loss[2].tolist() == pytest.approx([math.exp(0.5)] * 3)  # A < 0: the pessimistic unclipped term
    assert not st["clipped"][2].any()
    # k3 = e^d - d - 1 with d = ref - logp, added with weight β
    ref = torch.full_like(logp, -1.5)
    loss_kl, st = L.grpo_token_loss(logp, logp.clone(), torch.zeros(3, dtype=torch.float64), ref, kl_beta=0.5)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert st["kl"][0, 0].item() == pytest.approx(k3) and loss_kl[0, 0].item() == pytest.approx(0.5 * k3)
    assert L.k3_kl(logp, logp).abs().max().item() == 0.0


def test_grpo_gradient_is_the_policy_gradient_at_ratio_one():
    logp = t(-1.0, -2.0).requires_grad_()
    loss, _ = L.grpo_token_loss(logp[None], logp.detach()[None], t(0.5))
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([-0.5, -0.5])  # d(-ρA)/dlogp = -A at ρ = 1
