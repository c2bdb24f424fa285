"""``xiaolm dpo``: direct preference optimisation and its variants (IPO, SimPO, ORPO, KTO), offline or iterated
on-policy, on the shared training engine.

Reference log-probabilities. DPO, IPO and KTO compare the policy with a frozen reference (the model the round starts
from). Its log-probabilities of every training and held-out sequence are computed once, before training, in
length-sorted batches (``xiaolm.align.common.precompute_logps``) and carried in each batch, so no second model stays
in memory and every step costs one forward/backward. SimPO and ORPO need no reference.

Losses (formulas in ``xiaolm.align.losses``): ``dpo`` on sequence log-probabilities, with ``--label-smoothing``
(conservative DPO); ``ipo`` on average (per-token) log-probabilities, as TRL does; ``simpo`` (average
log-probabilities, target margin ``--simpo-gamma``); ``orpo`` (SFT loss on the chosen response + λ = ``--beta`` times
the odds-ratio term); ``kto`` (each pair gives a desirable and an undesirable response, and labelled data
``{prompt, completion, label}`` is read as is; the reference point z0 is estimated per batch from mismatched pairs,
the prompt of one example with the completion of another, fixed once per dataset as in TRL). ``--beta`` defaults to
0.1, except 2.0 for SimPO and 0.5 for IPO (its target margin 1/(2β) is in average log-probability per token; 0.1
would ask for 5 nats per token). ``--sft-weight`` adds that times the SFT loss of the chosen (desirable) responses to
any variant (RPO).

Logged as Trainer metrics at every log step: the loss, the implicit rewards of chosen and rejected responses
(``β (policy - reference)``; ``β × average log-probability`` for SimPO and ORPO), their margin, the preference
accuracy (share of pairs whose chosen reward is higher), and the chosen / rejected log-probabilities. At each
evaluation the same on held-out pairs (``val_loss``, ``val_accuracy``, ``val_margin``) and, with
``--eval-prompts``, the instruction-following eval on held-out instructions (``val_all_met``, ``val_rep4``).

Iterative on-policy DPO (``--rounds R``): offline DPO cannot update its samples, so between rounds the current policy
samples new pairs from the training prompts (``--prompts``; held-out prompts are refused), scored by the verifier
and/or a reward model exactly as ``xiaolm data pairs`` does, and the next round trains on them. Round 1 trains on
``--data`` when given, else on pairs sampled from the SFT model. The reference of each round is, by default
(``--round-reference previous``), the policy the round starts from (as in Self-Rewarding and iterative DPO/RPO:
each round's DPO loss starts at ln 2 again); ``--round-reference sft`` keeps the SFT model as the reference of every
round (a tighter leash). Rounds 1..R-1 are RUNDIRs under ``OUT/rounds/round-N`` with their pairs in
``OUT/rounds/pairs-round-N.jsonl``; the last round is ``OUT`` itself, so ``OUT`` is a RUNDIR ``load_model`` reads and
``xiaolm eval instruct OUT ...`` evaluates. A finished round is not rerun; ``--resume`` continues the round in
progress.

``--lora`` trains LoRA adapters (peft) instead of all weights; the checkpoint holds the adapter as ``xiaolm sft``'s
LoRA checkpoints do, and ``load_model`` merges it.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from xiaolm.align.common import (
    EncodeCounts,
    PairTrainConfig,
    SeededBatches,
    Sequence,
    build_sequence,
    pad_batch,
    precompute_logps,
    prompt_ids,
    response_logps,
    steps_for_epochs,
)
from xiaolm.align.onpolicy import OnPolicyOptions
from xiaolm.config import opt, parse_config
from xiaolm.eval.instruct import instruct_metrics
from xiaolm.train.dist import DistEnv, autocast_for, resolve_precision, setup_distributed
from xiaolm.train.engine import Trainer, run_training
from xiaolm.train.schedule import resolve_steps
from xiaolm.utils import atomic_write_json, fail, log, seed_everything, stable_hash, write_jsonl

LOSSES = ("dpo", "ipo", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.5, "kto": 0.1, "simpo": 2.0, "orpo": 0.1}


@dataclass
class DPOTrainConfig(PairTrainConfig):
    """The shared training options with defaults for preference optimisation (small steps from a trained model)."""

    lr: float = opt(5e-5, "peak learning rate")
    micro_batch_size: int = opt(8, "pairs per forward/backward on each device")


@dataclass
class DPOConfig:
    """Preference optimisation of an SFT model: DPO (with label smoothing), IPO, SimPO, ORPO or KTO, offline on \
