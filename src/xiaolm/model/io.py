"""Loading a model from any of the places one can live: a RUNDIR or one of its checkpoints (plain, LoRA or reward
model), a quantised directory (QDIR) or a Hugging Face Llama directory. ``load_model`` tells them apart and returns
``(model, tokenizer, ModelInfo)``; every stage that reads a model (generate, chat, serve, eval, export, quantise,
fine-tuning, alignment) calls it. ``load_weights`` is the one place a state dict is fitted to a model (a tied
``lm_head.weight`` may be absent: it is re-tied).

Checkpoint directories are written by ``xiaolm.train.checkpoint`` (atomically, with the sha256 of every file in
``meta.json``); ``find_checkpoint`` and ``verify_checkpoint`` find and check them here, so a truncated or altered
checkpoint is caught on load with a clear message.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from xiaolm.errors import CheckpointError  # a checkpoint that is missing, incomplete or corrupt
from xiaolm.utils import log, sha256_file

MODEL_FILE = "model.safetensors"
MODEL_CONFIG = "model_config.json"
META_FILE = "meta.json"



def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def find_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """RUNDIR (uses checkpoints/latest or /best) or a checkpoint directory -> the checkpoint directory."""
    path = Path(path)
    if (path / META_FILE).is_file() or (path / MODEL_FILE).is_file():
        return path
    root = checkpoints_dir(path)
    pointer = root / which
    if not pointer.is_file():
        if not path.exists():
            raise CheckpointError(f"{path}: no such run directory")
        if which == "latest" and step_checkpoints(root):
            return newest_verified_checkpoint(root)
        raise CheckpointError(f"{path}: no checkpoint found (expected {pointer})")
    ckpt = root / pointer.read_text().strip()
    if not ckpt.is_dir():
        raise CheckpointError(f"{pointer} names {ckpt.name}, which does not exist; pick another checkpoint "
                              f"with --resume-from STEP")
    return ckpt


def step_checkpoints(root: Path) -> list[Path]:
    """The ``step-N`` checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-"))


def newest_verified_checkpoint(root: Path) -> Path:
    """Without a ``latest`` pointer (a full disk can stop a save between the checkpoint and its pointer), the
    newest checkpoint whose files match their sha256."""
    for ckpt in reversed(step_checkpoints(root)):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as exc:
            log(f"note: passing over {ckpt.name}: {exc}")
            continue
        log(f"note: {root / 'latest'} is missing; using {ckpt.name}, the newest checkpoint that verifies")
        return ckpt
    raise CheckpointError(f"{root}: no latest pointer, and no checkpoint there verifies")


def verify_checkpoint(ckpt: Path) -> dict:
    """Check every file against the sha256 recorded in meta.json; return the meta."""
    meta_path = ckpt / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{ckpt}: incomplete checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: corrupt ({exc.msg})") from None
    for name, digest in meta.get("files", {}).items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"{ckpt}: corrupt checkpoint, {name} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(
                f"{ckpt}: corrupt checkpoint, {name} does not match its recorded sha256 "
                f"(truncated or altered); use an earlier checkpoint in {ckpt.parent}"
            )
    return meta


@dataclass
class ModelInfo:
    """What ``load_model`` found: where the weights came from and what the checkpoint says about them."""

    path: Path
    kind: str  # "xiaolm" | "hf" | "quantized" | "lora" | "reward"
    meta: dict = field(default_factory=dict)
    run_dir: Optional[Path] = None


def _find_tokenizer_dir(ckpt: Path) -> Optional[Path]:
    for cand in (ckpt / "tokenizer", ckpt.parent.parent / "tokenizer", ckpt.parent / "tokenizer", ckpt):
        if (cand / "tokenizer.json").is_file():
            return cand
    return None


