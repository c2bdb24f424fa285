#!/usr/bin/env bash
# The GPU proof: one command that shows every GPU path of xiaolm works, and how fast, on whatever GPU is at hand.
#
#   bash bench/gpu_proof.sh [--quick] [--dry-run] [--profile] [--out DIR] [--work DIR]   (OUT=DIR is accepted too)
#
# --profile adds torch.profiler over a few training steps: the top kernels in the log and OUT/trace.json.gz (use it
# on a --quick rerun when the throughput falls short of the goals, to see where the time goes).
#
# Full: one device call of about 8 minutes on one H100/H200 (budget 480 s of steps; --quick 240 s), in the order of
# what each figure is worth, each step under its own time box (the boxes sum to the budget at most; a failing or
# hanging step is killed at its box and the next one starts):
#   env (versions, a measured bf16 matmul) -> train_headline (bench/train_throughput.py --headline on 58m-v64k:
#   transformers compiled vs ours compiled, two cold compiles) -> quickstart (pretrain the 24m preset at 512 context,
#   batch 64, for ~100 s with configs/tinystories-zh.yaml's settings on a corpus built on the CPU cores meanwhile:
#   val bits/char, tokens/s, MFU, peak memory, 5 stories with rep-4 and distinct-2) -> pytest -m gpu (per-test
#   timeout) -> decode (bench/generate_throughput.py at batch 1 and 64) -> SFT (a finite schedule sized to its box)
#   -> eval instruct -> bench/speedrun.py --track gpu (the recipe vs the old defaults) -> profile (--profile).
# Every step appends its section to OUT/gpu_report.md as it finishes and the benchmarks append each row as it is
# measured, so a kill at any moment leaves every finished figure on disk; OUT/gpu_report.json is rewritten after
# each step, OUT/gpu_proof.log has every step's output. Corpora, runs and the inductor/Triton caches go to --work
# (default OUT/work): with the device tool's --work /tmp/gpu-proof-work a rerun on the same warm machine reuses the
# corpus and skips the compiles.
#
# --dry-run: the same steps on the CPU with tiny shapes and wide boxes (2-5 minutes on 2 cores); CI runs it
# (tests/test_gpu_proof.py), so the script cannot rot between GPU runs.
#
# On a lent GPU machine (the device tool; the image has Python 3.12, torch, transformers, no network):
#   1. here, once: bash bench/gpu_wheels.sh               (fills the ignored .whl/, about 26 MiB)
#   2. here: bash bench/gpu_proof.sh --dry-run             (must pass first)
#   3. the device tool's run with carry: [".whl"], timeout_s: 540 (--quick: 300), command (the session's
#      device time is 15 minutes including the machine's start, at most 10 per command: one full call fits):
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
