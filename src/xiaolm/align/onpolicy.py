"""On-policy preference pairs (``xiaolm data pairs --policy``, and every round of iterative DPO), and the
``xiaolm data pairs`` verb itself; the pair layouts it normalises with ``--data`` are ``xiaolm.data.pairs``'.

On-policy pairs (``--policy SFTDIR --prompts FILE``): for each *training* prompt (prompts whose story or text appears
in the held-out set are refused and counted) sample ``k`` responses from the policy in batches on one device, score
each with the rule-based verifier of the instruction eval (share of constraints met, a bonus when all are met, minus
repetition: ``xiaolm.align.common.rule_reward``) and/or a reward model, and keep (best, worst) when their scores
differ by at least ``--min-margin``. ``--mode reference`` instead pairs the prompt's reference answer (chosen) with
the worst sample (rejected), Chinese_LLM_From_Scratch's recipe, kept as an option because it teaches the model to
prefer text it cannot produce. Generation throughput (samples/s, tokens/s) is reported.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from xiaolm.align.common import PolicySampling
from xiaolm.config import opt, parse_config, save_config
from xiaolm.data.pairs import load_preferences, load_prompt_set
from xiaolm.infer.generate import SamplingConfig
from xiaolm.utils import atomic_write_json, fail, log, write_jsonl


@dataclass
class OnPolicyOptions:
    """How on-policy pairs are sampled and scored: ``xiaolm data pairs --policy`` and every round of iterative DPO."""

    mode: Literal["best-worst", "reference"] = opt(
        "best-worst", "best-worst: best vs worst of the k samples; reference: the prompt's reference answer vs the "
                      "worst sample (Chinese_LLM_From_Scratch's recipe)")
    k: int = opt(4, "responses sampled per prompt")
    greedy: bool = opt(False, "also score the policy's greedy answer as one more candidate")
    min_margin: float = opt(0.5, "keep a pair only when the chosen response scores at least this much higher")
    scorer: Literal["verifier", "reward", "both"] = opt(
        "verifier", "score responses with the rule-based verifier, a reward model (--reward-model), or their sum")
    reward_model: Optional[str] = opt(None, "reward model RMDIR (xiaolm reward) for --scorer reward or both")
    reward_model_weight: float = opt(1.0, "weight of the reward model's score with --scorer both")
    repetition_weight: float = opt(1.0, "verifier score: minus this times the share of repeated 4-grams")
    all_met_bonus: float = opt(0.5, "verifier score: bonus when every checked constraint is met")
    word_credit: float = opt(0.0, "verifier score: plus this times the share of required words (词汇) present")
    markers: bool = opt(False, "verifier score: count the marker checks (悲伤的结局, 寓意, 转折, 伏笔, 冲突) too")
    limit: Optional[int] = opt(None, "use at most this many prompts (iterative DPO: per round, a different slice "
                                     "each round)")
    batch_size: int = opt(64, "sequences generated together")
    sampling: PolicySampling = field(default_factory=PolicySampling)

    def make_scorer(self, device: str) -> "Scorer":
        """The scorer these options describe (raises ValueError when a reward model is asked for but not given)."""
        from xiaolm.align.common import RewardWeights

        return Scorer(self.scorer, RewardWeights.of(self), self.reward_model, self.reward_model_weight,
                      device=device)


@dataclass
class PairsConfig(OnPolicyOptions):
    """Build preference pairs: normalise files in the common layouts (--data), or sample on-policy pairs from an SFT \
