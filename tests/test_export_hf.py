"""Hugging Face export and import: transformers computes what we compute, chat models stop where they should,
LoRA adapters load with peft, and a Hugging Face directory is a starting point for more training."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xiaolm.cli import main
from xiaolm.export.hf import export_hf
from xiaolm.model.io import load_hf_llama
from xiaolm.tokenizer.hf import HFImportError, HFTokenizer
from xiaolm.model.io import find_checkpoint, load_model

transformers = pytest.importorskip("transformers")

PROBES = ["从前，有一个小女孩叫莉莉。她喜欢在花园里玩。", "小明和他的狗 2024 年 hello world!", "有一天，小猫"]


def _batch(tokenizer):
    ids = [[tokenizer.eot_id] + tokenizer.encode(p) for p in PROBES]
    longest = max(map(len, ids))
    x = torch.full((len(ids), longest), tokenizer.pad_id)
    mask = torch.zeros_like(x)
    for i, row in enumerate(ids):  # left padding, as in generation
        x[i, longest - len(row):] = torch.tensor(row)
        mask[i, longest - len(row):] = 1
    return x, mask


def _chat_copy(tiny_run: Path, dst: Path, kind: str = "sft") -> Path:
    """A copy of the tiny run whose checkpoint says it came out of SFT."""
    shutil.copytree(tiny_run, dst)
    ckpt = find_checkpoint(dst)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["kind"] = kind
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def hf_dir(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    assert main(["export", "hf", str(tiny_run), str(out)]) == 0
    return out


def test_export_directory_is_complete_and_explicit(hf_dir, tiny_run):
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "special_tokens_map.json", "README.md"} <= names
    conf = json.loads((hf_dir / "config.json").read_text())
    ours, tok, _ = load_model(tiny_run)
    c = ours.config
    assert conf["architectures"] == ["LlamaForCausalLM"] and conf["model_type"] == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert conf[key] == getattr(c, key), key
    assert conf["rope_theta"] == c.rope_theta and conf["rope_parameters"]["rope_theta"] == c.rope_theta
    assert conf["hidden_act"] == "silu" and conf["attention_bias"] is False and conf["mlp_bias"] is False
    assert conf["torch_dtype"] == conf["dtype"] == "float32"
    assert conf["bos_token_id"] == conf["eos_token_id"] == conf["pad_token_id"] == tok.eot_id  # a base model
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == tok.eot_id
    tensors = load_file(str(hf_dir / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # tied: dropped, not stored twice
    assert all(t.dtype == torch.float32 for t in tensors.values())
    tconf = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert tconf["model_input_names"] == ["input_ids", "attention_mask"]
    assert tconf["chat_template"] == (hf_dir / "chat_template.jinja").read_text()
    card = (hf_dir / "README.md").read_text()
    assert "LlamaForCausalLM" in card and "bits per character" in card and "max_steps: 120" in card


def test_transformers_logits_equal_ours(hf_dir, tiny_run):
    ours, tok, _ = load_model(tiny_run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # re-tied on load
    for p in PROBES:
        assert hf_tok(p)["input_ids"] == [tok.eot_id] + tok.encode(p)  # the BOS rule of `xiaolm generate`
        assert hf_tok(p, add_special_tokens=False)["input_ids"] == tok.encode(p)
        assert "token_type_ids" not in hf_tok(p)
    x, mask = _batch(tok)
    with torch.no_grad():
        a = ours(x, attention_mask=mask).logits
        b = hf(input_ids=x, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max().item() < 1e-5


def test_chat_run_stops_at_im_end_and_generates_with_the_template(tiny_run, tmp_path):
    from xiaolm.infer.generate import generate_ids

    run = _chat_copy(tiny_run, tmp_path / "sft_run")
    (run / "eval").mkdir()
    (run / "eval" / "cmmlu.json").write_text(json.dumps({"accuracy": 0.2488, "chance": 0.25}))
    out = export_hf(run, tmp_path / "hf_chat")
    card = (out / "README.md").read_text()
    assert "| cmmlu | accuracy 24.88% (chance 25%) |" in card and "- chat" in card
    ours, tok, _ = load_model(run)
    conf = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert conf["eos_token_id"] == tok.im_end_id
    assert gen["eos_token_id"] == [tok.im_end_id, tok.eot_id]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token_id == tok.pad_id
    messages = [{"role": "user", "content": "讲一个关于小猫的故事"}]
    enc = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert enc["input_ids"][0].tolist() == prompt
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    produced = hf.generate(**enc, max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    expected = generate_ids(ours, [prompt], 12, pad_id=tok.pad_id, eos_ids=[tok.eot_id, tok.im_end_id],
                            temperature=0)[0]
    assert produced[: len(expected)] == expected  # HF keeps the stop token, we drop it
    assert len(produced) == len(expected) or produced[len(expected)] in (tok.eot_id, tok.im_end_id)


def test_bfloat16_export(tiny_run, tmp_path):
    out = export_hf(tiny_run, tmp_path / "hf_bf16", dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours, tok, _ = load_model(tiny_run)
    x, mask = _batch(tok)
    with torch.no_grad():
        diff = (ours(x, attention_mask=mask).logits - hf(input_ids=x, attention_mask=mask).logits)[mask.bool()]
    assert 0 < diff.abs().max().item() < 0.5


@pytest.mark.parametrize("peft_names", [False, True])
def test_lora_adapter_is_exported_beside_and_loads_with_peft(tiny_run, tmp_path, peft_names):
    """A checkpoint with ``adapter/`` exports the base model plus ``adapter/``; PeftModel.from_pretrained on the
    transformers model gives what our model with the adapter gives. ``peft_names``: model.safetensors holds the
    peft-wrapped state (as LoRA training writes it) instead of plain base weights."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import save_file

    run = _chat_copy(tiny_run, tmp_path / "lora_run")
    ckpt = find_checkpoint(run)
    base, tok, _ = load_model(run)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the adapter matter
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(ckpt / "adapter"))
    if peft_names:
        sd = {k: v.contiguous() for k, v in peft_model.state_dict().items() if not k.endswith("lm_head.weight")}
        save_file(sd, str(ckpt / "model.safetensors"))
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["files"].pop("model.safetensors")
        (ckpt / "meta.json").write_text(json.dumps(meta))
    x, mask = _batch(tok)
    with torch.no_grad():
        want = peft_model(input_ids=x, attention_mask=mask).logits

    out = export_hf(run, tmp_path / "hf_lora")
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        base_logits = hf(input_ids=x, attention_mask=mask).logits
        got = PeftModel.from_pretrained(hf, str(out / "adapter")).eval()(input_ids=x, attention_mask=mask).logits
    assert (got - want)[mask.bool()].abs().max().item() < 1e-5
    assert (base_logits - want)[mask.bool()].abs().max().item() > 1e-3  # the adapter changes the output

    merged = export_hf(run, tmp_path / "hf_merged", merge_lora=True)
    assert not (merged / "adapter").exists()
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    with torch.no_grad():
        got = hf_merged(input_ids=x, attention_mask=mask).logits
    assert (got - want)[mask.bool()].abs().max().item() < 1e-4


