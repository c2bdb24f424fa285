"""Pretraining: loss falls, runs resume exactly, interruptions and NaNs never cost a good checkpoint, and two
processes train exactly like one."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xiaolm.cli import main
from xiaolm.model.io import CheckpointError, find_checkpoint, load_model
from xiaolm.train.engine import TrainConfig
from xiaolm.train.schedule import lr_at

from conftest import TINY_PRETRAIN

FAST = [a for a in TINY_PRETRAIN]


def _train_losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]


def _pretrain(shards_dir, out, *extra):
    return main(["pretrain", "--data", str(shards_dir), "--out", str(out), *FAST, *extra])


def test_loss_falls_and_run_dir_is_complete(tiny_run):
    losses = _train_losses(tiny_run)
    assert losses[-1][1] < losses[0][1] - 1.0, losses
    summary = json.loads((tiny_run / "summary.json").read_text())
    # Far below a context-free model of the same data.
    assert summary["val_loss"] < summary["unigram_entropy"] - 0.5
    assert summary["val_bpc"] > 0 and math.isfinite(summary["val_ppl"])
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "report.md", "tokenizer/tokenizer.json"):
        assert (tiny_run / name).exists(), name
    ckpt = find_checkpoint(tiny_run)
    assert ckpt.name == "step-00000120"
    assert (tiny_run / "checkpoints" / "best").read_text().strip().startswith("step-")
    # The resolved config is itself a recipe.
    assert "lr: 0.003" in (tiny_run / "config.yaml").read_text()


def test_resume_reproduces_uninterrupted_losses(shards_dir, tmp_path):
    args = ["--max-steps", "14", "--log-every", "1", "--eval-every", "7", "--grad-accum-steps", "2",
            "--micro-batch-size", "4"]
    assert _pretrain(shards_dir, tmp_path / "full", *args) == 0
    assert _pretrain(shards_dir, tmp_path / "split", *args, "--stop-at-step", "5") == 0
    assert find_checkpoint(tmp_path / "split").name == "step-00000005"
    assert _pretrain(shards_dir, tmp_path / "split", *args, "--resume") == 0
    full, split = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "split")
    assert [s for s, _ in split] == list(range(1, 15))
    assert max(abs(a - b) for (_, a), (_, b) in zip(full, split)) <= 1e-6


def test_sigterm_saves_and_resumes(shards_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "xiaolm", "pretrain", "--data", str(shards_dir), "--out", str(out), *FAST,
           "--max-steps", "100000", "--log-every", "1", "--eval-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM" in output and "--resume" in output
    ckpt = find_checkpoint(out)
    step = json.loads((ckpt / "meta.json").read_text())["step"]
    assert step >= 3
    model, tok, _ = load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert _pretrain(shards_dir, out, "--max-steps", str(step + 2), "--eval-every", "0", "--resume") == 0
    assert find_checkpoint(out).name == f"step-{step + 2:08d}"


def test_nonfinite_loss_stops_cleanly_and_never_reaches_a_checkpoint(shards_dir, tmp_path, monkeypatch, capsys):
    import xiaolm.train.pretrain as pt

    real = pt.lm_loss
    calls = {"n": 0}

    def poisoned(model, batch, chunk=0):
        loss, n, extra = real(model, batch, chunk)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 7 else loss), n, extra

    monkeypatch.setattr(pt, "lm_loss", poisoned)
    out = tmp_path / "nan"
    code = _pretrain(shards_dir, out, "--max-steps", "20", "--save-every", "3", "--eval-every", "0", "--log-every", "5")
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "--resume" in err
    model, _, _ = load_model(out)  # the last checkpoint is intact and finite
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # With --on-nonfinite skip the bad steps are skipped and the run finishes with finite weights.
    calls["n"] = 0
    out2 = tmp_path / "skip"
    assert _pretrain(shards_dir, out2, "--max-steps", "10", "--eval-every", "0", "--log-every", "5",
                     "--on-nonfinite", "skip", "--max-skipped-steps", "100") == 0
    model, _, _ = load_model(out2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_corrupt_checkpoint_is_detected(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    weights = find_checkpoint(run) / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(run)
    shutil.rmtree(find_checkpoint(run))
    with pytest.raises(CheckpointError, match="does not exist|no checkpoint"):
        load_model(run)


def test_crash_during_save_leaves_previous_checkpoint(tiny_run, tmp_path, monkeypatch):
    import shutil

    import xiaolm.train.checkpoint as ck

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    before = find_checkpoint(run)
    model, _, _ = load_model(run)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(run, 999, model, model.config.to_dict(), {})
    assert find_checkpoint(run) == before
    load_model(run)  # still verifies


def test_schedule_warms_up_and_decays_to_the_floor_at_the_real_end():
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    total = 200
    lrs = [lr_at(s, cfg, total) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(1e-4)
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[total] == pytest.approx(1e-4)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    wsd = TrainConfig(lr=1e-3, min_lr_ratio=0.0, warmup_steps=10, schedule="wsd")
    assert lr_at(100, wsd, total) == pytest.approx(1e-3) and lr_at(total, wsd, total) == pytest.approx(0.0)


def test_max_tokens_sets_the_horizon(shards_dir, tmp_path):
    out = tmp_path / "budget"
    # 8 sequences x 128 tokens = 1024 tokens/step; 5000 tokens -> 5 steps
    assert _pretrain(shards_dir, out, "--max-tokens", "5000", "--eval-every", "0") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["total_steps"] == 5


def test_two_processes_train_like_one(shards_dir, tmp_path, two_ranks_like_one):
    # the engine's DDP against accumulation, on the old recipe: Muon's bf16 orthogonalisation has its own test
    # (tests/test_recipe.py), and zero-initialised down_proj leaves up/gate with near-zero first gradients whose
    # rounding noise AdamW would normalise into real updates
    common = ["--data", str(shards_dir), *FAST, "--max-steps", "5", "--log-every", "1", "--eval-every", "0",
              "--micro-batch-size", "4", "--sample-tokens", "0", "--optimizer", "adamw", "--no-zero-init-residual"]
    one = tmp_path / "one"
    assert main(["pretrain", "--out", str(one), "--grad-accum-steps", "2", *common]) == 0
    two_ranks_like_one(one, tmp_path / "two", common, steps=5, loss_tol=1e-5)


@pytest.mark.parametrize("verb", ["sweep", "pretrain"])  # `xiaolm pretrain --lr-sweep` runs the same sweep
def test_lr_sweep_names_the_best(shards_dir, tmp_path, capsys, verb):
    out = tmp_path / "sweep"
    assert main([verb, "--data", str(shards_dir), "--out", str(out), *FAST, "--max-steps", "8",
                 "--eval-every", "0", "--lr-sweep", "1e-5,3e-3"]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [t["lr"] for t in result["trials"]] == [1e-5, 3e-3]
    assert result["best_lr"] == 3e-3  # 8 steps at 1e-5 barely move the loss
    assert (out / "sweep.png").exists()
    assert "best learning rate" in capsys.readouterr().out


def test_eval_ppl_cli(tiny_run, prepared_dir, tmp_path):
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", str(tiny_run), "--data", str(prepared_dir), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["tokens"] > 100 and 0 < res["bits_per_char"] < 20
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]), rel=1e-6)


def test_eval_ppl_scores_documents_as_pretraining_trained_them(tiny_run, shards_dir, tmp_path):
    """Pretraining masks attention at document boundaries by default, and so does ``eval ppl``: on the same tokens
    and windows it reproduces the run's own validation figure. Before the fix eval ppl let every window see the
    stories before it, which a masked model never saw in training, and scored it worse than its training did."""
    summary = json.loads((tiny_run / "summary.json").read_text())
    scores = {}
    for flag in ("--doc-mask", "--no-doc-mask"):
        out = tmp_path / f"{flag}.json"
        assert main(["eval", "ppl", str(tiny_run), "--data", str(shards_dir), "--max-tokens", "4096",
                     "--seq-len", "128", flag, "--out", str(out)]) == 0
        scores[flag] = json.loads(out.read_text())
    assert scores["--doc-mask"]["doc_mask"] is True and scores["--no-doc-mask"]["doc_mask"] is False
    assert scores["--doc-mask"]["bits_per_char"] == pytest.approx(summary["val_bpc"], rel=1e-4)
    assert scores["--no-doc-mask"]["bits_per_char"] > scores["--doc-mask"]["bits_per_char"]


def test_generate_cli_prints_a_continuation(tiny_run, capsys):
    assert main(["generate", str(tiny_run), "--prompt", "从前", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("从前") and len(out.strip()) > 2


def test_bad_data_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a token shard directory" in capsys.readouterr().err


def test_prefetching_changes_nothing(shards_dir, tmp_path):
    args = ["--max-steps", "6", "--log-every", "1", "--eval-every", "0"]
    assert _pretrain(shards_dir, tmp_path / "p0", *args, "--prefetch", "0") == 0
    assert _pretrain(shards_dir, tmp_path / "p3", *args, "--prefetch", "3") == 0
    assert _train_losses(tmp_path / "p0") == _train_losses(tmp_path / "p3")
