"""Hugging Face export (``xiaolm export hf``) and import (``load_hf_llama``).

Export writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load with no remote code, under transformers 4.5x and 5.x:

    config.json              LlamaForCausalLM, every field explicit. ``rope_theta`` sits at the top level (what
                             4.x and most other tools read) and again in ``rope_parameters`` (what 5.x writes).
    model.safetensors        our state dict as is (parameter names are Hugging Face's); a tied ``lm_head`` is dropped,
                             not stored as a shared tensor (safetensors refuses those; transformers re-ties it)
    generation_config.json   eos = <|im_end|> (and <|endoftext|>) for chat runs (SFT / preference tuning), else
                             <|endoftext|>; greedy by default
    tokenizer.json, tokenizer_config.json (chat template inside), chat_template.jinja, special_tokens_map.json,
    xiaolm_tokenizer.json    the run's tokenizer; ``model_input_names`` has no ``token_type_ids``
    adapter/                 a LoRA checkpoint's adapter in peft format (``PeftModel.from_pretrained(model, OUT/adapter)``)
    README.md                a model card: architecture, training configuration, evaluation numbers, limitations

Import reads any Hugging Face Llama directory on disk (config.json plus model.safetensors, sharded safetensors or
pytorch_model.bin, and tokenizer files) into ``xiaolm.model.llama.Llama``, so ``xiaolm pretrain --init-from HFDIR``
and ``xiaolm sft HFDIR`` continue training someone else's model. What our model cannot represent (rope scaling,
attention or MLP biases, activations other than SiLU) is refused with a message that names the field. A tokenizer
written by xiaolm loads as ``XTokenizer``; any other tokenizer is wrapped in ``HFTokenizer``, which offers the same
methods (see its docstring for what differs).
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from xiaolm.config import opt, parse_config
from xiaolm.errors import ExportError
from xiaolm.utils import atomic_output, atomic_write_json, atomic_write_text, fail, log

# Trainer names (meta.json "kind") of runs whose model answers in ChatML turns.
CHAT_KINDS = {"sft", "lora", "dpo", "ipo", "simpo", "orpo", "kto", "grpo", "align", "chat"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "xiaolm_tokenizer.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")


class HFImportError(ExportError):
    """A Hugging Face directory this model cannot represent, or cannot read."""


# ================================================================================================== loading a run


@dataclass
class ExportSource:
    """What an exporter needs: a plain float ``Llama`` (any LoRA adapter merged or set aside), its tokenizer, and
    what the run recorded about itself."""

    model: Any
    tokenizer: Any
    ckpt: Optional[Path]
    run_dir: Optional[Path]
    meta: dict
    adapter_dir: Optional[Path]  # a LoRA checkpoint's adapter (peft format), not merged into ``model``


def _lora_base(ckpt: Path, meta: dict):
    """The base weights a LoRA checkpoint's adapter applies to: the checkpoint's own model.safetensors when it
    holds them, else the base model its meta.json names."""
    from safetensors.torch import load_file

    from xiaolm.model.llama import Llama, LlamaConfig
    from xiaolm.train.checkpoint import MODEL_CONFIG, MODEL_FILE, load_model

    if (ckpt / MODEL_FILE).is_file() and (ckpt / MODEL_CONFIG).is_file():
        cfg = LlamaConfig.from_dict(json.loads((ckpt / MODEL_CONFIG).read_text(encoding="utf-8")))
        model = Llama(cfg)
        sd = {}
        for key, value in load_file(str(ckpt / MODEL_FILE)).items():  # plain names, or peft's wrapped names
            if ".lora_" in key:
                continue
            key = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
            sd[key.replace(".base_layer.", ".")] = value
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
        if not missing and not unexpected:
            model.tie_weights()
            return model.eval()
    for key in ("base_model", "base", "init_from", "base_run", "base_path"):
        base = meta.get(key)
        if isinstance(base, str) and base and Path(base).exists():
            model, _tok, _info = load_model(base, device="cpu", dtype=torch.float32, with_tokenizer=False)
            return model
    raise fail(f"{ckpt}: a LoRA checkpoint, but neither its model.safetensors nor its meta.json base model "
               f"gives the base weights the adapter applies to")


def load_export_source(path: str | Path, which: str = "latest", merge_lora: bool = False) -> ExportSource:
    """Load a RUNDIR / checkpoint / Hugging Face directory for export, as float32 on the CPU."""
    from xiaolm.train.checkpoint import (CheckpointError, META_FILE, _find_tokenizer_dir, find_checkpoint,
                                        load_model, verify_checkpoint)

    path = Path(path)
    if not path.exists():
        raise fail(f"{path}: no such run directory")
    if (path / "quantization.json").is_file():
        raise fail(f"{path}: a quantised directory; export from the unquantised run it was made from "
                   f"(GGUF quantises itself: --type q8_0 / q4_0)")
    if (path / "config.json").is_file() and not (path / "checkpoints").is_dir() and not (path / META_FILE).is_file():
        model, tok = load_hf_llama(path, device="cpu", dtype=torch.float32)
        return ExportSource(model, tok, None, None, hf_dir_meta(path, tok), None)
    try:
        ckpt = find_checkpoint(path, which)
        meta = verify_checkpoint(ckpt)
    except CheckpointError as exc:
        raise fail(str(exc))
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    adapter = ckpt / "adapter"
    if (adapter / "adapter_config.json").is_file():
        from xiaolm.tokenizer import load_tokenizer

        base = _lora_base(ckpt, meta)
        tok_dir = _find_tokenizer_dir(ckpt)
        if tok_dir is None:
            raise fail(f"{ckpt}: no tokenizer found beside the checkpoint")
        tokenizer = load_tokenizer(tok_dir)
        if merge_lora:
            from peft import PeftModel

            merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
            return ExportSource(merged.eval(), tokenizer, ckpt, run_dir, meta, None)
        return ExportSource(base, tokenizer, ckpt, run_dir, meta, adapter)
    try:
        model, tokenizer, _info = load_model(ckpt, device="cpu", dtype=torch.float32)
    except CheckpointError as exc:
        raise fail(str(exc))
    return ExportSource(model, tokenizer, ckpt, run_dir, meta, None)


def hf_dir_meta(path: Path, tokenizer) -> dict:
    """What a Hugging Face directory says about its model, so that exporting it (to GGUF) gives what exporting its
    run gives: our own export's ``xiaolm_export.json`` (name, chat, training facts), else chat when its eos is
    ``<|im_end|>``, and its directory name."""
    from xiaolm.export.target import read_marker

    marker = read_marker(path) or {}
    meta = {**(marker.get("meta") if isinstance(marker.get("meta"), dict) else {}),
            "kind": marker.get("kind") or "hf", "source": str(path), "name": marker.get("name") or path.resolve().name}
    if isinstance(marker.get("chat"), bool):
        meta["chat"] = marker["chat"]
    else:
        im_end = tokenizer.token_to_id("<|im_end|>") if tokenizer is not None else None
        eos = _read_hf_config(path).get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos]
        meta["chat"] = im_end is not None and im_end in eos
    return meta


def is_chat_run(meta: dict, run_dir: Optional[Path]) -> bool:
    """A model tuned to answer ChatML turns: its checkpoint says it came from SFT or preference tuning (an HF
    directory: see ``hf_dir_meta``)."""
    if isinstance(meta.get("chat"), bool):
        return meta["chat"]
    kind = str(meta.get("kind") or "").lower()
    if kind in CHAT_KINDS or kind.split("-")[0] in CHAT_KINDS:  # "sft", "sft-merged", "dpo", ...
        return True
    if kind == "pretrain":
        return False
    if run_dir is not None and (run_dir / "config.yaml").is_file():  # older checkpoints without a kind
        import yaml

        try:
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            return False
        return isinstance(cfg, dict) and any(k in cfg for k in ("sft", "lora", "dpo", "beta", "chosen_field"))
    return False


# ================================================================================================== export


def hf_config_dict(cfg, dtype: str, eos_id: int, bos_id: int, pad_id: int) -> dict:
    """config.json for ``LlamaForCausalLM``: every field explicit, readable by transformers 4.5x and 5.x."""
    import transformers

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,  # transformers 4.x
        "dtype": dtype,  # transformers 5.x
        "transformers_version": transformers.__version__,
    }


def _write_tokenizer(tokenizer, out: Path, chat: bool, context: int) -> list[str]:
    """The run's tokenizer files; returns the names written. For a chat model, eos is <|im_end|> so pipelines stop
    at the end of a turn. With our tokenizer, a plain prompt gets <|endoftext|> in front (the document separator
    the model was trained after, what ``xiaolm generate`` does): a post-processor in tokenizer.json plus
    ``add_bos_token``. Chat templates are rendered and encoded without it (transformers passes
    ``add_special_tokens=False``), exactly as SFT trained on them."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    from xiaolm.tokenizer import CHAT_TEMPLATE, EOT, IM_END

    if hasattr(tokenizer, "save"):
        tokenizer.save(out)
    conf_path = out / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text(encoding="utf-8")) if conf_path.is_file() else {}
    conf["model_input_names"] = ["input_ids", "attention_mask"]
    conf["model_max_length"] = int(context)
    conf.setdefault("chat_template", CHAT_TEMPLATE)
    if chat and tokenizer.token_to_id(IM_END) is not None:
        conf["eos_token"] = IM_END
    eot_id = tokenizer.token_to_id(EOT)
    if eot_id is not None and (out / "tokenizer.json").is_file():
        tk = Tokenizer.from_file(str(out / "tokenizer.json"))
        tk.post_processor = TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A $B:1",
                                               special_tokens=[(EOT, eot_id)])
        atomic_write_text(out / "tokenizer.json", tk.to_str(pretty=True))
        conf.update(bos_token=EOT, add_bos_token=True, add_eos_token=False)
    atomic_write_json(conf_path, conf)
    if not (out / "chat_template.jinja").is_file():
        atomic_write_text(out / "chat_template.jinja", conf["chat_template"])
    smap_path = out / "special_tokens_map.json"
    if smap_path.is_file():
        smap = json.loads(smap_path.read_text(encoding="utf-8"))
        smap["eos_token"] = conf.get("eos_token", smap.get("eos_token"))
        atomic_write_json(smap_path, smap)
    return [name for name in TOKENIZER_FILES if (out / name).is_file()]  # the target held none of them before


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


