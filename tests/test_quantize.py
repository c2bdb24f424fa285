"""Weight-only int8 / int4 quantisation: the arithmetic, the files, and a QDIR that works wherever a RUNDIR does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xiaolm.cli import main
from xiaolm.infer.quantize import parameter_bytes
from xiaolm.model.io import find_checkpoint, load_model, load_quantized
from xiaolm.model.quant import (
    QuantLinear,
    QuantizedLlama,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

TEXT = "从前，有一个小女孩叫莉莉。她喜欢在花园里玩。有一天，她看到一只小猫。"


def test_int8_is_symmetric_per_output_channel():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.logspace(-3, 0, 48)[:, None]  # rows of very different scale
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    assert (q.abs().amax(1) == 127).all()  # every row uses its full range
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()  # at most half a step, in each row's own units
    zero_q, zero_s = quantize_int8(torch.zeros(2, 8))
    assert (zero_q == 0).all() and torch.isfinite(zero_s).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_groups_pack_two_per_byte(group):
    torch.manual_seed(1)
    w = torch.randn(24, 256)
    packed, s = quantize_int4(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 128) and s.shape == (24, 256 // group)
    assert s.dtype == torch.float16
    codes = unpack_int4(packed)
    assert codes.shape == (24, 256) and codes.max() <= 15
    deq = dequantize_int4(packed, s, group)
    groups = w.view(24, -1, group)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))
    assert torch.allclose(deq.view(24, -1, group).gather(-1, groups.abs().argmax(-1, keepdim=True)), extreme,
                          rtol=1e-3)  # the largest value of a group is represented (code -8), Q4_0-style
    rel = ((deq - w).pow(2).mean() / w.pow(2).mean()).sqrt()
    assert rel < 0.12
    # packing order: low nibble = even column
    manual = torch.tensor([[3, 12, 0, 15]], dtype=torch.uint8)
    assert torch.equal(unpack_int4(manual[:, 0::2] | (manual[:, 1::2] << 4)), manual)


def test_quant_linear_matches_dequantised_matmul_and_aten_kernel():
    torch.manual_seed(2)
    x = torch.randn(3, 5, 64)
    for bits in (8, 4):
        w = torch.randn(96, 64)
        q, s = quantize_int8(w) if bits == 8 else quantize_int4(w, 32)
        layer = QuantLinear(q, s, bits, 32 if bits == 4 else 64, 64)
        ref = x @ layer.dequantize().T
        assert torch.allclose(layer(x), ref, atol=1e-5)
        assert torch.allclose(layer.weight, layer.dequantize())
        fast = QuantLinear(q.clone(), s.clone(), bits, 32 if bits == 4 else 64, 64, compute_dtype=torch.bfloat16,
                           kernel="aten")
        out = fast(x.bfloat16()).float()
        assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.fixture(scope="module")
def qdirs(tiny_run, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("quant")
    dirs = {8: root / "int8", 4: root / "int4"}
    assert main(["quantize", str(tiny_run), "--bits", "8", "--out", str(dirs[8])]) == 0
    assert main(["quantize", str(tiny_run), "--bits", "4", "--group-size", "32", "--out", str(dirs[4])]) == 0
    return dirs


def test_qdir_layout_sizes_and_logits(qdirs, tiny_run):
    model, tok, _ = load_model(tiny_run)
    float_file = (find_checkpoint(tiny_run) / "model.safetensors").stat().st_size
    ids = torch.tensor([[tok.eot_id] + tok.encode(TEXT)])
    with torch.no_grad():
        ref = model(ids).logits
    errors = {}
    for bits, qdir in qdirs.items():
        assert {"model.safetensors", "model_config.json", "quantization.json", "tokenizer", "config.yaml"} <= {
            p.name for p in qdir.iterdir()}
        assert not (qdir / "config.json").exists()  # would make load_model take it for a Hugging Face directory
        qconf = json.loads((qdir / "quantization.json").read_text())
        assert qconf["bits"] == bits and qconf["weight_only"] and qconf["method"]
        assert qconf["group_size"] == (32 if bits == 4 else None)
        assert qconf["linear_compression"] > (3.8 if bits == 8 else 6.9)  # ~4x / ~7x for the linear weights
        assert (qdir / "model.safetensors").stat().st_size < float_file / (2.5 if bits == 8 else 3.0)
        qmodel, qtok, info = load_model(qdir)
        assert info.kind == "quantized" and isinstance(qmodel, QuantizedLlama)
        assert qtok.fingerprint == tok.fingerprint
        assert parameter_bytes(qmodel) < parameter_bytes(model) / 2.5
        with torch.no_grad():
            out = qmodel(ids).logits
        errors[bits] = ((out - ref).abs().mean() / ref.std()).item()
        agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        assert agree >= (0.95 if bits == 8 else 0.8), (bits, agree)
    assert errors[8] < 0.01  # int8: very close
    assert errors[8] < errors[4] < 0.1  # int4: reasonably close


def test_qdir_decodes_with_cache_like_without(qdirs):
    from xiaolm.infer.generate import generate_ids

    qmodel, tok, _ = load_quantized(qdirs[4])
    prompt = [tok.eot_id] + tok.encode("有一天，小猫")
    with_cache = generate_ids(qmodel, [prompt], 12, pad_id=tok.pad_id, temperature=0)
    without = generate_ids(qmodel, [prompt], 12, pad_id=tok.pad_id, temperature=0, use_cache=False)
    assert with_cache == without


def test_qdir_works_with_generate_and_eval_ppl(qdirs, tiny_run, shards_dir, tmp_path, capsys):
    assert main(["generate", str(qdirs[8]), "--prompt", "有一天，", "--max-new-tokens", "8", "--temperature", "0",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("有一天，")
    results = {}
    for name, path in (("float", tiny_run), ("int8", qdirs[8]), ("int4", qdirs[4])):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "ppl", str(path), "--data", str(shards_dir), "--max-tokens", "4096", "--device", "cpu",
                     "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())["bits_per_char"]
    assert abs(results["int8"] / results["float"] - 1) < 0.01
    assert abs(results["int4"] / results["float"] - 1) < 0.05


def test_bad_requests_are_clear(tiny_run, qdirs, tmp_path, capsys):
    assert main(["quantize", str(tiny_run), "--bits", "4", "--group-size", "48", "--out", str(tmp_path / "x")]) == 2
    assert "group-size 48" in capsys.readouterr().err
    assert main(["quantize", str(qdirs[8]), "--bits", "4", "--out", str(tmp_path / "y")]) == 2
    assert "already quantised" in capsys.readouterr().err


def test_quantize_out_follows_the_export_rules(tiny_run, qdirs, tmp_path, capsys):
    """--out never the source run (its config.yaml would be replaced and its resume broken), never a run directory,
    never a foreign non-empty directory; an earlier QDIR only with --overwrite."""
    import hashlib

    def tree(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    def refused(out, *extra) -> str:
        assert main(["quantize", str(tiny_run), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("xiaolm: error: ") and err.count("\n") == 1 and "Traceback" not in err
        return err

    before = tree(tiny_run)
    assert "the run being quantised" in refused(tiny_run)
    assert "run directory" in refused(tiny_run / "checkpoints" / "q")
    assert tree(tiny_run) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert "not an earlier quantised directory" in refused(mine, "--overwrite")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert "--overwrite" in refused(qdirs[8])
    again = tmp_path / "again"
    assert main(["quantize", str(tiny_run), "--out", str(again)]) == 0
    (again / "model.safetensors").write_bytes(b"stale")
    assert main(["quantize", str(tiny_run), "--out", str(again), "--overwrite"]) == 0
    load_model(again)  # the stale weights were replaced
    capsys.readouterr()
    assert "--embedding-bits 3" in refused(tmp_path / "e", "--embedding-bits", "3")
    assert not (tmp_path / "e").exists()


def test_torchao_int8_backend_agrees():
    pytest.importorskip("torchao")
    torch.manual_seed(3)
    w = torch.randn(64, 128)
    q, s = quantize_int8(w)
    ours = QuantLinear(q, s, 8, 128, 128)
    theirs = QuantLinear(q, s, 8, 128, 128, kernel="torchao")
    x = torch.randn(4, 128)
    assert torch.allclose(ours(x), theirs(x), atol=1e-4)


def test_a_qdir_whose_tokenizer_was_edited_is_one_line(qdirs, tmp_path, capsys):
    """tokenizer.json changed under the fingerprint xiaolm_tokenizer.json records: a one-line error naming the
    directory (as for a run), not a traceback."""
    import shutil

    q = tmp_path / "q8"
    shutil.copytree(qdirs[8], q)
    data = json.loads((q / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (q / "tokenizer" / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    assert main(["generate", str(q), "--prompt", "有一天，", "--max-new-tokens", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(q / "tokenizer") in lines[0] and "edited after training" in lines[0], lines