pairs or iterated on-policy (--rounds). Reference log-probabilities are computed once, before training.
    examples:
      xiaolm data pairs --policy runs/sft --prompts data/instruct --out data/pairs.jsonl
      xiaolm dpo runs/sft --data data/pairs.jsonl --loss dpo --out runs/dpo
      xiaolm dpo runs/sft --prompts data/instruct --rounds 3 --out runs/dpo-iter
      xiaolm eval instruct runs/dpo --data data/instruct/heldout.jsonl
    """

    run: str = opt(None, "the SFT model (RUNDIR, checkpoint or Hugging Face Llama dir): policy and reference")
    data: list[str] = opt([], "preference pairs (xiaolm data pairs output or any layout it reads; KTO also takes "
                              "labelled {prompt, completion, label} records)")
    out: str = opt("runs/dpo", "output RUNDIR (the final policy)")
    loss: Literal["dpo", "ipo", "simpo", "orpo", "kto"] = opt("dpo", "dpo, ipo, simpo, orpo or kto")
    beta: Optional[float] = opt(None, "β: strength of the tie to the reference (DPO/IPO/KTO), reward scale (SimPO), "
                                      "odds-ratio weight λ (ORPO); default 0.1, SimPO 2.0, IPO 0.5")
    label_smoothing: float = opt(0.0, "conservative DPO / SimPO: probability that a preference label is wrong")
    simpo_gamma: float = opt(0.5, "SimPO target margin γ")
    kto_desirable_weight: float = opt(1.0, "KTO λ_D: weight of desirable responses")
    kto_undesirable_weight: float = opt(1.0, "KTO λ_U: weight of undesirable responses")
    sft_weight: float = opt(0.0, "add this times the SFT loss of the chosen responses (RPO); ORPO has its own")
    heldout: list[str] = opt([], "held-out pair files for val_loss / val_accuracy (default: a hash split by prompt)")
    heldout_fraction: float = opt(0.05, "share of prompts held out when --heldout is not given")
    checkpoint: str = opt("latest", "which checkpoint of the SFT RUNDIR: latest or best")
    seq_len: Optional[int] = opt(None, "context for prompt + response (default: the model's); longer responses are cut")
    epochs: float = opt(1.0, "passes over each round's pairs (when --max-steps is not given; max-steps is per round)")
    rounds: int = opt(1, "iterative on-policy DPO: rounds of (sample pairs with the current policy, train)")
    round_reference: Literal["previous", "sft"] = opt(
        "previous", "reference of rounds 2..R: the policy the round starts from, or the SFT model")
    prompts: list[str] = opt([], "training prompts for on-policy pairs (a `xiaolm data instruct` DIR or its "
                                 "train.jsonl): round 1 without --data, and every later round")
    heldout_prompts: list[str] = opt([], "prompts never sampled from (default: heldout.jsonl beside --prompts)")
    pairs: OnPolicyOptions = field(default_factory=OnPolicyOptions)
    lora: bool = opt(False, "train LoRA adapters (peft) instead of all weights")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: float = opt(32.0, "LoRA alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout (0 keeps policy == reference at step 0 exactly)")
    lora_targets: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                  "linear layers that get adapters")
    eval_prompts: list[str] = opt([], "held-out instructions (heldout.jsonl) for the instruction eval at each "
                                      "evaluation")
    eval_limit: int = opt(64, "held-out instructions used by that eval")
    eval_max_new_tokens: int = opt(256, "answer length in that eval (greedy)")
    ref_batch_size: int = opt(32, "sequences per forward pass when computing reference log-probabilities")
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class PairSet:
    """Encoded pairs: chosen and rejected sequences, with reference log-probabilities once computed."""

    chosen: list[Sequence]
    rejected: list[Sequence]
    prompts: list[list[int]]
    counts: EncodeCounts
    ref_chosen: Optional[torch.Tensor] = None
    ref_rejected: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.chosen)


@dataclass
class LabelledSet:
    """Encoded KTO examples (desirable / undesirable) and their mismatched KL sequences."""

    seqs: list[Sequence]
    kl_seqs: list[Sequence]
    desirable: list[bool]
    ref: Optional[torch.Tensor] = None
    ref_kl: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.seqs)


def _finished(rec: dict, key: str) -> bool:
    return bool(rec.get(f"{key}_finished", True))


def encode_pairs(tokenizer, pairs: list[dict], seq_len: int) -> PairSet:
    out = PairSet([], [], [], EncodeCounts())
    cache: dict[str, list[int]] = {}
    for rec in pairs:
        key = json.dumps(rec["prompt"], ensure_ascii=False)
        p = cache.get(key)
        if p is None:
            p = cache[key] = prompt_ids(tokenizer, rec["prompt"])
        c = build_sequence(p, tokenizer.encode(rec["chosen"], allow_special=False), _finished(rec, "chosen"),
                           tokenizer.im_end_id, seq_len, out.counts)
        r = build_sequence(p, tokenizer.encode(rec["rejected"], allow_special=False), _finished(rec, "rejected"),
                           tokenizer.im_end_id, seq_len, out.counts)
        if c is None or r is None:
            continue
        out.chosen.append(c)
        out.rejected.append(r)
        out.prompts.append(p)
    return out


def encode_labelled(tokenizer, pairs: list[dict], labelled: list[dict], seq_len: int, seed: int) -> LabelledSet:
    """KTO examples: each pair's chosen (desirable) and rejected (undesirable) response, plus labelled records. Each
    example's KL partner is the completion of the next example in a seeded order (a different prompt, mostly)."""
    items = []  # (prompt ids, completion ids, finished, desirable)
    for rec in pairs:
        p = prompt_ids(tokenizer, rec["prompt"])
        items.append((p, tokenizer.encode(rec["chosen"], allow_special=False), _finished(rec, "chosen"), True))
        items.append((p, tokenizer.encode(rec["rejected"], allow_special=False), _finished(rec, "rejected"), False))
    for rec in labelled:
        p = prompt_ids(tokenizer, rec["prompt"])
        items.append((p, tokenizer.encode(rec["completion"], allow_special=False), _finished(rec, "completion"),
                      bool(rec["label"])))
    out = LabelledSet([], [], [])
    if len(items) < 2:
        return out
    order = np.random.default_rng(seed).permutation(len(items))
    partner = {int(order[i]): int(order[(i + 1) % len(order)]) for i in range(len(order))}
    for i, (p, comp, fin, good) in enumerate(items):
        s = build_sequence(p, comp, fin, tokenizer.im_end_id, seq_len)
        j = partner[i]
        kl = build_sequence(p, items[j][1], items[j][2], tokenizer.im_end_id, seq_len)
        if s is None or kl is None:
            continue
        out.seqs.append(s)
        out.kl_seqs.append(kl)
        out.desirable.append(good)
    return out