def model_card(name: str, cfg, src: ExportSource, chat: bool, dtype: str, params: int, where: str = ".",
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


def export_hf(
    run: str | Path,
    out: str | Path,
    dtype: str = "float32",
    which: str = "latest",
    chat: Optional[bool] = None,
    merge_lora: bool = False,
    name: Optional[str] = None,
    overwrite: bool = False,
    license: str = "apache-2.0",
    base_model: Optional[str] = None,
    datasets: Optional[list[str]] = None,
) -> Path:
    """Write the Hugging Face directory for ``run`` into ``out``; returns ``out``. The names of the files written
    are in ``out/xiaolm_export.json`` (``files``)."""
    from xiaolm.export.target import prepare_hf_target

    if dtype not in DTYPES:
        raise fail(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    src = load_export_source(run, which=which, merge_lora=merge_lora)
    out = prepare_hf_target(out, overwrite, run)
    try:
        _write_hf(src, out, dtype, chat, name, run, card_metadata(src, license, base_model, datasets))
    except OSError as exc:
        raise fail(f"export hf: writing {out} failed: {exc.strerror or exc}")
    return out


def _write_hf(src: ExportSource, out: Path, dtype: str, chat: Optional[bool], name: Optional[str], run,
              metadata: dict) -> list[str]:
    from safetensors.torch import save_file

    from xiaolm.export.target import MARKER
    from xiaolm.tokenizer import EOT, IM_END

    model, tokenizer = src.model, src.tokenizer
    cfg = model.config
    chat = is_chat_run(src.meta, src.run_dir) if chat is None else chat

    eot_id = tokenizer.token_to_id(EOT)
    eot_id = tokenizer.eot_id if eot_id is None else eot_id
    im_end = tokenizer.token_to_id(IM_END)
    eos_id = im_end if chat and im_end is not None else eot_id
    bos_id = eot_id
    pad_id = getattr(tokenizer, "pad_id", eot_id)
    if pad_id is None:
        pad_id = eot_id

    sd = model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    torch_dtype = DTYPES[dtype]
    tensors = {k: v.detach().to("cpu", torch_dtype).contiguous().clone() for k, v in sd.items()
               if not k.endswith("rotary_emb.inv_freq")}
    written = ["model.safetensors", "config.json", "generation_config.json"]
    with atomic_output(out / "model.safetensors") as part:  # normal permissions, never a half-written file
        save_file(tensors, str(part), metadata={"format": "pt"})
    atomic_write_json(out / "config.json", hf_config_dict(cfg, dtype, eos_id, bos_id, pad_id))
    gen = {
        "bos_token_id": bos_id,
        "eos_token_id": [eos_id, eot_id] if eos_id != eot_id else eos_id,
        "pad_token_id": pad_id,
        "do_sample": False,
        "transformers_version": hf_config_dict(cfg, dtype, eos_id, bos_id, pad_id)["transformers_version"],
    }
    atomic_write_json(out / "generation_config.json", gen)
    written += _write_tokenizer(tokenizer, out, chat, cfg.max_position_embeddings)
    if src.adapter_dir is not None:
        write_peft_adapter(src.adapter_dir, out)
        written.append("adapter")
    params = sum(t.numel() for t in tensors.values())
    title = name or src.meta.get("name") or (src.run_dir.name if src.run_dir is not None else out.name)
    atomic_write_text(out / "README.md", model_card(title, cfg, src, chat, dtype, params, where=f"./{out.name}",
                                                    metadata=metadata))
    written += ["README.md", MARKER]
    keep = {k: v for k, v in src.meta.items() if isinstance(v, (str, int, float, bool)) and k != "files"}
    atomic_write_json(out / MARKER, {
        "format": "xiaolm-hf-export", "source": str(run), "name": title, "chat": bool(chat),
        "kind": src.meta.get("kind"), "checkpoint": src.ckpt.name if src.ckpt is not None else None,
        "meta": keep, "files": written})
    return written


def write_peft_adapter(adapter_dir: Path, out: Path) -> Path:
    """``out/adapter``: the LoRA adapter with a standard CAUSAL_LM config, so that
    ``AutoPeftModelForCausalLM.from_pretrained("OUT/adapter")`` loads base and adapter with no xiaolm import. The
    base path is the export as named from the directory the export was written from (relative, like a Hub id:
    peft resolves it against the working directory); ``auto_mapping`` (which would import xiaolm) is dropped."""
    import os

    dest = out / "adapter"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(adapter_dir, dest)
    conf_path = dest / "adapter_config.json"
    conf = json.loads(conf_path.read_text(encoding="utf-8"))
    conf.pop("auto_mapping", None)
    conf["task_type"] = "CAUSAL_LM"
    conf["base_model_name_or_path"] = os.path.relpath(out.resolve(), Path.cwd().resolve())
    atomic_write_json(conf_path, conf)
    return dest


# ================================================================================================== import


_SUPPORTED_ARCHS = {"LlamaForCausalLM"}


def _read_hf_config(path: Path) -> dict:
    f = path / "config.json"
    try:
        conf = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFImportError(f"{path}: not a Hugging Face model directory (no config.json)") from None
    except json.JSONDecodeError as exc:
        raise HFImportError(f"{f}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(conf, dict):
        raise HFImportError(f"{f}: expected a JSON object")
    return conf


def llama_config_from_hf(conf: dict, where: str = "config.json"):
    """Our ``LlamaConfig`` from a Hugging Face config dict; refuses what our model cannot compute exactly."""
    from xiaolm.model.llama import LlamaConfig

    model_type = conf.get("model_type")
    archs = conf.get("architectures") or []
    if model_type != "llama" and not (set(archs) & _SUPPORTED_ARCHS):
        raise HFImportError(f"{where}: model_type {model_type!r} / architectures {archs}: only Llama "
                            f"(LlamaForCausalLM) models can be imported")
    act = conf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise HFImportError(f"{where}: hidden_act {act!r} is not supported (the model uses SiLU / SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if conf.get(key):
            raise HFImportError(f"{where}: {key} = true is not supported (the model has no biases)")
    rope_params = conf.get("rope_parameters") or {}
    scaling = conf.get("rope_scaling")
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type")) if scaling else None
    rope_type = rope_type or rope_params.get("rope_type", "default")
    if rope_type not in (None, "default"):
        raise HFImportError(f"{where}: rope scaling {rope_type!r} is not supported (only plain RoPE)")
    theta = conf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    hidden, heads = conf["hidden_size"], conf["num_attention_heads"]

    def token_id(key):
        v = conf.get(key)
        if isinstance(v, list):
            v = v[0] if v else None
        return 0 if v is None else int(v)

    try:
        return LlamaConfig(
            vocab_size=int(conf["vocab_size"]),
            hidden_size=int(hidden),
            intermediate_size=int(conf["intermediate_size"]),
            num_hidden_layers=int(conf["num_hidden_layers"]),
            num_attention_heads=int(heads),
            num_key_value_heads=int(conf.get("num_key_value_heads") or heads),
            head_dim=int(conf.get("head_dim") or hidden // heads),
            max_position_embeddings=int(conf.get("max_position_embeddings", 2048)),
            rope_theta=float(theta),
            rms_norm_eps=float(conf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(conf.get("tie_word_embeddings", False)),
            initializer_range=float(conf.get("initializer_range", 0.02)),
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id"),
            pad_token_id=token_id("pad_token_id"),
        )
    except KeyError as exc:
        raise HFImportError(f"{where}: required field {exc.args[0]!r} is missing") from None
    except ValueError as exc:
        raise HFImportError(f"{where}: {exc}") from None


def read_hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory: model.safetensors, sharded safetensors (index file), or
    pytorch_model.bin (single or sharded; loaded with ``weights_only=True``)."""
    from safetensors.torch import load_file

    def from_index(index_file: Path, loader) -> dict:
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise HFImportError(f"{index_file}: not valid JSON ({exc.msg})") from None
        sd = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            if not (path / shard).is_file():
                raise HFImportError(f"{index_file} names shard {shard}, which is missing")
            sd.update(loader(path / shard))
        return sd

    def torch_load(f: Path) -> dict:
        return torch.load(f, map_location="cpu", weights_only=True)

    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    if (path / "model.safetensors.index.json").is_file():
        return from_index(path / "model.safetensors.index.json", lambda f: load_file(str(f)))
    if (path / "pytorch_model.bin").is_file():
        return torch_load(path / "pytorch_model.bin")
    if (path / "pytorch_model.bin.index.json").is_file():
        return from_index(path / "pytorch_model.bin.index.json", torch_load)
    raise HFImportError(f"{path}: no weights (expected model.safetensors, model.safetensors.index.json or "
                        f"pytorch_model.bin)")


def load_hf_llama(path: str | Path, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                  with_tokenizer: bool = True):
    """``(model, tokenizer)`` from a Hugging Face Llama directory. ``dtype=None`` gives float32 (what training
    and CPU inference want, whatever the file stores)."""
    from xiaolm.model.llama import Llama

    path = Path(path)
    conf = _read_hf_config(path)
    cfg = llama_config_from_hf(conf, str(path / "config.json"))
    sd = read_hf_state_dict(path)
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if "model.embed_tokens.weight" not in sd and "embed_tokens.weight" in sd:  # a bare LlamaModel
        sd = {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in sd.items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Llama(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        shown_m, shown_u = missing[:6], unexpected[:6]
        raise HFImportError(f"{path}: weights do not fit config.json (missing {shown_m}"
                            f"{'...' if len(missing) > 6 else ''}, unexpected {shown_u}"
                            f"{'...' if len(unexpected) > 6 else ''})")
    model.tie_weights()
    _rebuild_rotary(model)
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    tokenizer = load_hf_tokenizer(path, conf) if with_tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise HFImportError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{cfg.vocab_size} embeddings")
    return model, tokenizer


def _rebuild_rotary(model) -> None:
    """The rotary tables are non-persistent buffers: a model built on the meta device needs them recomputed."""
    from xiaolm.model.llama import RotaryEmbedding

    cfg = model.config
    model.model.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise HFImportError(f"tensors without values after loading: {leftovers[:6]}")


# ================================================================================================== tokenizers


def load_hf_tokenizer(path: str | Path, model_conf: Optional[dict] = None):
    """Our ``XTokenizer`` when the directory holds a xiaolm tokenizer (an export round trip), else an
    ``HFTokenizer`` wrapping whatever ``tokenizer.json`` it holds."""
    from xiaolm.tokenizer import load_tokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise HFImportError(f"{path}: no tokenizer.json (only fast tokenizers are supported; a slow "
                            f"SentencePiece-only tokenizer can be converted with transformers first)")
    try:
        return load_tokenizer(path)
    except ValueError:
        return HFTokenizer(path, model_conf)


class HFTokenizer:
    """Someone else's Hugging Face fast tokenizer behind ``XTokenizer``'s methods.

    Differences from ``XTokenizer``: special tokens are wherever that tokenizer puts them. ``eot_id`` is its eos
    token (falling back to bos), ``pad_id`` its pad token (else ``eot_id``), ``im_start_id`` / ``im_end_id`` are the
    ids of ``<|im_start|>`` / ``<|im_end|>`` when it has them (else None). ``apply_chat_template`` uses its own
    template (ChatML when it has none). Encoding never adds BOS/EOS, like ours. Data tokenised for xiaolm must use
    this same tokenizer (the fingerprint check enforces it).
    """

    def __init__(self, path: str | Path, model_conf: Optional[dict] = None):
        from tokenizers import Tokenizer

        from xiaolm.tokenizer.core import fingerprint_of_json

        self.path = Path(path)
        file = self.path / "tokenizer.json"
        try:
            self.tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise HFImportError(f"{file}: not a readable tokenizer.json: {exc}") from None
        conf_file = self.path / "tokenizer_config.json"
        self.config = json.loads(conf_file.read_text(encoding="utf-8")) if conf_file.is_file() else {}
        self.info = {}
        model_conf = model_conf or {}
        self.chat_template = self.config.get("chat_template")
        if (self.path / "chat_template.jinja").is_file():
            self.chat_template = (self.path / "chat_template.jinja").read_text(encoding="utf-8")

        def special(name: str, conf_key: str) -> Optional[int]:
            token = self.config.get(name)
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str) and self.tok.token_to_id(token) is not None:
                return self.tok.token_to_id(token)
            v = model_conf.get(conf_key)
            return (v[0] if v else None) if isinstance(v, list) else v

        eos = special("eos_token", "eos_token_id")
        bos = special("bos_token", "bos_token_id")
        pad = special("pad_token", "pad_token_id")
        self.eot_id = eos if eos is not None else (bos if bos is not None else 0)
        self.pad_id = pad if pad is not None else self.eot_id
        self.im_start_id = self.tok.token_to_id("<|im_start|>")
        self.im_end_id = self.tok.token_to_id("<|im_end|>")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = fingerprint_of_json(json.loads(self.tok.to_str()))

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        if allow_special:
            return self.tok.encode(text, add_special_tokens=False).ids
        previous = self.tok.encode_special_tokens
        self.tok.encode_special_tokens = True
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = previous

    def encode_batch(self, texts, allow_special: bool = True) -> list[list[int]]:
        return [self.encode(t, allow_special) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        from xiaolm.tokenizer import render_chat

        if not self.chat_template:
            return render_chat(messages, add_generation_prompt=add_generation_prompt)
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)

        def raise_exception(message):
            raise ValueError(f"{self.path}: chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        specials = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in self.config.items()
                    if k.endswith("_token") and isinstance(v, (str, dict))}
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **specials)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def id_to_token(self, index: int) -> Optional[str]:
        return self.tok.id_to_token(int(index))

    def __len__(self) -> int:
        return self.vocab_size

    def save(self, out_dir: str | Path, extra_info: Optional[dict] = None) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file() and (self.path / name).resolve() != (out / name).resolve():
                shutil.copyfile(self.path / name, out / name)
        return out

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, path={str(self.path)!r})"


# ================================================================================================== CLI


@dataclass
class ExportHFConfig:
    run: str = opt(None, "RUNDIR or checkpoint directory to export")
    out: str = opt(None, "output directory (created)")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "dtype of the stored weights")
    checkpoint: str = opt("latest", "which checkpoint of a RUNDIR: latest or best")
    chat: Optional[bool] = opt(None, "treat as a chat model (eos <|im_end|>); default: from the run's stage")
    merge_lora: bool = opt(False, "merge a LoRA checkpoint's adapter into the weights instead of writing adapter/")
    name: Optional[str] = opt(None, "model name in the model card (default: the run directory's name)")
    overwrite: bool = opt(False, "replace an earlier xiaolm export in OUTDIR (other non-empty directories are refused)")
    license: str = opt("apache-2.0", "license in the model card's metadata (the weights' license: mind the data's)")
    base_model: Optional[str] = opt(None, "base_model in the model card (default: the model a fine-tune started from)")
    datasets: Optional[list[str]] = opt(None, "datasets in the model card (default: the names of the run's --data)")


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(
        ExportHFConfig, argv, "xiaolm export hf",
        "Write a Hugging Face LlamaForCausalLM directory (config.json, model.safetensors, tokenizer with the chat "
        "template, generation_config.json, README.md model card; a LoRA adapter in adapter/) that "
        "AutoModelForCausalLM / AutoTokenizer load with no remote code.",
        positionals={"run": "RUNDIR", "out": "OUTDIR"},
    )
    if not cfg.run or not cfg.out:
        raise fail("export hf: give RUNDIR and OUTDIR")
    out = export_hf(cfg.run, cfg.out, dtype=cfg.dtype, which=cfg.checkpoint, chat=cfg.chat,
                    merge_lora=cfg.merge_lora, name=cfg.name, overwrite=cfg.overwrite, license=cfg.license,
                    base_model=cfg.base_model, datasets=cfg.datasets)
    from xiaolm.export.target import read_marker

    log(f"export hf: wrote {out} ({', '.join((read_marker(out) or {}).get('files', []))})")
    print(out, file=sys.stdout)
    return 0
