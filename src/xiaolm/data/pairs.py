"""``xiaolm data pairs``: preference pairs, loaded from the layouts people bring or sampled on-policy.

One pair format for every later stage (``xiaolm reward``, ``xiaolm dpo``), one JSON object per line::

    {"prompt": [{"role": "user", "content": "..."}], "chosen": "...", "rejected": "...",
     "source": "file:line", "layout": "llamafactory", ...metadata (constraints, story_id, scores, margin)}

Unpaired, labelled responses (for KTO) have ``"completion"`` and ``"label"`` (true = desirable) instead of
``chosen`` / ``rejected``.

Layouts read by ``--data`` (detected per record; JSON Lines, JSON arrays or one object, as ``xiaolm.data.formats``):

- ``prompt``: ``prompt`` / ``chosen`` / ``rejected`` strings (optional ``system``, and ``history`` as
  ``[[question, answer], ...]``); ``question`` may stand for ``prompt``; ``prompt`` may also be a message list (our
  own format, and TRL's conversational format where ``chosen`` / ``rejected`` are assistant message lists);
- ``llamafactory``: ``conversations`` (``from``/``value`` turns ending with the user's) and ``chosen`` / ``rejected``
  as ``{"from": "gpt", "value": ...}`` (LLaMA-Factory's ``dpo_zh_demo.json``);
- ``medicalgpt``: ``conversations`` with ``chosen`` / ``rejected`` strings; and MedicalGPT's reward files with
  ``question`` / ``response_chosen`` / ``response_rejected`` (``reward_medical_test.json``);
- ``minimind``: ``chosen`` / ``rejected`` as full message lists (``role``/``content``) that share every turn but the
  last assistant answer;
- ``kto``: ``prompt`` + ``completion`` + ``label`` (TRL's unpaired layout).

A malformed record (missing field, wrong type, turns out of order, chosen identical to rejected, different prompts
in the chosen and rejected lists) is counted and reported with its file, line and reason, and skipped.

On-policy pairs (``--policy SFTDIR --prompts FILE``): for each *training* prompt (prompts whose story or text appears
in the held-out set are refused and counted) sample ``k`` responses from the policy in batches on one device, score
each with the rule-based verifier of the instruction eval (share of constraints met, a bonus when all are met, minus
repetition: ``xiaolm.align.common.rule_reward``) and/or a reward model, and keep (best, worst) when their scores
differ by at least ``--min-margin``. ``--mode reference`` instead pairs the prompt's reference answer (chosen) with
the worst sample (rejected), Chinese_LLM_From_Scratch's recipe, kept as an option because it teaches the model to
prefer text it cannot produce. Generation throughput (samples/s, tokens/s) is reported.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from xiaolm.align.common import PolicySampling
from xiaolm.config import opt, parse_config, save_config
from xiaolm.infer.generate import SamplingConfig
from xiaolm.utils import atomic_write_json, fail, log, write_jsonl

LAYOUTS = ("prompt", "llamafactory", "medicalgpt", "minimind", "kto")


class PairError(ValueError):
    """A record that does not fit any preference layout; the message is the reason."""


@dataclass
class PairReport:
    path: str
    layouts: dict = field(default_factory=dict)
    pairs: int = 0
    labelled: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self, show: int = 5) -> str:
        kinds = "+".join(self.layouts) or "?"
        lines = [f"{self.path}: {self.pairs} pairs" + (f", {self.labelled} labelled responses" if self.labelled else "")
                 + f" ({kinds}), {self.skipped} malformed skipped"]
        lines += [f"  {p}" for p in self.problems[:show]]
        if len(self.problems) > show:
            lines.append(f"  ... and {len(self.problems) - show} more")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"path": self.path, "layouts": self.layouts, "pairs": self.pairs, "labelled": self.labelled,
                "skipped": self.skipped, "problems": self.problems[:100]}


# ---------------------------------------------------------------------------------------------- record layouts

_KNOWN = {"prompt", "question", "system", "history", "conversations", "messages", "chosen", "rejected",
          "response_chosen", "response_rejected", "completion", "label", "source", "layout"}


def _text(value, what: str) -> str:
    from xiaolm.data.formats import RecordError
    from xiaolm.data.formats import _text as formats_text

    try:
        text = formats_text(value, what)
    except RecordError as exc:
        raise PairError(str(exc)) from None
    if not text.strip():
        raise PairError(f"{what} is empty")
    return text


def _answer_text(value, what: str) -> str:
    """A response given as a string, a ``{from, value}`` / ``{role, content}`` turn, or a one-turn list."""
    if isinstance(value, dict):
        if "value" in value:
            speaker = str(value.get("from", "gpt")).lower()
            if speaker not in ("gpt", "assistant", "chatgpt", "model", "bot"):
                raise PairError(f"{what}.from is {value.get('from')!r}, expected an assistant turn")
            return _text(value["value"], f"{what}.value")
        if "content" in value:
            if value.get("role", "assistant") != "assistant":
                raise PairError(f"{what}.role is {value.get('role')!r}, expected 'assistant'")
            return _text(value["content"], f"{what}.content")
        raise PairError(f"{what} needs 'value' (ShareGPT) or 'content' (OpenAI)")
    if isinstance(value, list):
        if len(value) != 1:
            raise PairError(f"{what} is a list of {len(value)} turns; expected one assistant turn")
        return _answer_text(value[0], f"{what}[0]")
    return _text(value, what)


def _prompt_from_text(rec: dict, key: str) -> list[dict]:
    from xiaolm.data.formats import RecordError, system_and_history

    try:
        messages = system_and_history(rec, _text)
    except RecordError as exc:
        raise PairError(str(exc)) from None
    messages.append({"role": "user", "content": _text(rec[key], f"field '{key}'")})
    return messages


def _prompt_from_turns(rec: dict, key: str) -> list[dict]:
    """Prompt turns from a ShareGPT (``from``/``value``) or OpenAI (``role``/``content``) list."""
    from xiaolm.data.formats import RecordError, from_openai, from_sharegpt

    turns = rec[key]
    if not isinstance(turns, list) or not turns:
        raise PairError(f"field '{key}' must be a non-empty list of turns")
    first = turns[0] if isinstance(turns[0], dict) else {}
    try:
        if "from" in first:
            return from_sharegpt({key: turns, "system": rec.get("system")})
        messages = from_openai({"messages": turns})
    except RecordError as exc:
        raise PairError(str(exc)) from None
    if rec.get("system") and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": _text(rec["system"], "field 'system'")})
    return messages


def _message_list(value, what: str) -> list[dict]:
    from xiaolm.data.formats import RecordError, from_openai, from_sharegpt

    if not isinstance(value, list) or not value:
        raise PairError(f"{what} must be a non-empty list of messages")
    try:
        if isinstance(value[0], dict) and "from" in value[0]:
            return from_sharegpt({"conversations": value})
        return from_openai({"messages": value})
    except RecordError as exc:
        raise PairError(f"{what}: {exc}") from None


def _check_prompt(prompt: list[dict], answer: str) -> list[dict]:
    """Turns must alternate (user first, after an optional system message) and end with the user's question."""
    from xiaolm.data.formats import RecordError, validate_messages

    if not prompt or prompt[-1]["role"] != "user":
        raise PairError("the prompt must end with a user turn")
    try:
        validate_messages(prompt + [{"role": "assistant", "content": answer}], require_answer=True)
    except RecordError as exc:
        raise PairError(str(exc)) from None
    return prompt


