"""bench/gpu_proof.sh cannot rot between GPU runs: its dry run (the same steps on the CPU, tiny budgets) passes here,
a hanging step is killed at its time box, and carried wheels are installed only where the image needs them."""
from __future__ import annotations

import json
import math
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, load_bench

STEPS = ["env", "train_headline", "data", "quickstart", "pytest_gpu", "decode", "sft", "eval_instruct", "speedrun",
         "profile"]


def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    """About 100 s on 2 cores: the whole GPU route in the proof's order (headline, quickstart, tests, decode, SFT,
    eval instruct, speedrun, profile) on the CPU. Each step must end inside its dry-run box and the run inside the
    dry-run budget: the dry run times the same steps the GPU run boxes."""
    out = tmp_path / "proof"
    env = dict(os.environ, OUT=str(out), PYTHONPATH=str(REPO / "src"))
    env.pop("XIAOLM_SITE", None)
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_proof.sh"), "--dry-run", "--profile"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)
    log = (out / "gpu_proof.log").read_text(encoding="utf-8") if (out / "gpu_proof.log").exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log[-3000:]
    report = json.loads((out / "gpu_report.json").read_text(encoding="utf-8"))
    assert [s["step"] for s in report["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    assert all(s["seconds"] <= s["box_s"] for s in report["steps"]), report["steps"]
    assert report["wall_s"] <= report["budget_s"]
    fig = report["figures"]
    assert fig["env"]["matmul_tflops"] > 0 and fig["env"]["torch"]
    assert re.match(r"\d+ skipped", fig["pytest_gpu"]) and "failed" not in fig["pytest_gpu"]   # no CUDA here
    pre = fig["quickstart"]
    assert pre["steps"] >= 10 and math.isfinite(pre["val_bpc"]) and pre["tokens_per_s"] > 0
    assert len(pre["samples"]) == 5 and 0 <= pre["rep4"] <= 1 and 0 < pre["distinct2"] <= 1
    assert fig["eval_instruct"]["samples"] == 6
    assert (out / "trace.json.gz").stat().st_size > 1000
    md = (out / "gpu_report.md").read_text(encoding="utf-8")
    # the sections in the order of the steps, the benchmark rows inside their sections
    order = [md.index(f"## {name}") for name in ("env", "train_headline", "quickstart", "pytest_gpu", "decode",
                                                  "sft", "eval_instruct", "speedrun", "profile", "Summary")]
    assert order == sorted(order)
    headline = md[md.index("## train_headline"):md.index("## train_headline: ok")]
    assert re.search(r"\| quickstart-v4k \| hf \|.*\n\| quickstart-v4k \| xiaolm \|", headline)
    decode = md[md.index("## decode"):md.index("## decode: ok")]
    assert "| 1 | hf dynamic |" in decode and "| 4 | xiaolm static |" in decode
    assert "| quickstart val_bpc |" in md and "Sampled stories" in md


def test_the_budget_table_fits_the_budget_and_one_device_call():
    """The boxes of the serial steps sum to at most the budget (the background corpus box ends before the
    quickstart needs it), and the full proof fits one device call of about 8 minutes (at most 10 per command)."""
    mod = load_bench("gpu_proof")
    for plan in (mod.FULL, mod.QUICK, mod.DRY):
        assert set(plan.boxes) == set(mod.STEPS) | {"data"}
        assert plan.serial_boxes() <= plan.budget, plan.boxes
        assert plan.boxes["data"] <= plan.boxes["env"] + plan.boxes["train_headline"] + plan.boxes["quickstart"]
        assert plan.pretrain_s < plan.boxes["quickstart"]
    assert mod.FULL.budget <= 480 and mod.QUICK.budget <= 240


def test_hf_dynamic_baseline_runs_the_plain_forward(monkeypatch, capsys):
    """generate_throughput used to install transformers' compiled forward before the variant loop, so its
    "hf dynamic" baseline ran compiled. The compiled forward may run only inside "hf static+compile"."""
    mod = load_bench("generate_throughput")
    calls = {"compiled": 0}
    timed: list[int] = []

    def fake_compile(fn, **kw):
        def compiled(*a, **k):
            calls["compiled"] += 1
            return fn(*a, **k)
        return compiled

    real_time_it = mod.time_it

    def spy_time_it(fn, reps):
        result = real_time_it(fn, reps)
        timed.append(calls["compiled"])
        return result

    monkeypatch.setattr(mod.torch, "compile", fake_compile)
    monkeypatch.setattr(mod, "time_it", spy_time_it)
    mod.main(["--device", "cpu", "--shape", "quickstart-v4k", "--batches", "2", "--new-tokens", "3", "--reps", "1",
              "--compile"])
    assert timed[0] == 0            # hf dynamic: warm-up and timing ran no compiled forward
    assert timed[1] > 0             # hf static+compile did
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("2 ")]
    assert [r.split()[1] for r in rows] == ["hf", "hf", "xiaolm", "xiaolm", "xiaolm"]


def test_a_hanging_step_is_killed_at_its_box_and_the_next_step_runs(tmp_path):
    mod = load_bench("gpu_proof")
    plan = mod.Plan(**{**mod.DRY.__dict__, "boxes": {"hang": 2, "next": 10}})
    runner = mod.Runner(plan, tmp_path, tmp_path)
    t = time.monotonic()
    hang = runner.run("hang", ["bash", "-c", "sleep 60 & sleep 60"])     # a child too: the whole group goes
    assert hang["status"] == "timeout" and time.monotonic() - t < 10
    nxt = runner.run("next", [sys.executable, "-c", "print('{\"x\": 1}')"])
    assert nxt["status"] == "ok" and mod.last_json(nxt["output"]) == {"x": 1}
    failed = runner.run("next", [sys.executable, "-c", "raise SystemExit(3)"])
    assert failed["status"] == "failed (exit 3)"


def test_install_plan_takes_only_what_the_image_lacks_or_has_older(tmp_path):
    import importlib.metadata as md

    have = md.version("numpy")
    for name in (f"numpy-{have}-py3-none-any.whl", "numpy-0.1-py3-none-any.whl",
                 "surely_not_installed_xyz-1.0-py3-none-any.whl", "pytest-999.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_proof.py"), "install-plan", "--wheels",
                           str(tmp_path)], capture_output=True, text=True, check=True)
    chosen = sorted(Path(p).name for p in done.stdout.split())
    assert chosen == ["pytest-999.0-py3-none-any.whl", "surely_not_installed_xyz-1.0-py3-none-any.whl"]
    assert "keep the image's numpy" in done.stderr
