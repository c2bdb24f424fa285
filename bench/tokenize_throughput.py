"""Tokenisation throughput: the per-line loop of tiny-llm-zh / baby-llama2-chinese against `xiaolm data tokenize`.

All rows encode the same JSON Lines corpus with the same tokenizer, in the same run, and must produce the same
tokens (checked):

  per-line (transformers)  for each line: json.loads, AutoTokenizer.encode(text), append ids and EOS to one Python
                           list; np.array(list, uint16) at the end -- how tiny-llm-zh and baby-llama2-chinese build
                           their pretraining .bin files
  per-line (tokenizers)    the same loop calling the Rust tokenizers.Tokenizer.encode directly (no transformers
                           overhead), to show how much of the gain is batching rather than the library
  xiaolm, 1 process        tokenize_to_shards(workers=1): batched encode_batch, numpy arrays, shard files written
  xiaolm, N processes      tokenize_to_shards(workers=all cores)

Corpus: the real texts in ../shared/data when present (the `modern` side of the classical bitext and the lines of
the classic novels), else synthetic Chinese text. Usage:

    python bench/tokenize_throughput.py [--tokenizer TOKDIR] [--corpus FILE.jsonl] [--max-mb 20] [--workers N]

Without --tokenizer a 8,192-token tokenizer is trained on the corpus first (not timed).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

# Single-threaded Rust inside each process, so "1 process" means one core; the parallel row gets its
# parallelism from processes. Must be set before tokenizers is used.
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def real_corpus(max_bytes: int) -> tuple[list[str], str]:
    texts: list[str] = []
    size = 0
    bitext = SHARED / "classical_modern_bitext" / "bitext_subset.jsonl"
    novels = sorted((SHARED / "classic_novels").glob("*.txt"))
    if not bitext.is_file() and not novels:
        return [], ""
    if bitext.is_file():
        for line in open(bitext, encoding="utf-8"):
            text = json.loads(line).get("modern")
            if isinstance(text, str) and text.strip():
                texts.append(text)
                size += len(text.encode("utf-8"))
    for path in novels:
        for line in open(path, encoding="utf-8"):
            line = line.rstrip("\r\n")
            if line.strip():
                texts.append(line)
                size += len(line.encode("utf-8"))
    random.Random(0).shuffle(texts)
    out, size = [], 0
    for t in texts:
        if size >= max_bytes:
            break
        out.append(t)
        size += len(t.encode("utf-8"))
    return out, f"real: classical_modern_bitext `modern` + classic novels lines ({SHARED})"


def synthetic_corpus(max_bytes: int) -> tuple[list[str], str]:
    rng = random.Random(0)
    chars = "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可下而过天去能对小多然于心学么之都好看起发当没成只如事把还用第样道想作种开美总从无情己面最女但现前些所同日手又行意动方期它头经长儿回位分爱老因很给名法间斯知世什两次使身者被高已亲其进此话常与活正感"
    punct = "，。！？、"
    texts, size = [], 0
    while size < max_bytes:
        text = "".join(rng.choice(chars) if rng.random() > 0.1 else rng.choice(punct) for _ in range(rng.randint(20, 300)))
        texts.append(text)
        size += len(text.encode("utf-8"))
    return texts, "synthetic (../shared/data not present)"


def per_line_loop(jsonl: Path, encode, eos_id: int) -> np.ndarray:
    """The reference repos' way: one line at a time, ids appended to a Python list, one np.array at the end."""
    doc_ids: list[int] = []
    with open(jsonl, encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line)["text"]
            ids = encode(text)
            ids.append(eos_id)
            doc_ids += ids
    return np.array(doc_ids, dtype=np.uint16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="tokenizer directory (default: train an 8,192-token one on the corpus)")
    parser.add_argument("--corpus", help="a .jsonl file with a `text` field (e.g. a prepared train.jsonl) instead "
                                         "of the default real/synthetic corpus")
    parser.add_argument("--max-mb", type=float, default=20.0, help="corpus size in MB of UTF-8 text")
    parser.add_argument("--workers", type=int, default=0, help="processes for the parallel row (0 = all cores)")
    parser.add_argument("--repeat", type=int, default=1, help="time each row this many times, report the best")
    args = parser.parse_args()

    from xiaolm.data.shards import TokenShards, default_workers, tokenize_to_shards
    from xiaolm.tokenizer import load_tokenizer
    from xiaolm.data.vocab import train_tokenizer

    max_bytes = int(args.max_mb * 1e6)
    if args.corpus:
        texts, size = [], 0
        for line in open(args.corpus, encoding="utf-8"):
            if size >= max_bytes:
                break
            text = json.loads(line)["text"]
            texts.append(text)
            size += len(text.encode("utf-8"))
        description = f"{args.corpus} (`text` field)"
    else:
        texts, description = real_corpus(max_bytes)
    if not texts:
        texts, description = synthetic_corpus(max_bytes)
    workers = args.workers or default_workers()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="xiaolm_bench_") as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "corpus.jsonl"
        with open(jsonl, "w", encoding="utf-8") as fh:
            for t in texts:
                fh.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        tok_dir = Path(args.tokenizer) if args.tokenizer else None
        if tok_dir is None:
            tok_dir = tmp / "tok"
            train_tokenizer([str(jsonl)], tok_dir, vocab_size=8192, progress=False)
        tok = load_tokenizer(tok_dir)

        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        raw = tok.tok

        def hf_encode(text):
            return hf.encode(text, add_special_tokens=False)

        def raw_encode(text):
            return raw.encode(text, add_special_tokens=False).ids

        # Same job, same text: special-token strings in the corpus are text in every row.
        hf_has_special = any("<|" in t for t in texts)
        if hf_has_special:
            print("note: corpus contains '<|'; per-line rows may differ on special-token strings", file=sys.stderr)

        def timed(fn):
            best, result = float("inf"), None
            for _ in range(max(1, args.repeat)):
                t0 = time.perf_counter()
                result = fn()
                best = min(best, time.perf_counter() - t0)
            return best, result

        rows = []
        t, ref = timed(lambda: per_line_loop(jsonl, hf_encode, tok.eot_id))
        rows.append(("per-line loop, transformers (tiny-llm-zh / baby-llama2-chinese)", 1, t, len(ref)))
        t, ref2 = timed(lambda: per_line_loop(jsonl, raw_encode, tok.eot_id))
        assert np.array_equal(ref, ref2)
        rows.append(("per-line loop, tokenizers.Tokenizer.encode", 1, t, len(ref2)))
        for label, n in (("xiaolm data tokenize, 1 process", 1), (f"xiaolm data tokenize, {workers} processes", workers)):
            out = tmp / f"shards_{n}"
            t, meta = timed(lambda: tokenize_to_shards([str(jsonl)], tok_dir, out, workers=n, progress=False))
            got = TokenShards(out).read(0, meta["tokens"])
            assert np.array_equal(got, ref), "shards differ from the per-line reference"
            rows.append((label, n, t, meta["tokens"]))

    base = rows[0][2]
    print(f"\ncorpus: {description}")
    print(f"        {len(texts):,} documents, {nbytes / 1e6:.1f} MB UTF-8, {rows[0][3]:,} tokens "
          f"(vocab {tok.vocab_size}); cores available: {default_workers()}; load average before/after: "
          f"{load_before:.1f}/{os.getloadavg()[0]:.1f} (other work on the machine slows every row)\n")
    header = f"| {'method':<66} | procs | {'seconds':>7} | {'MB/s':>6} | {'tokens/s':>10} | vs per-line |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for label, n, t, ntok in rows:
        print(f"| {label:<66} | {n:>5} | {t:>7.2f} | {nbytes / 1e6 / t:>6.2f} | {ntok / t:>10,.0f} | "
              f"{base / t:>10.1f}x |")
    print("\nAll rows produced identical token streams (checked).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