def convert_pair_record(rec: object) -> tuple[str, dict, str]:
    """One record -> ``(kind, normalised record, layout)``; ``kind`` is ``pair`` or ``labelled``.

    Raises PairError with the reason for a record that fits no layout."""
    if not isinstance(rec, dict):
        raise PairError(f"a record must be a JSON object, got {type(rec).__name__}")
    meta = {k: v for k, v in rec.items() if k not in _KNOWN}
    if "completion" in rec and "label" in rec and "chosen" not in rec:
        if not isinstance(rec["label"], bool):
            raise PairError(f"'label' is {rec['label']!r}, expected true or false")
        prompt = (_message_list(rec["prompt"], "'prompt'") if isinstance(rec.get("prompt"), list)
                  else _prompt_from_text(rec, "prompt") if "prompt" in rec else None)
        if prompt is None:
            raise PairError("missing field 'prompt'")
        completion = _answer_text(rec["completion"], "'completion'")
        return "labelled", {"prompt": _check_prompt(prompt, completion), "completion": completion,
                            "label": rec["label"], **meta}, "kto"
    if "response_chosen" in rec or "response_rejected" in rec:  # MedicalGPT reward / DPO files
        for key in ("question", "response_chosen", "response_rejected"):
            if key not in rec:
                raise PairError(f"missing field '{key}'")
        prompt = _prompt_from_text(rec, "question")
        chosen = _text(rec["response_chosen"], "'response_chosen'")
        rejected = _text(rec["response_rejected"], "'response_rejected'")
        layout = "medicalgpt"
    else:
        for key in ("chosen", "rejected"):
            if key not in rec:
                raise PairError(f"missing field '{key}' (known layouts: {', '.join(LAYOUTS)})")
        c, r = rec["chosen"], rec["rejected"]
        if isinstance(c, list) and len(c) > 1 and not ("prompt" in rec or "conversations" in rec):
            # minimind: whole conversations that differ only in the last answer
            cm, rm = _message_list(c, "'chosen'"), _message_list(r, "'rejected'")
            if cm[-1]["role"] != "assistant" or rm[-1]["role"] != "assistant":
                raise PairError("'chosen' and 'rejected' must end with an assistant turn")
            if cm[:-1] != rm[:-1]:
                raise PairError("'chosen' and 'rejected' have different prompts (every turn but the last must match)")
            prompt, chosen, rejected, layout = cm[:-1], cm[-1]["content"], rm[-1]["content"], "minimind"
            if not chosen.strip() or not rejected.strip():
                raise PairError("an empty answer in 'chosen' or 'rejected'")
        else:
            chosen, rejected = _answer_text(c, "'chosen'"), _answer_text(r, "'rejected'")
            if "conversations" in rec or "messages" in rec:
                key = "conversations" if "conversations" in rec else "messages"
                prompt = _prompt_from_turns(rec, key)
                layout = "llamafactory" if isinstance(c, dict) else "medicalgpt"
            elif isinstance(rec.get("prompt"), list):
                prompt, layout = _message_list(rec["prompt"], "'prompt'"), "prompt"
            elif "prompt" in rec or "question" in rec:
                prompt, layout = _prompt_from_text(rec, "prompt" if "prompt" in rec else "question"), "prompt"
            else:
                raise PairError("no prompt: expected 'prompt', 'question', 'conversations' or 'messages'")
    if chosen.strip() == rejected.strip():
        raise PairError("'chosen' and 'rejected' are identical (no preference to learn)")
    prompt = _check_prompt(prompt, chosen)
    return "pair", {"prompt": prompt, "chosen": chosen, "rejected": rejected, **meta}, layout


