"""The model card (README.md) of a Hugging Face export: YAML metadata the Hub reads, architecture, training
configuration, evaluation numbers, how to run it, limitations. ``src`` is an ``xiaolm.export.hf.ExportSource``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # hf.py imports this module
    from xiaolm.export.hf import ExportSource


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _run_config(run_dir: Optional[Path]) -> dict:
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return {}
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def card_metadata(src: "ExportSource", license: str = "apache-2.0", base_model: Optional[str] = None,
                  datasets: Optional[list[str]] = None) -> dict:
    """The model card's YAML header (what the Hub and model indexes read). ``base_model`` defaults to the name of
    the model a fine-tuned run started from; ``datasets`` to the names of the run's ``data`` inputs."""
    meta = dict(src.meta)
    if not base_model:
        base = meta.get("base") or meta.get("base_model") or meta.get("init_from")
        if not base:  # continued pretraining: --model.init-from
            section = _run_config(src.run_dir).get("model")
            base = section.get("init_from") if isinstance(section, dict) else None
        if isinstance(base, str) and base:
            base_model = Path(base.rstrip("/")).name
    if datasets is None:
        found: list[str] = []
        conf = _run_config(src.run_dir)
        for section in (conf, *(v for v in conf.values() if isinstance(v, dict))):
            value = section.get("data")
            for item in (value if isinstance(value, list) else [value]):
                if isinstance(item, str) and item and Path(item.rstrip("/")).name not in found:
                    found.append(Path(item.rstrip("/")).name)
        datasets = found
    out = {"language": ["zh"], "license": license, "library_name": "transformers",
           "pipeline_tag": "text-generation"}
    if base_model:
        out["base_model"] = base_model
    if datasets:
        out["datasets"] = list(datasets)
    return out


def model_card(name: str, cfg, src: "ExportSource", chat: bool, dtype: str, params: int, where: str = ".",
               metadata: Optional[dict] = None) -> str:
    """README.md: what the model is, how it was trained, how well it does, how to run it, what it cannot do."""
    import yaml

    run_dir = src.run_dir
    header = dict(metadata if metadata is not None else card_metadata(src))
    header["tags"] = ["xiaolm", "llama"] + (["chat"] if chat else [])
    lines = [
        "---",
        yaml.safe_dump(header, allow_unicode=True, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"A small Chinese {'chat' if chat else 'base (not instruction-tuned)'} language model trained from scratch "
        f"with xiaolm (小LM): a Llama-style decoder ({params / 1e6:.2f}M parameters) in the "
        "standard `LlamaForCausalLM` layout, so it loads with transformers, vLLM, llama.cpp (after GGUF export) and "
        "anything else that reads Llama.",
        "",
        "## Architecture",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps",
                "tie_word_embeddings"):
        lines.append(f"| {key} | {getattr(cfg, key)} |")
    lines += [f"| parameters | {params:,} |", f"| weights dtype | {dtype} |", ""]

    summary = {}
    if run_dir is not None and (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            summary = {}
    lines += ["## Training", ""]
    meta = src.meta
    facts = {
        "stage": meta.get("kind"),
        "optimizer steps": meta.get("step") or summary.get("steps"),
        "tokens seen": meta.get("tokens") or summary.get("tokens"),
        "wall time (s)": round(float(summary.get("wall_s") or meta.get("elapsed_s") or 0), 1) or None,
        "device": summary.get("device"),
        "tokenizer fingerprint": meta.get("tokenizer_fingerprint"),
    }
    lines += ["| measure | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in facts.items() if v not in (None, "")]
    config_text = ""
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        config_text = (run_dir / "config.yaml").read_text(encoding="utf-8")
    if config_text:
        lines += ["", "Training configuration (`config.yaml` of the run; replay with `xiaolm ... --config`):", "",
                  "```yaml", config_text.rstrip(), "```"]
    lines += ["", "## Evaluation", ""]
    evals = {k: v for k, v in {**summary, **meta}.items()
             if k.startswith("val_") and isinstance(v, (int, float))}
    if evals:
        lines += ["Held-out validation split of the training corpus:", "", "| metric | value |", "|---|---|"]
        labels = {"val_loss": "loss (nats/token)", "val_ppl": "perplexity", "val_bpc": "bits per character",
                  "val_bpb": "bits per byte", "val_tokens": "tokens evaluated"}
        lines += [f"| {labels.get(k, k)} | {_fmt(v)} |" for k, v in sorted(evals.items())]
    extra = []
    if run_dir is not None:
        for f in sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []:
            try:
                res = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, OSError):
                continue
            if isinstance(res, dict) and "accuracy" in res:
                chance = res.get("chance", 0.25)
                extra.append(f"| {f.stem} | accuracy {100 * res['accuracy']:.2f}% (chance {100 * chance:.0f}%) |")
            elif isinstance(res, dict) and "bits_per_char" in res:
                extra.append(f"| {f.stem} | {res['bits_per_char']:.4f} bits/char |")
    if extra:
        lines += ["", "| evaluation | result |", "|---|---|", *extra]
    if not evals and not extra:
        lines += ["No evaluation numbers were recorded with this run."]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{where}")',
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
    ]
    if chat:
        lines += [
            'ids = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,',
            '                              return_tensors="pt", return_dict=True)',
            "out = model.generate(**ids, max_new_tokens=64)",
            'print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))',
        ]
    else:
        lines += [
            '# the tokenizer puts <|endoftext|> (the document separator it was trained after) in front',
            'ids = tok("从前，有一个小女孩", return_tensors="pt")',
            "out = model.generate(**ids, max_new_tokens=64, do_sample=True, temperature=0.8)",
            "print(tok.decode(out[0], skip_special_tokens=True))",
        ]
    lines += ["```", ""]
    if src.adapter_dir is not None:
        lines += ["A LoRA adapter (peft format) is in `adapter/`: "
                  f"`AutoPeftModelForCausalLM.from_pretrained(\"{where}/adapter\")` from the directory the export "
                  "was written from, or anywhere `PeftModel.from_pretrained(model, \"<this dir>/adapter\")`.", ""]
    lines += [
        "## Limitations",
        "",
        "A small model trained briefly on a narrow corpus: it writes fluent-looking text in the style of its "
        "training data but knows little, makes things up, and should not be relied on for facts or advice. "
        "Multiple-choice benchmark scores of models this size sit near the 25% chance level.",
        "",
        "(Evaluation files written to `RUNDIR/eval/*.json`, e.g. `xiaolm eval mc RUNDIR --data CMMLU "
        "--out RUNDIR/eval/cmmlu.json`, are listed in the Evaluation section of this card.)",
        "",
    ]
    return "\n".join(lines)