def split_heldout(pairs: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    from xiaolm.data.pairs import prompt_key

    cut = round(fraction * 10_000)
    held = [p for p in pairs if stable_hash(prompt_key(p["prompt"])) % 10_000 < cut]
    train = [p for p in pairs if stable_hash(prompt_key(p["prompt"])) % 10_000 >= cut]
    return train, held


class PreferenceBatches(SeededBatches):
    """``batch_fn(step, micro)`` over a PairSet (chosen rows, then rejected rows) or a LabelledSet (example rows,
    then KL rows), with the reference log-probabilities of those rows; a pure function of (step, micro, rank)."""

    def __call__(self, step: int, micro: int) -> dict:
        return collate(self.data, self.indices(step, micro), self.pad_id)


def collate(data, idx: list[int], pad_id: int) -> dict:
    if isinstance(data, PairSet):
        batch = pad_batch([data.chosen[i] for i in idx] + [data.rejected[i] for i in idx], pad_id)
        if data.ref_chosen is not None:
            batch["ref_chosen"] = data.ref_chosen[idx].float()
            batch["ref_rejected"] = data.ref_rejected[idx].float()
    else:
        batch = pad_batch([data.seqs[i] for i in idx] + [data.kl_seqs[i] for i in idx], pad_id)
        batch["desirable"] = torch.tensor([data.desirable[i] for i in idx], dtype=torch.bool)
        batch["ref"] = data.ref[idx].float()
        batch["ref_kl"] = data.ref_kl[idx].float()
    batch["num_tokens"] = int((batch["input_ids"] != pad_id).sum())
    return batch


# ---------------------------------------------------------------------------------------------- loss


@dataclass
class LossSettings:
    loss: str
    beta: float
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    sft_weight: float = 0.0


def preference_loss(model, batch: dict, s: LossSettings) -> tuple[torch.Tensor, dict]:
    """The configured variant's mean loss over the micro-batch, and its metrics (module docstring)."""
    from xiaolm.align import losses as L

    tok = response_logps(model, batch["input_ids"], batch["targets"])
    counts = (batch["targets"] != -100).sum(-1).clamp(min=1)
    sums = tok.sum(-1)
    n = sums.shape[0] // 2
    first, second = sums[:n], sums[n:]
    c1, c2 = counts[:n], counts[n:]
    avg1, avg2 = first / c1, second / c2
    nll_first = -(first.sum() / c1.sum())  # token-mean SFT loss of the chosen / desirable rows
    metrics: dict[str, torch.Tensor] = {}
    if s.loss == "kto":
        kl = L.kto_kl_estimate(second.detach(), batch["ref_kl"])
        losses, rewards = L.kto_loss(first, batch["ref"], batch["desirable"], kl, s.beta, s.kto_desirable_weight,
                                     s.kto_undesirable_weight)
        good = batch["desirable"]
        nll_first = -(first[good].sum() / c1[good].sum().clamp(min=1)) if good.any() else torch.zeros_like(first[0])
        metrics["kl"] = kl
        metrics["rewards_desirable"] = _masked_mean(rewards, good)
        metrics["rewards_undesirable"] = _masked_mean(rewards, ~good)
        metrics["logps_desirable"] = _masked_mean(first.detach(), good)
        metrics["logps_undesirable"] = _masked_mean(first.detach(), ~good)
    else:
        if s.loss == "dpo":
            losses, rc, rr = L.dpo_loss(first, second, batch["ref_chosen"], batch["ref_rejected"], s.beta,
                                        s.label_smoothing)
        elif s.loss == "ipo":
            losses, rc, rr = L.ipo_loss(avg1, avg2, batch["ref_chosen"] / c1, batch["ref_rejected"] / c2, s.beta)
        elif s.loss == "simpo":
            losses, rc, rr = L.simpo_loss(avg1, avg2, s.beta, s.simpo_gamma, s.label_smoothing)
        elif s.loss == "orpo":
            losses, ratio, _term = L.orpo_loss(avg1, avg2, nll_first, s.beta)
            rc, rr = s.beta * avg1.detach(), s.beta * avg2.detach()
            metrics["log_odds_ratio"] = ratio.mean()
        else:
            raise ValueError(f"unknown loss {s.loss!r}; choose one of {', '.join(LOSSES)}")
        metrics["rewards_chosen"] = rc.mean()
        metrics["rewards_rejected"] = rr.mean()
        metrics["reward_margin"] = (rc - rr).mean()
        metrics["pref_accuracy"] = (rc > rr).float().mean()
        metrics["logps_chosen"] = first.detach().mean()
        metrics["logps_rejected"] = second.detach().mean()
    loss = losses.mean()
    if s.sft_weight and s.loss != "orpo":
        loss = loss + s.sft_weight * nll_first
    metrics["nll_chosen"] = nll_first.detach()
    return loss, metrics


def preference_loss_sum(model, batch: dict, s: LossSettings) -> tuple[torch.Tensor, int, dict]:
    """``preference_loss`` summed over the micro-batch's pairs (KTO: examples), and their number, for the engine."""
    loss, metrics = preference_loss(model, batch, s)
    n = batch["input_ids"].shape[0] // 2
    return loss * n, n, metrics


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def evaluate_pairs(model, data, pad_id: int, settings: LossSettings, batch_size: int = 16) -> dict:
    """The loss and its metrics over held-out data, averaged batch by batch (weighted by batch size)."""
    totals: dict[str, float] = {}
    n = 0
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(len(data), start + batch_size)))
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v
                 for k, v in collate(data, idx, pad_id).items()}
        batch.pop("num_tokens", None)
        loss, metrics = preference_loss(model, batch, settings)
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(idx)
        n += len(idx)
    return {k: v / max(1, n) for k, v in totals.items()}