def load_preference_file(path: str | Path) -> tuple[list[dict], list[dict], PairReport]:
    """Pairs and labelled responses of one file, normalised, with a report of what was skipped and why."""
    from xiaolm.data.formats import iter_json_records

    path = Path(path)
    report = PairReport(path=str(path))
    pairs, labelled = [], []
    for line, rec, error in iter_json_records(path):
        where = f"{path}:{line}"
        if error is not None:
            report.skipped += 1
            report.problems.append(f"{where}: {error}")
            continue
        try:
            kind, norm, layout = convert_pair_record(rec)
        except PairError as exc:
            report.skipped += 1
            report.problems.append(f"{where}: {exc}")
            continue
        norm["source"] = rec.get("source") or where
        norm["layout"] = rec.get("layout") or layout
        report.layouts[layout] = report.layouts.get(layout, 0) + 1
        (pairs if kind == "pair" else labelled).append(norm)
    report.pairs, report.labelled = len(pairs), len(labelled)
    return pairs, labelled, report


def expand_pair_paths(paths: list[str]) -> list[Path]:
    """Preference files named directly or inside directories (every .json/.jsonl there but xiaolm's reports)."""
    from xiaolm.data.formats import expand_paths

    return expand_paths(paths, split=None, skip_reports=True)


def load_preferences(paths: list[str]) -> tuple[list[dict], list[dict], list[PairReport]]:
    """Pairs, labelled responses and per-file reports of several files (in order)."""
    pairs, labelled, reports = [], [], []
    for f in expand_pair_paths(paths):
        p, lab, r = load_preference_file(f)
        pairs += p
        labelled += lab
        reports.append(r)
    return pairs, labelled, reports


