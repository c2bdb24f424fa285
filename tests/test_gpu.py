"""Every CUDA-only path against the plain path it replaces.

Each test takes a ``device``: the ``cuda`` case is marked ``gpu`` (skipped without CUDA by the hook in conftest.py,
run by ``bench/gpu_proof.sh`` where a GPU is at hand); the ``cpu`` case, where CPU can run the same logic
(inductor compile, bf16 autocast, gloo FSDP2), runs in the default suite. The last test checks that every ``gpu``
test is collected and skipped cleanly without CUDA, and that the list covers every path the GPU proof promises.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from xiaolm.infer.generate import generate_ids
from xiaolm.model.llama import Llama, LlamaConfig

REPO = Path(__file__).resolve().parents[1]
CUDA = pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")
CPU = pytest.param("cpu", id="cpu")


def tiny_config(vocab: int = 256, layers: int = 2, kv: int = 2, max_pos: int = 256) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=max_pos)


def tiny_model(device: str, seed: int = 0, **kw) -> Llama:
    torch.manual_seed(seed)
    return Llama(tiny_config(**kw)).to(device)


def rows(batch: int, seq: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))


def grads(model) -> dict:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return bool((a.float() - b.float()).norm() <= rel * b.float().norm() + 1e-6)


# --------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("device", [CUDA])
def test_compiled_step_equals_eager_loss_and_gradients(device):
    """torch.compile + bf16 autocast (the GPU training step) == eager under the same autocast; the CPU case is
    test_model.py::test_compiled_model_equals_eager_loss_and_gradients."""
    a, b = tiny_model(device), tiny_model(device)
    x = rows(4, 128).to(device)
    compiled = torch.compile(b)
    with torch.autocast(device, dtype=torch.bfloat16):
        la = a(x[:, :-1], targets=x[:, 1:]).loss
        lb = compiled(x[:, :-1], targets=x[:, 1:]).loss
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) < 2e-2 * la.item()
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert close(gb[n], ga[n], 0.05), n


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_flex_document_mask_equals_dense_sdpa_mask_forward_and_backward(device):
    """FlexAttention's block mask for packed documents == the dense boolean mask through SDPA (GQA included)."""
    a, b = tiny_model(device), tiny_model(device)
    a.attn_impl, b.attn_impl = "sdpa", "flex"  # the dense reference vs the block mask
    T = 128 if device == "cuda" else 64
    x = rows(2, T).to(device)
    doc_ids = torch.cumsum((torch.rand(2, T, generator=torch.Generator().manual_seed(1)) < 0.05).long(), 1)
    doc_ids = doc_ids.to(device)
    backward = device == "cuda"      # FlexAttention has no CPU backward (pretrain refuses flex off CUDA)
    out = []
    for m in (a, b):
        with torch.set_grad_enabled(backward):
            loss = m(x[:, :-1], targets=x[:, 1:], doc_ids=doc_ids).loss
        if backward:
            loss.backward()
        out.append((loss.detach(), grads(m)))
    (la, ga), (lb, gb) = out
    tol = 1e-4 if device == "cpu" else 2e-3        # the fused GPU kernel may sum in another order / use TF32
    assert abs(la.item() - lb.item()) < tol * la.item()
    assert ga.keys() == gb.keys()
    for n in ga:
        assert close(gb[n], ga[n], 10 * tol), n


@pytest.mark.parametrize("device", [CUDA])
def test_compiled_flex_document_mask_training_step_equals_eager_dense(device):
    """pretrain --compile --doc-mask --attn-impl flex: the block mask is built inside the compiled forward."""
    a, b = tiny_model(device), tiny_model(device)
    a.attn_impl, b.attn_impl = "sdpa", "auto"  # auto picks FlexAttention on CUDA
    compiled = torch.compile(b)
    x = rows(2, 256).to(device)
    doc_ids = torch.cumsum((torch.rand(2, 256, generator=torch.Generator().manual_seed(2)) < 0.03).long(), 1).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        la = a(x[:, :-1], targets=x[:, 1:], doc_ids=doc_ids).loss
        lb = compiled(x[:, :-1], targets=x[:, 1:], doc_ids=doc_ids).loss
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) < 2e-2 * la.item()
    ga, gb = grads(a), grads(b)
    for n in ga:
        assert close(gb[n], ga[n], 0.05), n


