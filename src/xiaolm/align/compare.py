"""The instruction-following table for several models side by side (SFT, SFT+DPO, SFT+GRPO, ...).

Every model answers the same held-out instructions with the same greedy decoding (``xiaolm.eval.instruct``); the
table lists, per model, each rule-checked constraint's satisfaction rate, the all-constraints rate and the
repetition figures (share of repeated 4-grams, distinct-2, mean length).
"""
from __future__ import annotations

from typing import Optional


def evaluate_models(models: dict, samples: list[dict], max_new_tokens: int = 256, batch_size: int = 64,
                    markers: bool = False) -> dict[str, dict]:
    """``{name: evaluate_instruct result}`` for ``{name: RUNDIR path or (model, tokenizer)}`` (greedy, chat prompts).
    Paths are loaded one at a time, so only one model is in memory."""
    from xiaolm.eval.instruct import evaluate_instruct
    from xiaolm.infer.generate import SamplingConfig
    from xiaolm.model.io import load_model

    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    out = {}
    for name, spec in models.items():
        if isinstance(spec, tuple):
            model, tokenizer = spec
        else:
            model, tokenizer, _ = load_model(spec)
        out[name] = evaluate_instruct(model, tokenizer, samples, "chat", sampling, batch_size=batch_size,
                                      markers=markers, keep_generations=False)
    return out


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: Optional[float], digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def side_by_side(results: dict[str, dict], markdown: bool = False) -> str:
    """One row per constraint (rule checks first, then marker checks), the all-constraints rate, and repetition;
    one column per model. ``markdown`` gives a Markdown table."""
    names = list(results)
    first = results[names[0]]
    rows: list[tuple[str, list[str]]] = []
    constraint_names: list[str] = []
    for r in results.values():
        for c in r["constraints"]:
            if c not in constraint_names:
                constraint_names.append(c)
    for c in constraint_names:
        kinds = {r["constraints"][c]["kind"] for r in results.values() if c in r["constraints"]}
        n = max(r["constraints"].get(c, {}).get("n", 0) for r in results.values())
        label = f"{c} ({'marker' if 'marker' in kinds else 'rule'}, n={n})"
        rows.append((label, [_pct(r["constraints"].get(c, {}).get("rate")) for r in results.values()]))
    if any((r.get("words") or {}).get("asked") for r in results.values()):
        asked = max((r.get("words") or {}).get("asked", 0) for r in results.values())
        rows.append((f"词汇, word by word (n={asked} words)",
                     [_pct((r.get("words") or {}).get("rate")) for r in results.values()]))
    a = first["all_constraints"]
    rows.append((f"all constraints ({a['counts']}, n={a['n']})",
                 [_pct(r["all_constraints"]["rate"]) for r in results.values()]))
    rows.append(("repeated 4-grams (rep-4)", [_num(r["repetition"]["rep4"], 4) for r in results.values()]))
    rows.append(("distinct-2", [_num(r["repetition"]["distinct2"]) for r in results.values()]))
    rows.append(("mean answer length (chars)", [_num(r["repetition"]["mean_chars"], 0) for r in results.values()]))
    rows.append(("empty answers", [str(r["repetition"]["empty"]) for r in results.values()]))
    if markdown:
        lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
        return "\n".join(lines)
    width = max(len(label) for label, _ in rows) + 2
    col = max(12, max(len(n) for n in names) + 2)
    lines = [f"{'':<{width}}" + "".join(f"{n:>{col}}" for n in names)]
    lines += [f"{label:<{width}}" + "".join(f"{c:>{col}}" for c in cells) for label, cells in rows]
    return "\n".join(lines)
