"""``xiaolm grpo``: group-relative policy optimisation with verifiable rewards, on the shared training engine.

Each *batch of samples* takes the next ``--prompts-per-step`` training prompts (a seeded order, epoch by epoch;
held-out prompts are refused) and samples a group of ``--group-size`` responses to each, all in batched generation
with the KV cache on one device. Every response is scored by the rule-based verifier of the instruction eval (share
of constraints met + a bonus when all are met - repetition; ``xiaolm.align.common.rule_reward``), optionally plus a
reward model's score. Advantages are group-normalised: each reward minus its group's mean, divided by the group's
standard deviation (a group whose samples all score the same carries no signal and gets advantage 0).

The policy then takes ``--updates-per-batch`` (μ) optimisation steps on that batch with the PPO-style clipped ratio
objective ``min(ρ A, clip(ρ, 1-ε, 1+ε) A)``, ``ρ = π(token) / π_old(token)``, where π_old is the policy that sampled
(its log-probabilities are computed once, at sampling time; with μ = 1 ρ is 1 and the objective is the plain policy
gradient), minus ``--kl-beta`` times the k3 estimate of KL(policy‖SFT reference) per token. The reference is a frozen
copy of the SFT model (unlike DPO, the samples are new every batch, so its log-probabilities cannot be computed ahead
of time; the models this project trains are small enough for two copies). ``--loss-agg token`` averages the loss
over all response tokens of the batch (DAPO; no preference for short or long answers), ``sequence`` per response
first (the GRPO paper).

Logged at every log step: the loss, the mean reward of the samples and its spread, the share of samples meeting all
constraints, the samples' repetition (share of repeated 4-grams) and length, the KL to the reference, the share of
clipped tokens, and the share of groups without signal. ``--eval-prompts`` runs the instruction eval (greedy) on
held-out instructions at each evaluation (``val_all_met``, ``val_rep4``, ``val_words``). The repetition term in the
reward and the KL term keep a small model from collapsing into loops; the logged repetition shows whether they do.

Resume. Batch g is sampled from the weights at step g·μ with generators seeded by (seed, g), and saved to
``OUT/rollouts/`` (the latest only). ``--resume`` from a checkpoint inside a batch reloads that saved batch, so the
run continues exactly; from a checkpoint at a batch boundary it samples the next batch from the restored weights with
the same seed, which gives the same samples up to the floating-point nondeterminism of the device's kernels.
(The training engine's data prefetching is switched off: each batch must be sampled by the current weights.)

OUT is a RUNDIR of the policy: ``load_model`` reads it and ``xiaolm eval instruct OUT ...`` evaluates it.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from xiaolm.align.agent import ToolSampling
from xiaolm.align.common import (
    PolicySampling,
    RewardWeights,
    SamplingStats,
    build_sequence,
    items_for,
    pad_batch,
    prompt_ids,
    response_logps,
    rule_reward,
    sample_responses,
)
from xiaolm.config import opt, parse_config
from xiaolm.train.dist import DistEnv, autocast_for, resolve_precision, setup_distributed
from xiaolm.train.engine import TrainConfig, Trainer, run_training
from xiaolm.utils import atomic_write_json, fail, log, seed_everything


@dataclass
class GRPOTrainConfig(TrainConfig):
    """The shared training options with defaults for GRPO (small steps; no prefetching: each batch of samples needs
    the current weights)."""

    lr: float = opt(2e-5, "peak learning rate")
    warmup_steps: int = opt(5, "linear warmup steps (capped at 10% of the run)")
    micro_batch_size: int = opt(16, "sampled responses per forward/backward (a batch of samples is split into these)")
    weight_decay: float = opt(0.0, "AdamW weight decay (matrices only)")
    min_lr_ratio: float = opt(0.5, "final learning rate as a fraction of lr")
    eval_every: int = opt(50, "evaluate (and save) every N steps; 0: only at the end")
    log_every: int = opt(5, "log every N optimizer steps")
    # Responses of every length: eager until batches are bucketed (a compile per shape otherwise). No LM loss to
    # chunk: 0, so that device resolution leaves this unused field alone.
    compile: Optional[bool] = opt(False, "torch.compile the model")
    loss_chunk_size: Optional[int] = opt(0, "unused: GRPO needs every token's log-probability")
    prefetch: int = opt(0, "must stay 0 for GRPO: each batch is sampled by the current weights")
    grad_accum_steps: int = opt(0, "set by GRPO: micro-batches of one batch of samples (prompts_per_step x group_size "
                                   "/ micro_batch_size); leave at 0")


@dataclass
class GRPOConfig:
    """Group-relative policy optimisation: sample a group of answers per training instruction, reward them with the \
