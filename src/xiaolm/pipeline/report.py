"""The route's report card: WORKDIR/REPORT.md and report.json, readable on their own.

Per stage: what it did this time (ran, resumed, skipped), wall time, tokens, device, peak memory, its key figures
and the command that replays it; then the evaluation (bits per character, instruction following, multiple choice
beside chance), tool use of the agent stage's models, the final model's answers, samples, loss curves and the
exported files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

from xiaolm.pipeline.figures import fmt as _f, pct as _pct, read_json as _read
from xiaolm.utils import atomic_write_json, atomic_write_text


def key_figures(name: str, r: dict) -> dict:
    """The few numbers that say how a stage went."""
    if not r:
        return {}
    if name.startswith("agent_"):
        from xiaolm.pipeline.agent import key_figures as agent_figures

        return agent_figures(name, r)
    pick = {
        "prepare": ("documents_in", "documents_kept", "train_documents", "duplicates_exact", "duplicates_near"),
        "tokenizer": ("vocab_size", "chars_per_token"),
        "tokenize": ("tokens", "chars_per_token"),
        "pretrain": ("params", "steps", "tokens", "val_loss", "val_bpc", "unigram_entropy", "tokens_per_s"),
        "distill": ("teacher_bpc", "plain_bpc", "student_bpc"),
        "instruct": ("train_samples", "heldout_samples", "stories"),
        "sft": ("steps", "tokens", "val_loss", "best_val_loss", "final_train_loss"),
        "pairs": ("pairs", "labelled", "prompts", "skipped", "dropped_below_margin"),
        "reward": ("steps", "train_accuracy", "heldout_accuracy", "heldout_margin"),
        "align": ("steps", "val_loss", "val_accuracy", "val_margin", "val_reward_margin", "final_train_loss",
                  "reward_mean", "val_all_met", "val_rep4"),
        "export": ("hf",),
    }.get(name, ())
    out = {k: r[k] for k in pick if k in r and not isinstance(r[k], (dict, list))}
    if name == "align":
        out.update({k: v for k, v in r.items() if ("margin" in k or "accuracy" in k) and isinstance(v, (int, float))})
    if name == "export" and isinstance(r.get("gguf"), dict):
        out["gguf"] = r["gguf"].get("path")
    return out


def _tokens(name: str, r: dict) -> Optional[int]:
    if name == "prepare":
        return r.get("characters_in") or r.get("train_characters")
    return r.get("tokens") if isinstance(r.get("tokens"), int) else None


def _curve(run: Path) -> list[str]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == "eval" and rec.get("val_loss") is not None:
            rows.append(f"| {rec['step']} | {rec['val_loss']:.4f} | {_f(rec.get('val_bpc'))} |")
    return rows


def write_report(cfg, rows: list[dict], command_for: Callable[[Any, str], str]) -> Path:
    """REPORT.md and report.json for a route; ``command_for(cfg, stage)`` is the command that replays a stage
    (``route.command_for``, passed in: it needs route's stage table)."""
    from xiaolm.eval.instruct import format_table
    from xiaolm.pipeline.agent import eval_dir as agent_eval_dir
    from xiaolm.pipeline.agent import headline_rows as agent_headline
    from xiaolm.pipeline.agent import report_section as agent_section
    from xiaolm.pipeline.paths import final_run
    from xiaolm.pipeline.state import StageState

    work = Path(cfg.workdir)
    stages: dict[str, dict] = {}
    for row in rows:
        name = row["stage"]
        if name == "report":
            continue
        state = StageState(work, name).read() or {}
        r = state.get("result") or {}
        stages[name] = {
            "this_run": row["action"], "why": row["why"], "status": state.get("status", "not run")
            if row["action"] != "off" else "off", "fingerprint": row["fingerprint"],
            "wall_s": state.get("wall_s"), "tokens": _tokens(name, r) if isinstance(r, dict) else None,
            "device": r.get("device") if isinstance(r, dict) else None, "memory": state.get("memory"),
            "figures": key_figures(name, r) if isinstance(r, dict) else {},
            "command": command_for(cfg, name) if row["action"] != "off" else None,
            "attempts": state.get("attempts"),
        }
    ev = (StageState(work, "eval").read() or {}).get("result") or _read(work / "eval" / "eval.json") or {}
    full_eval = _read(work / "eval" / "eval.json") or ev
    done = all(s["status"] in ("done", "off") for s in stages.values())
    report = {"workdir": str(work), "complete": done, "final_model": final_run(cfg), "stages": stages,
              "eval": {k: v for k, v in full_eval.items() if k != "instruct"},
              "instruct": {m: {k: v for k, v in r.items() if k != "generations"}
                           for m, r in (full_eval.get("instruct") or {}).items()},
              "export": (StageState(work, "export").read() or {}).get("result"),
              "agent": _read(agent_eval_dir(cfg) / "eval.json") if cfg.agent != "none" else None}
    atomic_write_json(work / "report.json", report)

    L: list[str] = [f"# xiaolm route report: `{work.name}`", ""]
    L.append(("All stages finished." if done else "**Not finished**: some stages have not run or were interrupted "
              "(see the table; rerun the same command to continue).") +
             f" Final model: `{final_run(cfg)}`.")
    exp = report["export"] or {}
    if exp:
        L.append(f"Exported: Hugging Face `{exp.get('hf', '-')}`, GGUF `{(exp.get('gguf') or {}).get('path', '-')}`. "
                 f"Chat with it: `xiaolm chat {final_run(cfg)}` or `xiaolm serve {final_run(cfg)}`.")
    L += ["", "## Headline figures", "", "| figure | value |", "|---|---|"]
    pre = stages.get("pretrain", {}).get("figures", {})
    if pre:
        L.append(f"| pretraining | {_f(pre.get('params'))} parameters, {_f(pre.get('tokens'))} tokens, "
                 f"{_f(pre.get('steps'))} steps |")
        L.append(f"| pretraining validation loss / bits per char | {_f(pre.get('val_loss'))} nats/token / "
                 f"{_f(pre.get('val_bpc'))} (unigram entropy {_f(pre.get('unigram_entropy'))} nats/token) |")
    sft = stages.get("sft", {}).get("figures", {})
    if sft:
        L.append(f"| SFT held-out loss | {_f(sft.get('val_loss'))} (last training loss "
                 f"{_f(sft.get('final_train_loss'))}) |")
    rw = stages.get("reward", {}).get("figures", {})
    if rw:
        L.append(f"| reward model held-out pair accuracy | {_pct(rw.get('heldout_accuracy'))} (train "
                 f"{_pct(rw.get('train_accuracy'))}) |")
    al = stages.get("align", {}).get("figures", {})
    if al:
        L.append(f"| {cfg.align} | " + ", ".join(f"{k} {_f(v)}" for k, v in al.items()) + " |")
    for name, p in (full_eval.get("ppl") or {}).items():
        L.append(f"| held-out bits per char, {name} | {_f(p['bits_per_char'])} ({_f(p['tokens'])} tokens) |")
    for name, m in (full_eval.get("mc") or {}).items():
        L.append(f"| multiple choice, {name} | {_pct(m['accuracy'])} ± {_pct(m['accuracy_stderr'])} on "
                 f"{m['questions']} questions; chance {_pct(m['chance'])} |")
    for name, r in (full_eval.get("instruct") or {}).items():
        a = r.get("all_constraints") or {}
        rep = r.get("repetition") or {}
        extra = f", ROUGE-L {r['rouge_l']:.2f}" if "rouge_l" in r else ""
        met = f"all constraints {_pct(a.get('rate'))} of {a.get('n')}, " if a.get("n") else ""
        L.append(f"| instruction following, {name} ({r.get('samples')} held-out prompts) | {met}"
                 f"rep-4 {_f(rep.get('rep4'), 3)}, mean length {_f(rep.get('mean_chars'), 0)} chars{extra} |")
    L += agent_headline(cfg)

    L += ["", "## Stages", "",
          "| stage | this run | status | wall s | tokens (chars for prepare) | device | peak RSS MB | key figures |",
          "|---|---|---|---|---|---|---|---|"]
    for name, s in stages.items():
        mem = (s.get("memory") or {})
        mem_s = _f(mem.get("peak_rss_mb"), 0) + (f" (CUDA {mem['peak_cuda_mb']:.0f})" if "peak_cuda_mb" in mem else "")
        figs = ", ".join(f"{k} {_f(v)}" for k, v in s["figures"].items())
        L.append(f"| {name} | {s['this_run']} | {s['status']} | {_f(s['wall_s'], 1)} | {_f(s['tokens'])} | "
                 f"{s['device'] or '-'} | {mem_s if mem else '-'} | {figs} |")
    L.append("\nPeak RSS is the pipeline process's peak so far when the stage ended (stages share one process).")

    for name, r in (full_eval.get("instruct") or {}).items():
        L += ["", f"## Instruction following: {name}", "", "```", format_table(r), "```"]
        gens = r.get("generations") or []
        if gens:
            L += ["", "Examples (held-out prompts, greedy):", ""]
            for g in gens[:3]:
                L.append(f"- **{_one_line(g['prompt'])}** → {_one_line(g['response'])}")
    from xiaolm.pipeline.distill import report_lines

    L += report_lines(_read(work / "distill" / "distill.json") if cfg.distill.enabled else None)
    mc = full_eval.get("mc") or {}
    if mc:
        L += ["", "## Multiple choice", "", "| model | accuracy | ± | chance | macro | questions | letter mass |",
              "|---|---|---|---|---|---|---|"]
        for name, m in mc.items():
            L.append(f"| {name} | {_pct(m['accuracy'])} | {_pct(m['accuracy_stderr'])} | {_pct(m['chance'])} | "
                     f"{_pct(m['macro_accuracy'])} | {m['questions']} | {_pct(m.get('letter_mass'))} |")
        L.append("\nAccuracy within about two standard errors of chance means the model does not know the answers.")
    L += agent_section(cfg)
    qs = full_eval.get("questions") or []
    if qs:
        L += ["", f"## The final model answers ({full_eval.get('final')}, greedy, repetition penalty "
              f"{(full_eval.get('question_sampling') or {}).get('repetition_penalty')})", ""]
        for q in qs:
            L.append(f"- **{q['question']}** → {_one_line(q['answer']) or '(empty)'}")
    L += ["", "## Story grades by a judge model", ""] + judge_section(full_eval.get("judge"), cfg.pretrain.out)
    samples = []
    for name in ("pretrain", "sft"):
        summ = _read(Path(getattr(cfg, name).out) / "summary.json") or {}
        for s in (summ.get("samples") or [])[:3]:
            samples.append(f"- {name}: {_one_line(str(s))}")
    if samples:
        L += ["", "## Samples at the last evaluation of each training stage", ""] + samples
    curves = []
    runs = {"pretrain": cfg.pretrain.out, "sft": cfg.sft.out}
    if cfg.reward_model:
        runs["reward"] = cfg.reward.out
    if cfg.align != "none":
        runs[cfg.align] = final_run(cfg)
    for name, run in runs.items():
        run = Path(run)
        png = run / "loss_curve.png"
        rows_ = _curve(run)
        if png.is_file() or rows_:
            curves += ["", f"### {name}", ""]
            if png.is_file():
                curves.append(f"![{name} loss curve]({os.path.relpath(png, work)})")
            if rows_:
                curves += ["", "| step | val loss | val bits/char |", "|---|---|---|"] + rows_[-12:]
    if curves:
        L += ["", "## Loss curves"] + curves
    L += ["", "## Reproduce each stage", "",
          f"The whole route: `xiaolm pipeline --config {work / 'pipeline.yaml'}` (resolved recipe; a rerun skips "
          "finished stages). One stage alone (its resolved options are in `configs/STAGE.yaml`):", ""]
    for name, s in stages.items():
        if s.get("command"):
            L.append(f"- {name}: `{s['command']}`")
    path = work / "REPORT.md"
    atomic_write_text(path, "\n".join(L) + "\n")
    return path


def judge_section(judged: dict | None, run) -> list[str]:
    """The judge's table (``xiaolm eval judge``), or one line saying how to get it."""
    if not judged:
        return [f"Not graded: set `eval.judge_endpoint` and `eval.judge_model` in the recipe (or run `xiaolm eval "
                f"judge {run} --endpoint URL --model NAME`) for TinyStories-style grades of the stories."]
    j, t = judged["judge"], judged["accounting"]["tokens"]
    return [f"`{judged['run']}` completing {judged['openings']} held-out openings × {judged['samples']}, graded by "
            f"`{j['model']}` (1-10, mean and 95% interval; the corpus's own stories are the ceiling, their shuffled "
            f"sentences the floor). Tokens: {t['prompt'] + t['completion']:,} now, "
            f"{t['cached_prompt'] + t['cached_completion']:,} from the cache. Details: `{judged['out']}/judge.md`.",
            "", judged["table"]]


def _one_line(text: str, limit: int = 240) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= limit else t[: limit - 1] + "…"