# ---------------------------------------------------------------------------------------------- reference


def attach_reference(model, data, pad_id: int, batch_size: int, autocast=None) -> None:
    """Reference log-probabilities of every row, computed once with ``model`` (the reference) before training, under
    ``autocast`` (a context factory): the trainer's precision, so that policy == reference gives margins of 0."""
    if isinstance(data, PairSet):
        data.ref_chosen, _ = precompute_logps(model, data.chosen, pad_id, batch_size, autocast)
        data.ref_rejected, _ = precompute_logps(model, data.rejected, pad_id, batch_size, autocast)
    else:
        data.ref, _ = precompute_logps(model, data.seqs, pad_id, batch_size, autocast)
        data.ref_kl, _ = precompute_logps(model, data.kl_seqs, pad_id, batch_size, autocast)


# ---------------------------------------------------------------------------------------------- one round


def _settings(cfg: DPOConfig) -> LossSettings:
    beta = cfg.beta if cfg.beta is not None else DEFAULT_BETA[cfg.loss]
    return LossSettings(cfg.loss, beta, cfg.label_smoothing, cfg.simpo_gamma, cfg.kto_desirable_weight,
                        cfg.kto_undesirable_weight, cfg.sft_weight)


def _load_instruct_eval(cfg: DPOConfig):
    if not cfg.eval_prompts:
        return None
    from xiaolm.eval.instruct import load_eval_samples

    samples, _ = load_eval_samples(cfg.eval_prompts, limit=cfg.eval_limit)
    return samples


