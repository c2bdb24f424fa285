#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the wheels that bench/gpu_proof.sh installs on a GPU machine without network.
#
# The GPU machines lent to this project (kind nvidia-h200) run their own image: Python 3.12, torch 2.11+,
# transformers 5.x, numpy, scipy, pyyaml, tqdm, rich, tokenizers, safetensors, peft, matplotlib, httpx, pytest,
# anyio, click, h11 ... but none of the packages below, and no package index. So they travel as wheels:
#
#   here (this machine, with the registry):   bash bench/gpu_wheels.sh            # about 15 MiB, under a minute
#   there (the device tool's run):            carry: [".whl"]
#                                             command: bash bench/gpu_proof.sh    # or --quick for a rerun
#                                             timeout_s: 540 (the full proof is budgeted 8 min, --quick 4 min)
#
# The whole tree that travels (tracked + untracked-not-ignored files + .whl) must stay under 64 MiB; this script
# fails above MAX_MIB. gpu_proof.sh installs a carried wheel only where the image lacks that distribution or has an
# older version (it checks, never assumes), with
#   python3 -m pip install --no-index --no-deps --no-compile --target /tmp/xiaolm-site WHEEL...
# and puts /tmp/xiaolm-site and src/ on PYTHONPATH.
#
# The versions are the ones CI tests (the project's venv); pure-Python wheels where they exist, cp312 manylinux
# wheels for the two with C code (pydantic-core, OpenCC). --no-deps: every dependency is named here.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
MAX_MIB=${MAX_MIB:-40}
PY=${PYTHON:-python3}

WHEELS=(
  jieba==0.42.1             # word segmentation (data, eval)
  datasketch==2.0.0         # MinHash dedup (data prepare)
  zhconv==1.4.3             # Traditional -> Simplified fallback
  OpenCC==1.4.2             # Traditional -> Simplified (data prepare's default converter)
  gguf==0.19.0              # export gguf
  fastapi==0.165.0          # xiaolm serve
  starlette==1.10.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  annotated-doc==0.0.7
  typing-inspection==0.4.5
  typing-extensions==4.16.0  # pydantic 2.14 needs >= 4.16; installed only if the image's is older
  opentelemetry-api==1.45.2  # a dependency of fastapi 0.165
  uvicorn==0.54.0
  rouge-score==0.1.2        # eval instruct's ROUGE-L (sacrebleu, absl-py, six are on the image)
  nltk==3.10.4              # a dependency of rouge-score
  defusedxml==0.7.1         # a dependency of nltk
  pytest-timeout==2.4.0     # gpu_proof's per-test timeout for pytest -m gpu
)

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for req in "${WHEELS[@]}"; do
  # the platforms the device notes list (pip matches the manylinux glibc version exactly)
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
      -d "$TMP" "$req" >/dev/null 2>&1; then
    # no wheel published (jieba, zhconv ship only an sdist): build it here; it must come out pure Python
    "$PY" -m pip wheel -q --no-deps -w "$TMP" "$req" >/dev/null
    name=${req%%==*}
    if ! ls "$TMP" | grep -i "^${name//-/_}-.*-none-any\.whl$" >/dev/null; then
      echo "gpu_wheels: $req has no wheel for cp312 manylinux and its sdist does not build a pure-Python wheel" >&2
      exit 1
    fi
  fi
done
got=$(ls "$TMP"/*.whl 2>/dev/null | wc -l)
if [ "$got" -ne "${#WHEELS[@]}" ]; then
  echo "gpu_wheels: expected ${#WHEELS[@]} wheels, got $got in $TMP:" >&2
  ls "$TMP" >&2
  exit 1
fi
rm -rf "$DEST" && mkdir -p "$DEST" && mv "$TMP"/*.whl "$DEST"/
mib=$(du -sm "$DEST" | cut -f1)
ls -1 "$DEST"
echo "gpu_wheels: ${#WHEELS[@]} wheels, ${mib} MiB in $DEST (carry: [\"$DEST\"])"
if [ "$mib" -gt "$MAX_MIB" ]; then
  echo "gpu_wheels: $DEST is over $MAX_MIB MiB; the tree that travels must stay under 64 MiB" >&2
  exit 1
fi
