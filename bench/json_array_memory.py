"""Peak memory of reading a large JSON array: streamed with ijson (``xiaolm.data.readers``, now) against the whole
file loaded and decoded first (the reader before, reproduced here as the baseline), in the same run.

The file is an array of story records (``{"id": N, "text": "...Chinese...", "n": N}``) of about ``--mb`` MB. Each
method runs in a fresh child process that only reads and counts the records (texts summed); the table shows the
child's peak resident memory (``ru_maxrss``) above a child that only imports the same modules, its wall time, and
the records it read (which must agree).

Usage: python bench/json_array_memory.py [--mb 1000] [--out bench/results/NAME.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time, re
sys.path.insert(0, sys.argv[3])
from xiaolm.data.readers import ReadLog, iter_records
method, path = sys.argv[1], sys.argv[2]
t = time.perf_counter()
n = chars = 0
if method == "stream":
    for rec in iter_records([path], field="text", collector=ReadLog()):
        n += 1
        chars += len(rec.text)
elif method == "whole":  # the reader before: read every byte, decode, then raw_decode item by item
    text = open(path, "rb").read().decode("utf-8")
    decoder, space, pos = json.JSONDecoder(), re.compile(r"\s*"), text.index("[") + 1
    newlines = [m.start() for m in re.finditer("\n", text)]  # it kept these for line numbers
    while True:
        pos = space.match(text, pos).end()
        if text[pos] == "]":
            break
        value, pos = decoder.raw_decode(text, pos)
        n += 1
        chars += len(value["text"])
        pos = space.match(text, pos).end()
        if text[pos] == ",":
            pos += 1
wall = time.perf_counter() - t
print(json.dumps({"records": n, "chars": chars, "wall_s": wall,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

SENTENCES = ["从前有一座山，山里有一座庙。", "小猫在花园里追蝴蝶，蝴蝶飞到了高高的树上。",
             "老奶奶给小明讲了一个关于月亮和星星的故事。", "他们一起把玩具收拾好，然后高高兴兴地去吃晚饭。"]


def make_array(path: Path, mb: float) -> int:
    target = int(mb * 1e6)
    n = size = 0
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("[\n")
        while size < target:
            text = "".join(SENTENCES[(n + i) % 4] for i in range(8))
            line = ("," if n else "") + json.dumps({"id": n, "text": text, "n": n}, ensure_ascii=False) + "\n"
            fh.write(line)
            size += len(line.encode("utf-8"))
            n += 1
        fh.write("]\n")
    return n


def run(method: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(path), str(REPO / "src")],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=1000)
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "array.json"
        t = time.perf_counter()
        n = make_array(path, args.mb)
        size_mb = path.stat().st_size / 1e6
        print(f"wrote {size_mb:,.0f} MB, {n:,} records in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        empty = Path(tmp) / "empty.json"
        empty.write_text("[]\n")
        base = run("stream", empty)["peak_mb"]  # interpreter + imports
        rows = [(m, run(m, path)) for m in ("whole", "stream")]
    assert rows[0][1]["records"] == rows[1][1]["records"] == n and rows[0][1]["chars"] == rows[1][1]["chars"]
    lines = [
        f"# JSON array peak memory ({time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs; "
        f"loaded machine: other jobs shared the cores, so times are rough, memory is not)",
        "",
        f"File: a {size_mb:,.0f} MB JSON array of {n:,} story records. Peak RSS of a child that only reads and "
        f"counts the records, minus {base:,.0f} MB for the interpreter and imports (a child reading `[]`).",
        "",
        "| reader | peak memory above imports (MB) | wall (s) | records |",
        "|---|---:|---:|---:|",
    ]
    for name, r in rows:
        label = {"whole": "whole file loaded and decoded (before)", "stream": "streamed with ijson (now)"}[name]
        lines.append(f"| {label} | {r['peak_mb'] - base:,.0f} | {r['wall_s']:.1f} | {r['records']:,} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
