"""Optional packages that are not installed: a run says so in one warning line and records what really happened."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

import xiaolm

SRC = str(Path(xiaolm.__file__).resolve().parents[1])


def test_missing_tensorboard_warns_once_and_config_records_it(shards_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["pretrain", "--data", str(shards_dir), "--out", str(out), "--preset", "tiny", "--seq-len", "64",
            "--micro-batch-size", "2", "--max-steps", "2", "--eval-every", "0", "--sample-tokens", "0",
            "--log-every", "1", "--no-progress"]  # TensorBoard left on, as by default
    code = ("import sys\nfor m in ('tensorboard', 'torch.utils.tensorboard'): sys.modules[m] = None\n"
            "from xiaolm.cli import main\nsys.exit(main(%r))" % (argv,))
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [ln for ln in proc.stderr.splitlines() if "TensorBoard" in ln or ln.startswith("warning")]
    assert len(warnings) == 1 and warnings[0].startswith("warning:"), proc.stderr[-2000:]
    conf = yaml.safe_load((out / "config.yaml").read_text())
    assert conf["train"]["tensorboard"] is False
    assert not (out / "tensorboard").exists()
