"""Optimisers for the training engine: AdamW (the default) or Muon for hidden matrices with AdamW for the rest.

Muon (Keller Jordan's, as in modded-nanogpt and nanochat, and ``torch.optim.Muon`` in torch 2.9+) orthogonalises
each 2-D hidden matrix's momentum with a few Newton-Schulz iterations. It suits the attention and MLP projections;
the embedding, an untied head and the norm gains stay with AdamW. See docs/RECIPE.md for the measurements.

``Muon`` below is ``torch.optim.Muon`` (same options, same state, same checkpoints; owned here, so any supported
torch runs it and no private torch helper is called) with one change: the Newton-Schulz iterations run in bf16 on an
accelerator, as upstream does, but in fp32 on the CPU, where bf16 matrix products are emulated and cost ~13x more
(measured: 415 vs 31 ms per step for the quickstart's 24 matrices, which made a CPU Muon step 2.3x an AdamW step).
Matrices of one shape are orthogonalised together as one batch.

Under DDP every rank holds the full, all-reduced gradient, so every rank orthogonalises the same matrix and the
replicas stay identical. Under FSDP2 a rank holds only a shard of each matrix, and orthogonalising a shard is not
orthogonalising the matrix, so Muon refuses to run there (see :func:`build_optimizer`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def hidden_matrix_ids(model: torch.nn.Module) -> set[int]:
    """The parameters Muon should take: 2-D weights other than the embedding and the output head."""
    ids = set()
    for name, p in model.named_parameters():
        if p.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name:
            ids.add(id(p))
    return ids


def newton_schulz(grads: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz orthogonalisation of ``torch.optim.Muon`` on a batch ``[n, rows, cols]`` of matrices
    (each normalised by its own Frobenius norm), computed in ``dtype``; returns ``dtype``."""
    a, b, c = coefficients
    x = grads.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return x.mT if tall else x


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 where matrix products run natively in it (CUDA), fp32 on the CPU (emulated bf16 is ~13x slower)."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


# Keller Jordan's quintic coefficients and torch.optim.Muon's defaults (torch/optim/_muon.py)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def adjusted_lr(lr: float, adjust_lr_fn: Optional[str], shape) -> float:
    """Muon's per-matrix learning rate: "original" (Keller Jordan's) scales by sqrt(max(1, rows/cols)),
    "match_rms_adamw" (Moonshot's) by 0.2 sqrt(max(rows, cols)) -- torch.optim.Muon's ``_adjust_lr``."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        ratio = 1.0
    return lr * ratio


class Muon(torch.optim.Optimizer):
    """Muon with ``torch.optim.Muon``'s options, state layout (``momentum_buffer``) and checkpoints, owned here so
    that it runs on every supported torch (torch.optim.Muon appeared in 2.9) without torch's private helpers, with
    Newton-Schulz in fp32 on the CPU, same-shaped matrices batched (module doc), and ``found_inf``: a 0-dim tensor
    that, when 1, leaves the parameters and the momentum exactly as they were -- decided on the device, so the
    engine skips a non-finite step without a host sync (as the fused AdamW kernel does with its ``found_inf``)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = NS_EPS, ns_steps: int = NS_STEPS, adjust_lr_fn: Optional[str] = None):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"Muon: lr {lr}, momentum {momentum} and weight_decay {weight_decay} must be >= 0")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"Muon: adjust_lr_fn {adjust_lr_fn!r}: choose original or match_rms_adamw")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps,
                    "adjust_lr_fn": adjust_lr_fn}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, not a parameter of shape {tuple(p.shape)}")
        self.found_inf: Optional[torch.Tensor] = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        keep = None if self.found_inf is None else self.found_inf.bool()  # True: skip this step on the device
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            momentum, lr = group["momentum"], float(group["lr"])
            by_shape: dict[tuple, list[int]] = {}
            for i, (grad, buf) in enumerate(zip(grads, bufs)):
                if keep is None:
                    buf.lerp_(grad, 1 - momentum)
                else:  # the same numbers, kept only where the step is not skipped
                    buf.copy_(torch.where(keep, buf, buf.lerp(grad, 1 - momentum)))
                by_shape.setdefault((tuple(grad.shape), grad.device, grad.dtype), []).append(i)
            for (shape, device, _), idx in by_shape.items():
                stacked = torch.stack([grads[i].lerp(bufs[i], momentum) if group["nesterov"] else bufs[i]
                                       for i in idx])
                ortho = newton_schulz(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                      newton_schulz_dtype(device))
                step_lr = adjusted_lr(lr, group["adjust_lr_fn"], shape)
                for k, i in enumerate(idx):
                    p = params[i]
                    if keep is None:
                        p.mul_(1 - lr * group["weight_decay"])
                        p.add_(ortho[k].to(p.dtype), alpha=-step_lr)
                    else:
                        new = p.mul(1 - lr * group["weight_decay"]).add_(ortho[k].to(p.dtype), alpha=-step_lr)
                        p.copy_(torch.where(keep, p, new))
        return loss