@pytest.mark.parametrize("device", [CUDA])
def test_auto_attention_uses_one_block_mask_and_equals_dense_under_bf16(device, monkeypatch):
    """attn_impl auto on CUDA (the default): document masks go to FlexAttention through its compiled kernel (the
    eager evaluation path), one block mask per forward, q/k/v in one dtype under bf16 autocast; equal to the dense
    SDPA reference forward and backward. Two batch shapes: the second compiles once more, the first is reused."""
    import xiaolm.model.llama as llama

    built = []
    real = llama.document_block_mask
    monkeypatch.setattr(llama, "document_block_mask", lambda d: built.append(d) or real(d))
    a, b = tiny_model(device), tiny_model(device)
    a.attn_impl = "sdpa"
    for batch in (2, 3, 2):
        x = rows(batch, 128, seed=batch).to(device)
        doc_ids = torch.cumsum((torch.rand(batch, 128, generator=torch.Generator().manual_seed(3)) < 0.05).long(),
                               1).to(device)
        for m in (a, b):
            m.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            la = a(x[:, :-1], targets=x[:, 1:], doc_ids=doc_ids).loss
            lb = b(x[:, :-1], targets=x[:, 1:], doc_ids=doc_ids).loss
        la.backward()
        lb.backward()
        assert abs(la.item() - lb.item()) < 2e-2 * la.item()
        ga, gb = grads(a), grads(b)
        for n in ga:
            assert close(gb[n], ga[n], 0.05), n
    assert len(built) == 3          # b's three forwards; a (sdpa) builds none


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_chunked_linear_cross_entropy_equals_plain(device):
    a, b = tiny_model(device), tiny_model(device)
    x = rows(4, 64).to(device)
    targets = x[:, 1:].clone()
    targets[:, :5] = -100
    dtype = torch.bfloat16
    with torch.autocast(device, dtype=dtype):
        la = a(x[:, :-1], targets=targets).loss
        lb = b(x[:, :-1], targets=targets, loss_chunk_size=48).loss
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) < 1e-2 * la.item()
    ga, gb = grads(a), grads(b)
    for n in ga:
        assert close(gb[n], ga[n], 0.03), n


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_fused_adamw_equals_unfused_and_found_inf_skips_the_step(device):
    """The Trainer's fused AdamW (with ``found_inf`` set to skip a bad step without a host sync) == plain AdamW."""
    models = [tiny_model(device) for _ in range(3)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=f, foreach=False if not f else None)
            for m, f in zip(models, (False, True, True))]
    for step in range(3):
        x = rows(2, 32, seed=step).to(device)
        for m, opt in zip(models, opts):
            m(x[:, :-1], targets=x[:, 1:]).loss.backward()
        opts[0].step()
        opts[1].found_inf = torch.zeros((), device=device)
        opts[1].step()
        before = [p.detach().clone() for p in models[2].parameters()]
        opts[2].found_inf = torch.ones((), device=device)   # a non-finite step: the update must be skipped
        opts[2].step()
        assert all(torch.equal(p, q) for p, q in zip(models[2].parameters(), before))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_fsdp2_one_process_step_equals_plain_step_and_saves_full_weights(device, tmp_path):
    """The Trainer's FSDP2 path (fully_shard per layer, full state dict for checkpoints) on a one-rank group gives
    the weights a plain run gives, and its checkpoint holds the full (unsharded) tensors."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from xiaolm.train.engine import TrainConfig, Trainer
    from xiaolm.train.pretrain import lm_loss

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        data = [rows(2, 32, seed=s) for s in range(3)]

        def batch_fn(step, micro):
            return {"input_ids": data[step][:, :-1], "targets": data[step][:, 1:]}

        weights = []
        for fsdp in (False, True):
            cfg = TrainConfig(max_steps=3, micro_batch_size=2, lr=1e-2, warmup_steps=0, device=device,
                              precision="fp32", fsdp=fsdp, progress=False, tensorboard=False, prefetch=0,
                              log_every=1, keep_last=1)
            env = types.SimpleNamespace(rank=0, world_size=1, local_rank=0, device=device, distributed=fsdp,
                                        is_main=True)
            run = tmp_path / f"fsdp{int(fsdp)}"
            trainer = Trainer(cfg, tiny_model(device), run, total_steps=3, dist_env=env)
            trainer.fit(batch_fn, lm_loss)
            ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
            weights.append(load_file(str(ckpt / "model.safetensors")))
        plain, sharded = weights
        assert plain.keys() == sharded.keys()
        for k in plain:
            assert plain[k].shape == sharded[k].shape, k
            assert torch.allclose(plain[k], sharded[k], atol=1e-5, rtol=1e-4), k
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("device", [CUDA])
def test_cuda_graph_greedy_decode_equals_dynamic_cache(device, batch):
    """The compiled static-cache step (CUDA graphs, mode="reduce-overhead") decodes the same greedy tokens as the
    dynamic cache, really runs as a CUDA graph (no "skipping cudagraphs"), and a second call with another prompt
    length reuses the graph."""
    from torch._dynamo.utils import counters

    model = tiny_model(device, max_pos=512).to(torch.bfloat16).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8)      # sharper logits: no bf16 near-ties between the two paths
    counters.clear()
    for length in (16, 23):
        prompts = rows(batch, length - 1, seed=length).tolist()
        kw = dict(pad_id=0, eos_ids=[], temperature=0.0)
        with torch.no_grad():
            want = generate_ids(model, prompts, 48, **kw)
            got = generate_ids(model, prompts, 48, compile_step=True, **kw)
        same = sum(a == b for a, b in zip(got, want)) / batch
        assert same >= 0.9, same        # bf16: a near-tie may flip a row
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


def test_compiled_decode_reuses_its_cache_across_prompt_lengths(monkeypatch):
    """CPU: the compiled static step == eager decoding, and two prompt lengths in one power-of-two bucket share
    one cache (same tensors, so one CUDA graph on a GPU) and one dynamo graph. Dynamo traces for real; the
    "eager" backend skips inductor's code generation, which takes minutes on 2 busy cores."""
    from torch._dynamo.utils import counters

    from xiaolm.infer import generate as gen

    real_compile = torch.compile
    monkeypatch.setattr(gen.torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager",
                                                                            dynamic=kw.get("dynamic")))
    model = tiny_model("cpu", max_pos=256).eval()
    counters.clear()
    caches = []
    for length in (10, 17):
        prompts = [rows(1, length, seed=length)[0].tolist(), rows(1, length - 3, seed=1)[0].tolist()]
        kw = dict(pad_id=0, eos_ids=[], temperature=0.0)
        with torch.no_grad():
            want = generate_ids(model, prompts, 12, **kw)
            got = generate_ids(model, prompts, 12, compile_step=True, **kw)
        assert got == want
        caches.append(dict(gen._decode_state(model)["caches"]))
    assert len(caches[1]) == 1 and list(caches[0].values())[0] is list(caches[1].values())[0]
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])   # the step, not one per length


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("device", [CUDA])
def test_quantized_generate_runs(device, bits, tiny_run, tmp_path):
    from xiaolm.infer.quantize import quantize_run
    from xiaolm.model.io import load_quantized

    quantize_run(tiny_run, tmp_path / "q", bits=bits, group_size=64)
    model, tokenizer, _ = load_quantized(tmp_path / "q", device=device)
    ids = tokenizer.encode("从前，有一个小女孩")
    out = generate_ids(model, [ids, ids[:3]], 16, pad_id=tokenizer.pad_id, eos_ids=[], temperature=0.0)
    assert [len(o) for o in out] == [16, 16]
    assert all(0 <= t < model.config.vocab_size for o in out for t in o)


