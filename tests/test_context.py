"""Context extension end to end: `pretrain --init-from RUN --seq-len N --rope-scaling yarn` continues a model at a
longer context, resumes exactly, generates past the old length, exports its scaling to Hugging Face and GGUF, and the
long-context checks (bits/char by position, passkey) run on it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_PRETRAIN
from xiaolm.cli import main
from xiaolm.model.io import load_model

EXTEND = ["--seq-len", "256", "--rope-scaling", "yarn", "--max-steps", "6", "--eval-every", "6"]


def _tiny_flags() -> list[str]:
    flags = list(TINY_PRETRAIN)
    i = flags.index("--seq-len")
    del flags[i : i + 2]
    return flags


@pytest.fixture(scope="module")
def extended(tiny_run, shards_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("extended")
    assert main(["pretrain", "--data", str(shards_dir), "--init-from", str(tiny_run), "--out", str(out),
                 *EXTEND, *_tiny_flags()]) == 0
    return out


def test_extension_run_records_the_scaling_and_continues_training(extended, tiny_run):
    model, _tok, _ = load_model(extended)
    s = model.config.rope_scaling
    assert s["rope_type"] == "yarn" and s["original_max_position_embeddings"] == 128 and s["factor"] == 2.0
    assert model.config.max_position_embeddings == 256
    base, _, _ = load_model(tiny_run)
    assert base.config.rope_scaling is None  # the source run is untouched
    rows = [json.loads(line) for line in (extended / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows)


def test_extension_resumes_exactly(tiny_run, shards_dir, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = ["--data", str(shards_dir), "--init-from", str(tiny_run), *EXTEND, *_tiny_flags()]
    assert main(["pretrain", *common, "--out", str(whole)]) == 0
    assert main(["pretrain", *common, "--out", str(parts), "--stop-at-step", "3", "--save-every", "3"]) == 0
    assert main(["pretrain", *common, "--out", str(parts), "--resume"]) == 0
    a, _, _ = load_model(whole)
    b, _, _ = load_model(parts)
    assert b.config.rope_scaling == a.config.rope_scaling
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_rope_scaling_needs_init_from(shards_dir, tmp_path, capsys):
    assert main(["pretrain", "--data", str(shards_dir), "--out", str(tmp_path / "x"), "--rope-scaling", "yarn",
                 *TINY_PRETRAIN]) == 2
    assert "--init-from" in capsys.readouterr().err


def test_generation_goes_past_the_original_context(extended):
    from xiaolm.infer.generate import generate_ids

    model, tok, _ = load_model(extended)
    prompt = [tok.eot_id] + tok.encode("从前，有一个小女孩叫莉莉。" * 20)[:200]
    assert len(prompt) > 128
    out = generate_ids(model, [prompt], 40, pad_id=tok.pad_id, temperature=0.0)[0]
    assert len(prompt) + len(out) > 200 and len(out) > 0
    # cached decoding equals a full forward pass at positions past the original 128
    with torch.no_grad():
        full = model(torch.tensor([prompt + out[:-1]])).logits[0, len(prompt) - 1 :].argmax(-1).tolist()
    assert full == out


def test_hf_export_carries_the_scaling_and_transformers_agrees(extended, tmp_path):
    import transformers

    d = tmp_path / "hf"
    assert main(["export", "hf", str(extended), str(d)]) == 0
    conf = json.loads((d / "config.json").read_text())
    assert conf["rope_scaling"]["rope_type"] == "yarn" and conf["rope_scaling"]["factor"] == 2.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d)).eval()
    model, tok, _ = load_model(extended)
    x = torch.tensor([[tok.eot_id] + tok.encode("小明和他的狗在公园里玩。" * 30)[:230]])
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max().item() < 1e-4
    back, _, _ = load_model(d)  # and our loader reads it back
    assert back.config.rope_scaling == model.config.rope_scaling


def test_gguf_export_writes_llama_cpp_rope_keys(extended, tmp_path, tiny_run, shards_dir, capsys):
    gguf = pytest.importorskip("gguf")
    f = tmp_path / "m.gguf"
    assert main(["export", "gguf", str(extended), str(f), "--type", "f32"]) == 0
    fields = gguf.GGUFReader(str(f)).fields

    def value(key):
        return fields[key].contents()

    assert value("llama.rope.scaling.type") == "yarn"
    assert value("llama.rope.scaling.factor") == pytest.approx(2.0)
    assert value("llama.rope.scaling.original_context_length") == 128
    assert value("llama.context_length") == 256
    # llama.cpp has no dynamic NTK: refused in one line, not exported to compute something else
    dyn = tmp_path / "dyn"
    assert main(["pretrain", "--data", str(shards_dir), "--init-from", str(tiny_run), "--out", str(dyn),
                 "--seq-len", "256", "--rope-scaling", "dynamic", "--max-steps", "1", "--eval-every", "1",
                 *_tiny_flags()]) == 0
    capsys.readouterr()
    assert main(["export", "gguf", str(dyn), str(tmp_path / "d.gguf")]) == 2
    assert "dynamic NTK" in capsys.readouterr().err


def test_gguf_llama3_scaling_travels_as_rope_freqs():
    from xiaolm.export.gguf import rope_freq_factors
    from xiaolm.model.llama import LlamaConfig
    from xiaolm.model.rope import base_inv_freq, scaled_inv_freq

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      rope_scaling={"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 256})
    factors = rope_freq_factors(cfg)
    scaled, _ = scaled_inv_freq(16, 10000.0, cfg.rope_scaling)
    assert torch.allclose(base_inv_freq(16, 10000.0) / factors, scaled)
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(4.0)  # high frequencies kept, low ones divided


def test_eval_ppl_by_position_and_passkey(extended, tiny_run, tmp_path):
    # long documents: the built-in stories are short, so join several into one document per line
    from xiaolm.data.synth import generate_stories

    stories = [r["story_zh"] for r in generate_stories(60, seed=7)]
    docs = tmp_path / "long.jsonl"
    docs.write_text("".join(json.dumps({"text": "".join(stories[i : i + 12])}, ensure_ascii=False) + "\n"
                            for i in range(0, 60, 12)), encoding="utf-8")
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", str(extended), "--data", str(docs), "--seq-len", "256", "--by-position", "64",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    buckets = r["by_position"]["buckets"]
    assert [b["start"] for b in buckets] == [0, 64, 128, 192] and r["by_position"]["windows"] >= 5
    assert all(np.isfinite(b["bits_per_char"]) and b["chars"] > 0 for b in buckets)
    # the unextended model, scaled at evaluation time only, scores too (the table's no-training rows)
    out2 = tmp_path / "ppl2.json"
    assert main(["eval", "ppl", str(tiny_run), "--data", str(docs), "--seq-len", "256", "--by-position", "128",
                 "--rope-scaling", "linear", "--out", str(out2)]) == 0
    assert json.loads(out2.read_text())["rope_scaling"]["factor"] == 2.0
    pk = tmp_path / "pk.json"
    assert main(["eval", "passkey", str(extended), "--lengths", "64", "200", "--depths", "0", "1", "--trials", "2",
                 "--out", str(pk)]) == 0
    rows = json.loads(pk.read_text())["rows"]
    assert len(rows) == 4 and all(0 <= row["exact"] <= 1 and 0 <= row["rank_of_ten"] <= 1 for row in rows)
    assert {row["length"] for row in rows} == {64, 200}
    assert all(abs(row["prompt_tokens"] - row["length"]) <= 16 for row in rows)


@pytest.mark.parametrize("kind", ["linear", "yarn", "llama3"])
def test_llama_cpp_greedy_tokens_equal_ours_past_the_original_context(kind, tiny_run, shards_dir, tmp_path,
                                                                        monkeypatch):
    """The types llama.cpp supports (it has no dynamic NTK): its greedy tokens from a prompt longer than the
    original 128 positions equal ours."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run builds it once)")
    from test_export_interop import _llama_cpp
    from xiaolm.infer.generate import generate_ids

    run = tmp_path / kind
    assert main(["pretrain", "--data", str(shards_dir), "--init-from", str(tiny_run), "--out", str(run),
                 "--seq-len", "256", "--rope-scaling", kind, "--max-steps", "2", "--eval-every", "2",
                 *_tiny_flags()]) == 0
    f = tmp_path / f"{kind}.gguf"
    assert main(["export", "gguf", str(run), str(f), "--type", "f32"]) == 0
    model, tok, _ = load_model(run)
    prompt = [tok.eot_id] + tok.encode("小明和他的小狗去公园玩。它们跑呀跑。" * 12)[:160]
    ours = generate_ids(model, [prompt], 24, pad_id=tok.pad_id, temperature=0.0)[0]
    llm = _llama_cpp(llama_cpp, monkeypatch, f, 256)
    theirs: list[int] = []
    for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        if t == llm.token_eos() or len(theirs) == len(ours):
            break
        theirs.append(t)
    assert theirs == ours
