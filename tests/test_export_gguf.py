"""GGUF export: what llama.cpp reads back is what we trained.

In CI the file is read back with gguf's own reader: keys, tensor names, shapes, types; dequantised Q8_0 / Q4_0
tensors close to ours; q/k un-permuted back to our layout; and a reference forward pass in llama.cpp's convention
(interleaved RoPE pairs) on the file's tensors reproduces our logits. Where llama-cpp-python is installed (.ci/run
builds it once into a wheel cache and reuses it), llama.cpp itself must tokenise as we do and continue greedily as
we do.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xiaolm.cli import main
from xiaolm.errors import XiaolmError
from xiaolm.export.gguf import check_tokenizer_for_gguf, export_gguf, permute_for_gguf, unpermute_from_gguf
from xiaolm.model.io import load_model
from xiaolm.tokenizer.chat import CHAT_TEMPLATE

gguf = pytest.importorskip("gguf")

PROBES = ["从前，有一个小女孩叫莉莉。", "Hello world, 12345 678.90 and 3.14159", "😀🎉 表情 emoji 🐱‍👤",
          "  多个   空格\n\n换行\t制表  ", "<|im_start|>user\n你好<|im_end|>\n", "小明和他的狗，2024年1月1日。"]


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def gguf_files(tiny_run, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for t in ("f32", "f16", "q8_0", "q4_0"):
        files[t] = out / f"tiny-{t}.gguf"
        assert main(["export", "gguf", str(tiny_run), str(files[t]), "--type", t]) == 0
    return files


def _reference_logits(reader: "gguf.GGUFReader", ids: list[int]) -> torch.Tensor:
    """A forward pass over the GGUF tensors the way llama.cpp computes Llama: RoPE rotates adjacent pairs
    (2i, 2i+1) of each head, which is why the exporter permutes q/k rows."""
    T = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
         .reshape([int(s) for s in reversed(t.shape)]) for t in reader.tensors}
    n_layer = int(_field(reader, "llama.block_count"))
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv"))
    eps = float(_field(reader, "llama.attention.layer_norm_rms_epsilon"))
    theta = float(_field(reader, "llama.rope.freq_base"))
    x = T["token_embd.weight"][torch.tensor(ids)]
    n, d = x.shape
    hd = d // n_head
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(n).float()[:, None] * inv[None]  # [n, hd/2]
    cos, sin = ang.cos(), ang.sin()

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(v):  # v [heads, n, hd], pairs (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)

    for i in range(n_layer):
        p = f"blk.{i}."
        h = rms(x, T[p + "attn_norm.weight"])
        q = rope((h @ T[p + "attn_q.weight"].T).view(n, n_head, hd).transpose(0, 1))
        k = rope((h @ T[p + "attn_k.weight"].T).view(n, n_kv, hd).transpose(0, 1))
        v = (h @ T[p + "attn_v.weight"].T).view(n, n_kv, hd).transpose(0, 1)
        k, v = k.repeat_interleave(n_head // n_kv, 0), v.repeat_interleave(n_head // n_kv, 0)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(n, d)
        x = x + a @ T[p + "attn_output.weight"].T
        h = rms(x, T[p + "ffn_norm.weight"])
        x = x + (F.silu(h @ T[p + "ffn_gate.weight"].T) * (h @ T[p + "ffn_up.weight"].T)) @ T[p + "ffn_down.weight"].T
    head = T.get("output.weight", T["token_embd.weight"])  # llama.cpp's fallback for tied models
    return rms(x, T["output_norm.weight"]) @ head.T


def test_metadata_tokenizer_and_tensors_read_back(gguf_files, tiny_run):
    model, tok, _ = load_model(tiny_run)
    c = model.config
    r = gguf.GGUFReader(str(gguf_files["f32"]))
    expect = {
        "general.architecture": "llama", "general.file_type": int(gguf.LlamaFileType.ALL_F32),
        "llama.context_length": c.max_position_embeddings, "llama.embedding_length": c.hidden_size,
        "llama.block_count": c.num_hidden_layers, "llama.feed_forward_length": c.intermediate_size,
        "llama.attention.head_count": c.num_attention_heads, "llama.attention.head_count_kv": c.num_key_value_heads,
        "llama.rope.dimension_count": c.head_dim, "llama.vocab_size": c.vocab_size,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tok.eot_id, "tokenizer.ggml.eos_token_id": tok.eot_id,
        "tokenizer.ggml.padding_token_id": tok.pad_id, "tokenizer.ggml.unknown_token_id": tok.eot_id,
        "tokenizer.ggml.add_bos_token": True,  # a plain prompt starts after <|endoftext|>, as in xiaolm generate
    }
    for key, value in expect.items():
        assert _field(r, key) == value, key
    assert _field(r, "llama.rope.freq_base") == pytest.approx(c.rope_theta)
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    assert _field(r, "tokenizer.chat_template") == CHAT_TEMPLATE  # the one template, tools and thinking included
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert tokens == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[:8] == [int(gguf.TokenType.CONTROL)] * 8 and set(types[14:]) == {int(gguf.TokenType.NORMAL)}
    assert types[8:14] == [int(gguf.TokenType.USER_DEFINED)] * 6  # <think> ... </tool_response>: printed text
    tok_json = json.loads((Path(tok.path) / "tokenizer.json").read_text())
    assert _field(r, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m
                                                  for m in tok_json["model"]["merges"]]

    names = {t.name for t in r.tensors}
    want = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(c.num_hidden_layers)
        for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                  "ffn_down")}
    assert names == want  # tied: no output.weight, llama.cpp falls back to token_embd
    by_name = {t.name: t for t in r.tensors}
    assert list(by_name["blk.0.ffn_gate.weight"].shape) == [c.hidden_size, c.intermediate_size]  # ggml order
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)

    sd = model.state_dict()
    for i in range(c.num_hidden_layers):
        q = torch.from_numpy(by_name[f"blk.{i}.attn_q.weight"].data.copy())
        k = torch.from_numpy(by_name[f"blk.{i}.attn_k.weight"].data.copy())
        ours_q = sd[f"model.layers.{i}.self_attn.q_proj.weight"]
        assert not torch.equal(q, ours_q)  # really permuted
        assert torch.equal(unpermute_from_gguf(q, c.num_attention_heads), ours_q)
        assert torch.equal(unpermute_from_gguf(k, c.num_key_value_heads), sd[f"model.layers.{i}.self_attn.k_proj.weight"])
        v = torch.from_numpy(by_name[f"blk.{i}.attn_v.weight"].data.copy())
        assert torch.equal(v, sd[f"model.layers.{i}.self_attn.v_proj.weight"])


def test_llama_cpp_convention_forward_reproduces_our_logits(gguf_files, tiny_run):
    model, tok, _ = load_model(tiny_run)
    ids = [tok.eot_id] + tok.encode(PROBES[0] + PROBES[5])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    theirs = _reference_logits(gguf.GGUFReader(str(gguf_files["f32"])), ids)
    assert (ours - theirs).abs().max().item() < 1e-4
    q8 = _reference_logits(gguf.GGUFReader(str(gguf_files["q8_0"])), ids)
    assert (ours - q8).abs().max().item() < 0.05 * ours.std().item()


def test_quantised_types_values_and_sizes(gguf_files, tiny_run):
    model, _tok, _ = load_model(tiny_run)
    ref = {t.name: t for t in gguf.GGUFReader(str(gguf_files["f32"])).tensors}
    T = gguf.GGMLQuantizationType
    errors = {}
    for ftype, main_type, tol in (("f16", T.F16, 1e-3), ("q8_0", T.Q8_0, 0.01), ("q4_0", T.Q4_0, 0.2)):
        r = gguf.GGUFReader(str(gguf_files[ftype]))
        worst = 0.0
        for t in r.tensors:
            if t.name.endswith("norm.weight"):
                assert t.tensor_type == T.F32
                continue
            expected = T.Q8_0 if (ftype == "q4_0" and t.name == "token_embd.weight") else main_type
            assert t.tensor_type == expected, (ftype, t.name)
            got = gguf.quants.dequantize(t.data, t.tensor_type)
            want = ref[t.name].data
            assert got.shape == want.shape
            rel = float(np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean()))
            worst = max(worst, rel)
        errors[ftype] = worst
        assert worst < tol, (ftype, worst)
    assert errors["f16"] < errors["q8_0"] < errors["q4_0"]
    sizes = {t: p.stat().st_size for t, p in gguf_files.items()}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]
    modelfile = gguf_files["q4_0"].with_name("tiny-q4_0.Modelfile").read_text()
    assert "FROM ./tiny-q4_0.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile


def test_chat_run_eos_and_untied_head(tiny_run, tmp_path):
    import shutil

    from xiaolm.model.llama import Llama
    from xiaolm.model.io import find_checkpoint
    from xiaolm.train.checkpoint import save_checkpoint

    model, tok, _ = load_model(tiny_run)
    cfg = type(model.config).from_dict({**model.config.to_dict(), "tie_word_embeddings": False})
    untied = Llama(cfg)
    untied.load_state_dict({**model.state_dict(), "lm_head.weight": model.lm_head.weight.detach().clone() * 0.5})
    run = tmp_path / "untied_sft"
    shutil.copytree(tiny_run / "tokenizer", run / "tokenizer")
    meta = json.loads((find_checkpoint(tiny_run) / "meta.json").read_text())
    save_checkpoint(run, 1, untied, cfg.to_dict(), {"kind": "sft", "tokenizer_fingerprint": meta["tokenizer_fingerprint"]})
    info = export_gguf(run, tmp_path / "untied.gguf", ftype="f32")
    r = gguf.GGUFReader(info["path"])
    assert "output.weight" in {t.name for t in r.tensors}
    assert _field(r, "tokenizer.ggml.eos_token_id") == tok.im_end_id and info["chat"]
    ids = [tok.eot_id] + tok.encode(PROBES[0])
    with torch.no_grad():
        ours = untied(torch.tensor([ids])).logits[0]
    assert (ours - _reference_logits(r, ids)).abs().max().item() < 1e-4


def test_permutation_is_a_bijection_and_the_inverse():
    torch.manual_seed(0)
    for heads, hd, cols in ((4, 16, 64), (2, 8, 24), (1, 32, 8)):
        w = torch.randn(heads * hd, cols)
        p = permute_for_gguf(w, heads)
        assert torch.equal(unpermute_from_gguf(p, heads), w)
        assert sorted(p[:, 0].tolist()) == sorted(w[:, 0].tolist())
        # within head 0, llama.cpp's pair (0, 1) is HF's (0, hd/2)
        assert torch.equal(p[1], w[hd // 2]) and torch.equal(p[0], w[0])


def test_tokenizers_llama_cpp_would_split_differently_are_refused():
    base = {"model": {"type": "BPE", "byte_fallback": False}, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    check_tokenizer_for_gguf(base, "ok")
    for change in ({"normalizer": {"type": "NFC"}}, {"pre_tokenizer": {"type": "Metaspace"}},
                   {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}},
                   {"model": {"type": "Unigram"}}):
        with pytest.raises(XiaolmError, match="^bad: "):
            check_tokenizer_for_gguf({**base, **change}, "bad")


# ----------------------------------------------------------------------------- optional: the real llama.cpp


def _llama_cpp(llama_cpp, monkeypatch, path: Path, n_ctx: int):
    """A llama.cpp model with the extra (AMX / repacked) weight buffers off: inside some VMs the CPU advertises AMX
    but the kernel does not grant it, and the quantised AMX kernels die with SIGILL."""
    import llama_cpp.llama as module

    default = module.llama_cpp.llama_model_default_params

    def params():
        p = default()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    monkeypatch.setattr(module.llama_cpp, "llama_model_default_params", params)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False)


def test_llama_cpp_tokenises_and_continues_like_us(gguf_files, tiny_run, capsys, monkeypatch):
    """Runs only where llama-cpp-python is installed (it is not in CI)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from xiaolm.infer.generate import generate_ids

    model, tok, _ = load_model(tiny_run)
    llm = _llama_cpp(llama_cpp, monkeypatch, gguf_files["f32"], model.config.max_position_embeddings)
    for text in PROBES:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == tok.encode(text), text
        assert llm.detokenize(tok.encode(text), special=True).decode("utf-8") == text

    prompt = [tok.eot_id] + tok.encode("从前，有一个小女孩")
    ours = generate_ids(model, [prompt], 24, pad_id=tok.pad_id, eos_ids=[tok.eot_id], temperature=0)[0]
    llm.reset()
    llm.eval(prompt)
    theirs = []
    while len(theirs) < len(ours):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt == tok.eot_id:
            break
        theirs.append(nxt)
        llm.eval([nxt])
    assert theirs == ours

    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].numpy()
    report = {}
    for ftype in ("f32", "q8_0", "q4_0"):
        q = _llama_cpp(llama_cpp, monkeypatch, gguf_files[ftype], model.config.max_position_embeddings)
        q.eval(prompt)
        got = np.array(q.scores[: len(prompt)])
        report[ftype] = float(np.abs(got - ref).max())
    with capsys.disabled():
        print(f"\nllama.cpp {llama_cpp.__version__} max |logit error| vs ours: "
              + ", ".join(f"{k} {v:.4f}" for k, v in report.items()) + f" (logit std {ref.std():.3f})")
    # float32 kernels summing in another order: the error grows with the logits' scale (std ~2 for a model
    # trained with the Muon recipe, ~1.3 before), so the bound is relative to it, as the quantised ones are
    assert report["f32"] < 1e-3 * max(1.0, ref.std())
    assert report["q8_0"] < 0.1 * ref.std() and report["q8_0"] < report["q4_0"] < 0.5 * ref.std()