# ---------------------------------------------------------------------------------- SFT / DPO / GRPO, serve


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory, stories_file):
    from xiaolm.cli import main

    out = tmp_path_factory.mktemp("gpu_instruct")
    assert main(["data", "instruct", str(stories_file), "--out", str(out), "--limit", "60",
                 "--heldout-fraction", "0.2"]) == 0
    return out


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_sft_dpo_grpo_steps_run_under_bf16_autocast(device, tiny_run, instruct_dir, tmp_path):
    from xiaolm.cli import main
    from xiaolm.utils import read_jsonl, write_jsonl

    common = ["--device", device, "--precision", "bf16", "--no-progress", "--no-tensorboard", "--log-every", "1"]
    sft = tmp_path / "sft"
    assert main(["sft", str(tiny_run), "--data", str(instruct_dir / "train.jsonl"), "--out", str(sft),
                 "--max-steps", "2", "--micro-batch-size", "4", "--eval-conversations", "4", "--sample-prompts", "1",
                 "--sample-tokens", "4", *common]) == 0
    pairs = tmp_path / "pairs.jsonl"
    recs = [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1]["content"][:30], "rejected": "小猫" * 10}
            for r in list(read_jsonl(instruct_dir / "train.jsonl"))[:8]]
    write_jsonl(pairs, recs)
    assert main(["dpo", str(sft), "--data", str(pairs), "--out", str(tmp_path / "dpo"), "--max-steps", "2",
                 "--micro-batch-size", "4", *common]) == 0
    assert main(["grpo", str(sft), "--prompts", str(instruct_dir), "--out", str(tmp_path / "grpo"),
                 "--group-size", "2", "--prompts-per-step", "2", "--micro-batch-size", "4", "--max-new-tokens", "8",
                 "--max-steps", "2", *common]) == 0
    for run in ("sft", "dpo", "grpo"):
        train = [r for r in read_jsonl(tmp_path / run / "metrics.jsonl") if r.get("kind") == "train"]
        assert len(train) == 2 and all(r["loss"] == r["loss"] for r in train), (run, train)   # finite


