"""The model equals Hugging Face Llama weight for weight, and its fast paths equal its plain paths."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xiaolm.infer.cache import new_cache
from xiaolm.model.llama import (
    PRESETS,
    Llama,
    LlamaConfig,
    count_parameters,
    doc_ids_from_tokens,
    positions_from_docs,
    preset_config,
)
from xiaolm.model.losses import chunked_cross_entropy


def _hf_twin(model: Llama):
    transformers = pytest.importorskip("transformers")
    cfg = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False,
        mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


@pytest.mark.parametrize("tied,kv", [(True, 2), (False, 4), (True, 1)])
def test_logits_equal_hugging_face_llama(tied, kv):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=96,
                      rope_theta=5000.0, tie_word_embeddings=tied)
    model = Llama(cfg).eval()
    # Parameter names are Hugging Face's exactly.
    hf = _hf_twin(model)
    assert set(model.state_dict()) == set(hf.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 50))
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-5


def test_left_padding_matches_hugging_face():
    torch.manual_seed(1)
    model = Llama(preset_config("tiny", vocab_size=300, max_position_embeddings=64)).eval()
    hf = _hf_twin(model)
    x = torch.randint(1, 300, (3, 20))
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    mask[2, :11] = 0
    with torch.no_grad():
        ours = model(x, attention_mask=mask).logits
        theirs = hf(x, attention_mask=mask).logits
    assert torch.isfinite(ours).all()
    assert (ours - theirs)[mask.bool()].abs().max().item() < 1e-5


def test_kv_cache_equals_full_forward():
    torch.manual_seed(2)
    model = Llama(preset_config("tiny", vocab_size=200, max_position_embeddings=64)).eval()
    x = torch.randint(0, 200, (2, 30))
    with torch.no_grad():
        full = model(x).logits
        cache = new_cache(model, 2, 40)
        parts = [model(x[:, :17], cache=cache).logits]
        for t in range(17, 30):  # one token at a time, as in decoding
            parts.append(model(x[:, t : t + 1], cache=cache).logits)
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def test_document_mask_equals_separate_documents():
    torch.manual_seed(3)
    model = Llama(preset_config("tiny", vocab_size=100, max_position_embeddings=64)).eval()
    eot = 0
    a = torch.randint(1, 100, (7,)).tolist() + [eot]
    b = torch.randint(1, 100, (9,)).tolist() + [eot]
    packed = torch.tensor([a + b])
    doc_ids = doc_ids_from_tokens(packed, eot)
    assert doc_ids.tolist() == [[0] * 8 + [1] * 10]
    assert positions_from_docs(doc_ids).tolist() == [list(range(8)) + list(range(10))]
    with torch.no_grad():
        joint = model(packed, doc_ids=doc_ids).logits[0]
        sep_a = model(torch.tensor([a])).logits[0]
        sep_b = model(torch.tensor([b])).logits[0]
    assert (joint[:8] - sep_a).abs().max() < 1e-5
    assert (joint[8:] - sep_b).abs().max() < 1e-5


def test_chunked_cross_entropy_equals_plain_loss_and_gradients():
    torch.manual_seed(4)
    h = torch.randn(2, 37, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    t = torch.randint(0, 300, (2, 37))
    t[0, :5] = -100
    loss = chunked_cross_entropy(h, w, t, chunk_size=10)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy((h @ w.T).flatten(0, 1), t.flatten(), ignore_index=-100)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert (gh - h.grad).abs().max() < 1e-5
    assert (gw - w.grad).abs().max() < 1e-5


def test_model_chunked_loss_path_equals_plain_path():
    torch.manual_seed(5)
    cfg = preset_config("tiny", vocab_size=500, max_position_embeddings=64)
    a, b = Llama(cfg), Llama(cfg)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 500, (3, 24))
    y = torch.randint(0, 500, (3, 24))
    la = a(x, targets=y).loss
    lb = b(x, targets=y, loss_chunk_size=16).loss
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) < 1e-5
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad - pb.grad).abs().max() < 1e-5, name


def test_presets_shapes_and_counts():
    for name in PRESETS:
        cfg = preset_config(name, vocab_size=8192)
        n = count_parameters(cfg)
        model_params = sum(p.numel() for p in Llama(cfg).parameters()) if cfg.hidden_size <= 512 else None
        if model_params is not None:
            assert model_params == n["total"], name
        if name in ("58m", "microstories", "134m", "256m"):  # GPU presets: tile-aligned matmuls
            assert cfg.hidden_size % 256 == 0 and cfg.intermediate_size % 256 == 0, name
    assert preset_config("9m").hidden_size == 64 and preset_config("9m").num_key_value_heads == 4
    assert preset_config("134m").num_hidden_layers == 12
    # With an 8k vocabulary the embedding stays a minority of a 58m-preset model.
    n = count_parameters(preset_config("58m", vocab_size=8192))
    assert n["embedding"] / n["total"] < 0.2


def test_presets_cli_prints_every_preset(capsys):
    from xiaolm.cli import main

    assert main(["presets", "--vocab-size", "8192"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="multiple"):
        LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("7b")


def test_static_cache_equals_dynamic_cache_with_padding():
    """The fixed-shape cache (for compiled / CUDA-graph decoding) computes what the growing cache computes."""
    torch.manual_seed(6)
    model = Llama(preset_config("tiny", vocab_size=150, max_position_embeddings=64)).eval()
    x = torch.randint(1, 150, (3, 12))
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    steps = torch.randint(1, 150, (3, 6))
    outs = {}
    with torch.no_grad():
        for static in (False, True):
            cache = new_cache(model, 3, 20, static=static)
            logits = [model(x, attention_mask=mask, cache=cache).logits]
            for t in range(steps.shape[1]):
                logits.append(model(steps[:, t : t + 1], attention_mask=torch.ones(3, 1, dtype=torch.long),
                                    cache=cache).logits)
            outs[static] = torch.cat(logits, 1)
    real = torch.cat([mask, torch.ones(3, 6, dtype=torch.long)], 1).bool()
    assert (outs[True] - outs[False])[real].abs().max() < 1e-5


def test_flex_attention_document_mask_equals_sdpa_mask():
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(7)
    model = Llama(preset_config("tiny", vocab_size=100, max_position_embeddings=64)).eval()
    x = torch.randint(1, 100, (2, 32))
    x[0, 9] = x[0, 20] = x[1, 14] = 0
    doc_ids = doc_ids_from_tokens(x, 0)
    with torch.no_grad():
        plain = model(x, doc_ids=doc_ids).logits
        model.attn_impl = "flex"
        flex = model(x, doc_ids=doc_ids).logits
    assert (plain - flex).abs().max() < 1e-5


def test_compiled_model_equals_eager_loss_and_gradients():
    """torch.compile (the GPU training path) computes what eager mode computes; checked on CPU with inductor."""
    torch.manual_seed(9)
    cfg = preset_config("tiny", vocab_size=128, max_position_embeddings=32)
    a, b = Llama(cfg), Llama(cfg)
    b.load_state_dict(a.state_dict())
    compiled = torch.compile(b)
    x = torch.randint(0, 128, (2, 16))
    y = torch.randint(0, 128, (2, 16))
    la = a(x, targets=y, loss_chunk_size=8).loss
    lb = compiled(x, targets=y, loss_chunk_size=8).loss
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) < 1e-5
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad - pb.grad).abs().max() < 1e-4, name