def load_run_tokenizer(ckpt: Path, meta: dict):
    """The tokenizer saved beside checkpoint ``ckpt``, checked against the fingerprint the run trained with."""
    from xiaolm.tokenizer import load_tokenizer

    tok_dir = _find_tokenizer_dir(ckpt)
    if tok_dir is None:
        raise CheckpointError(f"{ckpt}: no tokenizer found beside the checkpoint")
    try:
        tokenizer = load_tokenizer(tok_dir)
    except (OSError, ValueError) as exc:  # unreadable, or edited after training (its recorded fingerprint)
        raise CheckpointError(str(exc)) from None
    want = meta.get("tokenizer_fingerprint")
    if want and tokenizer.fingerprint != want:
        raise CheckpointError(f"{ckpt}: trained with tokenizer {want}, but {tok_dir / 'tokenizer.json'} is "
                              f"{tokenizer.fingerprint}")
    return tokenizer


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str | Path,
                 what: str = "weights do not fit the config", error: type[Exception] = CheckpointError,
                 assign: bool = False, absent: frozenset[str] | set[str] = frozenset()) -> None:
    """Fit state dict ``sd`` into ``model`` and re-tie its output head: the one place that knows a tied
    ``lm_head.weight`` is not stored (safetensors keeps no shared tensors). Any other key that is missing (beyond
    ``absent``, keys the caller fills itself) or unexpected raises ``error``: "``where``: ``what`` (missing ...,
    unexpected ...)"."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=assign)
    missing = [k for k in missing if k not in absent and not (k == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise error(f"{where}: {what} (missing {_some(missing)}, unexpected {_some(unexpected)})")
    model.tie_weights()


def _some(names: list[str], shown: int = 6) -> str:
    return f"{names[:shown]}{'...' if len(names) > shown else ''}"


def load_model(
    path: str | Path,
    device: str = "cpu",
    dtype: Optional[torch.dtype] = None,
    which: str = "latest",
    verify: bool = True,
    with_tokenizer: bool = True,
    reward: bool = False,
) -> tuple[torch.nn.Module, Any, ModelInfo]:
    """Load ``(model, tokenizer, info)`` from a RUNDIR, a checkpoint directory, a quantised directory or a
    Hugging Face Llama directory (continued pretraining / fine-tuning from someone else's model). ``reward``: a
    reward model's run (``xiaolm reward``) as a ``RewardModel``; a reward run is refused otherwise, and anything
    else with ``reward``."""
    from xiaolm.model.llama import Llama, LlamaConfig
    from xiaolm.model.reward import RewardModel

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    hf_dir = (path / "config.json").is_file() and not (path / MODEL_CONFIG).is_file()
    if reward and ((hf_dir and not (path / "checkpoints").is_dir()) or (path / "quantization.json").is_file()):
        raise CheckpointError(f"{path}: not a reward model (a Hugging Face or quantised directory); train one with "
                              f"xiaolm reward")
    if hf_dir and not (path / "checkpoints").is_dir():
        model, tokenizer = load_hf_llama(path, device=device, dtype=dtype, with_tokenizer=with_tokenizer)
        return model, tokenizer, ModelInfo(path=path, kind="hf")
    if (path / "quantization.json").is_file():
        return load_quantized(path, device=device, with_tokenizer=with_tokenizer, dtype=dtype)
    ckpt = find_checkpoint(path, which)
    meta = verify_checkpoint(ckpt) if verify else json.loads((ckpt / META_FILE).read_text())
    if reward and meta.get("kind") != "reward":
        raise CheckpointError(f"{ckpt}: not a reward model (kind {meta.get('kind')!r}); train one with xiaolm reward")
    if not reward and meta.get("kind") == "reward":
        raise CheckpointError(f"{ckpt}: a reward model, not a language model (score responses with it: "
                              f"xiaolm reward score)")
    if (ckpt / "adapter" / "adapter_config.json").is_file():
        return load_lora_checkpoint(ckpt, meta, device=device, dtype=dtype, with_tokenizer=with_tokenizer)
    cfg = LlamaConfig.from_dict(json.loads((ckpt / MODEL_CONFIG).read_text(encoding="utf-8")))
    model = RewardModel(cfg) if reward else Llama(cfg)
    load_weights(model, load_file(str(ckpt / MODEL_FILE)), ckpt,
                 "weights do not fit a reward model" if reward else "weights do not fit the config")
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    tokenizer = load_run_tokenizer(ckpt, meta) if with_tokenizer else None
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return model, tokenizer, ModelInfo(path=ckpt, kind="reward" if reward else "xiaolm", meta=meta, run_dir=run_dir)


# ================================================================================================== LoRA


def load_lora_checkpoint(ckpt: Path, meta: dict, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                         with_tokenizer: bool = True, merge: bool = True) -> tuple[torch.nn.Module, Any, Any]:
    """Load a checkpoint holding ``adapter/``: the base weights (``load_lora_base``), the adapter with
    ``PeftModel.from_pretrained``. ``merge`` (the default) folds the adapter in and returns a plain ``Llama``, which
    every later stage (generation, export, quantisation, alignment) takes as is; ``merge=False`` returns the
    ``PeftModel``. Returns ``(model, tokenizer, ModelInfo(kind="lora"))``."""
    from peft import PeftModel

    from xiaolm.model.lora import ADAPTER_DIR, merge_lora

    ckpt = Path(ckpt)
    base = load_lora_base(ckpt, meta)
    model = PeftModel.from_pretrained(base, str(ckpt / ADAPTER_DIR), is_trainable=False)
    if merge:
        model = merge_lora(model)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    tokenizer = load_run_tokenizer(ckpt, meta) if with_tokenizer else None
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return model, tokenizer, ModelInfo(path=ckpt, kind="lora", meta=meta, run_dir=run_dir)


def load_lora_base(ckpt: Path, meta: dict) -> torch.nn.Module:
    """The plain float ``Llama`` a LoRA checkpoint's adapter applies to: the base weights in the checkpoint's own
    model.safetensors (plain names, or peft's wrapped names as LoRA training writes them), else the base model its
    meta.json names."""
    from xiaolm.model.llama import Llama, LlamaConfig
    from xiaolm.model.lora import base_weights_from_peft_state

    ckpt = Path(ckpt)
    problem = f"neither its {MODEL_FILE} nor its meta.json base model gives"
    if (ckpt / MODEL_FILE).is_file() and (ckpt / MODEL_CONFIG).is_file():
        base = Llama(LlamaConfig.from_dict(json.loads((ckpt / MODEL_CONFIG).read_text(encoding="utf-8"))))
        try:
            load_weights(base, base_weights_from_peft_state(load_file(str(ckpt / MODEL_FILE))), ckpt,
                         "base weights do not fit the config")
            return base.eval()
        except CheckpointError as exc:
            problem = f"{exc}; nor does its meta.json name a base model with"
    for key in ("base_model", "base", "init_from", "base_run", "base_path"):
        named = meta.get(key)
        if isinstance(named, str) and named and Path(named).exists():
            model, _tok, _info = load_model(named, device="cpu", dtype=torch.float32, with_tokenizer=False)
            return model
    raise CheckpointError(f"{ckpt}: a LoRA checkpoint, but {problem} the base weights the adapter applies to")


# ================================================================================================== quantised


def _default_dtype(device: str) -> torch.dtype:
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.float32


def load_quantized(path: str | Path, device: str = "cpu", with_tokenizer: bool = True,
                   dtype: Optional[torch.dtype] = None, kernel: str = "auto"):
    """``(model, tokenizer, ModelInfo(kind="quantized"))`` from a QDIR. ``dtype`` is the compute dtype (default:
    float32 on the CPU, bfloat16 / float16 on a GPU); ``kernel`` picks the matmul (see the module docstring)."""
    from safetensors.torch import load_file

    from torch import nn

    from xiaolm.model.llama import LlamaConfig, RotaryEmbedding
    from xiaolm.model.quant import (FORMAT, FORMAT_VERSION, KERNELS, QUANT_FILE, QuantEmbedding, QuantizedLlama,
                                    QuantLinear, QuantWeight, TiedQuantHead)

    path = Path(path)
    try:
        qconf = json.loads((path / QUANT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / QUANT_FILE}: unreadable ({exc})") from None
    if qconf.get("format") != FORMAT:
        raise CheckpointError(f"{path / QUANT_FILE}: format {qconf.get('format')!r} is not {FORMAT!r}")
    if qconf.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer xiaolm (format version {qconf['version']})")
    for name in ("model.safetensors", "model_config.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: incomplete quantised directory ({name} is missing)")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    device = str(device)
    dtype = dtype or _default_dtype(device)
    cfg = LlamaConfig.from_dict(json.loads((path / "model_config.json").read_text(encoding="utf-8")))
    sd = load_file(str(path / "model.safetensors"), device=device)

    with torch.device("meta"):
        model = QuantizedLlama(cfg)
    model.compute_dtype = dtype
    modules = qconf.get("modules", {})

    def parent_of(name: str):
        parent_name, _, child = name.rpartition(".")
        return model.get_submodule(parent_name) if parent_name else model, child

    for name, spec in modules.items():
        if spec["bits"] >= 16:
            continue
        if f"{name}.qweight" not in sd:
            raise CheckpointError(f"{path}/model.safetensors: {name}.qweight is missing")
        cls = QuantEmbedding if name == "model.embed_tokens" else QuantLinear
        mod = cls(sd.pop(f"{name}.qweight"), sd.pop(f"{name}.scales"), spec["bits"], spec["group_size"],
                  spec["shape"][1], compute_dtype=dtype)
        parent, child = parent_of(name)
        setattr(parent, child, mod)
    if cfg.tie_word_embeddings:
        emb = model.model.embed_tokens
        if isinstance(emb, QuantEmbedding):
            model.lm_head = TiedQuantHead(emb)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    quant_keys = {f"{n}.{b}" for n in modules for b in ("qweight", "scales")}
    load_weights(model, sd, path, assign=True, absent=quant_keys)  # QuantizedLlama.tie_weights: built in
    if cfg.tie_word_embeddings and isinstance(model.model.embed_tokens, nn.Embedding):
        model.lm_head.weight = model.model.embed_tokens.weight  # a float embedding stays tied the usual way
    model.model.rotary_emb = RotaryEmbedding.for_config(cfg).to(device)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise CheckpointError(f"{path}: tensors without values after loading: {leftovers[:6]}")
    chosen = "dequant" if kernel == "auto" else kernel
    if chosen != "dequant":
        for m in model.modules():
            if isinstance(m, QuantWeight):
                m.compute_dtype = dtype
                try:
                    m.set_kernel(chosen)
                except (RuntimeError, ValueError) as exc:
                    raise CheckpointError(f"{path}: kernel {chosen!r} is not available here: {exc}") from None
    model.eval()

    tokenizer = None
    if with_tokenizer:
        from xiaolm.tokenizer import load_tokenizer

        tok_dir = path / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file():
            raise CheckpointError(f"{path}: no tokenizer/ in the quantised directory")
        try:
            tokenizer = load_tokenizer(tok_dir)
        except (OSError, ValueError) as exc:  # edited after quantising (its recorded fingerprint)
            raise CheckpointError(str(exc)) from None
        want = qconf.get("tokenizer_fingerprint")
        if want and tokenizer.fingerprint != want:
            raise CheckpointError(f"{path}: quantised with tokenizer {want}, but tokenizer/ is {tokenizer.fingerprint}")
    return model, tokenizer, ModelInfo(path=path, kind="quantized", meta=qconf, run_dir=None)


# ================================================================================================== Hugging Face


def load_hf_llama(path: str | Path, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                  with_tokenizer: bool = True):
    """``(model, tokenizer)`` from a Hugging Face Llama directory. ``dtype=None`` gives float32 (what training
    and CPU inference want, whatever the file stores)."""
    from xiaolm.model.hf import _read_hf_config, _rebuild_rotary, llama_config_from_hf, read_hf_state_dict
    from xiaolm.model.llama import Llama
    from xiaolm.tokenizer.hf import HFImportError, load_hf_tokenizer

    path = Path(path)
    conf = _read_hf_config(path)
    cfg = llama_config_from_hf(conf, str(path / "config.json"))
    sd = read_hf_state_dict(path)
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if "model.embed_tokens.weight" not in sd and "embed_tokens.weight" in sd:  # a bare LlamaModel
        sd = {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in sd.items()}
    with torch.device("meta"):
        model = Llama(cfg)
    load_weights(model, sd, path, "weights do not fit config.json", error=HFImportError, assign=True)
    _rebuild_rotary(model)
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    tokenizer = load_hf_tokenizer(path, conf) if with_tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise HFImportError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{cfg.vocab_size} embeddings")
    return model, tokenizer


# ================================================================================================== reward model


def load_reward_model(path: str | Path, device: str = "cpu", which: str = "latest"):
    """``(RewardModel, tokenizer, info)`` from an RMDIR (or one of its checkpoints) written by ``xiaolm reward``,
    its tokenizer checked against the fingerprint the run trained with (``load_model(..., reward=True)``)."""
    return load_model(path, device=device, which=which, reward=True)
