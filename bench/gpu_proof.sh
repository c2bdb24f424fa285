#!/usr/bin/env bash
# The GPU proof: one command that shows every GPU path of xiaolm works, and how fast, on whatever GPU is at hand.
#
#   bash bench/gpu_proof.sh [--quick] [--dry-run] [--profile] [--out DIR] [--work DIR]   (OUT=DIR is accepted too)
#
# --profile adds torch.profiler over a few training steps: the top kernels in the log and OUT/trace.json.gz (use it
# on a --quick rerun when the throughput falls short of the goals, to see where the time goes).
#
# Full: at most 8 minutes on one H100/H200 (budget 480 s; --quick 240 s): environment and a measured bf16 matmul,
# `pytest -m gpu` (tests/test_gpu.py), bench/train_throughput.py on the three anchor shapes (ours vs transformers,
# eager and compiled, interleaved), bench/generate_throughput.py at batch 1 and 64, and the end-to-end route
# (synth 200k -> prepare -> tokenizer 8k -> tokenize, built on the CPU cores meanwhile -> pretrain the 58m preset for
# 3 minutes with configs/tinystories-zh.yaml's settings -> 5 sampled stories, val bits/char, tokens/s, MFU, peak
# memory -> SFT 1 minute -> eval instruct on 200 held-out instructions). Each step runs under its own time box, so a
# failing or hanging step is killed and the next one starts. Writes OUT/gpu_report.md, OUT/gpu_report.json and
# OUT/gpu_proof.log (every step's output); corpora and runs go to --work (default OUT/work).
#
# --dry-run: the same steps on the CPU with tiny shapes and budgets (~2-3 minutes on 2 cores); CI runs it
# (tests/test_gpu_proof.py), so the script cannot rot between GPU runs.
#
# On a lent GPU machine (the device tool; the image has Python 3.12, torch, transformers, no network):
#   1. here, once: bash bench/gpu_wheels.sh               (fills the ignored .whl/, about 26 MiB)
#   2. here: bash bench/gpu_proof.sh --dry-run             (must pass first)
#   3. the device tool's run with carry: [".whl"], timeout_s: 540 (--quick: 300), command:
#        bash bench/gpu_proof.sh --work /tmp/gpu-proof-work
#      ($OUT is set there: the three report files come back; the work folder stays behind).
# Wheels are installed only where the image lacks a distribution or has an older one (bench/gpu_proof.py
# install-plan checks each), into a --target folder put on PYTHONPATH with src/; nothing is installed into the image.
set -uo pipefail
cd "$(dirname "$0")/.."
args=("$@")
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
SITE=${XIAOLM_SITE:-${TMPDIR:-/tmp}/xiaolm-site}

# xiaolm from this tree, with no build step and no network
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  mapfile -t wheels < <(PYTHONPATH="$PYTHONPATH" "$PY" bench/gpu_proof.py install-plan --wheels .whl)
  if [ "${#wheels[@]}" -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
      || echo "gpu_proof: installing the carried wheels failed; the steps that need them will say so" >&2
    export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH#"$PWD/src"}"
  fi
fi
exec "$PY" bench/gpu_proof.py proof "${args[@]}"
