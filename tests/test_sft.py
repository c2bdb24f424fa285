"""SFT: the loss mask, the length rule, packing that keeps conversations apart, deterministic resumable batches,
full fine-tuning through the shared Trainer, and LoRA (step-0 identity, merge, peft format that loads onto
Hugging Face's LlamaForCausalLM)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xiaolm.cli import main
from xiaolm.model.llama import Llama, preset_config
from xiaolm.tokenizer.chat import encode_conversation
from xiaolm.train.dist import DistEnv
from xiaolm.train.sft import SFTBatches, encode_all, sft_loss, to_example

MULTI_TURN = [
    {"role": "system", "content": "你是一个会讲故事的助手。"},
    {"role": "user", "content": "讲一个关于小猫的故事。"},
    {"role": "assistant", "content": "从前有一只小猫，它很喜欢晒太阳。"},
    {"role": "user", "content": "后来呢？"},
    {"role": "assistant", "content": "后来它交到了一个好朋友。"},
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from xiaolm.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def _short_conversations(n: int, seed: int = 0) -> list[dict]:
    """Short two- and four-turn conversations made from built-in stories (cheap to train on)."""
    from xiaolm.data.synth import generate_stories

    out = []
    for i, rec in enumerate(generate_stories(n, seed)):
        story = rec["story_zh"]
        first, _, rest = story.partition("。")
        msgs = [{"role": "user", "content": "讲一个故事的开头。"}, {"role": "assistant", "content": first + "。"}]
        if i % 2:
            msgs += [{"role": "user", "content": "接着讲。"}, {"role": "assistant", "content": rest[:40]}]
        out.append({"messages": msgs})
    return out


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft_data") / "chat.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in _short_conversations(120)]
    lines.insert(5, "{not json")  # a malformed sample: reported, skipped, training goes on
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ loss mask


def test_loss_mask_is_exactly_the_assistant_tokens(tok):
    ids, mask = encode_conversation(tok, MULTI_TURN)
    full = tok.encode(tok.apply_chat_template(MULTI_TURN))
    # Token for token the chat template's encoding (without the final newline, which predicts nothing).
    assert ids == full[: len(ids)] and full[len(ids):] == tok.encode("\n")
    labelled = [t for t, m in zip(ids, mask) if m]
    want = tok.encode(MULTI_TURN[2]["content"]) + [tok.im_end_id] + tok.encode(MULTI_TURN[4]["content"]) + [tok.im_end_id]
    assert labelled == want
    # The prompt of each answer ends exactly where inference's generation prompt ends.
    prompt = tok.encode(tok.apply_chat_template(MULTI_TURN[:4], add_generation_prompt=True))
    assert ids[: len(prompt)] == prompt and mask[len(prompt)] and not mask[len(prompt) - 1]

    ex = to_example(ids, mask)
    assert len(ex) == len(ids) - 1
    where = np.flatnonzero(ex.targets != -100)
    assert ex.targets[where].tolist() == want
    assert all(ex.inputs[w + 1] == ex.targets[w] for w in where[:-1])  # shifted by one


def test_prompt_encoding_matches_full_encoding_on_real_samples(tok, shared_data):
    """Piecewise encoding equals encoding the whole rendered conversation (so training sees what inference sees)."""
    from xiaolm.data.formats import load_file

    convs, _ = load_file(shared_data / "medicalgpt" / "sharegpt_zh_1K_format.jsonl")
    for c in convs[:200]:
        if any("<|" in m["content"] for m in c.messages):
            continue
        ids, _ = encode_conversation(tok, c.messages)
        assert ids == tok.encode(tok.apply_chat_template(c.messages))[: len(ids)]


def test_overlong_conversations_truncated_or_dropped_and_counted(tok):
    short = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好呀"}]
    long_answer = [{"role": "user", "content": "讲故事"}, {"role": "assistant", "content": "小猫" * 80}]
    long_prompt = [{"role": "user", "content": "小猫" * 80}, {"role": "assistant", "content": "好"}]
    convs = [short, long_answer, long_prompt]
    examples, stats = encode_all(tok, convs, seq_len=40, overlong="truncate")
    assert stats.kept == 2 and stats.truncated == 1 and stats.dropped_overlong == 1  # no answer left in the third
    assert max(len(e) for e in examples) == 40
    examples, stats = encode_all(tok, convs, seq_len=40, overlong="drop")
    assert stats.kept == 1 and stats.dropped_overlong == 2 and stats.truncated == 0


# ------------------------------------------------------------------------------------------------ batching


def _examples(tok, n=40):
    return encode_all(tok, [r["messages"] for r in _short_conversations(n)], seq_len=128)[0]


def test_packing_keeps_attention_inside_each_conversation(tok):
    torch.manual_seed(0)
    model = Llama(preset_config("tiny", vocab_size=tok.vocab_size, max_position_embeddings=128)).eval()
    examples = _examples(tok, 6)
    batches = SFTBatches(examples[:3], seq_len=128, micro_batch=1, accum=1, env=DistEnv(), seed=0, packing=True,
                         pad_id=tok.pad_id)
    batch = batches.collate([[0, 1, 2]])
    with torch.no_grad():
        packed = model(batch["input_ids"], doc_ids=batch["doc_ids"]).logits[0]
        pos = 0
        for ex in examples[:3]:
            alone = model(torch.from_numpy(ex.inputs)[None]).logits[0]
            torch.testing.assert_close(packed[pos : pos + len(ex)], alone, atol=1e-5, rtol=1e-5)
            pos += len(ex)
        # and the packed loss is the label-weighted mean of the separate losses
        loss_sum, n, _ = sft_loss(model, batch)
        assert int(n) == sum(e.label_count for e in examples[:3])
        loss = loss_sum / n
        total = sum(model(torch.from_numpy(e.inputs)[None], targets=torch.from_numpy(e.targets)[None]).loss * e.label_count
                    for e in examples[:3])
        torch.testing.assert_close(loss, total / sum(e.label_count for e in examples[:3]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packing", [True, False])
def test_batches_cover_each_epoch_once_and_are_a_pure_function_of_the_step(tok, packing):
    examples = _examples(tok)

    def make(group=True):
        return SFTBatches(examples, seq_len=128, micro_batch=4, accum=2, env=DistEnv(), seed=5, packing=packing,
                          pad_id=tok.pad_id, group_by_length=group)

    b = make()
    units0 = b.layout(0)
    seen = sorted(i for u in units0 for i in u)
    assert seen == list(range(len(examples)))
    assert all(sum(len(examples[i]) for i in u) <= 128 for u in units0)
    assert b.layout(1) != units0  # a new order every epoch
    first = b(3, 1)
    again = make()(3, 1)  # a fresh object (as after --resume) gives the same batch
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["targets"], again["targets"])
    # padding share: what the collated batches really hold
    real = padded = 0
    for i in range(0, len(units0), 4):
        batch = b.collate(units0[i : i + 4])
        real += batch["num_tokens"]
        padded += batch["input_ids"].shape[1] * 4
    assert b.padding_share() == pytest.approx(1 - real / padded)
    assert b.padding_share() <= make(group=False).padding_share()  # grouping by length pads less
    if packing:
        assert len(units0) < len(examples)  # several conversations share a row


# ------------------------------------------------------------------------------------------------ full SFT CLI

FAST_SFT = ["--micro-batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "1",
            "--eval-conversations", "16", "--sample-prompts", "1", "--sample-tokens", "8", "--no-progress",
            "--no-tensorboard", "--heldout-fraction", "0.1"]


def _losses(run: Path) -> list[float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


def test_full_sft_run_dir_and_resume(tiny_run, chat_file, tmp_path, capsys):
    from xiaolm.model.io import load_model

    out = tmp_path / "sft"
    args = ["sft", str(tiny_run), "--data", str(chat_file), *FAST_SFT, "--max-steps", "8", "--eval-every", "4"]
    assert main([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{chat_file}:6: not valid JSON" in err  # the malformed line, reported with file and line
    for name in ("config.yaml", "metrics.jsonl", "report.md", "summary.json", "tokenizer/tokenizer.json",
                 "loss_curve.png"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train"]["kept"] > 90 and summary["data"]["heldout"]["kept"] > 0
    assert 0 <= summary["data"]["padding_share"] < 0.5 and summary["val_loss"] > 0
    assert summary["data"]["files"][0]["skipped"] == 1
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [4, 8] and all("val_loss" in e for e in evals)
    assert "padding share" in (out / "report.md").read_text()
    losses = _losses(out)
    assert losses[-1] < losses[0]
    model, tok, info = load_model(out)
    assert info.meta["kind"] == "sft" and tok.fingerprint == load_model(tiny_run)[1].fingerprint

    split = tmp_path / "split"
    assert main([*args, "--out", str(split), "--stop-at-step", "3"]) == 0
    assert main([*args, "--out", str(split), "--resume"]) == 0
    assert max(abs(a - b) for a, b in zip(_losses(out), _losses(split))) <= 1e-6
    assert len(_losses(split)) == 8


def test_bad_inputs_are_clear_errors(tiny_run, chat_file, tmp_path, capsys):
    assert main(["sft", str(tiny_run), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert main(["sft", str(tiny_run), "--data", str(chat_file), "--out", str(tmp_path / "o"),
                 "--seq-len", "4096"]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_starts_as_the_base_model_and_trains_only_adapters():
    from xiaolm.model.lora import merge_lora
    from xiaolm.train.lora import apply_lora, trainable_parameters

    torch.manual_seed(0)
    base = Llama(preset_config("tiny", vocab_size=300, max_position_embeddings=64)).eval()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        want = base(x).logits.clone()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        assert torch.equal(model(x).logits, want)  # B = 0 at step 0
    trainable = trainable_parameters(model)
    assert trainable and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        model(x, targets=x).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        adapted = model(x).logits.clone()
    assert not torch.allclose(adapted, want)
    merged = merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted, atol=1e-5, rtol=1e-5)
    # merging changed only the targeted matrices
    after = merged.state_dict()
    for k, v in before.items():
        changed = not torch.equal(after[k], v)
        assert changed == any(t in k for t in ("q_proj", "v_proj", "down_proj")), k
    with pytest.raises(ValueError, match="not linear layers"):
        apply_lora(Llama(preset_config("tiny", vocab_size=300)), target_modules=["qkv"])


def test_lora_sft_checkpoint_merge_and_hugging_face(tiny_run, chat_file, tmp_path):
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    from xiaolm.model.io import find_checkpoint, load_model
    from xiaolm.model.io import load_lora_checkpoint

    out = tmp_path / "lora"
    assert main(["sft", str(tiny_run), "--data", str(chat_file), *FAST_SFT, "--max-steps", "6", "--eval-every", "3",
                 "--lora", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.0", "--lr", "2e-2",
                 "--merge", "--out", str(out)]) == 0
    ckpt = find_checkpoint(out)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (ckpt / "adapter").iterdir()}
    meta = json.loads((ckpt / "meta.json").read_text())
    assert "adapter/adapter_model.safetensors" in meta["files"]  # sha256-checked like every checkpoint file
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == summary["lora"]["trainable_params"] < summary["params"] / 5

    # The frozen base weights in the checkpoint are the pretrained ones, bit for bit.
    base_model, tok, _ = load_model(tiny_run)
    base_sd = base_model.state_dict()
    saved = load_file(str(ckpt / "model.safetensors"))
    for k, v in saved.items():
        if ".lora_" in k:
            continue
        name = k.replace("base_model.model.", "").replace(".base_layer.", ".")
        assert torch.equal(v, base_sd[name]), name

    x = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": "讲一个故事的开头。"}],
                                                         add_generation_prompt=True))])
    adapter_model, _, _ = load_lora_checkpoint(ckpt, meta, merge=False)
    with torch.no_grad():
        want = adapter_model(x).logits
        assert not torch.allclose(want, base_model(x).logits, atol=1e-4)  # the adapter learned something
    merged, _, info = load_model(out)  # a LoRA RUNDIR loads as the merged plain model
    assert info.kind == "lora" and type(merged).__name__ == "Llama"
    merged_dir, _, _ = load_model(out / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(merged_dir(x).logits, want, atol=1e-4, rtol=1e-4)

    # peft's own format: the adapter loads onto a Hugging Face LlamaForCausalLM with the same base weights.
    cfg = base_model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False, mlp_bias=False,
    )).eval()
    hf.load_state_dict(base_sd, strict=False)
    hf.tie_weights()
    hf_lora = PeftModel.from_pretrained(hf, str(ckpt / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_lora(x).logits, want, atol=1e-4, rtol=1e-4)
