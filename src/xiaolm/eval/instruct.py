"""``xiaolm eval instruct``: does the model write what was asked? Rule-checked constraints and repetition.

For each held-out sample the model answers the instruction (batched generation); the answer is checked against
the sample's structured constraints by ``xiaolm.tasks.constraints`` (词汇, 随机句子, 开头, 对话 by exact rules; 悲伤的结局,
寓意, 转折, 伏笔, 冲突 by the built-in generator's marker words, reported but outside the all-constraints rate
unless ``--markers``; 摘要 is not scored). Repetition (share of repeated 4-grams, distinct-1/2) is measured on every
answer, since loops are what small models do worst. Where samples carry a reference answer (our instruction data,
Alpaca-style data), character-level BLEU-4 (sacrebleu) and ROUGE-L (rouge-score, characters as tokens) against it.

The same checks run on the reference answers too (column ``ref``): a check the references themselves fail is a
weak check, and the table shows it.

Prompt styles (``--prompt-style``). ``chat``: the instruction as a user turn of the chat template, generation
prompt ``<|im_start|>assistant\\n``, as ``xiaolm chat`` asks. ``plain``: ``<|endoftext|>`` + the instruction + a
newline, as ``xiaolm generate`` continues text; this is how a pretrained model, which has never seen the chat
markers, can best read an instruction. ``auto`` picks ``chat`` for fine-tuned checkpoints and ``plain`` for
pretrained ones. To compare a pretrained model with its fine-tuned version fairly, run the pretrained model in both
styles and take its better score (the instruction-tuning test does exactly that).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from xiaolm.config import opt, parse_config
from xiaolm.infer.generate import SamplingConfig
from xiaolm.tasks.constraints import aggregate_repetition, repetition_metrics, score_response, words_present


def _eval_sampling() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=400, temperature=0.0, seed=0)


@dataclass
class EvalInstructConfig:
    """Generate answers to held-out instructions and score each constraint by rule, plus repetition; BLEU-4 and \
ROUGE-L against reference answers where the data has them."""

    run: str = opt(None, "the model: RUNDIR, checkpoint, or Hugging Face directory")
    data: list[str] = opt([], "held-out samples: heldout.jsonl from `xiaolm data instruct`, or Alpaca / ShareGPT / "
                              "OpenAI files (reference answers give BLEU-4 and ROUGE-L)",
                          required="--data is required (e.g. DIR/heldout.jsonl from xiaolm data instruct)")
    out: Optional[str] = opt(None, "write the result JSON here")
    limit: Optional[int] = opt(None, "use only the first N samples")
    format: Literal["auto", "alpaca", "sharegpt", "openai"] = opt("auto", "layout of --data files")
    prompt_style: Literal["auto", "chat", "plain"] = opt("auto", "chat template, plain text, or by the checkpoint "
                                                                  "kind (chat for fine-tuned models)")
    batch_size: int = opt(32, "prompts generated together")
    markers: bool = opt(False, "count the marker checks (悲伤的结局, 寓意, 转折, 伏笔, 冲突) in the all-constraints rate")
    keep_generations: bool = opt(True, "store every prompt, answer and check in the result JSON")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    checkpoint: str = opt("latest", "which checkpoint of a RUNDIR: latest or best")
    sampling: SamplingConfig = field(default_factory=_eval_sampling)


# ---------------------------------------------------------------------------------------------- prompts


def render_prompt(tokenizer, messages: list[dict], style: str) -> list[int]:
    """Token ids of the prompt for ``messages`` (all turns before the answer) in ``style`` (module docstring)."""
    if style == "chat":
        return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    if style == "plain":
        text = "\n".join(m["content"] for m in messages if m["role"] != "assistant") + "\n"
        return [tokenizer.eot_id] + tokenizer.encode(text, allow_special=False)
    raise ValueError(f"unknown prompt style {style!r}")


def auto_style(info) -> str:
    """``plain`` for a pretrained checkpoint, ``chat`` for anything fine-tuned."""
    kind = (getattr(info, "meta", None) or {}).get("kind")
    if getattr(info, "kind", None) == "lora":
        return "chat"
    return "plain" if kind in (None, "pretrain", "train") else "chat"


# ---------------------------------------------------------------------------------------------- scoring


class _CharTokenizer:
    """rouge-score's default tokenizer keeps only [a-z0-9]; Chinese needs characters as tokens."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]


