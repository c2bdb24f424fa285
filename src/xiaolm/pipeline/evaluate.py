"""The route's evaluation stage: every model of the route measured the same way, into WORKDIR/eval/eval.json.

- held-out bits per character (tokenizer-independent) of the base and the final model on the val shards;
- the instruction-following table (constraint rates, repetition, BLEU/ROUGE against references) of each chat model
  on the held-out instructions, greedy;
- multiple-choice accuracy beside chance (C-Eval / CMMLU CSVs) of the base and the final model, where named;
- the final model's answers to a few fixed questions;
- with ``eval.judge_endpoint``: the pretrained model's stories graded by a judge model (``xiaolm eval judge``).
"""
from __future__ import annotations

from pathlib import Path

from xiaolm.utils import atomic_write_json, log, pick_device


def evaluate_route(cfg) -> dict:
    import torch

    from xiaolm.eval.instruct import evaluate_instruct, format_table, generate_answers, load_eval_samples
    from xiaolm.eval.ppl import evaluate_ppl, token_stream
    from xiaolm.infer.generate import SamplingConfig
    from xiaolm.model.io import load_model
    from xiaolm.pipeline.paths import _eval_models, instruct_dir

    e = cfg.eval
    device = pick_device(e.device)
    models = _eval_models(cfg)
    final_name = list(models)[-1]
    result: dict = {"device": device, "models": models, "final": final_name, "ppl": {}, "instruct": {}, "mc": {}}
    heldout = instruct_dir(cfg) / "heldout.jsonl"
    samples = []
    if e.instruct_limit and heldout.is_file():
        samples, _ = load_eval_samples([str(heldout)], limit=e.instruct_limit)
    mc_data = None
    if e.mc_data:
        from xiaolm.eval.mc import load_mc_data

        mc_data = load_mc_data(e.mc_data, e.mc_split, e.mc_subjects or None, e.mc_limit)
    greedy = SamplingConfig(max_new_tokens=e.max_new_tokens, temperature=0.0, seed=0)
    for name, run in models.items():
        model, tokenizer, _ = load_model(run, device=device)
        model.eval()
        with torch.no_grad():
            if name in ("base", final_name):
                tokens, where = token_stream([cfg.tokenize.out], tokenizer, "val", "text", e.ppl_tokens)
                # scored as the route pretrained: each document on its own unless --no-doc-mask
                r = evaluate_ppl(model, tokenizer, tokens, model.config.max_position_embeddings, e.batch_size,
                                 cfg.pretrain.model.doc_mask)
                result["ppl"][name] = {"loss": r["val_loss"], "bits_per_char": r["val_bpc"],
                                       "tokens": r["val_tokens"], "data": where}
                log(f"eval {name}: {r['val_bpc']:.4f} bits/char on {where}")
            if name != "base" and samples:
                r = evaluate_instruct(model, tokenizer, samples, "chat", greedy, batch_size=e.batch_size)
                result["instruct"][name] = r
                log(format_table(r, f"eval {name}: instruction following on {len(samples)} held-out prompts"))
            if mc_data is not None and name in ("base", final_name):
                from xiaolm.eval.mc import evaluate_mc

                r = evaluate_mc(model, tokenizer, mc_data, shots=e.mc_shots, batch_size=e.batch_size)
                r.pop("letter_tokens", None)
                result["mc"][name] = r
                log(f"eval {name}: MC accuracy {100 * r['accuracy']:.1f}% (chance {100 * r['chance']:.0f}%) "
                    f"on {r['questions']} questions")
            if name == final_name and e.questions:
                qs = [{"prompt": [{"role": "user", "content": q}]} for q in e.questions]
                sampling = SamplingConfig(max_new_tokens=e.max_new_tokens, temperature=0.0, seed=0,
                                          repetition_penalty=e.repetition_penalty)
                answers = generate_answers(model, tokenizer, qs, "chat", sampling, e.batch_size)
                result["questions"] = [{"question": q, "answer": a.strip()} for q, a in zip(e.questions, answers)]
                result["question_sampling"] = dict(sampling.__dict__)
        del model
    out = Path(cfg.workdir) / "eval"
    if e.judge_endpoint:
        result["judge"] = judge_stories(cfg, models["base"], out / "judge")
    atomic_write_json(out / "eval.json", result)
    return result


def judge_stories(cfg, run: str, out: Path, **options) -> dict:
    """``xiaolm eval judge`` on the pretrained model (story completion is what pretraining teaches); ``options``
    override the judge's other defaults."""
    from xiaolm.eval.judge import JudgeConfig, format_table, judge

    e = cfg.eval
    r = judge(JudgeConfig(run=str(run), endpoint=e.judge_endpoint, model=e.judge_model or "", out=str(out),
                          samples=e.judge_samples, device=e.device, **options))
    log(f"eval judge ({e.judge_model}):\n{format_table(r)}")
    return {"run": str(run), "judge": r["judge"], "rows": r["rows"], "accounting": r["accounting"],
            "openings": r["openings"], "samples": r["samples"], "out": r["out"], "table": format_table(r)}
