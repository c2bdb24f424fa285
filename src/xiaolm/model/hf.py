"""Hugging Face Llama <-> our ``Llama``: config.json to ``LlamaConfig`` and back, and the state dict of a Hugging
Face directory (safetensors or pytorch_model.bin, single or sharded). What our model cannot represent (rope types
other than linear, dynamic, yarn and llama3, attention or MLP biases, activations other than SiLU) is refused with a
message that names the field."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from xiaolm.tokenizer.hf import HFImportError


def hf_config_dict(cfg, dtype: str, eos_id: int, bos_id: int, pad_id: int) -> dict:
    """config.json for ``LlamaForCausalLM``: every field explicit, readable by transformers 4.5x and 5.x."""
    import transformers

    from xiaolm.model.rope import hf_rope_fields

    rope = hf_rope_fields(cfg.rope_scaling, cfg.rope_theta, cfg.max_position_embeddings)
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
        "max_position_embeddings": rope["max_position_embeddings"],
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": rope["rope_scaling"],
        "rope_parameters": rope["rope_parameters"],
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
    from xiaolm.model.rope import rope_scaling_from_hf

    rope_params = conf.get("rope_parameters") or {}
    try:
        rope_scaling, scaled_context = rope_scaling_from_hf(conf)
    except ValueError as exc:
        raise HFImportError(f"{where}: {exc}") from None
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
            max_position_embeddings=scaled_context or int(conf.get("max_position_embeddings", 2048)),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
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


def _rebuild_rotary(model) -> None:
    """The rotary tables are non-persistent buffers: a model built on the meta device needs them recomputed."""
    from xiaolm.model.llama import RotaryEmbedding

    cfg = model.config
    model.model.rotary_emb = RotaryEmbedding.for_config(cfg)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise HFImportError(f"tensors without values after loading: {leftovers[:6]}")