def test_round_trip_and_continued_pretraining_from_hf(hf_dir, tiny_run, shards_dir, tmp_path):
    ours, tok, _ = load_model(tiny_run)
    back, back_tok, info = load_model(hf_dir)
    assert info.kind == "hf" and back_tok.fingerprint == tok.fingerprint
    x, mask = _batch(tok)
    with torch.no_grad():
        assert torch.equal(ours(x, attention_mask=mask).logits, back(x, attention_mask=mask).logits)

    out = tmp_path / "continued"
    assert main(["pretrain", "--data", str(shards_dir), "--out", str(out), "--init-from", str(hf_dir),
                 "--max-steps", "4", "--seq-len", "128", "--micro-batch-size", "8", "--lr", "1e-4",
                 "--warmup-steps", "1", "--eval-every", "4", "--eval-tokens", "2048", "--sample-tokens", "4",
                 "--log-every", "1", "--no-progress", "--no-tensorboard"]) == 0
    first = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "train"][0]
    trained = json.loads((tiny_run / "summary.json").read_text())["final_train_loss"]
    assert first["loss"] < math.log(tok.vocab_size) - 0.5  # not a fresh model
    assert abs(first["loss"] - trained) < 0.5


def test_import_any_hf_llama_with_a_foreign_tokenizer(tmp_path):
    """A Llama written by transformers itself (pytorch_model.bin, untied, GQA), with a tokenizer that is not ours."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(["hello world this is a test"] * 50 + ["从 前 有 座 山"] * 50,
                           trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, rope_theta=5000.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path / "foreign"
    hf.save_pretrained(str(d))
    fast.save_pretrained(str(d))
    # The older pickle layout (transformers 5 writes safetensors only): import must read it too.
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()

    model, tok, info = load_model(d)
    assert info.kind == "hf" and isinstance(tok, HFTokenizer)
    assert tok.eot_id == 2 and tok.im_end_id is None and not model.config.tie_word_embeddings
    ids = tok.encode("hello world 从 前")
    assert ids == fast("hello world 从 前", add_special_tokens=False)["input_ids"]
    x = torch.tensor([[1] + ids])
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max().item() < 1e-5
    assert "<|im_start|>user" in tok.apply_chat_template([{"role": "user", "content": "hi"}], True)


def test_import_refuses_what_the_model_cannot_compute(hf_dir, tmp_path):
    def variant(name: str, **changes) -> Path:
        d = tmp_path / name
        shutil.copytree(hf_dir, d)
        conf = json.loads((d / "config.json").read_text())
        conf.update(changes)
        (d / "config.json").write_text(json.dumps(conf))
        return d

    with pytest.raises(HFImportError, match="rope_type 'longrope' is not supported"):
        load_hf_llama(variant("scaled", rope_scaling={"rope_type": "longrope", "factor": 2.0}))
    with pytest.raises(HFImportError, match="attention_bias"):
        load_hf_llama(variant("bias", attention_bias=True))
    with pytest.raises(HFImportError, match="only Llama"):
        load_hf_llama(variant("gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    with pytest.raises(HFImportError, match="hidden_act 'gelu'"):
        load_hf_llama(variant("gelu", hidden_act="gelu"))
    empty = variant("noweights")
    (empty / "model.safetensors").unlink()
    with pytest.raises(HFImportError, match="no weights"):
        load_hf_llama(empty)
    wrong = variant("wrongshape", num_hidden_layers=3)
    with pytest.raises(HFImportError, match="do not fit"):
        load_hf_llama(wrong)
