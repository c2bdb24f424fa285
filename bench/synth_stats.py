"""Figures of the built-in story corpus (``xiaolm data synth``), and the builder of its keyword lists.

    python bench/synth_stats.py                       # table for 10,000 stories (and speed at 50,000)
    python bench/synth_stats.py --num 20000 --seed 3  # another run
    python bench/synth_stats.py --build-keywords      # refresh synth_assets/keywords.json
    python bench/synth_stats.py --near-dups 200000    # how many genuinely different stories a GPU-size run has

The table: generation speed (stories/s, one process), average length, the share of distinct stories, the exact
maximum pairwise overlap of character 5-gram sets (containment |A&B|/min(|A|,|B|) and Jaccard, every pair,
see ``max_ngram_overlap``), distinct jieba words (containing a CJK character), how often each feature and plot
occurs, and whether every declared word is a jieba token of its story.

``--near-dups N`` measures near-duplicates in a corpus of N stories (what a GPU run of N stories sees): MinHash
signatures of every story's character 5-gram set (``xiaolm.data.dedup.MinHasher``, 128 permutations, as
``data prepare`` uses), then for a random sample of stories the estimated Jaccard against all N, confirmed with
the exact 5-gram Jaccard. It prints, per threshold, the share of stories with at least one such neighbour and the
mean / maximum number of neighbours, and the number of distinct 5-gram profiles this implies
(N / mean cluster size at Jaccard >= 0.8, the threshold ``data prepare`` removes).

``--build-keywords`` keeps, for each part of speech, only the listed words whose jieba dictionary tag is exactly
v / n / a, and records for each word the jieba tokens that swallow it in generated text (很漂亮, 快快乐乐, 小/苗种
...), so that the generator declares a word only when the story also uses it as a word of its own. It prints
the words it dropped. The word lists themselves are curated by hand in the JSON file.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xiaolm.data import synth  # noqa: E402

CJK = re.compile(r"[\u3400-\u9fff]")


def _jieba():
    import jieba

    jieba.setLogLevel(60)
    jieba.initialize()
    return jieba


def build_keywords(num: int, seeds: list[int]) -> None:
    jieba = _jieba()
    import jieba.posseg

    tags = jieba.posseg.dt.word_tag_tab
    path = synth.ASSETS / "keywords.json"
    lists = json.loads(path.read_text(encoding="utf-8"))
    texts = [r["story_zh"] for seed in seeds for r in synth.iter_stories(num, seed)]
    swallowing: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    whole = collections.Counter()
    seen = collections.Counter()
    words = {w for pos in lists for w in lists[pos]}
    finder = re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))
    for text in texts:
        spans, pos = [], 0
        for tok in jieba.lcut(text):
            spans.append((pos, pos + len(tok), tok))
            pos += len(tok)
        exact = {(a, b) for a, b, _ in spans}
        for word in words:
            start = text.find(word)
            while start >= 0:
                end = start + len(word)
                seen[word] += 1
                if (start, end) in exact:
                    whole[word] += 1
                else:
                    cover = "".join(t for a, b, t in spans if b > start and a < end)
                    swallowing[word][cover] += 1
                start = text.find(word, start + 1)
    # a noun directly before a name (小羊毛毛 -> 小/羊毛/毛, 同学X) is too rare to be sure of in a
    # sample: check every species + name pair
    bank = synth.load_bank()
    names = bank.words["animal_names"] + bank.words["boys"] + bank.words["girls"]
    for species in [row[0] for row in bank.records["animals"]] + ["小鸟", "小花猫", "小鸭子", "小蚂蚁", "小伙伴", "同学", "好朋友"]:
        for word in {w for w in words if w in species or species in w}:
            for name in names:
                joined = species + name
                if word not in jieba.lcut(joined):
                    swallowing[word][joined] += 1
    out, dropped = {}, []
    for pos, entries in lists.items():
        out[pos] = {}
        for word in entries:
            if tags.get(word) != pos:
                dropped.append(f"{word} (jieba tag {tags.get(word)}, wanted {pos})")
                continue
            out[pos][word] = sorted(swallowing[word])
    path.write_text(json.dumps(out, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"keywords: {', '.join(f'{p}: {len(w)}' for p, w in out.items())} -> {path}")
    print("dropped:", "; ".join(dropped) or "none")
    never = [w for pos in out for w in out[pos] if whole[w] == 0]
    print(f"never used as a word of its own in {len(texts):,} stories: {' '.join(never) or 'none'}")


def table(num: int, seed: int, speed_num: int) -> None:
    t0 = time.perf_counter()
    bank = synth.load_bank()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    records = synth.generate_stories(num, seed)
    gen_s = time.perf_counter() - t0
    rows = [("assets load", f"{load_s * 1000:.0f} ms")]
    rows.append((f"generate {num:,}", f"{gen_s:.2f} s = {num / gen_s:,.0f} stories/s"))
    if speed_num:
        t0 = time.perf_counter()
        count = sum(1 for _ in synth.iter_stories(speed_num, seed + 1))
        s = time.perf_counter() - t0
        rows.append((f"generate {speed_num:,}", f"{s:.2f} s = {count / s:,.0f} stories/s"))
    texts = [r["story_zh"] for r in records]
    lengths = sorted(len(t) for t in texts)
    rows.append(("length (chars)", f"mean {sum(lengths) / len(lengths):.0f}, min {lengths[0]}, "
                                   f"median {lengths[len(lengths) // 2]}, max {lengths[-1]}"))
    rows.append(("distinct stories", f"{len(set(texts)) / len(texts):.2%}"))
    t0 = time.perf_counter()
    overlap = synth.max_ngram_overlap(texts, n=5)
    rows.append(("max 5-gram containment", f"{overlap['containment']:.3f} (pair {overlap['containment_pair']})"))
    rows.append(("max 5-gram Jaccard", f"{overlap['jaccard']:.3f} (pair {overlap['jaccard_pair']})"))
    rows.append(("pairs with containment >", ", ".join(f"{k}: {v}" for k, v in overlap["pairs_above"].items())
                 + f" of {overlap['pairs']:,} ({time.perf_counter() - t0:.1f} s)"))
    jieba = _jieba()
    vocab = collections.Counter()
    bad_words = 0
    for rec in records:
        tokens = jieba.lcut(rec["story_zh"])
        vocab.update(t for t in tokens if CJK.search(t))
        token_set = set(tokens)
        bad_words += sum(1 for w in rec["instruction"]["words"] if w not in token_set)
    rows.append(("distinct jieba words", f"{len(vocab):,}"))
    rows.append(("declared words not jieba tokens", f"{bad_words} of {3 * len(records):,}"))
    feats = collections.Counter(f for r in records for f in r["instruction"]["features"])
    rows.append(("features", ", ".join(f"{f} {feats[f] / num:.0%}" for f in synth.FEATURES)))
    mismatched = sum(1 for r in records if synth.detect_features(r["story_zh"]) != r["instruction"]["features"])
    rows.append(("features not read back", f"{mismatched}"))
    width = max(len(k) for k, _ in rows)
    print(f"xiaolm data synth, seed {seed}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if overlap["containment_pair"]:
        a, b = overlap["containment_pair"]
        print("\nmost alike pair (containment):\n" + texts[a] + "\n~~\n" + texts[b])


def _grams(text: str, n: int = 5) -> set:
    t = "".join(text.split())
    return {t[i:i + n] for i in range(len(t) - n + 1)}


def near_dups(num: int, seed: int, sample: int, thresholds=(0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> dict:
    import numpy as np

    from xiaolm.data.dedup import MinHasher

    t0 = time.perf_counter()
    texts = [r["story_zh"] for r in synth.iter_stories(num, seed)]
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sigs = MinHasher(num_perm=128, ngram=5).signatures(texts)
    sig_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    queries = rng.choice(num, size=min(sample, num), replace=False)
    low = min(thresholds)
    counts = {t: [] for t in thresholds}
    best, best_pair = 0.0, None
    t0 = time.perf_counter()
    for q in queries:
        est = (sigs == sigs[q]).mean(axis=1)
        est[q] = 0.0
        # the estimate's standard error at 128 permutations is <= 0.045: confirm everything within 3 of them
        cand = np.flatnonzero(est >= low - 0.14)
        gq = _grams(texts[q])
        exact = []
        for c in cand:
            gc = _grams(texts[c])
            exact.append(len(gq & gc) / len(gq | gc))
        for t in thresholds:
            counts[t].append(sum(j >= t for j in exact))
        if exact and max(exact) > best:
            best, best_pair = max(exact), (int(q), int(cand[int(np.argmax(exact))]))
    query_s = time.perf_counter() - t0
    out = {"num": num, "seed": seed, "sample": len(queries), "generate_s": gen_s, "minhash_s": sig_s,
           "query_s": query_s, "max_jaccard": best, "max_pair": best_pair, "thresholds": {}}
    for t in thresholds:
        c = np.asarray(counts[t])
        out["thresholds"][t] = {"with_neighbour": float((c > 0).mean()), "mean": float(c.mean()), "max": int(c.max())}
    out["distinct_profiles_0.8"] = num / (1.0 + out["thresholds"][0.8]["mean"])
    return out, texts


def near_dup_table(num: int, seed: int, sample: int) -> None:
    r, texts = near_dups(num, seed, sample)
    print(f"xiaolm data synth, seed {seed}: near-duplicates among {num:,} stories (sample of {r['sample']:,} "
          f"stories against all {num:,}; generate {r['generate_s']:.0f} s, MinHash {r['minhash_s']:.0f} s, "
          f"queries {r['query_s']:.0f} s)")
    print(f"  {'5-gram Jaccard >=':<18} {'stories with a neighbour':>25} {'neighbours: mean':>17} {'max':>5}")
    for t, v in r["thresholds"].items():
        print(f"  {t:<18} {v['with_neighbour']:>25.2%} {v['mean']:>17.3f} {v['max']:>5}")
    print(f"  max Jaccard in the sample: {r['max_jaccard']:.3f}")
    print(f"  distinct 5-gram profiles (N / mean cluster size at Jaccard >= 0.8): {r['distinct_profiles_0.8']:,.0f}")
    if r["max_pair"]:
        a, b = r["max_pair"]
        print("\nmost alike pair in the sample:\n" + texts[a] + "\n~~\n" + texts[b])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speed-num", type=int, default=50_000, help="also time this many stories (0: skip)")
    ap.add_argument("--build-keywords", action="store_true")
    ap.add_argument("--near-dups", type=int, default=0, metavar="N", help="near-duplicate figures for N stories")
    ap.add_argument("--sample", type=int, default=1000, help="stories compared against all N (--near-dups)")
    args = ap.parse_args()
    if args.near_dups:
        near_dup_table(args.near_dups, args.seed, args.sample)
    elif args.build_keywords:
        build_keywords(args.num, [101, 202, 303])
    else:
        table(args.num, args.seed, args.speed_num)


if __name__ == "__main__":
    main()