def reference_scores(hyps: list[str], refs: list[str]) -> dict:
    """Character-level BLEU-4 (sacrebleu, ``tokenize='char'``) and mean ROUGE-L F1 (characters as tokens)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize="char")
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CharTokenizer())
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    return {"bleu4": bleu.score, "rouge_l": 100.0 * sum(rouge) / max(1, len(rouge)), "references": len(refs)}


def chance_words(samples: list[dict], responses: list[str]) -> dict:
    """The 词汇 rate by chance: each answer checked for the words another instruction asked for (the instruction half
    the list away, skipping any that shares a word with its own). A model that ignores the instruction scores its
    word rate here too, since common story words turn up anyway; following shows as the rate above this one."""
    asked = [(text, (sample.get("constraints") or {}).get("词汇") or []) for sample, text in zip(samples, responses)]
    asked = [(text, words) for text, words in asked if words]
    n, used, total = len(asked), 0, 0
    if n < 2:
        return {"chance_asked": 0, "chance_used": 0, "chance_rate": None}
    for i, (text, own) in enumerate(asked):
        own = set(own)
        for k in range(n // 2, n // 2 + n):
            other = asked[(i + k) % n][1]
            if (i + k) % n != i and not own.intersection(other):
                used += words_present(text, other)
                total += len(other)
                break
    return {"chance_asked": total, "chance_used": used, "chance_rate": used / total if total else None}


def summarise(samples: list[dict], responses: list[str], markers: bool = False) -> dict:
    """Per-constraint satisfaction rates, the all-constraints rate and repetition for ``responses`` to
    ``samples`` (each ``{"constraints": {...}, "reference": str|None}``)."""
    per: dict[str, dict] = {}
    all_met = all_n = 0
    words_asked = words_used = 0  # 词汇 word by word: progress shows here long before all three words land together
    unscored: dict[str, int] = {}
    scores = []
    for sample, text in zip(samples, responses):
        cons = sample.get("constraints") or {}
        s = score_response(cons, text, markers=markers)
        ref = sample.get("reference")
        ref_s = score_response(cons, ref, markers=markers) if ref else None
        scores.append(s)
        words = cons.get("词汇") or []
        words_asked += len(words)
        words_used += words_present(text, words)
        for name, ok in s["checks"].items():
            row = per.setdefault(name, {"n": 0, "met": 0, "ref_n": 0, "ref_met": 0})
            row["n"] += 1
            row["met"] += int(ok)
            if ref_s is not None:
                row["ref_n"] += 1
                row["ref_met"] += int(ref_s["checks"][name])
        for name in s["unscored"]:
            unscored[name] = unscored.get(name, 0) + 1
        if s["all_met"] is not None:
            all_n += 1
            all_met += int(s["all_met"])
    order = {n: i for i, n in enumerate(["词汇", "随机句子", "开头", "特征:对话"])}
    constraints = {}
    for name in sorted(per, key=lambda n: (order.get(n, 99), n)):
        row = per[name]
        constraints[name] = {
            "n": row["n"], "met": row["met"], "rate": row["met"] / row["n"],
            "reference_rate": row["ref_met"] / row["ref_n"] if row["ref_n"] else None,
            "kind": "rule" if name in order else "marker",
        }
    refs = [s.get("reference") for s in samples]
    result = {
        "samples": len(samples),
        "constraints": constraints,
        "all_constraints": {"n": all_n, "met": all_met, "rate": all_met / all_n if all_n else None,
                            "counts": "rule checks" + (" + marker checks" if markers else "")},
        "unscored": unscored,
        "words": {"asked": words_asked, "used": words_used,
                  "rate": words_used / words_asked if words_asked else None, **chance_words(samples, responses)},
        "repetition": aggregate_repetition([s["repetition"] for s in scores]),
    }
    with_refs = [(h, r) for h, r in zip(responses, refs) if r]
    if with_refs:
        result["reference_repetition"] = aggregate_repetition([repetition_metrics(r) for _, r in with_refs])
        result.update(reference_scores([h for h, _ in with_refs], [r for _, r in with_refs]))
    return result


# ---------------------------------------------------------------------------------------------- generation


def load_eval_samples(paths: list[str], fmt: str = "auto", limit: Optional[int] = None) -> tuple[list[dict], list]:
    """Held-out samples as ``{"prompt": messages, "constraints": {...}, "reference": str|None}``, plus the load
    reports (malformed records are reported and skipped)."""
    from xiaolm.data.formats import expand_paths, load_conversations

    files = expand_paths(paths, split="heldout")
    convs, reports = load_conversations(files, fmt, require_answer=False)
    samples = []
    for c in convs:
        if not c.prompt_messages or c.prompt_messages[-1]["role"] != "user":
            continue
        samples.append({"prompt": c.prompt_messages, "constraints": c.meta.get("constraints") or {},
                        "reference": c.reference, "where": c.where})
    if limit is not None:
        samples = samples[:limit]
    return samples, reports


def generate_answers(model, tokenizer, samples: list[dict], style: str, sampling: SamplingConfig,
                     batch_size: int = 32, progress: bool = False) -> list[str]:
    """Answers to every sample's prompt, ``batch_size`` prompts at a time (KV cache, left padding)."""
    import torch

    from xiaolm.infer.generate import generate

    texts: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        ids = [render_prompt(tokenizer, s["prompt"], style) for s in chunk]
        s = sampling
        if s.seed is not None:  # a different, reproducible stream per batch
            s = SamplingConfig(**{**s.__dict__, "seed": s.seed + start})
        with torch.no_grad():
            texts += generate(model, tokenizer, [""] * len(ids), s, prompt_ids=ids)
        if progress:
            print(f"\r  generated {len(texts)}/{len(samples)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    model.train(was_training)
    return texts


def evaluate_instruct(model, tokenizer, samples: list[dict], style: str = "chat",
                      sampling: Optional[SamplingConfig] = None, batch_size: int = 32, markers: bool = False,
                      keep_generations: bool = True, progress: bool = False) -> dict:
    """Generate for ``samples`` and score them (see ``summarise``); the function the alignment stage reuses."""
    sampling = sampling or _eval_sampling()
    responses = generate_answers(model, tokenizer, samples, style, sampling, batch_size, progress)
    result = summarise(samples, responses, markers)
    result["prompt_style"] = style
    result["sampling"] = dict(sampling.__dict__)
    if keep_generations:
        result["generations"] = [
            {"where": s.get("where"), "prompt": s["prompt"][-1]["content"], "response": r,
             "constraints": s["constraints"], **{k: v for k, v in score_response(s["constraints"], r, markers).items()
                                                 if k in ("checks", "all_met")}}
            for s, r in zip(samples, responses)
        ]
    return result


def instruct_metrics(model, tokenizer, samples, max_new_tokens: int) -> dict:
    """A short instruction-following eval (greedy): all-constraints rate, word rate and repetition."""
    r = evaluate_instruct(model, tokenizer, samples, "chat", SamplingConfig(max_new_tokens=max_new_tokens,
                                                                            temperature=0.0, seed=0),
                          batch_size=64, keep_generations=False)
    out = {"val_all_met": r["all_constraints"]["rate"], "val_rep4": r["repetition"]["rep4"]}
    if "词汇" in r["constraints"]:
        out["val_words"] = r["constraints"]["词汇"]["rate"]
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------------------------- report


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(result: dict, title: str = "") -> str:
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'constraint':<16}{'kind':>7}{'n':>6}{'met':>9}{'ref':>9}")
    for name, row in result["constraints"].items():
        lines.append(f"{name:<16}{row['kind']:>7}{row['n']:>6}{_pct(row['rate']):>9}{_pct(row['reference_rate']):>9}")
    w = result.get("words") or {}
    if w.get("asked"):
        chance = ("" if w.get("chance_rate") is None
                  else f"   (by chance, another instruction's words: {_pct(w['chance_rate'])})")
        lines.append(f"{'词汇, per word':<16}{'rule':>7}{w['asked']:>6}{_pct(w['rate']):>9}{chance}")
    a = result["all_constraints"]
    lines.append(f"{'all constraints':<16}{'':>7}{a['n']:>6}{_pct(a['rate']):>9}   ({a['counts']})")
    if result.get("unscored"):
        lines.append("not scored: " + ", ".join(f"{k} ({v})" for k, v in result["unscored"].items()))
    r = result["repetition"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    line = (f"repetition: rep-4 {fmt(r['rep4'])}, distinct-1 {fmt(r['distinct1'])}, distinct-2 {fmt(r['distinct2'])}, "
            f"mean length {r['mean_chars']:.0f} chars, empty {r['empty']}")
    if result.get("reference_repetition"):
        rr = result["reference_repetition"]
        line += f"  (references: rep-4 {fmt(rr['rep4'])}, distinct-2 {fmt(rr['distinct2'])})"
    lines.append(line)
    if "bleu4" in result:
        lines.append(f"against references ({result['references']}): BLEU-4 (chars) {result['bleu4']:.2f}, "
                     f"ROUGE-L (chars) {result['rouge_l']:.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from xiaolm.model.io import load_model
    from xiaolm.utils import atomic_write_json, fail, log, pick_device

    cfg, _ = parse_config(EvalInstructConfig, argv, "xiaolm eval instruct", positionals={"run": "RUNDIR"})
    try:
        samples, reports = load_eval_samples(cfg.data, cfg.format, cfg.limit)
    except FileNotFoundError as exc:
        raise fail(str(exc))
    for r in reports:
        if r.skipped or r.trimmed:
            log(r.summary())
    if not samples:
        raise fail("no usable samples in --data")
    # a CheckpointError is an XiaolmError: the CLI prints it as one line
    model, tokenizer, info = load_model(cfg.run, device=pick_device(cfg.device), which=cfg.checkpoint)
    style = auto_style(info) if cfg.prompt_style == "auto" else cfg.prompt_style
    log(f"{len(samples)} samples, prompt style {style}, {cfg.sampling.max_new_tokens} new tokens at most")
    result = evaluate_instruct(model, tokenizer, samples, style, cfg.sampling, cfg.batch_size, cfg.markers,
                               cfg.keep_generations, progress=sys.stderr.isatty())
    result = {"run": str(cfg.run), "data": list(cfg.data), **result}
    print(format_table(result, title=f"{cfg.run} ({style} prompts, {len(samples)} samples)"))
    if cfg.out:
        atomic_write_json(Path(cfg.out), result)
        log(f"wrote {cfg.out}")
    return 0
