"""Exact and MinHash-LSH near-duplicate removal."""
from __future__ import annotations

import random

import numpy as np
import pytest

from xiaolm.data.dedup import (DedupConfig, Deduplicator, MinHasher, estimated_jaccard, exact_key, jaccard,
                               shingle_hashes, validate_dedup)

STORY_A = ("从前有一只小猫，它住在村子旁边的大树下。每天早上，小猫都会去河边看小鱼游来游去。有一天，它看见一只受伤的小鸟"
           "躺在草地上，翅膀上还有血。小猫没有吃掉小鸟，而是把它带回了家，用树叶给它盖好。过了几天，小鸟的伤好了，"
           "它唱着歌飞回了天空。")
STORY_B = ("莉莉很喜欢画画。她的房间里贴满了自己画的太阳、花朵和大海。妈妈说明天要带她去海边，莉莉高兴得一晚上都"
           "没睡好。到了海边，她发现真正的大海比画里的还要蓝。她坐在沙滩上，拿出画本，认真地画下了第一只海鸥。"
           "回家的路上，她说：“下次我要画会唱歌的浪花。”")


def mutate(text: str, n_changes: int, seed: int) -> str:
    rng = random.Random(seed)
    chars = list(text)
    for _ in range(n_changes):
        chars[rng.randrange(len(chars))] = rng.choice("天地人山水火木金土日月星")
    return "".join(chars)


def test_signatures_equal_datasketch_update_batch():
    from datasketch import MinHash

    texts = [STORY_A, "短", "", "两个字 与空格", STORY_B, "abcd"]
    sigs = MinHasher(num_perm=64, seed=3, ngram=5).signatures(texts)
    for text, sig in zip(texts, sigs):
        m = MinHash(num_perm=64, seed=3, hashfunc=int)
        m.update_batch(shingle_hashes(text, 5).tolist())
        assert np.array_equal(m.hashvalues, sig), text


def test_shingles_ignore_whitespace_and_never_use_single_characters():
    assert np.array_equal(shingle_hashes("小猫 在\n花园里", 5), shingle_hashes("小猫在花园里", 5))
    assert len(shingle_hashes("小猫在花园里", 5)) == 2
    with pytest.raises(ValueError, match="at least 2"):
        validate_dedup(DedupConfig(ngram=1))
    # Two unrelated Chinese texts share most single characters but almost no 5-grams.
    assert jaccard(STORY_A, STORY_B, ngram=5) < 0.05
    assert jaccard(STORY_A, STORY_B, ngram=1) > 0.1


def test_exact_duplicates_ignore_whitespace():
    dedup = Deduplicator(DedupConfig(near=False))
    spaced = STORY_A.replace("。", "。\n\n  ")
    verdicts = dedup.check([STORY_A, STORY_B, spaced, STORY_A])
    assert [v.kind for v in verdicts] == [None, None, "exact", "exact"]
    assert verdicts[2].match == 0 and verdicts[3].match == 0
    assert exact_key(STORY_A) == exact_key(spaced) != exact_key(STORY_B)


def test_near_duplicates_with_a_few_characters_changed_are_caught():
    long_story = STORY_A + STORY_B  # ~240 characters: 3 changed characters leave Jaccard near 0.88
    copies = [mutate(long_story, 3, seed) for seed in range(10)]
    assert all(0.8 <= jaccard(long_story, c) < 1 for c in copies)
    dedup = Deduplicator()
    verdicts = dedup.check([long_story, STORY_A, STORY_B] + copies)
    assert [v.kind for v in verdicts[:3]] == [None, None, None]
    assert all(v.kind == "near" and v.match == 0 and v.similarity >= 0.8 for v in verdicts[3:])
    assert dedup.kept == 3