model scored by the rule-based verifier and/or a reward model (--policy, --prompts).
    examples:
      xiaolm data pairs --data dpo_zh_demo.json reward_medical_test.json --out data/pairs_real.jsonl
      xiaolm data pairs --policy runs/sft --prompts data/instruct --k 4 --out data/pairs.jsonl
    """

    data: list[str] = opt([], "preference files to normalise into one pair format (layouts: prompt/chosen/rejected, "
                              "LLaMA-Factory, MedicalGPT, minimind, KTO labelled); or use --policy for on-policy pairs")
    policy: Optional[str] = opt(None, "SFT RUNDIR to sample on-policy pairs from (with --prompts)")
    prompts: list[str] = opt([], "training prompts: a `xiaolm data instruct` DIR (its train.jsonl) or OpenAI-messages "
                                 "files whose records keep their `constraints`")
    heldout: list[str] = opt([], "held-out files whose stories / prompts must never be used (default: heldout.jsonl "
                                 "beside the prompts)")
    out: str = opt("data/pairs.jsonl", "output JSON Lines file (a report and the config are written beside it)")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    checkpoint: str = opt("latest", "which checkpoint of the policy RUNDIR: latest or best")


class Scorer:
    """Scores responses to prompts: the rule-based verifier, a reward model, or both (see PairsConfig)."""

    def __init__(self, kind: str = "verifier", weights=None, reward_model: Optional[str] = None,
                 reward_model_weight: float = 1.0, device: str = "cpu", batch_size: int = 32):
        from xiaolm.align.common import RewardWeights

        self.kind, self.weights = kind, weights or RewardWeights()
        self.rm_weight, self.batch_size = reward_model_weight, batch_size
        self.rm = None
        if kind in ("reward", "both"):
            if not reward_model:
                raise ValueError(f"--scorer {kind} needs --reward-model RMDIR")
            from xiaolm.model.io import load_reward_model

            self.rm, self.rm_tokenizer, _ = load_reward_model(reward_model, device=device)

    def __call__(self, items: list[tuple[dict, str]]) -> list[float]:
        """``items`` are ``(prompt record, response text)``; returns one score each."""
        from xiaolm.align.common import rule_reward

        scores = [0.0] * len(items)
        if self.kind in ("verifier", "both"):
            scores = [rule_reward(p.get("constraints") or {}, text, self.weights) for p, text in items]
        if self.rm is not None:
            from xiaolm.align.reward import score_texts

            rm = score_texts(self.rm, self.rm_tokenizer, [(p["prompt"], t) for p, t in items], self.batch_size)
            w = 1.0 if self.kind == "reward" else self.rm_weight
            scores = [s + w * r for s, r in zip(scores, rm)]
        return scores


@dataclass
class OnPolicyResult:
    pairs: list[dict]
    report: dict


def build_onpolicy_pairs(model, tokenizer, prompts: list[dict], *, k: int, sampling: SamplingConfig, scorer: Scorer,
                         min_margin: float, mode: str = "best-worst", batch_size: int = 64, seed: int = 0,
                         greedy: bool = False, tag: Optional[dict] = None) -> OnPolicyResult:
    """Sample ``k`` responses per prompt with ``model``, score them, keep (best, worst) pairs (module docstring).
    ``greedy`` adds the policy's greedy answer as one more candidate: the answer the model gives when decoding
    greedily (as the instruction eval and chat at temperature 0 do), so a loop that only greedy decoding falls into
    can be the rejected side."""
    from xiaolm.align.common import SamplingStats, prompt_ids, sample_responses

    if k < 1 or (mode == "best-worst" and k < 2):
        raise ValueError("best-worst pairs need k >= 2 samples per prompt")
    context = model.config.max_position_embeddings
    max_new = sampling.max_new_tokens
    usable, too_long = [], 0
    for p in prompts:
        ids = prompt_ids(tokenizer, p["prompt"])
        if len(ids) + 8 > context:  # no room left for an answer
            too_long += 1
            continue
        usable.append((p, ids))
    stats = SamplingStats()
    samples = sample_responses(
        model, tokenizer, [ids for _, ids in usable], k, max_new_tokens=max_new, temperature=sampling.temperature,
        top_k=sampling.top_k, top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty,
        batch_size=batch_size, seed=seed if sampling.seed is None else sampling.seed + seed, stats=stats,
    )
    if greedy:
        plain = sample_responses(model, tokenizer, [ids for _, ids in usable], 1, max_new_tokens=max_new,
                                 temperature=0.0, batch_size=batch_size, stats=stats)
        samples = [group + g for group, g in zip(samples, plain)]
        k = k + 1
    flat = [(p, s.text) for (p, _), group in zip(usable, samples) for s in group]
    t_score = time.perf_counter()
    scores = scorer(flat)
    ref_scores = scorer([(p, p["reference"]) for p, _ in usable if p.get("reference")]) if mode == "reference" else []
    ref_iter = iter(ref_scores)
    score_s = time.perf_counter() - t_score
    pairs = []
    no_margin = no_reference = 0
    all_scores = []
    for i, ((p, _), group) in enumerate(zip(usable, samples)):
        sc = scores[i * k : (i + 1) * k]
        all_scores.extend(sc)
        worst = min(range(k), key=lambda j: (sc[j], -j))  # ties: the last sample (the best is the first)
        if mode == "reference":
            if not p.get("reference"):
                no_reference += 1
                continue
            chosen_text, chosen_score, chosen_finished = p["reference"], next(ref_iter), True
        else:
            best = max(range(k), key=lambda j: (sc[j], -j))
            chosen_text, chosen_score, chosen_finished = group[best].text, sc[best], group[best].finished
        margin = chosen_score - sc[worst]
        if margin < min_margin or chosen_text.strip() == group[worst].text.strip():
            no_margin += 1
            continue
        rec = {"prompt": p["prompt"], "chosen": chosen_text, "rejected": group[worst].text,
               "source": f"on-policy:{p['where']}", "layout": "on-policy", "mode": mode,
               "chosen_finished": chosen_finished, "rejected_finished": group[worst].finished,
               "scores": {"chosen": round(chosen_score, 4), "rejected": round(sc[worst], 4)},
               "margin": round(margin, 4), "sample_scores": [round(s, 4) for s in sc]}
        if p.get("constraints"):
            rec["constraints"] = p["constraints"]
        if p.get("story_id"):
            rec["story_id"] = p["story_id"]
        if tag:
            rec.update(tag)
        pairs.append(rec)
    report = {
        "prompts": len(prompts), "prompts_too_long": too_long, "k": k, "greedy_candidate": greedy, "mode": mode,
        "min_margin": min_margin,
        "pairs": len(pairs), "dropped_below_margin": no_margin, "dropped_no_reference": no_reference,
        "generation": stats.to_dict(), "scoring_seconds": round(score_s, 2),
        "mean_score": round(statistics.fmean(all_scores), 4) if all_scores else None,
        "mean_margin": round(statistics.fmean(p["margin"] for p in pairs), 4) if pairs else None,
        "sampling": dict(sampling.__dict__),
    }
    return OnPolicyResult(pairs, report)


# ---------------------------------------------------------------------------------------------- CLI


def _normalise(cfg: PairsConfig) -> dict:
    try:
        pairs, labelled, reports = load_preferences(cfg.data)
    except FileNotFoundError as exc:
        raise fail(str(exc))
    for r in reports:
        log(r.summary())
    if not pairs and not labelled:
        raise fail("no usable preference records in --data (see the messages above)")
    out = Path(cfg.out)
    n = write_jsonl(out, pairs + labelled)
    report = {"mode": "normalise", "written": n, "pairs": len(pairs), "labelled": len(labelled),
              "skipped": sum(r.skipped for r in reports), "files": [r.to_dict() for r in reports]}
    return report


def _on_policy(cfg: PairsConfig) -> dict:
    from xiaolm.model.io import CheckpointError, load_model
    from xiaolm.utils import pick_device

    if not cfg.prompts:
        raise fail("on-policy pairs need --prompts (a `xiaolm data instruct` DIR or its train.jsonl)")
    try:
        pset = load_prompt_set(cfg.prompts, cfg.heldout or None, cfg.limit)
    except FileNotFoundError as exc:
        raise fail(str(exc))
    if pset.excluded_heldout:
        log(f"refused {pset.excluded_heldout} prompts whose story or text is in the held-out set "
            f"({', '.join(pset.heldout_files)})")
    if not pset.prompts:
        raise fail("no training prompts left (all were held out or malformed)")
    device = pick_device(cfg.device)
    try:
        model, tokenizer, info = load_model(cfg.policy, device=device, which=cfg.checkpoint)
    except CheckpointError as exc:
        raise fail(str(exc))
    try:
        scorer = cfg.make_scorer(device)
    except ValueError as exc:
        raise fail(str(exc))
    log(f"sampling {cfg.k} responses to each of {len(pset.prompts)} training prompts from {cfg.policy} on {device}")
    try:
        result = build_onpolicy_pairs(model, tokenizer, pset.prompts, k=cfg.k, sampling=cfg.sampling, scorer=scorer,
                                      min_margin=cfg.min_margin, mode=cfg.mode, batch_size=cfg.batch_size,
                                      greedy=cfg.greedy, tag={"policy": str(cfg.policy)})
    except ValueError as exc:
        raise fail(str(exc))
    write_jsonl(Path(cfg.out), result.pairs)
    return {**result.report, "pair_mode": result.report["mode"], "mode": "on-policy", "policy": str(cfg.policy),
            "prompt_files": pset.files, "heldout_files": pset.heldout_files,
            "excluded_heldout": pset.excluded_heldout}


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(PairsConfig, argv, "xiaolm data pairs")
    if bool(cfg.data) == bool(cfg.policy):
        raise fail("give either --data FILES (normalise) or --policy SFTDIR --prompts FILE (on-policy)")
    out = Path(cfg.out)
    report = _normalise(cfg) if cfg.data else _on_policy(cfg)
    atomic_write_json(out.with_name(out.name + ".report.json"), report)
    save_config(cfg, out.with_name(out.name + ".config.yaml"))
    if report["mode"] == "on-policy":
        g = report["generation"]
        print(f"{report['pairs']} pairs from {report['prompts']} prompts (k={report['k']}; "
              f"{report['dropped_below_margin']} below the margin {report['min_margin']}, "
              f"{report['excluded_heldout']} held-out prompts refused); generation {g['samples']} samples, "
              f"{g['tokens']} tokens in {g['seconds']:.1f} s = {g['samples_per_s']:.1f} samples/s, "
              f"{g['tokens_per_s']:.0f} tokens/s; wrote {cfg.out}", file=sys.stdout)
    else:
        print(f"{report['pairs']} pairs, {report['labelled']} labelled responses, {report['skipped']} malformed "
              f"records skipped; wrote {cfg.out}", file=sys.stdout)
    return 0