def _round_done(run_dir: Path) -> bool:
    f = run_dir / "summary.json"
    if not f.is_file():
        return False
    s = json.loads(f.read_text(encoding="utf-8"))
    return not s.get("interrupted") and s.get("steps") == s.get("total_steps")


def train_round(cfg: DPOConfig, env: DistEnv, policy, tokenizer, train_data, held_data, run_dir: Path,
                reference, round_index: int, eval_samples, base_name: str) -> tuple[torch.nn.Module, dict]:
    """One round of preference optimisation from ``policy`` on ``train_data``; returns (plain policy, summary)."""
    settings = _settings(cfg)
    t = cfg.train
    pad = tokenizer.pad_id
    if cfg.loss not in REFERENCE_FREE:
        ref_model = reference if reference is not None else policy
        log(f"round {round_index}: reference log-probabilities of {len(train_data)} training and {len(held_data)} "
            f"held-out {'examples' if cfg.loss == 'kto' else 'pairs'}, computed once")
        autocast = autocast_for(env.device, resolve_precision(t.precision, env.device))  # the trainer's precision
        attach_reference(ref_model, train_data, pad, cfg.ref_batch_size, autocast)
        if len(held_data):
            attach_reference(ref_model, held_data, pad, cfg.ref_batch_size, autocast)
    batches = PreferenceBatches(train_data, t.micro_batch_size, t.grad_accum_steps, env, t.seed + round_index - 1,
                                pad)
    lengths = [len(s) for s in (train_data.chosen if isinstance(train_data, PairSet) else train_data.seqs)]
    tokens_per_step = int(2 * batches.global_batch * float(np.mean(lengths)))
    default = None if t.max_steps or t.max_tokens else steps_for_epochs(cfg.epochs, len(train_data),
                                                                        batches.global_batch)
    total_steps = resolve_steps(t, tokens_per_step, default_steps=default)

    model, param_groups, trainer_cls, lora_info = policy, None, Trainer, None
    if cfg.lora:
        from xiaolm.train.lora import LoraTrainer, apply_lora, trainable_parameters

        model = apply_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_targets, base_name=base_name)
        param_groups = [{"params": trainable_parameters(model), "weight_decay": t.weight_decay}]
        trainer_cls = LoraTrainer
        lora_info = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                     "targets": list(cfg.lora_targets)}
    base = model.get_base_model() if cfg.lora else model

    def eval_fn(m, step):
        result = {}
        if len(held_data):
            r = evaluate_pairs(m, held_data, pad, settings, batch_size=max(1, t.micro_batch_size))
            result["val_loss"] = r["loss"]
            if "pref_accuracy" in r:
                result.update(val_accuracy=r["pref_accuracy"], val_margin=r["reward_margin"])
            else:  # KTO: rewards of desirable vs undesirable held-out responses
                result.update(val_rewards_desirable=r["rewards_desirable"],
                              val_rewards_undesirable=r["rewards_undesirable"])
        if eval_samples:
            result.update(instruct_metrics(m, tokenizer, eval_samples, cfg.eval_max_new_tokens))
        return result

    trainer = trainer_cls(t, model, run_dir, total_steps=total_steps, dist_env=env,
                          full_config=cfg, model_config=base.config.to_dict(), tokenizer=tokenizer,
                          param_groups=param_groups, name="dpo",
                          extra_meta={"base": base_name, "loss": cfg.loss, "beta": settings.beta,
                                      "round": round_index, "lora": lora_info})
    trainer.open_run_dir()  # a resume that does not fit is refused before anything in the run is written
    if env.is_main:
        log(f"round {round_index}: {cfg.loss} (beta {settings.beta}) on {len(train_data)} training "
            f"{'examples' if cfg.loss == 'kto' else 'pairs'}, {len(held_data)} held-out; {total_steps} steps of "
            f"{batches.global_batch}; device {env.device} -> {run_dir}")
    result = trainer.fit(batches, lambda m, b: preference_loss_sum(m, b, settings), eval_fn)
    trained = trainer.raw_model
    if cfg.lora:
        from xiaolm.model.lora import merge_lora

        trained = merge_lora(trained)
    summary = {
        "run": str(run_dir), "round": round_index, "loss": cfg.loss, "beta": settings.beta,
        **result.summary(total_steps),
        "train_examples": len(train_data), "heldout_examples": len(held_data),
        "device": env.device, "world_size": env.world_size, "lora": lora_info,
        **{k: v for k, v in result.last_eval.items() if isinstance(v, (int, float))},
    }
    if env.is_main:
        atomic_write_json(run_dir / "summary.json", summary)
    return trained, summary