def prompt_key(prompt: list[dict]) -> str:
    """A stable text key of a prompt (for hash splits and held-out checks)."""
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


# ---------------------------------------------------------------------------------------------- on-policy pairs


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


@dataclass
class PromptSet:
    prompts: list[dict]  # {"prompt": messages, "constraints", "story_id", "reference", "where"}
    excluded_heldout: int = 0
    files: list = field(default_factory=list)
    heldout_files: list = field(default_factory=list)


def _heldout_beside(paths: list[str]) -> list[Path]:
    found = []
    for p in paths:
        path = Path(p)
        cand = path / "heldout.jsonl" if path.is_dir() else path.parent / "heldout.jsonl"
        if cand.is_file() and cand.resolve() != path.resolve():
            found.append(cand)
    return list(dict.fromkeys(found))


def load_prompt_set(paths: list[str], heldout: Optional[list[str]] = None, limit: Optional[int] = None) -> PromptSet:
    """Training prompts (with their constraints) from instruction data, never one whose story or prompt text is in
    the held-out files (``heldout``; default: a ``heldout.jsonl`` beside the prompts)."""
    from xiaolm.data.formats import expand_paths, load_conversations

    files = expand_paths(paths, "train")
    held_files = [Path(p) for p in heldout] if heldout else _heldout_beside(paths)
    for p in held_files:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
    held_ids, held_texts = set(), set()
    if held_files:
        held, _ = load_conversations(held_files, require_answer=False)
        for c in held:
            if c.meta.get("story_id"):
                held_ids.add(c.meta["story_id"])
            held_texts.add(prompt_key(c.prompt_messages))
    convs, reports = load_conversations(files, require_answer=False)
    for r in reports:
        if r.skipped:
            log(r.summary())
    out = PromptSet(prompts=[], files=[str(f) for f in files], heldout_files=[str(f) for f in held_files])
    for c in convs:
        prompt = c.prompt_messages
        if not prompt or prompt[-1]["role"] != "user":
            continue
        if (c.meta.get("story_id") and c.meta["story_id"] in held_ids) or prompt_key(prompt) in held_texts:
            out.excluded_heldout += 1
            continue
        out.prompts.append({"prompt": prompt, "constraints": c.meta.get("constraints") or {},
                            "story_id": c.meta.get("story_id"), "reference": c.reference, "where": c.where})
        if limit is not None and len(out.prompts) >= limit:
            break
    return out


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
    cfg, _ = parse_config(
        PairsConfig, argv, "xiaolm data pairs",
        "Build preference pairs: normalise files in the common layouts (--data), or sample on-policy pairs from an "
        "SFT model scored by the rule-based verifier and/or a reward model (--policy, --prompts).\n"
        "examples:\n"
        "  xiaolm data pairs --data dpo_zh_demo.json reward_medical_test.json --out data/pairs_real.jsonl\n"
        "  xiaolm data pairs --policy runs/sft --prompts data/instruct --k 4 --out data/pairs.jsonl",
    )
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
