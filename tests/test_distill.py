"""Distillation (issue 25): the loss and its gradients, offline top-k teacher logits (round trip, refusals), resume
with a teacher, and a run that brings the student closer to its teacher."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from xiaolm.cli import main
from xiaolm.model.losses import distillation_sums, kl_to_teacher, kl_to_teacher_topk

from conftest import TINY_PRETRAIN

QUIET = ["--no-progress", "--no-tensorboard"]


# ------------------------------------------------------------------------------------------------- the loss


def _case(n=10, v=13, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    targets[3] = -100  # a position without a label (a prompt token in SFT) counts in neither term
    return h, w, targets


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_is_zero_when_student_equals_teacher(temperature):
    h, w, targets = _case()
    valid = targets != -100
    logits = h @ w.t()
    assert abs(float(kl_to_teacher(logits, logits.clone(), valid, temperature))) < 1e-5
    logp, ids = torch.log_softmax(logits, -1).topk(4, dim=-1)
    assert abs(float(kl_to_teacher_topk(logits, ids, logp.half(), valid, temperature))) < 1e-3  # fp16 as stored
    _ce, kl = distillation_sums(h, w, targets, temperature=temperature, teacher_hidden=h, teacher_head=lambda x: x @ w.t())
    assert abs(float(kl)) < 1e-5
    # ...and positive for another teacher
    assert float(kl_to_teacher(logits, logits.flip(0), valid, temperature)) > 0.1


@pytest.mark.parametrize("chunk", [0, 3])
def test_gradients_equal_a_hand_written_reference(chunk):
    """d/dz [alpha CE + (1 - alpha) T^2 KL(p_t^T || p_s^T)] = alpha (softmax(z) - onehot) + (1 - alpha) T (softmax(z/T)
    - softmax(z_t/T)) on labelled rows; the hidden and head gradients follow by the chain rule."""
    h, w, targets = _case()
    t_w = torch.randn_like(w)
    alpha, T = 0.3, 2.0
    hs, ws = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ce, kl = distillation_sums(hs, ws, targets, temperature=T, teacher_hidden=h, teacher_head=lambda x: x @ t_w.t(),
                               chunk_size=chunk)
    (alpha * ce + (1 - alpha) * kl).backward()

    z, zt = h @ w.t(), h @ t_w.t()
    valid = (targets != -100).float()[:, None]
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), w.shape[0]).float()
    dz = alpha * (torch.softmax(z, -1) - onehot) + (1 - alpha) * T * (torch.softmax(z / T, -1) - torch.softmax(zt / T, -1))
    dz = dz * valid
    torch.testing.assert_close(hs.grad, dz @ w, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ws.grad, dz.t() @ h, atol=1e-5, rtol=1e-4)


def test_topk_kl_matches_the_bucketed_reference_and_its_gradient():
    h, w, targets = _case(seed=1)
    valid = targets != -100
    zt = h @ torch.randn_like(w).t()
    logp_t, ids = torch.log_softmax(zt, -1).topk(5, dim=-1)
    z = (h @ w.t()).requires_grad_(True)
    got = kl_to_teacher_topk(z, ids, logp_t, valid, 1.0)
    got.backward()
    # reference: both distributions collapsed to (top-5 tokens, everything else)
    ps, pt = torch.softmax(z.detach(), -1), torch.softmax(zt, -1)
    s_b = torch.cat([ps.gather(1, ids), 1 - ps.gather(1, ids).sum(-1, keepdim=True)], -1)
    t_b = torch.cat([pt.gather(1, ids), 1 - pt.gather(1, ids).sum(-1, keepdim=True)], -1)
    ref = ((t_b * (t_b.log() - s_b.log())).sum(-1) * valid).sum()
    assert abs(float(got.detach()) - float(ref)) < 1e-4
    # d KL / d z_j = p_s(j) - p_t(bucket of j) * p_s(j) / p_s(bucket of j)
    bucket = torch.full(z.shape, 5, dtype=torch.long)
    bucket.scatter_(1, ids, torch.arange(5).expand_as(ids))
    ratio = t_b.gather(1, bucket) / s_b.gather(1, bucket)
    ref_grad = (ps - ratio * ps) * valid[:, None].float()
    torch.testing.assert_close(z.grad, ref_grad, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- offline logits


def _write_logits(shards_dir, teacher, out, seq_len=64, k=4, **kw):
    from xiaolm.data.teacher_logits import TeacherLogitsConfig, write_teacher_logits

    return write_teacher_logits(TeacherLogitsConfig(shards=str(shards_dir), teacher=str(teacher), out=str(out),
                                                    seq_len=seq_len, top_k=k, batch_size=8, windows_per_file=7,
                                                    device="cpu", **kw))


@pytest.fixture(scope="module")
def offline(tmp_path_factory, shards_dir, tiny_run):
    out = tmp_path_factory.mktemp("teacher_logits")
    meta = _write_logits(shards_dir, tiny_run, out)
    return out, meta


def test_offline_topk_round_trip(offline, shards_dir, tiny_run):
    from xiaolm.data.shards import TokenShards
    from xiaolm.data.teacher_logits import TeacherLogits, verify_teacher_logits
    from xiaolm.model.io import load_model
    from xiaolm.model.llama import doc_ids_from_tokens

    out, meta = offline
    assert meta["bytes_per_token"] == 4 * (2 + 2) and len(meta["shards"]) > 1  # uint16 ids + fp16 log-probs
    assert meta["s_per_million_tokens"] > 0
    reader = TeacherLogits(out, shards_dir, seq_len=64, doc_mask=True)
    model, _, _ = load_model(tiny_run)
    shards = TokenShards(shards_dir)
    for window in (0, 8, reader.num_windows - 1):  # in the first file, the second, the last
        x = torch.from_numpy(shards.read(window * 64, 64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(x, doc_ids=doc_ids_from_tokens(x, shards.eot_id)).logits[0].float(), -1)
        want_lp, want_ids = logp.topk(4, dim=-1)
        ids, lp = reader.read(window)
        assert torch.equal(torch.from_numpy(ids), want_ids)
        torch.testing.assert_close(torch.from_numpy(lp), want_lp, atol=2e-2, rtol=1e-3)  # fp16 storage
    assert verify_teacher_logits(out) == []


def test_offline_logits_are_refused_when_they_do_not_match(offline, shards_dir, tmp_path):
    from xiaolm.data.teacher_logits import TeacherLogits, TeacherLogitsMismatch, verify_teacher_logits

    out, _ = offline
    with pytest.raises(TeacherLogitsMismatch, match="seq-len 64"):
        TeacherLogits(out, shards_dir, seq_len=128)
    with pytest.raises(TeacherLogitsMismatch, match="document masking"):
        TeacherLogits(out, shards_dir, seq_len=64, doc_mask=False)
    # other token shards: one sidecar's checksum changed
    other = tmp_path / "shards"
    shutil.copytree(shards_dir, other, ignore=shutil.ignore_patterns("teacher-logits"))
    side = sorted((other / "train").glob("shard_*.json"))[0]
    rec = json.loads(side.read_text())
    rec["sha256"] = "0" * 64
    side.write_text(json.dumps(rec))
    with pytest.raises(TeacherLogitsMismatch, match="other token shards"):
        TeacherLogits(out, other, seq_len=64)
    # a truncated file, and a corrupted one
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    f = broken / "topk_00000.logp.bin"
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))
    assert any("topk_00000.logp.bin" in p for p in verify_teacher_logits(broken))
    f.write_bytes(bytes(data[:-2]))
    with pytest.raises(TeacherLogitsMismatch, match="truncated"):
        TeacherLogits(broken, shards_dir, seq_len=64)


# ------------------------------------------------------------------------------------------------- training


def _pretrain(shards_dir, out, *extra):
    args = [a for a in TINY_PRETRAIN]
    args[args.index("--seq-len") + 1] = "64"
    return main(["pretrain", "--data", str(shards_dir), "--out", str(out), *args, *extra])


def _train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_resume_with_offline_teacher_is_exact(offline, shards_dir, tmp_path):
    out, _ = offline
    args = ["--max-steps", "8", "--log-every", "1", "--eval-every", "4", "--micro-batch-size", "4",
            "--grad-accum-steps", "2", "--teacher-logits", str(out), "--distill-alpha", "0.5",
            "--distill-temperature", "2", "--optimizer", "adamw"]
    assert _pretrain(shards_dir, tmp_path / "full", *args) == 0
    assert _pretrain(shards_dir, tmp_path / "split", *args, "--stop-at-step", "3") == 0
    assert _pretrain(shards_dir, tmp_path / "split", *args, "--resume") == 0
    full, split = _train_records(tmp_path / "full"), _train_records(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 9))
    for a, b in zip(full, split):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["kl"] - b["kl"]) <= 1e-6, (a, b)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["distill"]["mode"] == "offline" and summary["distill"]["bytes_per_token"] == 16
    # a resume with another teacher setting is refused
    assert _pretrain(shards_dir, tmp_path / "split", *args[:-6], "--teacher-logits", str(out),
                     "--distill-alpha", "0.9", "--max-steps", "10", "--resume") != 0


def test_online_distillation_lowers_the_students_kl_to_the_teacher(shards_dir, tiny_run, tmp_path, capsys):
    """alpha = 0: the student learns from the teacher alone; its KL to the teacher falls well below its start, and
    the summary reports the teacher's cost. Muon (the pretraining default) with document masking."""
    out = tmp_path / "student"
    assert _pretrain(shards_dir, out, "--max-steps", "40", "--log-every", "5", "--eval-every", "0",
                     "--teacher", str(tiny_run), "--distill-alpha", "0", "--micro-batch-size", "8") == 0
    recs = _train_records(out)
    assert recs[-1]["kl"] < 0.6 * recs[0]["kl"], [r["kl"] for r in recs]
    assert recs[-1]["ce"] < recs[0]["ce"] - 0.5  # learning the teacher's distribution also fits the data
    d = json.loads((out / "summary.json").read_text())["distill"]
    assert d["mode"] == "online" and d["teacher_forward_s"] > 0 and d["teacher_weight_bytes"] > 0
    assert 0 < d["teacher_share_of_wall"] < 1


