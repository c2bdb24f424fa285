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

STEPS = ["env", "pytest_gpu", "train_throughput", "generate_throughput", "profile", "data", "pretrain", "sft",
         "eval_instruct"]


def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    """About 80 s on 2 cores: the whole GPU route (tests, both benchmarks, synth -> ... -> eval instruct) on CPU."""
    out = tmp_path / "proof"
    env = dict(os.environ, OUT=str(out), PYTHONPATH=str(REPO / "src"))
    env.pop("XIAOLM_SITE", None)
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_proof.sh"), "--dry-run", "--profile"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=400)
    log = (out / "gpu_proof.log").read_text(encoding="utf-8") if (out / "gpu_proof.log").exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log[-3000:]
    report = json.loads((out / "gpu_report.json").read_text(encoding="utf-8"))
    assert [s["step"] for s in report["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    assert report["wall_s"] <= report["budget_s"]
    fig = report["figures"]
    assert fig["env"]["matmul_tflops"] > 0 and fig["env"]["torch"]
    assert re.match(r"\d+ skipped", fig["pytest_gpu"]) and "failed" not in fig["pytest_gpu"]   # no CUDA here
    pre = fig["pretrain"]
    assert pre["steps"] >= 10 and math.isfinite(pre["val_bpc"]) and pre["tokens_per_s"] > 0
    assert len(pre["samples"]) == 5
    assert fig["eval_instruct"]["samples"] == 6
    assert (out / "trace.json.gz").stat().st_size > 1000
    md = (out / "gpu_report.md").read_text(encoding="utf-8")
    for needle in ("| pretrain val_bpc |", "## train_throughput", "xiaolm", "## generate_throughput", "hf dynamic"):
        assert needle in md, needle


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
