"""Hugging Face export (``xiaolm export hf``); the model card is ``xiaolm.export.card``.

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

Import (``xiaolm.model.io.load_hf_llama``, mapping in ``xiaolm.model.hf``) reads any Hugging Face Llama directory
on disk (config.json plus model.safetensors, sharded safetensors or pytorch_model.bin, and tokenizer files) into
``xiaolm.model.llama.Llama``, so ``xiaolm pretrain --init-from HFDIR`` and ``xiaolm sft HFDIR`` continue training
someone else's model. What our model cannot represent (rope scaling, attention or MLP biases, activations other
than SiLU) is refused with a message that names the field. A tokenizer written by xiaolm loads as ``XTokenizer``;
any other tokenizer is wrapped in ``xiaolm.tokenizer.hf.HFTokenizer``, which offers the same methods.
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
from xiaolm.export.card import card_metadata, model_card
from xiaolm.model.hf import _read_hf_config, hf_config_dict
from xiaolm.model.io import load_hf_llama
from xiaolm.tokenizer.hf import TOKENIZER_FILES
from xiaolm.utils import atomic_output, atomic_write_json, atomic_write_text, fail, log

# Trainer names (meta.json "kind") of runs whose model answers in ChatML turns.
CHAT_KINDS = {"sft", "lora", "dpo", "ipo", "simpo", "orpo", "kto", "grpo", "align", "chat"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_export_source(path: str | Path, which: str = "latest", merge_lora: bool = False) -> ExportSource:
    """Load a RUNDIR / checkpoint / Hugging Face directory for export, as float32 on the CPU."""
    from xiaolm.model.io import (CheckpointError, META_FILE, find_checkpoint, load_lora_base, load_model,
                                 load_run_tokenizer, verify_checkpoint)

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
        try:
            base, tokenizer = load_lora_base(ckpt, meta), load_run_tokenizer(ckpt, meta)
        except CheckpointError as exc:
            raise fail(str(exc))
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


# ================================================================================================== CLI


@dataclass
class ExportHFConfig:
    """Write a Hugging Face LlamaForCausalLM directory (config.json, model.safetensors, tokenizer with the chat \
template, generation_config.json, README.md model card; a LoRA adapter in adapter/) that AutoModelForCausalLM / \
AutoTokenizer load with no remote code."""

    run: str = opt(None, "RUNDIR or checkpoint directory to export", required="export hf: give RUNDIR and OUTDIR")
    out: str = opt(None, "output directory (created)", required="export hf: give RUNDIR and OUTDIR")
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
    cfg, _ = parse_config(ExportHFConfig, argv, "xiaolm export hf", positionals={"run": "RUNDIR", "out": "OUTDIR"})
    out = export_hf(cfg.run, cfg.out, dtype=cfg.dtype, which=cfg.checkpoint, chat=cfg.chat,
                    merge_lora=cfg.merge_lora, name=cfg.name, overwrite=cfg.overwrite, license=cfg.license,
                    base_model=cfg.base_model, datasets=cfg.datasets)
    from xiaolm.export.target import read_marker

    log(f"export hf: wrote {out} ({', '.join((read_marker(out) or {}).get('files', []))})")
    print(out, file=sys.stdout)
    return 0