# ---------------------------------------------------------------------------------------------- rounds


def _encode(cfg: DPOConfig, tokenizer, pairs, labelled, held_pairs, seq: int, seed: int):
    if cfg.loss == "kto":
        train, held = (encode_labelled(tokenizer, pairs, labelled, seq, seed),
                       encode_labelled(tokenizer, held_pairs, [], seq, seed + 1))
        _note_dropped("training examples", 2 * len(pairs) + len(labelled), len(train), seq)
        _note_dropped("held-out examples", 2 * len(held_pairs), len(held), seq)
        return train, held
    train, held = encode_pairs(tokenizer, pairs, seq), encode_pairs(tokenizer, held_pairs, seq)
    _note_dropped("training pairs", len(pairs), len(train), seq)
    _note_dropped("held-out pairs", len(held_pairs), len(held), seq)
    return train, held


def _note_dropped(what: str, given: int, kept: int, seq: int) -> None:
    if kept < given:
        log(f"note: {given - kept} of {given} {what} dropped: the prompt leaves no room for a response within "
            f"--seq-len {seq}")


def _sample_pairs(cfg: DPOConfig, policy, tokenizer, prompt_set, round_index: int,
                  device_note: str) -> tuple[list, dict]:
    from xiaolm.align.onpolicy import build_onpolicy_pairs

    p = cfg.pairs
    scorer = p.make_scorer(str(policy.device))
    prompts = prompt_set.prompts
    if p.limit is not None and len(prompts) > p.limit:  # a different slice of the prompts each round
        start = ((round_index - 1) * p.limit) % len(prompts)
        prompts = (prompts[start:] + prompts[:start])[: p.limit]
    log(f"round {round_index}: sampling {p.k} responses to each of {len(prompts)} training prompts {device_note}")
    result = build_onpolicy_pairs(policy, tokenizer, prompts, k=p.k, sampling=p.sampling, scorer=scorer,
                                  min_margin=p.min_margin, mode=p.mode, batch_size=p.batch_size, greedy=p.greedy,
                                  seed=cfg.train.seed + 7919 * round_index, tag={"round": round_index})
    g = result.report["generation"]
    log(f"round {round_index}: {len(result.pairs)} pairs ({result.report['dropped_below_margin']} below the margin); "
        f"{g['samples_per_s']:.1f} samples/s, {g['tokens_per_s']:.0f} tokens/s")
    return result.pairs, result.report