@pytest.mark.parametrize("device", [CUDA])
def test_serve_streams_a_chat_completion_on_cuda(device, tiny_run):
    pytest.importorskip("fastapi")
    import json

    from fastapi.testclient import TestClient

    from xiaolm.serve.app import create_app
    from xiaolm.model.io import load_model

    model, tokenizer, _ = load_model(tiny_run, device=device)
    assert model.device.type == "cuda"
    req = {"model": "m", "messages": [{"role": "user", "content": "讲一个故事。"}], "temperature": 0,
           "max_tokens": 16, "stream": True}
    with TestClient(create_app(model=model, tokenizer=tokenizer, model_name="m", max_batch=4)) as client:
        with client.stream("POST", "/v1/chat/completions", json=req) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]
                   if json.loads(e)["choices"])
    assert text


def test_rotary_frequencies_stay_float32_when_the_model_is_cast_to_bf16():
    """GPU serving casts the weights to bfloat16; the RoPE frequencies must not follow (``model.to`` on CPU does
    the same cast, so this runs here)."""
    model = tiny_model("cpu", max_pos=1024)
    positions = torch.arange(1000)[None]
    want_cos, want_sin = model.model.rotary_emb(positions, torch.float32)
    model = model.to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    cos, sin = model.model.rotary_emb(positions, torch.float32)
    assert torch.allclose(cos, want_cos, atol=1e-5) and torch.allclose(sin, want_sin, atol=1e-5)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ MFU table


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA GeForce RTX 4090", 165),
    ("NVIDIA GeForce RTX 3090", 71), ("NVIDIA L4", 121), ("NVIDIA L40S", 362),
])
def test_peak_flops_table_names_the_cards(monkeypatch, name, tflops):
    from xiaolm.train import dist

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
    assert dist.device_peak_flops("cuda") == pytest.approx(tflops * 1e12)
    assert dist.device_peak_flops("cpu") is None


# --------------------------------------------------------------------------------- the gpu tests themselves


# the CUDA paths bench/gpu_proof.sh promises to test: each must have a gpu-marked test here
PROMISED = ("compiled_step", "flex_document_mask", "auto_attention", "chunked_linear_cross_entropy", "fused_adamw",
            "cuda_graph_greedy", "quantized_generate", "fsdp2", "sft_dpo_grpo", "serve_streams")


def test_every_gpu_test_is_collected_and_skips_cleanly_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO / "src"))
    ran = subprocess.run([sys.executable, "-m", "pytest", "-v", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                          str(REPO / "tests" / "test_gpu.py")], capture_output=True, text=True, env=env, cwd=REPO)
    out = ran.stdout + ran.stderr
    assert ran.returncode == 0, out
    lines = ran.stdout.splitlines()
    ids = [ln.split()[0] for ln in lines if "::" in ln and " SKIPPED" in ln]
    reasons = [ln for ln in lines if ln.startswith("SKIPPED [")]
    assert ids and reasons and all("gpu: needs a CUDA device" in ln for ln in reasons), out
    assert sum(int(ln.split("[")[1].split("]")[0]) for ln in reasons) == len(ids), out
    assert f"{len(ids)} skipped" in ran.stdout and "passed" not in ran.stdout and "error" not in out.lower(), out
    for path in PROMISED:
        assert any(path in i and "cuda" in i for i in ids), (path, ids)