def test_k_quants_without_llama_cpp_say_what_to_install(tiny_run, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert main(["export", "gguf", str(tiny_run), str(tmp_path / "k.gguf"), "--type", "q4_k_m"]) == 2
    err = capsys.readouterr().err
    assert "pip install llama-cpp-python" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written


def test_k_quants_are_made_by_llama_cpp_and_stay_close(tiny_run, tmp_path, monkeypatch, capsys):
    """Runs where llama-cpp-python is installed (.ci/run builds it once into a wheel cache)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from xiaolm.export.gguf import K_QUANTS

    model, tok, _ = load_model(tiny_run)
    prompt = [tok.eot_id] + tok.encode(PROBES[0] + PROBES[5])
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].numpy()
    errors = {}
    for ftype, llama_ftype in K_QUANTS.items():
        path = tmp_path / f"tiny-{ftype}.gguf"
        assert main(["export", "gguf", str(tiny_run), str(path), "--type", ftype]) == 0
        r = gguf.GGUFReader(str(path))
        assert _field(r, "general.file_type") == llama_ftype and _field(r, "general.basename") == "xiaolm"
        assert _field(r, "tokenizer.ggml.add_bos_token") is True and "<|im_start|>" in _field(r, "tokenizer.chat_template")
        assert path.with_name(f"tiny-{ftype}.Modelfile").read_text().count(f"FROM ./tiny-{ftype}.gguf") == 1
        assert not list(tmp_path.glob(".*.tmp"))
        llm = _llama_cpp(llama_cpp, monkeypatch, path, model.config.max_position_embeddings)
        llm.eval(prompt)
        errors[ftype] = float(np.abs(np.array(llm.scores[: len(prompt)]) - ref).max())
    with capsys.disabled():
        print("\nllama.cpp K-quants max |logit error| vs ours: "
              + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()) + f" (logit std {ref.std():.3f})")
    assert errors["q6_k"] <= errors["q4_k_m"] and all(e < 0.5 * ref.std() for e in errors.values())
