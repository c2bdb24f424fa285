#!/usr/bin/env bash
# The general Chinese route end to end on ../shared/data only (configs/general-zh-local.yaml): prepare -> tokenizer
# -> tokenize -> pretrain -> SFT mixture -> DPO -> eval (bits/char, instruction following, CMMLU) -> export, timed.
# Target: under 20 minutes on 2 CPU cores. Prints the wall time, the stage table and the headline figures of
# WORKDIR/REPORT.md, and how the chat model answers the recipe's five questions.
#
#   bash bench/route_general_local.sh [WORKDIR] [extra pipeline flags...]
# A rerun with the same WORKDIR skips finished stages (delete it to time the whole route again).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/bench-general-zh-local}
shift || true
if [ ! -d ../shared/data ]; then echo "skip: ../shared/data not present"; exit 0; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${MKL_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
echo "machine: $(nproc --all) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s)
python -m xiaolm pipeline --config configs/general-zh-local.yaml --workdir "$WORK" "$@"
end=$(date +%s)
echo
echo "route wall time: $((end - start)) s (target < 1200 s on 2 cores); load average now $(cut -d' ' -f1-3 /proc/loadavg)"
python - "$WORK" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
md = (work / "REPORT.md").read_text(encoding="utf-8")
def section(title):
    part = md.split(title, 1)[1] if title in md else ""
    return title + part.split("\n## ", 1)[0] if part else ""
for t in ("## Headline figures", "## Stages", "## Multiple choice", "## The final model answers"):
    s = section(t)
    if s:
        print(s.rstrip() + "\n")
PY
