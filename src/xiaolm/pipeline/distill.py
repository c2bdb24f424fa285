"""The route's optional distillation stage: a smaller student pretrained twice on the route's shards, once alone and
once taught online by a teacher (``xiaolm pretrain --teacher``), and the two compared in REPORT.md.

Off unless the recipe sets ``distill.enabled``. The teacher is the route's own pretrained model (``teacher: route``)
or a given RUNDIR / Hugging Face Llama directory that uses the route's tokenizer. Both students take the pretrain
section's options (data, schedule, optimizer, seed, sequence length) with the student's preset and budget, so they
differ only in the teacher: WORKDIR/distill/plain and WORKDIR/distill/student. Each is scored like the eval stage
scores the base model (held-out bits per character on the val shards, ``eval.ppl_tokens``), with the rep-4 and
distinct-2 of the greedy stories each run samples at its end, into WORKDIR/distill/distill.json.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from xiaolm.config import opt
from xiaolm.pipeline.figures import fmt as _f
from xiaolm.utils import atomic_write_json, log, pick_device

ROUTE = "route"


@dataclass
class DistillStage:
    enabled: bool = opt(False, "train a smaller student with and without a teacher and report both", short=False)
    teacher: str = opt(ROUTE, "the teacher: route (this route's pretrained model) or a RUNDIR / Hugging Face Llama "
                              "directory that uses the route's tokenizer", short=False)
    student_preset: str = opt("tiny", "model preset of the student (smaller than the teacher)", short=False)
    student_max_steps: Optional[int] = opt(None, "the students' optimizer steps (wins over student_max_tokens; "
                                                 "default: the pretrain section's budget)", short=False)
    student_max_tokens: Optional[int] = opt(None, "the students' token budget (default: the pretrain section's)",
                                            short=False)
    alpha: Optional[float] = opt(None, "weight of the data's cross-entropy (default: xiaolm pretrain's "
                                       "--distill-alpha)", short=False)
    temperature: Optional[float] = opt(None, "temperature of the KL (default: xiaolm pretrain's "
                                             "--distill-temperature)", short=False)


def teacher_path(cfg) -> str:
    return cfg.pretrain.out if cfg.distill.teacher == ROUTE else cfg.distill.teacher


def stage_dir(cfg) -> Path:
    return Path(cfg.workdir) / "distill"


def student_configs(cfg) -> dict:
    """The pretrain section twice, as the smaller student: {"plain": ..., "student": ...} (the second with the
    teacher)."""
    from xiaolm.train.pretrain import ModelSection

    d, out = cfg.distill, {}
    for name in ("plain", "student"):
        c = copy.deepcopy(cfg.pretrain)
        # The route's own shape overrides and starting point belong to the route's model, not to the student.
        c.model = ModelSection(preset=d.student_preset, seq_len=c.model.seq_len, doc_mask=c.model.doc_mask,
                               tie_word_embeddings=c.model.tie_word_embeddings, rope_theta=c.model.rope_theta,
                               attn_impl=c.model.attn_impl, zero_init_residual=c.model.zero_init_residual)
        c.lr_sweep = []
        if d.student_max_tokens is not None:  # the students' own budget, not the route's step count
            c.train.max_tokens, c.train.max_steps = d.student_max_tokens, None
        if d.student_max_steps is not None:
            c.train.max_steps = d.student_max_steps
        c.out = str(stage_dir(cfg) / name)
        c.distill = type(c.distill)()
        if name == "student":
            c.distill.teacher = teacher_path(cfg)
            if d.alpha is not None:
                c.distill.distill_alpha = d.alpha
            if d.temperature is not None:
                c.distill.distill_temperature = d.temperature
        out[name] = c
    return out


def run_distill(cfg, resume: bool) -> dict:
    import torch

    from xiaolm.eval.ppl import evaluate_ppl, token_stream
    from xiaolm.model.io import load_model
    from xiaolm.tasks.constraints import aggregate_repetition, repetition_metrics
    from xiaolm.train.pretrain import pretrain

    runs = student_configs(cfg)
    summaries = {}
    for name, c in runs.items():
        done = Path(c.out) / "summary.json"
        if resume and done.is_file():  # the stage was interrupted after this student had finished
            summaries[name] = json.loads(done.read_text(encoding="utf-8"))
            continue
        log(f"-- distill: the {name}, " + (f"taught by {c.distill.teacher}" if c.distill.teacher else "no teacher"))
        c.train.resume, c.train.progress = resume, False
        summaries[name] = pretrain(c)
        if summaries[name].get("interrupted"):
            return summaries[name]
    device = pick_device(cfg.eval.device)
    models = {"teacher": teacher_path(cfg), **{n: c.out for n, c in runs.items()}}
    result: dict = {"teacher": models["teacher"], "student_preset": cfg.distill.student_preset, "models": {}}
    tokens = where = None  # one read of the val tokens: teacher and students share the route's tokenizer
    for name, run in models.items():
        model, tokenizer, _ = load_model(run, device=device)
        model.eval()
        if tokens is None:
            tokens, where = token_stream([cfg.tokenize.out], tokenizer, "val", "text", cfg.eval.ppl_tokens)
        with torch.no_grad():
            r = evaluate_ppl(model, tokenizer, tokens, model.config.max_position_embeddings, cfg.eval.batch_size,
                             cfg.pretrain.model.doc_mask)
        row = {"run": run, "bits_per_char": r["val_bpc"], "loss": r["val_loss"], "tokens": r["val_tokens"],
               "data": where, "params": sum(p.numel() for p in model.parameters())}
        del model
        summ = summaries.get(name)
        if summ:
            rep = aggregate_repetition([repetition_metrics(s) for s in summ.get("samples") or []])
            row.update({"train_tokens": summ.get("tokens"), "steps": summ.get("steps"), "wall_s": summ.get("wall_s"),
                        "rep4": rep["rep4"], "distinct2": rep["distinct2"], "samples": len(summ.get("samples") or [])})
            if summ.get("distill"):
                row["distill"] = summ["distill"]
        result["models"][name] = row
        log(f"distill {name}: {r['val_bpc']:.4f} bits/char on {where}")
    m = result["models"]
    result.update({"plain_bpc": m["plain"]["bits_per_char"], "student_bpc": m["student"]["bits_per_char"],
                   "teacher_bpc": m["teacher"]["bits_per_char"]})
    atomic_write_json(stage_dir(cfg) / "distill.json", result)
    return result


def report_lines(result: Optional[dict]) -> list[str]:
    """REPORT.md's side-by-side: the student without a teacher beside the one taught by it (empty: stage off)."""
    if not result or "models" not in result:
        return []
    m = result["models"]
    d = (m["student"].get("distill") or {})
    L = ["", "## Distillation", "",
         f"A `{result['student_preset']}` student pretrained twice with the same data, steps and seed: alone, and "
         f"taught online by `{result['teacher']}` (alpha {d.get('alpha')}, T {d.get('temperature')}). Held-out "
         f"bits per character on the val shards (as the eval stage scores the base model); rep-4 / distinct-2 of "
         f"the greedy stories each run samples at its end.", "",
         "| model | parameters | student tokens | wall s | held-out bits/char | rep-4 | distinct-2 |",
         "|---|---|---|---|---|---|---|"]
    for name, label in (("teacher", "teacher"), ("plain", "student without a teacher"),
                        ("student", "student with the teacher")):
        r = m[name]
        L.append(f"| {label} | {_f(r.get('params'))} | {_f(r.get('train_tokens'))} | {_f(r.get('wall_s'), 1)} | "
                 f"{_f(r['bits_per_char'])} | {_f(r.get('rep4'), 3)} | {_f(r.get('distinct2'), 3)} |")
    gain = m["plain"]["bits_per_char"] - m["student"]["bits_per_char"]
    L.append(f"\nThe teacher {'lowered' if gain > 0 else 'did not lower'} the student's held-out bits per char "
             f"({gain:+.4f}); its forwards took {_f(d.get('teacher_forward_s'), 1)} s "
             f"({_f(d.get('teacher_share_of_wall'), 3)} of the taught student's wall time).")
    return L