def dpo(cfg: DPOConfig, env: Optional[DistEnv] = None) -> dict:
    """Run (iterated) preference optimisation as configured; returns the summary (also OUT/summary.json)."""
    from xiaolm.data.pairs import load_preferences, load_prompt_set
    from xiaolm.model.io import CheckpointError, load_model

    if not cfg.run:
        raise fail("give the SFT model: xiaolm dpo SFTDIR --data PAIRS --out DPODIR")
    if cfg.loss not in LOSSES:
        raise fail(f"--loss must be one of {', '.join(LOSSES)}")
    if cfg.rounds < 1:
        raise fail("--rounds must be at least 1")
    if not cfg.data and not cfg.prompts:
        raise fail("give preference pairs (--data) or training prompts to sample them from (--prompts)")
    if cfg.rounds > 1 and not cfg.prompts:
        raise fail("--rounds > 1 samples new pairs between rounds: give the training prompts with --prompts")
    env = env or setup_distributed(cfg.train.device)
    seed_everything(cfg.train.seed)
    out = Path(cfg.out)
    try:
        data_pairs, data_labelled, reports = load_preferences(cfg.data) if cfg.data else ([], [], [])
        held_file_pairs = load_preferences(cfg.heldout)[0] if cfg.heldout else None
        prompt_set = load_prompt_set(cfg.prompts, cfg.heldout_prompts or None) if cfg.prompts else None
    except FileNotFoundError as exc:
        raise fail(str(exc))
    for r in reports:
        log(r.summary())
    if data_labelled and cfg.loss != "kto":
        log(f"note: {len(data_labelled)} unpaired labelled responses are used by --loss kto only; ignored here")
    if prompt_set is not None:
        if prompt_set.excluded_heldout:
            log(f"refused {prompt_set.excluded_heldout} held-out prompts ({', '.join(prompt_set.heldout_files)})")
        if not prompt_set.prompts:
            raise fail("no training prompts left in --prompts (all held out or malformed)")
    try:
        sft_policy, tokenizer, info = load_model(cfg.run, device=env.device, dtype=torch.float32, which=cfg.checkpoint)
    except CheckpointError as exc:
        raise fail(str(exc))
    context = sft_policy.config.max_position_embeddings
    seq = min(cfg.seq_len or context, context)
    eval_samples = _load_instruct_eval(cfg)
    policy = sft_policy
    sft_state = None
    if cfg.rounds > 1 and cfg.round_reference == "sft" and cfg.loss not in REFERENCE_FREE:
        sft_state = {k: v.detach().cpu().clone() for k, v in sft_policy.state_dict().items()}
    rounds: list[dict] = []
    summary: dict = {}
    for r in range(1, cfg.rounds + 1):
        run_dir = out if r == cfg.rounds else out / "rounds" / f"round-{r}"
        if r < cfg.rounds and _round_done(run_dir):
            log(f"round {r}: already finished in {run_dir}; loading its policy")
            policy, _, _ = load_model(run_dir, device=env.device, dtype=torch.float32)
            rounds.append(json.loads((run_dir / "summary.json").read_text(encoding="utf-8")))
            continue
        gen_report = None
        if r == 1 and cfg.data:
            pairs, labelled = data_pairs, data_labelled
        else:
            pairs_file = out / "rounds" / f"pairs-round-{r}.jsonl"
            if pairs_file.is_file() and cfg.train.resume:
                pairs = list(load_preferences([str(pairs_file)])[0])
                log(f"round {r}: reusing {len(pairs)} pairs from {pairs_file}")
            else:
                pairs, gen_report = _sample_pairs(cfg, policy, tokenizer, prompt_set, r, f"on {env.device}")
                if env.is_main:
                    write_jsonl(pairs_file, pairs)
                    atomic_write_json(pairs_file.with_name(pairs_file.name + ".report.json"), gen_report)
            labelled = []
        if held_file_pairs is not None:
            train_pairs, held_pairs = pairs, held_file_pairs
        else:
            train_pairs, held_pairs = split_heldout(pairs, cfg.heldout_fraction)
        train_data, held_data = _encode(cfg, tokenizer, train_pairs, labelled, held_pairs, seq, cfg.train.seed + r)
        if not len(train_data):
            raise fail(f"round {r}: no training pairs (lower --pairs.min-margin, raise --pairs.k, or give --data)")
        reference = None
        if sft_state is not None and r > 1:
            from xiaolm.model.llama import Llama

            reference = Llama(sft_policy.config)
            reference.load_state_dict(sft_state, strict=False)
            reference.tie_weights()
            reference.to(env.device).eval()
        policy, summary = train_round(cfg, env, policy, tokenizer, train_data, held_data, run_dir, reference, r,
                                      eval_samples, str(cfg.run))
        del reference
        summary["pairs"] = {"train": len(train_pairs), "heldout": len(held_pairs),
                            "encode": (train_data.counts.to_dict() if isinstance(train_data, PairSet) else None),
                            "generation": gen_report}
        rounds.append(summary)
        if summary.get("interrupted"):
            break
        if env.is_main and r < cfg.rounds:
            atomic_write_json(run_dir / "summary.json", summary)
    final = {**summary, "run": str(out), "base": str(cfg.run), "rounds": rounds,
             "round_reference": cfg.round_reference if cfg.rounds > 1 else None,
             "files": [r.to_dict() for r in reports]}
    if env.is_main:
        atomic_write_json(out / "summary.json", final)
        _write_report(out, final, cfg)
    return final