rule-based verifier (optionally plus a reward model), and push the policy towards the better ones with a \
clipped-ratio objective and a KL penalty to the SFT model.
    example:
      xiaolm grpo runs/sft --prompts data/instruct --eval-prompts data/instruct/heldout.jsonl --out runs/grpo
    """

    run: str = opt(None, "the SFT model (RUNDIR, checkpoint or Hugging Face Llama dir): starting policy and reference")
    prompts: list[str] = opt([], "training prompts: a `xiaolm data instruct` DIR (its train.jsonl) or OpenAI-messages "
                                 "files whose records keep their `constraints`")
    heldout: list[str] = opt([], "prompts never trained on (default: heldout.jsonl beside --prompts)")
    out: str = opt("runs/grpo", "output RUNDIR (the policy)")
    limit: Optional[int] = opt(None, "use at most this many training prompts")
    group_size: int = opt(8, "responses sampled per prompt (G)")
    prompts_per_step: int = opt(8, "prompts per batch of samples")
    updates_per_batch: int = opt(1, "optimisation steps on each batch of samples (μ); above 1 the clipped ratio "
                                    "against the sampling policy matters")
    epochs: float = opt(1.0, "passes over the training prompts (when --max-steps is not given)")
    clip_eps: float = opt(0.2, "PPO clip range ε of the ratio")
    kl_beta: float = opt(0.04, "weight of the k3 KL(policy‖SFT reference) penalty per token (0: no reference kept)")
    loss_agg: Literal["token", "sequence"] = opt("token", "average the loss over all tokens of the batch, or per "
                                                          "response first")
    scale_rewards: bool = opt(True, "divide advantages by the group's standard deviation")
    repetition_weight: float = opt(1.0, "reward: minus this times the share of repeated 4-grams")
    all_met_bonus: float = opt(0.5, "reward: bonus when every checked constraint is met")
    word_credit: float = opt(0.0, "reward: plus this times the share of required words (词汇) present")
    markers: bool = opt(False, "reward: count the marker checks (悲伤的结局, 寓意, ...) too")
    reward_model: Optional[str] = opt(None, "also add a reward model's score (RMDIR from xiaolm reward)")
    reward_model_weight: float = opt(1.0, "weight of the reward model's score")
    sampling: PolicySampling = field(default_factory=PolicySampling)
    gen_batch_size: int = opt(64, "sequences generated together")
    eval_prompts: list[str] = opt([], "held-out instructions (heldout.jsonl) for the instruction eval at each "
                                      "evaluation")
    eval_limit: int = opt(64, "held-out instructions used by that eval")
    eval_max_new_tokens: int = opt(256, "answer length in that eval (greedy)")
    checkpoint: str = opt("latest", "which checkpoint of the SFT RUNDIR: latest or best")
    task: Literal["instruct", "tools"] = opt("instruct", "instruct: story instructions scored by the constraint "
                                                         "verifier; tools: `xiaolm data tools` problems, episodes "
                                                         "with the tools run in the loop (xiaolm.align.agent)")
    max_turns: int = opt(4, "tools: assistant turns per episode at most")
    enable_thinking: Optional[bool] = opt(None, "tools: the prompt's thinking switch (false: an empty think block; "
                                                "unset: the model decides)")
    train: GRPOTrainConfig = field(default_factory=GRPOTrainConfig)


# ---------------------------------------------------------------------------------------------- rollouts


class Rollouts:
    """``batch_fn(step, micro)`` that samples on-policy: batch g = step // μ is sampled (once) by the current weights,
    scored, and split into micro-batches (module docstring)."""

    def __init__(self, cfg: GRPOConfig, prompts: list[dict], tokenizer, reference, out: Path, micro_batch: int,
                 env: DistEnv, model=None):
        self.cfg, self.prompts, self.tokenizer, self.reference = cfg, prompts, tokenizer, reference
        # old and reference log-probabilities in the trainer's precision: ratio 1 and KL 0 where the weights agree
        self.autocast = autocast_for(env.device, resolve_precision(cfg.train.precision, env.device))
        self.out, self.micro_batch, self.env = out, micro_batch, env
        self.model = model  # the policy (the Trainer moves it to the device in place)
        self.current: Optional[tuple[int, dict]] = None
        self.gen_stats = SamplingStats()
        self.batches_sampled = 0
        self.weights = RewardWeights.of(cfg)
        self.scorer = None
        if cfg.reward_model:
            from xiaolm.align.onpolicy import Scorer

            self.scorer = Scorer("reward", reward_model=cfg.reward_model, device=env.device)
        self.prompt_ids = [prompt_ids(tokenizer, p["prompt"]) for p in prompts]
        self.history: list[dict] = []

    @property
    def rows(self) -> int:
        return self.cfg.prompts_per_step * self.cfg.group_size

    def _path(self, g: int) -> Path:
        return self.out / "rollouts" / f"batch-{g:06d}.pt"

    def __call__(self, step: int, micro: int) -> dict:
        g = step // max(1, self.cfg.updates_per_batch)
        if self.current is None or self.current[0] != g:
            path = self._path(g)
            if path.is_file():
                buf = torch.load(path, map_location="cpu", weights_only=False)
                log(f"batch {g}: reloaded the saved samples from {path}")
            else:
                buf = self.sample(g)
                if self.env.is_main:
                    self._save(g, buf)
            self.current = (g, buf)
        buf = self.current[1]
        lo, hi = micro * self.micro_batch, min(self.rows, (micro + 1) * self.micro_batch)
        width = int(buf["lengths"][lo:hi].max())
        batch = {k: buf[k][lo:hi, :width] for k in ("input_ids", "targets", "old_logp", "ref_logp")}
        batch["advantages"] = buf["advantages"][lo:hi]
        batch["norm"] = torch.tensor(float(buf["norm"]))
        batch["num_tokens"] = int(buf["lengths"][lo:hi].sum())
        for k, v in buf["stats"].items():
            batch[f"stat_{k}"] = torch.tensor(float(v))
        return batch

    def _save(self, g: int, buf: dict) -> None:
        path = self._path(g)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(buf, tmp)
        tmp.replace(path)
        for old in path.parent.glob("batch-*.pt"):
            if old != path:
                old.unlink(missing_ok=True)

    @torch.no_grad()
    def sample(self, g: int) -> dict:
        """Sample, score and precompute everything batch g needs (old and reference log-probabilities)."""
        from xiaolm.tasks.constraints import score_response

        cfg, tok, model = self.cfg, self.tokenizer, self.model
        chosen, base_seed = self._chosen(g)
        s = cfg.sampling
        groups = sample_responses(
            model, tok, [self.prompt_ids[i] for i in chosen], cfg.group_size, max_new_tokens=s.max_new_tokens,
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
            batch_size=cfg.gen_batch_size, seed=base_seed, stats=self.gen_stats,
        )
        self.batches_sampled += 1
        seqs, rewards, all_met, rep4, lengths = [], [], [], [], []
        context = model.config.max_position_embeddings
        for i, group in zip(chosen, groups):
            p = self.prompts[i]
            for smp in group:
                end = smp.end if smp.end is not None else tok.im_end_id
                seq = build_sequence(self.prompt_ids[i], smp.ids, smp.finished, end, context)
                if seq is None:  # prompts are kept only with room to answer, so every sample has a token
                    raise RuntimeError(f"batch {g}: an empty, unfinished sample (max_new_tokens {s.max_new_tokens})")
                seqs.append(seq)
                rewards.append(rule_reward(p["constraints"], smp.text, self.weights))
                sc = score_response(p["constraints"], smp.text, markers=cfg.markers)
                all_met.append(1.0 if sc["all_met"] else 0.0)
                if sc["repetition"]["rep4"] is not None:
                    rep4.append(sc["repetition"]["rep4"])
                lengths.append(len(smp.ids))
        if self.scorer is not None:
            rm = self.scorer([(self.prompts[i], smp.text) for i, group in zip(chosen, groups) for smp in group])
            rewards = [r + cfg.reward_model_weight * x for r, x in zip(rewards, rm)]
        return self._precomputed(g, seqs, rewards, {
            "all_met": statistics.fmean(all_met),
            "rep4": statistics.fmean(rep4) if rep4 else 0.0,
            "response_tokens": statistics.fmean(lengths),
        })

    def _chosen(self, g: int) -> tuple[list[int], int]:
        """Batch g's prompts (a seeded pick, the same on every rank and after a resume) and its sampling seed."""
        cfg, P = self.cfg, self.cfg.prompts_per_step
        s = cfg.sampling
        return (items_for(len(self.prompts), cfg.train.seed, g * P, P),
                (s.seed if s.seed is not None else cfg.train.seed) * 100_003 + g)

    def _precomputed(self, g: int, seqs: list, rewards: list[float], task_stats: dict) -> dict:
        """Batch g from its scored sequences (prompt by prompt, group_size each): group advantages, the padded
        tensors, old and reference log-probabilities, and its stats (logged in ``history``)."""
        from xiaolm.align.losses import group_advantages

        cfg, G = self.cfg, self.cfg.group_size
        reward_t = torch.tensor(rewards, dtype=torch.float32).view(cfg.prompts_per_step, G)
        adv = group_advantages(reward_t, scale=cfg.scale_rewards).view(-1)
        batch = pad_batch(seqs, self.tokenizer.pad_id)
        x, y = batch["input_ids"], batch["targets"]
        old = self._logps(self.model, x, y) if cfg.updates_per_batch > 1 else torch.zeros(y.shape)
        ref = self._logps(self.reference, x, y) if self.reference is not None else torch.zeros(y.shape)
        mask = y != -100
        norm = float(mask.sum()) if cfg.loss_agg == "token" else float(len(seqs))
        stats = {
            "reward": float(reward_t.mean()),
            "reward_std": float(reward_t.std(dim=1).mean()) if G > 1 else 0.0,
            **task_stats,
            "no_signal_groups": float((reward_t.std(dim=1) < 1e-6).float().mean()) if G > 1 else 1.0,
        }
        self.history.append({"batch": g, **{k: round(v, 4) for k, v in stats.items()}})
        return {"input_ids": x, "targets": y, "old_logp": old, "ref_logp": ref, "advantages": adv,
                "lengths": torch.tensor([len(q) for q in seqs]), "norm": norm, "stats": stats}

    def _logps(self, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        was = model.training
        model.eval()
        out = []
        for start in range(0, x.shape[0], self.micro_batch):
            xb, yb = x[start : start + self.micro_batch], y[start : start + self.micro_batch]
            with self.autocast():
                out.append(response_logps(model, xb.to(model.device), yb.to(model.device)).float().cpu())
        model.train(was)
        return torch.cat(out)


class ToolRollouts(ToolSampling, Rollouts):
    """Rollouts whose samples are tool episodes (``xiaolm.align.agent``)."""

    def __init__(self, cfg: GRPOConfig, prompts: list[dict], tokenizer, reference, out: Path, micro_batch: int,
                 env: DistEnv, model=None):
        super().__init__(cfg, [{"prompt": p["prompt"]} for p in prompts], tokenizer, reference, out, micro_batch,
                         env, model=model)
        self.use_tool_prompts(prompts)


def grpo_loss(model, batch: dict, cfg: GRPOConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The micro-batch's summed loss and its units (response tokens, or responses with --loss-agg sequence), so that
    the engine's division by the step's units averages over the whole batch of samples; and its metrics."""
    from xiaolm.align.losses import grpo_token_loss

    logp = response_logps(model, batch["input_ids"], batch["targets"])
    mask = (batch["targets"] != -100).float()
    old = batch["old_logp"] if cfg.updates_per_batch > 1 else logp.detach()
    ref = batch["ref_logp"] if cfg.kl_beta > 0 else None
    per_tok, st = grpo_token_loss(logp, old, batch["advantages"], ref, cfg.clip_eps, cfg.kl_beta)
    if cfg.loss_agg == "token":
        total = (per_tok * mask).sum()
    else:
        total = ((per_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    units = mask.sum() if cfg.loss_agg == "token" else torch.tensor(float(mask.shape[0]), device=mask.device)
    n = mask.sum().clamp(min=1)
    metrics = {
        "kl": (st["kl"] * mask).sum() / n,
        "clip_frac": (st["clipped"].float() * mask).sum() / n,
        "ratio": (st["ratio"] * mask).sum() / n,
    }
    for k, v in batch.items():
        if k.startswith("stat_"):
            metrics[k[5:]] = v
    return total, units, metrics


# ---------------------------------------------------------------------------------------------- main


def resolve_train(cfg: GRPOConfig, n_prompts: int) -> GRPOConfig:
    """The training options GRPO derives, set once before anything uses them: one optimizer step per batch of
    samples (its micro-batches accumulated) and, without --max-steps, the steps of --epochs over the prompts."""
    t = cfg.train
    if t.prefetch:
        raise fail("--prefetch must stay 0 for grpo: each batch of samples is drawn by the current weights")
    rows = cfg.prompts_per_step * cfg.group_size
    accum = math.ceil(rows / min(t.micro_batch_size, rows))
    if t.grad_accum_steps not in (0, accum):
        raise fail(f"--grad-accum-steps {t.grad_accum_steps}: grpo accumulates the {accum} micro-batches of one batch "
                   f"of samples (--prompts-per-step x --group-size / --micro-batch-size); leave it unset")
    max_steps = t.max_steps
    if max_steps is None:
        max_steps = max(1, math.ceil(cfg.epochs * n_prompts / cfg.prompts_per_step)) * max(1, cfg.updates_per_batch)
    return dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum_steps=accum, max_steps=int(max_steps)))


def grpo(cfg: GRPOConfig, env: Optional[DistEnv] = None) -> dict:
    """Run GRPO as configured; returns the summary (also OUT/summary.json)."""
    from xiaolm.data.pairs import load_prompt_set
    from xiaolm.eval.instruct import instruct_metrics
    from xiaolm.model.io import CheckpointError, load_model

    if not cfg.run:
        raise fail("give the SFT model: xiaolm grpo SFTDIR --prompts FILE --out GRPODIR")
    if not cfg.prompts:
        raise fail("--prompts is required: training instructions with constraints (xiaolm data instruct), or tool "
                   "tasks with --task tools (xiaolm data tools)")
    if cfg.group_size < 2:
        raise fail("--group-size must be at least 2 (advantages are relative to the group)")
    env = env or setup_distributed(cfg.train.device)
    if env.distributed:
        raise fail("xiaolm grpo runs on one device (sampling and training share it); run it without torchrun")
    seed_everything(cfg.train.seed)
    tools = cfg.task == "tools"
    if tools:
        from xiaolm.tasks.agent import load_tool_prompts

        loaded, refused = load_tool_prompts(cfg.prompts, cfg.heldout or None, cfg.limit)
        pset = types.SimpleNamespace(prompts=loaded, excluded_heldout=refused)
        if refused:
            log(f"refused {refused} held-out tool prompts")
    else:
        try:
            pset = load_prompt_set(cfg.prompts, cfg.heldout or None, cfg.limit)
        except FileNotFoundError as exc:
            raise fail(str(exc))
        if pset.excluded_heldout:
            log(f"refused {pset.excluded_heldout} held-out prompts ({', '.join(pset.heldout_files)})")
    try:
        policy, tokenizer, info = load_model(cfg.run, device=env.device, dtype=torch.float32, which=cfg.checkpoint)
    except CheckpointError as exc:
        raise fail(str(exc))
    context = policy.config.max_position_embeddings

    def ids_of(p: dict) -> list[int]:
        return prompt_ids(tokenizer, p["prompt"], p.get("tools"), cfg.enable_thinking if tools else None)

    prompts = [p for p in pset.prompts if len(ids_of(p)) + 16 <= context]
    if len(prompts) < len(pset.prompts):
        log(f"skipped {len(pset.prompts) - len(prompts)} prompts that leave under 16 tokens of context for an answer")
    if not prompts:
        raise fail("no usable training prompts")
    reference = None
    if cfg.kl_beta > 0:
        reference = copy.deepcopy(policy).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    cfg = resolve_train(cfg, len(prompts))
    t = cfg.train
    rows = cfg.prompts_per_step * cfg.group_size
    micro = min(t.micro_batch_size, rows)
    mu = max(1, cfg.updates_per_batch)
    total_steps = int(t.max_steps)
    out = Path(cfg.out)
    rollouts = (ToolRollouts if tools else Rollouts)(cfg, prompts, tokenizer, reference, out, micro, env,
                                                     model=policy)
    eval_samples = None
    if cfg.eval_prompts and tools:
        from xiaolm.align.agent import tool_eval_fn
        from xiaolm.tasks.agent import load_tool_prompts

        eval_samples, _ = load_tool_prompts(cfg.eval_prompts, limit=cfg.eval_limit, refuse_heldout=False)
        eval_fn = tool_eval_fn(cfg, tokenizer, eval_samples)
    elif cfg.eval_prompts:
        from xiaolm.eval.instruct import load_eval_samples

        eval_samples, _ = load_eval_samples(cfg.eval_prompts, limit=cfg.eval_limit)

        def eval_fn(m, step):
            return instruct_metrics(m, tokenizer, eval_samples, cfg.eval_max_new_tokens) if eval_samples else {}

    trainer = Trainer(t, policy, out, total_steps=total_steps, dist_env=env,
                      full_config=cfg, tokenizer=tokenizer, name="grpo",
                      extra_meta={"base": str(cfg.run), "group_size": cfg.group_size, "kl_beta": cfg.kl_beta})
    trainer.open_run_dir()  # a resume that does not fit is refused before anything in OUT is written
    if env.is_main:
        log(f"GRPO on {cfg.run}: {len(prompts)} training prompts, {cfg.prompts_per_step} prompts x {cfg.group_size} "
            f"samples per batch, {mu} update(s) per batch, {total_steps} steps "
            f"({math.ceil(total_steps / mu)} batches of samples); micro-batches of {micro} x {t.grad_accum_steps}; "
            f"KL beta {cfg.kl_beta}; device {env.device}")
    result = trainer.fit(rollouts, lambda m, b: grpo_loss(m, b, cfg), eval_fn if eval_samples else None)
    hist = rollouts.history
    summary = {
        "run": str(out), "base": str(cfg.run), **result.summary(total_steps), "device": env.device, "world_size": 1,
        "prompts": len(prompts), "excluded_heldout": pset.excluded_heldout, "group_size": cfg.group_size,
        "prompts_per_step": cfg.prompts_per_step, "updates_per_batch": mu, "kl_beta": cfg.kl_beta,
        "batches_sampled": rollouts.batches_sampled, "generation": rollouts.gen_stats.to_dict(),
        "first_batch": hist[0] if hist else None, "last_batch": hist[-1] if hist else None,
        **{k: v for k, v in result.last_eval.items() if isinstance(v, (int, float))},
    }
    if env.is_main:
        atomic_write_json(out / "summary.json", summary)
        _write_report(out, summary, hist, cfg)
    return summary


def _write_report(out: Path, summary: dict, hist: list[dict], cfg: GRPOConfig) -> None:
    from xiaolm.train.report import write_report
    from xiaolm.utils import atomic_write_text

    path = write_report(out, summary, cfg, title="xiaolm GRPO report")
    g = summary["generation"]
    lines = ["", "## Samples", "",
             f"{g['samples']} samples in {summary['batches_sampled']} batches, {g['samples_per_s']:.1f} samples/s, "
             f"{g['tokens_per_s']:.0f} tokens/s of generation on {summary['device']}.", "",
             "| batch | reward | spread in group | all constraints met | rep-4 | response tokens "
             "| groups without signal |",
             "|---|---|---|---|---|---|---|"]
    show = hist if len(hist) <= 12 else hist[:: max(1, len(hist) // 12)] + [hist[-1]]
    for h in show:
        lines.append(f"| {h['batch']} | {h['reward']:.3f} | {h['reward_std']:.3f} | {100 * h['all_met']:.1f}% | "
                     f"{h['rep4']:.3f} | {h['response_tokens']:.0f} | {100 * h['no_signal_groups']:.0f}% |")
    if summary.get("val_all_met") is not None:
        lines += ["", f"Held-out instructions (greedy): all constraints met {100 * summary['val_all_met']:.1f}%, "
                      f"rep-4 {summary.get('val_rep4', float('nan')):.3f}."]
    atomic_write_text(path, path.read_text(encoding="utf-8") + "\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(
        GRPOConfig, argv, "xiaolm grpo",
        positionals={"run": "SFTDIR"},
        # steps come from --max-steps or the prompts; batches are sampled by the current weights; no fused CE
        unused={"train.max_tokens", "train.prefetch", "train.loss_chunk_size"},
    )
    summary, env = run_training(grpo, cfg)
    if env.is_main:
        first, last = summary.get("first_batch") or {}, summary.get("last_batch") or {}
        msg = (f"done: {summary['run']}: {summary['steps']} steps, {summary['batches_sampled']} batches sampled; "
               f"sample reward {first.get('reward', float('nan')):.3f} -> {last.get('reward', float('nan')):.3f}, ")
        if cfg.task == "tools":
            msg += (f"answers right {100 * first.get('accuracy', 0):.1f}% -> {100 * last.get('accuracy', 0):.1f}%, "
                    f"calls per episode {first.get('calls_per_episode', 0):.2f} -> "
                    f"{last.get('calls_per_episode', 0):.2f}")
        else:
            msg += (f"all-met {100 * first.get('all_met', 0):.1f}% -> {100 * last.get('all_met', 0):.1f}%, "
                    f"rep-4 {first.get('rep4', 0):.3f} -> {last.get('rep4', 0):.3f}")
        if summary.get("val_all_met") is not None:
            msg += f"; held-out all-met {100 * summary['val_all_met']:.1f}%"
        print(msg, file=sys.stdout)
    return int(summary.get("exit_code", 0))