class MuonAdamW:
    """Muon on the hidden matrices and AdamW on everything else, stepped, saved and scheduled as one optimiser.

    ``param_groups`` lists both optimisers' groups; each carries ``lr_scale`` (its peak lr over the run's ``--lr``),
    so the engine's schedule multiplies one curve into every group's own learning rate.
    """

    def __init__(self, groups: list[dict], hidden: set[int], *, muon_lr: float, adam_lr: float, base_lr: float,
                 muon_momentum: float, muon_weight_decay: float, betas, eps: float, fused: bool):
        muon_groups, adam_groups = [], []
        for g in groups:
            mats = [p for p in g["params"] if id(p) in hidden]
            rest = [p for p in g["params"] if id(p) not in hidden]
            if mats:
                muon_groups.append({"params": mats, "lr": muon_lr, "weight_decay": muon_weight_decay,
                                    "lr_scale": muon_lr / base_lr})
            if rest:
                adam_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": rest,
                                    "lr": adam_lr, "lr_scale": adam_lr / base_lr})
        if not muon_groups:
            raise ValueError("--optimizer muon: the model has no 2-D hidden matrices to give Muon")
        self.muon = Muon(muon_groups, lr=muon_lr, momentum=muon_momentum, nesterov=True,
                         weight_decay=muon_weight_decay, adjust_lr_fn="original")
        self.adam = torch.optim.AdamW(adam_groups, lr=adam_lr, betas=betas, eps=eps, fused=fused) if adam_groups \
            else None
        self._opts = [o for o in (self.muon, self.adam) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self._opts for g in o.param_groups]

    @property
    def state(self):
        return {k: v for o in self._opts for k, v in o.state.items()}

    @property
    def found_inf(self) -> Optional[torch.Tensor]:
        return self.muon.found_inf

    @found_inf.setter
    def found_inf(self, value: Optional[torch.Tensor]) -> None:
        """1 skips the step on the device, for both parts (the AdamW part is the fused kernel, see build_optimizer)."""
        for o in self._opts:
            o.found_inf = value

    def step(self) -> None:
        for o in self._opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._opts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adam.state_dict() if self.adam else None}

    def load_state_dict(self, state: dict) -> None:
        if "muon" not in state:
            raise ValueError("the checkpoint's optimizer state is AdamW's; resume with --optimizer adamw")
        self.muon.load_state_dict(state["muon"])
        if self.adam is not None:
            self.adam.load_state_dict(state["adamw"])


def build_optimizer(cfg, model: torch.nn.Module, groups: list[dict], device: str, sharded: bool):
    """The optimiser ``cfg.optimizer`` names, and whether it takes ``found_inf`` (a 0-dim tensor; 1 skips the step on
    the device, leaving weights and state exactly as they were): the fused AdamW kernel, and Muon + fused AdamW."""
    fused = (device.startswith("cuda") or device == "cpu") and not cfg.fsdp
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused), fused
    if cfg.optimizer != "muon":
        raise ValueError(f"--optimizer {cfg.optimizer!r}: choose adamw or muon")
    if sharded:
        # A rank holds a shard of each matrix; Newton-Schulz on a shard is not the matrix's orthogonalisation.
        raise ValueError("--optimizer muon does not run under --fsdp (each rank holds only a shard of every "
                         "matrix); train with DDP (drop --fsdp) or use --optimizer adamw")
    if cfg.precision == "fp16":
        raise ValueError("--optimizer muon: use --precision bf16 or fp32 (fp16 loss scaling steps one optimizer)")
    adam_lr: Optional[float] = cfg.adam_lr if cfg.adam_lr is not None else cfg.lr
    opt = MuonAdamW(groups, hidden_matrix_ids(model), muon_lr=cfg.muon_lr, adam_lr=adam_lr, base_lr=cfg.lr,
                    muon_momentum=cfg.muon_momentum, muon_weight_decay=cfg.muon_weight_decay, betas=betas,
                    eps=cfg.eps, fused=fused)
    return opt, fused