def test_distinct_stories_sharing_a_template_are_not_merged():
    # Same opening and names, different events: Jaccard well below 0.8.
    base = "从前有一只小猫，它住在村子旁边的大树下。"
    endings = ["它每天去河边看小鱼，后来交了一个青蛙朋友，一起唱歌跳舞。",
               "有一天下起大雨，它帮老奶奶把晒在院子里的衣服收回屋里。",
               "冬天来了，它和小狗一起堆了一个很大的雪人，还给雪人戴上帽子。",
               "它想学会爬上屋顶看星星，摔了好几次，最后终于成功了。"]
    texts = [base + e * 2 for e in endings]
    assert max(jaccard(a, b) for i, a in enumerate(texts) for b in texts[i + 1:]) < 0.6
    verdicts = Deduplicator().check(texts)
    assert [v.kind for v in verdicts] == [None] * len(texts)


def test_threshold_is_respected_and_order_keeps_first_copy():
    heavy = mutate(STORY_A, 10, seed=1)  # ten changes in 115 characters: Jaccard about 0.4
    assert jaccard(STORY_A, heavy) < 0.6
    assert [v.kind for v in Deduplicator().check([STORY_A, heavy])] == [None, None]
    # A loose threshold merges it; the earlier document is the one kept.
    verdicts = Deduplicator(DedupConfig(threshold=0.3)).check([heavy, STORY_A])
    assert verdicts[0].kind is None and verdicts[1].kind == "near" and verdicts[1].match == 0


def test_duplicates_across_batches_and_estimate_tracks_true_jaccard():
    dedup = Deduplicator()
    first = dedup.check([STORY_A])
    second = dedup.check([STORY_B, mutate(STORY_A, 2, 7), STORY_B])
    assert first[0].kind is None
    assert [v.kind for v in second] == [None, "near", "exact"]
    assert [v.match for v in second[1:]] == [0, 1]
    for changes in (2, 6, 12):
        other = mutate(STORY_A, changes, changes)
        assert abs(estimated_jaccard(STORY_A, other) - jaccard(STORY_A, other)) < 0.15


def _planted_corpus(n_orig: int, seed: int = 0) -> list[str]:
    """Distinct documents followed by exact copies, near copies and copies of copies, shuffled after the first
    few so duplicates meet their originals inside a batch and across batches."""
    rng = random.Random(seed)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 400)]  # a small alphabet: many LSH false candidates
    docs = ["".join(rng.choice(han) for _ in range(rng.randint(60, 200))) for _ in range(n_orig)]
    copies = []
    for _ in range(n_orig // 2):
        base = rng.choice(docs + copies)
        copies.append(base if rng.random() < 0.3 else mutate(base, rng.randint(1, 12), rng.randrange(10**6)))
    tail = docs[20:] + copies
    rng.shuffle(tail)
    return docs[:20] + tail


def test_numpy_index_gives_the_same_verdicts_as_datasketch_lsh():
    docs = _planted_corpus(1500)
    numpy_index, reference = Deduplicator(), Deduplicator(index="datasketch")
    got, want = [], []
    for start in range(0, len(docs), 97):  # many batches: index levels merge, duplicates span batches
        got += numpy_index.check(docs[start:start + 97])
        want += reference.check(docs[start:start + 97])
    assert [(v.kind, v.match) for v in got] == [(v.kind, v.match) for v in want]
    kinds = [v.kind for v in got]
    assert kinds.count("exact") > 50 and kinds.count("near") > 100  # the comparison covers both kinds
    assert len(numpy_index._band_index[0].levels) < 8


def test_index_stays_under_300_bytes_per_kept_document():
    dedup = Deduplicator()
    rng = np.random.default_rng(0)
    for _ in range(20):  # signatures supplied directly: the index, not the hashing, is what is measured
        sigs = rng.integers(0, 2**32, size=(1000, 128), dtype=np.uint32)
        dedup.check([f"doc {rng.integers(10**12)}" for _ in range(1000)], signatures=sigs)
    assert dedup.kept == 20_000
    assert dedup.index_bytes / dedup.kept <= 300