def test_teacher_with_another_tokenizer_is_refused_in_one_line(shards_dir, tiny_run, tmp_path, capsys):
    from xiaolm.tokenizer import load_tokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_run, teacher)
    tok_file = teacher / "tokenizer" / "tokenizer.json"
    data = json.loads(tok_file.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[300], list(vocab)[301]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: another tokenizer of the same size
    tok_file.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    for recorded in [teacher / "tokenizer" / "xiaolm_tokenizer.json", *(teacher / "checkpoints").glob("*/meta.json")]:
        rec = json.loads(recorded.read_text(encoding="utf-8"))
        rec.pop("fingerprint", None), rec.pop("tokenizer_fingerprint", None)
        recorded.write_text(json.dumps(rec), encoding="utf-8")
    theirs, ours = load_tokenizer(teacher / "tokenizer").fingerprint, load_tokenizer(tiny_run / "tokenizer").fingerprint
    assert theirs != ours
    assert _pretrain(shards_dir, tmp_path / "s", "--max-steps", "2", "--teacher", str(teacher)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    line = [x for x in err if x.startswith("xiaolm: error:")]
    assert len(line) == 1 and theirs in line[0] and ours in line[0] and "xiaolm data tokenize" in line[0], err


def test_sft_distillation_moves_the_student_toward_the_teacher_and_takes_lora(shards_dir, tiny_run, tmp_path):
    """SFT with packing: the KL on the assistant tokens falls for a full student (alpha = 0); a LoRA student trains
    its adapters under the same loss (on this sub-1M model its KL moves little in 40 steps, so no figure is pinned)."""
    from test_sft import FAST_SFT, _short_conversations

    base = tmp_path / "base"
    assert _pretrain(shards_dir, base, "--max-steps", "3", "--eval-every", "0") == 0
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in _short_conversations(80)) + "\n",
                    encoding="utf-8")
    common = ["sft", str(base), "--data", str(data), *FAST_SFT, "--log-every", "5", "--eval-every", "0",
              "--teacher", str(tiny_run), "--distill-alpha", "0"]
    assert main([*common, "--max-steps", "30", "--out", str(tmp_path / "full")]) == 0
    recs = _train_records(tmp_path / "full")
    assert recs[-1]["kl"] < 0.6 * recs[0]["kl"], [r["kl"] for r in recs]
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["distill"]["mode"] == "online"

    assert main([*common, "--max-steps", "4", "--lora", "--lora-r", "8", "--lr", "2e-2",
                 "--out", str(tmp_path / "lora")]) == 0
    from safetensors.torch import load_file

    from xiaolm.model.io import find_checkpoint

    adapter = load_file(str(find_checkpoint(tmp_path / "lora") / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at zero: it learned
    summary = json.loads((tmp_path / "lora" / "summary.json").read_text())
    assert summary["distill"]["mode"] == "online" and summary["lora"]["trainable_params"] > 0
    # offline logits follow pretraining windows: SFT refuses them
    assert main(["sft", str(base), "--data", str(data), "--teacher-logits", str(tmp_path), "--out",
                 str(tmp_path / "x")]) != 0


def test_a_quantised_teacher_distils_like_its_float_original(shards_dir, tiny_run, tmp_path):
    """A quantised directory is a teacher too: int8 weights give nearly the float teacher's first-step KL."""
    qdir = tmp_path / "q8"
    assert main(["quantize", str(tiny_run), "--bits", "8", "--out", str(qdir)]) == 0
    kls = []
    for name, teacher in (("float", tiny_run), ("int8", qdir)):
        out = tmp_path / name
        assert _pretrain(shards_dir, out, "--max-steps", "1", "--log-every", "1", "--eval-every", "0",
                         "--teacher", str(teacher), "--distill-alpha", "0") == 0
        kls.append(_train_records(out)[0]["kl"])
    assert kls[0] > 1.0 and abs(kls[0] - kls[1]) < 0.02 * kls[0], kls


def test_online_teacher_under_bf16_autocast_with_the_chunked_loss(shards_dir, tiny_run, tmp_path):
    """The GPU path's logic on the CPU: bf16 autocast (teacher and student) with the loss chunked over rows gives the
    fp32 unchunked run's first-step KL and CE to bf16 accuracy."""
    got = {}
    for name, extra in (("fp32", []), ("bf16", ["--precision", "bf16", "--loss-chunk-size", "100"])):
        out = tmp_path / name
        assert _pretrain(shards_dir, out, "--max-steps", "1", "--log-every", "1", "--eval-every", "0",
                         "--teacher", str(tiny_run), *extra) == 0
        got[name] = _train_records(out)[0]
    for key in ("kl", "ce", "loss"):
        assert abs(got["bf16"][key] - got["fp32"][key]) < 0.03 * got["fp32"][key], (key, got)


@pytest.mark.gpu
def test_teacher_clock_on_cuda_times_without_a_sync_per_step():
    from xiaolm.train.distill import _TeacherClock

    clock = _TeacherClock("cuda")
    x = torch.randn(2048, 2048, device="cuda")
    for _ in range(300):  # more than the 256 pending pairs it folds at
        begun = clock.start()
        x = (x @ x).tanh()
        clock.stop(begun)
    assert clock.calls == 300 and clock.total() > 0 and not clock._pending


def test_two_processes_distil_like_one(offline, shards_dir, tmp_path):
    """DDP: each rank reads its own windows' offline logits and the loss runs inside DDP's forward (head_loss), so
    two processes match one process accumulating two micro-batches."""
    import os
    import subprocess
    import sys

    args = [a for a in TINY_PRETRAIN]
    args[args.index("--seq-len") + 1] = "64"
    common = ["--data", str(shards_dir), *args, "--max-steps", "4", "--log-every", "1", "--eval-every", "0",
              "--micro-batch-size", "4", "--sample-tokens", "0", "--optimizer", "adamw", "--no-zero-init-residual",
              "--teacher-logits", str(offline[0]), "--distill-alpha", "0.3"]
    assert main(["pretrain", "--out", str(tmp_path / "one"), "--grad-accum-steps", "2", *common]) == 0
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "xiaolm", "pretrain", "--out", str(tmp_path / "two"), "--grad-accum-steps", "1", *common],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _train_records(tmp_path / "one"), _train_records(tmp_path / "two")
    assert len(a) == len(b) == 4
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < 1e-5, (a, b)
