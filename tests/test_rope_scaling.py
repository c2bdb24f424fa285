"""RoPE scaling (linear, dynamic NTK, YaRN, llama3): our logits equal transformers' past the original context, the
Hugging Face export and import carry ``rope_scaling`` unchanged, and a bad setting is refused naming the field."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from xiaolm.model.hf import hf_config_dict, llama_config_from_hf
from xiaolm.model.llama import Llama, LlamaConfig

ORIGINAL = 32  # the context the tiny model was "pretrained" with
EXTENDED = 128

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


def _tiny(scaling: dict | None) -> Llama:
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=EXTENDED if scaling else ORIGINAL,
                      rope_theta=500.0, tie_word_embeddings=False,
                      rope_scaling=dict(scaling, original_max_position_embeddings=ORIGINAL) if scaling else None)
    torch.manual_seed(0)
    return Llama(cfg).eval()


def _to_transformers(model: Llama) -> transformers.LlamaForCausalLM:
    conf = hf_config_dict(model.config, "float32", 0, 0, 0)
    conf = {k: v for k, v in conf.items() if k not in ("architectures", "model_type", "transformers_version",
                                                       "torch_dtype", "dtype")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**json.loads(json.dumps(conf)))).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return hf


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_logits_equal_transformers_beyond_the_original_context(kind):
    model = _tiny(SCALINGS[kind])
    hf = _to_transformers(model)
    x = torch.randint(0, 97, (2, EXTENDED))
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    # the comparison means something: the scaled model differs from the unscaled one past the original context
    plain = _tiny(None)
    plain.config.max_position_embeddings = EXTENDED
    with torch.no_grad():
        unscaled = plain(x).logits
    assert (ours[:, ORIGINAL:] - unscaled[:, ORIGINAL:]).abs().max().item() > 1e-3


def test_dynamic_ntk_is_plain_rope_within_the_original_context():
    model, plain = _tiny(SCALINGS["dynamic"]), _tiny(None)
    x = torch.randint(0, 97, (1, ORIGINAL))
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain(x).logits)


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_hf_config_round_trip(kind):
    cfg = _tiny(SCALINGS[kind]).config
    conf = json.loads(json.dumps(hf_config_dict(cfg, "float32", 0, 0, 0)))
    back = llama_config_from_hf(conf)
    assert back.rope_scaling == cfg.rope_scaling
    assert back.max_position_embeddings == cfg.max_position_embeddings
    if kind == "dynamic":  # transformers reads max_position_embeddings as the original context for dynamic NTK
        assert conf["max_position_embeddings"] == ORIGINAL


@pytest.mark.parametrize("bad, field", [
    ({"rope_type": "yarn", "factor": 0.5}, "factor"),
    ({"rope_type": "yarn", "factor": float("nan")}, "factor"),
    ({"rope_type": "ntk-by-parts", "factor": 2.0}, "rope_type"),
    ({"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}, "high_freq_factor"),
])
def test_bad_scaling_is_refused_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        LlamaConfig(rope_scaling=bad)


def test_yarn_tempers_attention_and_keeps_high_frequencies():
    from xiaolm.model.rope import base_inv_freq, normalize_rope_scaling, scaled_inv_freq

    s = normalize_rope_scaling({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}, 1024)
    inv, attention = scaled_inv_freq(64, 10000.0, s)
    base = base_inv_freq(64, 10000.0)
    assert attention == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    # dimensions that turn more than beta_fast (32) times over the original context are kept (extrapolated): here
    # only the first (64 * ln(256 / (32 * 2 pi)) / (2 ln 10000) = 0.84 -> 0); those turning less than beta_slow (1)
    # times are interpolated by the factor: from ceil(12.9) = 13 on; a linear ramp in between
    assert inv[0] == base[0]
    assert torch.allclose(inv[13:], base[13:] / 4)
    assert ((inv[1:13] < base[1:13]) & (inv[1:13] > base[1:13] / 4)).all()