def _write_report(out: Path, summary: dict, cfg: DPOConfig) -> None:
    from xiaolm.train.report import write_report
    from xiaolm.utils import atomic_write_text

    path = write_report(out, summary, cfg, title=f"xiaolm preference optimisation report ({cfg.loss})")
    lines = ["", "## Rounds", "",
             "| round | pairs (train / held-out) | steps | held-out loss | held-out pref. accuracy | all-met | rep-4 |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda v, p=False: "-" if v is None else (f"{100 * v:.1f}%" if p else f"{v:.4f}")  # noqa: E731
    for r in summary["rounds"]:
        pr = r.get("pairs") or {}
        lines.append(f"| {r.get('round')} | {pr.get('train', r.get('train_examples'))} / "
                     f"{pr.get('heldout', r.get('heldout_examples'))} | {r.get('steps')} | {fmt(r.get('val_loss'))} | "
                     f"{fmt(r.get('val_accuracy'), True)} | {fmt(r.get('val_all_met'), True)} | "
                     f"{fmt(r.get('val_rep4'))} |")
    lines += ["", f"Loss `{cfg.loss}`, beta {summary.get('beta')}; reference log-probabilities computed once per round "
                  "before training" + (" (none: reference-free)" if cfg.loss in REFERENCE_FREE else "") + "."]
    atomic_write_text(path, path.read_text(encoding="utf-8") + "\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(
        DPOConfig, argv, "xiaolm dpo",
        positionals={"run": "SFTDIR"},
        unused={"train.loss_chunk_size"},  # the pair losses need every token's log-probability, not a fused CE
    )
    summary, env = run_training(dpo, cfg)
    if env.is_main:
        parts = [f"done: {summary['run']}: {len(summary['rounds'])} round(s) of {cfg.loss}"]
        for key, label, pct in (("val_loss", "held-out loss", False), ("val_accuracy", "held-out pref. accuracy", True),
                                ("val_all_met", "all-constraints", True), ("val_rep4", "rep-4", False)):
            v = summary.get(key)
            if v is not None:
                parts.append(f"{label} {100 * v:.1f}%" if pct else f"{label} {v:.4f}")
        print(", ".join(parts), file=sys.stdout)
    return int(summary.get("exit_code", 0))
