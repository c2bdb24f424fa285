"""GGUF export (``xiaolm export gguf``): one file that llama.cpp, Ollama, LM Studio and friends run.

Written with the ``gguf`` package (the writer llama.cpp's own converter uses), no llama.cpp checkout needed.

- Tensors get llama.cpp's names through ``gguf.get_tensor_name_map`` (``token_embd``, ``blk.N.attn_q`` ...). The
  rows of ``attn_q`` / ``attn_k`` are permuted from Hugging Face's rotate-half RoPE layout to the interleaved
  (GPT-J) layout llama.cpp's ``rope`` kernel expects, exactly as ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``
  does (``unpermute`` below is its inverse; the tests check the round trip).
- ``--type f32|f16|q8_0|q4_0``. Norm weights (1-D) always stay F32, as in llama.cpp. A matrix whose rows are not
  a multiple of the 32-value block falls back to F16. For ``q4_0`` the embedding matrix (which is also the output
  head when tied) is written as Q8_0: llama.cpp's own ``llama-quantize`` keeps the output head at higher precision
  (Q6_K, which the ``gguf`` package cannot write) because 4-bit logits cost far more quality than 4-bit layers.
- A tied head writes no ``output.weight``: llama.cpp's Llama loader falls back to ``token_embd.weight``
  (``TENSOR_DUPLICATED``), which is what ``convert_hf_to_gguf.py`` relies on for tied models.
- The tokenizer is embedded as ``tokenizer.ggml.model = gpt2`` with ``tokenizer.ggml.pre = gpt-2``: ours is
  byte-level BPE behind exactly the GPT-2 regex pre-tokenizer, no normaliser (checked before writing). Token types
  mark special tokens CONTROL. bos/eos/pad/unk ids, ``add_bos_token = true`` with bos = ``<|endoftext|>`` (the
  document separator the model was trained after: a plain prompt is conditioned as ``xiaolm generate`` and the HF
  export condition it) and the ChatML template go in too; a chat run's eos is ``<|im_end|>``. Exported from an HF
  directory of ours, the file gets the same metadata as from the run (``xiaolm_export.json`` says what it was).
- ``--type q4_k_m|q5_k_m|q6_k`` (the K-quants people pick in Ollama) need llama.cpp's own quantiser, which the
  ``gguf`` package does not have: an F16 file is written first and quantised with ``llama_cpp.llama_model_quantize``
  (``pip install llama-cpp-python``). Matrices whose rows are not a multiple of 256 get llama.cpp's fallback types.
- An Ollama ``Modelfile`` (ChatML template, ``<|im_end|>`` stop) is printed and written beside the file.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from xiaolm.config import opt, parse_config
from xiaolm.export.target import GGUF_BASENAME
from xiaolm.utils import atomic_write_text, fail, log

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
# Quantised by llama.cpp from our F16 file: type -> llama_ftype (llama.h LLAMA_FTYPE_MOSTLY_*).
K_QUANTS = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
BLOCK = 32  # values per Q8_0 / Q4_0 block


def permute_for_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp interleaved pairs, per head (``convert_hf_to_gguf`` LlamaModel.permute).

    Within each head, HF rotates dimension i together with i + head_dim/2; llama.cpp rotates 2i with 2i+1."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``permute_for_gguf`` (llama.cpp layout -> ours)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ================================================================================================== tokenizer


def check_tokenizer_for_gguf(tok_json: dict, where: str) -> None:
    """llama.cpp must split text exactly as we do: byte-level BPE, GPT-2 regex, no normaliser, no byte fallback."""
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        raise fail(f"{where}: tokenizer model {model.get('type')!r}: GGUF export supports byte-level BPE only")
    pre = tok_json.get("pre_tokenizer") or {}
    ok = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
    if not ok:
        raise fail(f"{where}: pre-tokenizer {json.dumps(pre)[:120]} is not plain GPT-2 ByteLevel; llama.cpp's "
                   f"'gpt-2' pre-tokenizer would split text differently")
    if tok_json.get("normalizer") is not None:
        raise fail(f"{where}: tokenizer has a normalizer, which llama.cpp's gpt2 tokenizer does not apply")
    if model.get("byte_fallback"):
        raise fail(f"{where}: byte_fallback BPE is not the GPT-2 scheme")


def gguf_vocab(tok_json: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens in id order, their GGUF token types, and the merges as ``"a b"`` strings."""
    import gguf

    from xiaolm.tokenizer.chat import MARKERS

    vocab: dict[str, int] = dict(tok_json["model"]["vocab"])
    special = {}
    for t in tok_json.get("added_tokens") or []:
        vocab[t["content"]] = t["id"]
        special[t["id"]] = bool(t.get("special"))
    by_id = {i: s for s, i in vocab.items()}
    if len(by_id) > vocab_size:
        raise fail(f"tokenizer has {len(by_id)} tokens but the model only {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer (a vocabulary padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            if i in special:
                # The thinking / tool markers are printed text for llama.cpp's parsers (as Qwen3's GGUFs have
                # them); the turn markers are control tokens it hides.
                control = special[i] and by_id[i] not in MARKERS
                types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges") or []]
    return tokens, [int(t) for t in types], merges


# ================================================================================================== tensors


def _tensor_type(name: str, arr: np.ndarray, ftype: str):
    """The GGML type a tensor is stored as under ``ftype`` (llama.cpp's conventions, see the module docstring)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if arr.ndim == 1 or ftype == "f32":
        return T.F32
    if ftype == "f16":
        return T.F16
    if arr.shape[-1] % BLOCK:
        return T.F16
    if ftype == "q4_0" and name in ("token_embd.weight", "output.weight"):
        return T.Q8_0
    return T.Q8_0 if ftype == "q8_0" else T.Q4_0


def gguf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, float32 tensor) for every weight, q/k permuted, a tied head left out."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    out = []
    for key, t in model.state_dict().items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise fail(f"no GGUF name for tensor {key}")
        t = t.detach().to("cpu", torch.float32)
        if key.endswith("self_attn.q_proj.weight"):
            t = permute_for_gguf(t, cfg.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            t = permute_for_gguf(t, cfg.num_key_value_heads)
        out.append((name, t.contiguous()))
    return out


# ================================================================================================== writer


def ollama_modelfile(gguf_name: str, context: int, chat: bool) -> str:
    note = "" if chat else (
        "# This is a base model (not instruction-tuned): it continues text rather than answering.\n"
        "# For raw continuation use `ollama run --raw` or the API's raw mode.\n")
    return (
        f"# Ollama Modelfile: ollama create xiaolm -f {gguf_name.rsplit('.', 1)[0]}.Modelfile && ollama run xiaolm\n"
        f"{note}"
        f"FROM ./{gguf_name}\n"
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n'
        '{{ .Content }}<|im_end|>\n'
        '{{ end }}<|im_start|>assistant\n'
        '"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop "<|endoftext|>"\n'
        'PARAMETER stop "<|im_start|>"\n'
        f"PARAMETER num_ctx {context}\n"
        "PARAMETER temperature 0.7\n"
        "PARAMETER top_p 0.9\n"
        "PARAMETER repeat_penalty 1.1\n"
    )


def export_gguf(run: str | Path, out: str | Path, ftype: str = "f16", which: str = "latest",
                chat: Optional[bool] = None, name: Optional[str] = None, overwrite: bool = False) -> dict:
    """Write ``out`` (.gguf) and its Modelfile; returns a summary (path, types, bytes, modelfile)."""
    gguf = import_gguf()

    from xiaolm.export.hf import load_export_source
    from xiaolm.export.target import prepare_gguf_target

    if ftype not in GGUF_TYPES:
        raise fail(f"--type {ftype}: choose one of {', '.join(GGUF_TYPES)}")
    llama_cpp = import_llama_cpp(ftype) if ftype in K_QUANTS else None
    src = load_export_source(run, which=which, merge_lora=True)
    out, modelfile_path = prepare_gguf_target(out, overwrite)
    tmp = out.with_name(f".{out.name}.tmp")
    f16 = out.with_name(f".{out.name}.f16.tmp")
    try:
        if llama_cpp is None:
            return _write_gguf(gguf, src, run, out, tmp, modelfile_path, ftype, chat, name)
        info = _write_gguf(gguf, src, run, f16, tmp, modelfile_path, "f16", chat, name, final=out)
        quantize_with_llama_cpp(llama_cpp, f16, tmp, ftype)
        tmp.replace(out)
        return {**info, "path": str(out), "type": ftype, "bytes": out.stat().st_size,
                "tensor_types": gguf_tensor_types(out)}
    except OSError as exc:
        raise fail(f"export gguf: writing {out} failed: {exc.strerror or exc}")
    finally:
        tmp.unlink(missing_ok=True)
        f16.unlink(missing_ok=True)


def import_llama_cpp(ftype: str):
    try:
        import llama_cpp
    except ImportError:
        raise fail(f"--type {ftype}: K-quants are made by llama.cpp's quantiser: pip install llama-cpp-python "
                   f"(or use --type q8_0 / q4_0, which need nothing more)") from None
    return llama_cpp


def quantize_with_llama_cpp(llama_cpp, src: Path, dst: Path, ftype: str, threads: int = 0) -> None:
    """llama.cpp's own ``llama-quantize`` on an F16 GGUF (importance matrix none, output head per its rules)."""
    import contextlib

    try:  # llama.cpp prints a line per tensor; the summary line of `export gguf` says what came out
        from llama_cpp._utils import suppress_stdout_stderr
        quiet = suppress_stdout_stderr(disable=False)
    except ImportError:
        quiet = contextlib.nullcontext()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_QUANTS[ftype]
    params.nthread = threads
    with quiet:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise fail(f"export gguf: llama.cpp could not quantise to {ftype} (code {rc})")


def gguf_tensor_types(path: Path) -> dict[str, int]:
    import gguf

    types: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return types


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise fail("export gguf needs the gguf package: pip install 'xiaolm[export]'") from None
    return gguf


def _write_gguf(gguf, src, run, out: Path, tmp: Path, modelfile_path: Path, ftype: str, chat: Optional[bool],
                name: Optional[str], final: Optional[Path] = None) -> dict:
    """Write ``out`` through ``tmp``; ``final`` is the name the Modelfile points to (default ``out``)."""
    from xiaolm.export.hf import is_chat_run
    from xiaolm.tokenizer import CHAT_TEMPLATE, EOT, IM_END

    model, tokenizer = src.model, src.tokenizer
    cfg = model.config
    tok_file = Path(tokenizer.path) / "tokenizer.json" if getattr(tokenizer, "path", None) else None
    if tok_file is None or not tok_file.is_file():
        raise fail(f"{run}: the tokenizer's tokenizer.json was not found")
    tok_json = json.loads(tok_file.read_text(encoding="utf-8"))
    check_tokenizer_for_gguf(tok_json, str(tok_file))
    tokens, token_types, merges = gguf_vocab(tok_json, cfg.vocab_size)
    chat = is_chat_run(src.meta, src.run_dir) if chat is None else chat

    title = name or src.meta.get("name") or (src.run_dir.name if src.run_dir is not None else out.stem)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[ftype]

    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(title)
    w.add_basename(GGUF_BASENAME)
    n_params = sum(p.numel() for p in model.parameters())
    w.add_size_label(f"{n_params / 1e6:.0f}M" if n_params >= 1e6 else f"{n_params / 1e3:.0f}K")
    w.add_description("small Chinese language model trained from scratch with xiaolm"
                      + (" (chat)" if chat else " (base)"))
    w.add_languages(["zh"])
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # llama.* hyperparameters
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    # tokenizer
    eot_id = tokenizer.token_to_id(EOT)
    eot_id = tokenizer.eot_id if eot_id is None else eot_id
    im_end = tokenizer.token_to_id(IM_END)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(eot_id)
    w.add_eos_token_id(im_end if chat and im_end is not None else eot_id)
    w.add_pad_token_id(getattr(tokenizer, "pad_id", eot_id) if getattr(tokenizer, "pad_id", None) is not None
                       else eot_id)
    w.add_unk_token_id(eot_id)
    if im_end is not None:
        w.add_eot_token_id(im_end)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
    w.add_chat_template(template)

    types_used: dict[str, int] = {}
    for tname, t in gguf_tensors(model):
        arr = t.numpy()
        qtype = _tensor_type(tname, arr, ftype)
        types_used[qtype.name] = types_used.get(qtype.name, 0) + 1
        data = gguf.quants.quantize(arr, qtype)
        w.add_tensor(tname, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)

    modelfile = ollama_modelfile((final or out).name, cfg.max_position_embeddings, chat)
    atomic_write_text(modelfile_path, modelfile)
    return {"path": str(out), "type": ftype, "bytes": out.stat().st_size, "tensor_types": types_used,
            "modelfile": str(modelfile_path), "modelfile_text": modelfile, "chat": chat}


# ================================================================================================== CLI


@dataclass
class ExportGGUFConfig:
    """Write a GGUF file for llama.cpp / Ollama (tokenizer and chat template embedded) and an Ollama Modelfile \
beside it. Run it with: llama-cli -m OUT.gguf, or ollama create NAME -f OUT.Modelfile."""

    run: str = opt(None, "RUNDIR, checkpoint directory or Hugging Face Llama directory to export",
                   required="export gguf: give RUNDIR and OUT.gguf")
    out: str = opt(None, "output .gguf file", required="export gguf: give RUNDIR and OUT.gguf")
    type: Literal["f32", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"] = opt(
        "f16", "tensor type: f32, f16, q8_0, q4_0, or the K-quants q4_k_m, q5_k_m, q6_k (these need llama-cpp-python)")
    checkpoint: str = opt("latest", "which checkpoint of a RUNDIR: latest or best")
    chat: Optional[bool] = opt(None, "treat as a chat model (eos <|im_end|>); default: from the run's stage")
    name: Optional[str] = opt(None, "general.name in the file (default: the run directory's name)")
    overwrite: bool = opt(False, "replace an earlier xiaolm export at OUT (any other existing file is refused)")


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(ExportGGUFConfig, argv, "xiaolm export gguf",
                          positionals={"run": "RUNDIR", "out": "OUT.gguf"})
    info = export_gguf(cfg.run, cfg.out, ftype=cfg.type, which=cfg.checkpoint, chat=cfg.chat, name=cfg.name,
                       overwrite=cfg.overwrite)
    types = ", ".join(f"{n} {k}" for k, n in info["tensor_types"].items())
    log(f"export gguf: wrote {info['path']} ({info['bytes'] / 1e6:.2f} MB; tensors {types})")
    fallback = [k for k in info["tensor_types"] if cfg.type in K_QUANTS and k != "F32" and not k.endswith("_K")]
    if fallback:
        log(f"export gguf: llama.cpp used {', '.join(fallback)} for matrices whose rows are not a multiple of 256 "
            f"(K-quant blocks)")
    log(f"export gguf: Ollama Modelfile at {info['modelfile']}:")
    print(info["modelfile_text"], file=sys.stdout, end="")
    return 0
