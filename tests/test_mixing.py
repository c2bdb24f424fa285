"""Training on several shard directories at once: weights respected, one tokenizer required, resumable order."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from xiaolm.data.shards import MixedShards, ShardMismatchError, parse_data_dirs, tokenize_to_shards
from xiaolm.data.vocab import train_tokenizer

SEQ = 16


def _docs(n: int, words: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + "。" for _ in range(n)]


def _prepared(root: Path, name: str, docs: list[str]) -> Path:
    d = root / name
    d.mkdir()
    with (d / "train.jsonl").open("w", encoding="utf-8") as fh:
        for t in docs:
            fh.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return d


@pytest.fixture(scope="module")
def three_dirs(tmp_path_factory):
    """Three corpora of very different sizes, tokenised separately with one tokenizer."""
    root = tmp_path_factory.mktemp("mix")
    words = ["小猫", "公园", "苹果", "朋友", "河边", "月亮", "老师", "书包", "太阳", "雨伞"]
    sources = [_prepared(root, f"p{i}", _docs(n, words, i)) for i, n in enumerate((400, 120, 40))]
    tok = root / "tok"
    train_tokenizer([str(s) for s in sources], tok, vocab_size=300, progress=False)
    dirs = []
    for i, src in enumerate(sources):
        out = root / f"shards{i}"
        tokenize_to_shards([str(src)], tok, out, workers=0, progress=False)
        dirs.append(str(out))
    return {"dirs": dirs, "root": root, "tok": tok, "words": words}


def test_observed_mixture_matches_the_weights(three_dirs):
    weights = [0.2, 0.3, 0.5]  # the smallest corpus gets the largest weight: it repeats
    mixed = MixedShards(three_dirs["dirs"], weights)
    plan = mixed.windows(SEQ, seed=7)
    n = plan.num_windows
    located = [plan.locate(g) for g in range(3 * n)]
    counts = Counter(part for part, _ in located)
    for part, w in enumerate(weights):
        assert abs(counts[part] / (3 * n) - w) <= 1 / n  # exact in every pass, up to rounding
    # Over a short stretch (a tenth of a pass) the mix is already close to the weights.
    early = Counter(part for part, _ in located[: n // 10])
    for part, w in enumerate(weights):
        assert abs(early[part] / (n // 10) - w) < 0.1
    # Each window's tokens are that directory's window, and a directory's windows are used evenly: over three
    # passes each is drawn floor or ceil of (draws / windows) times (none skipped while another repeats).
    for g in (0, 1, n - 1, n, 2 * n + 5):
        part, window = plan.locate(g)
        assert np.array_equal(plan.read(g), mixed.parts[part].read(window * SEQ, SEQ + 1))
    for part in range(3):
        seen = Counter(w for p, w in located if p == part)
        size = int(plan.part_windows[part])
        draws = sum(seen.values())
        uses = [seen.get(w, 0) for w in range(size)]
        assert min(uses) >= draws // size and max(uses) <= -(-draws // size)
    # Deterministic in the seed (resuming at a step reads the same windows), different for another seed.
    again = mixed.windows(SEQ, seed=7)
    assert [again.locate(g) for g in range(50)] == located[:50]
    assert [mixed.windows(SEQ, seed=8).locate(g) for g in range(50)] != located[:50]


def test_default_weights_are_token_shares(three_dirs):
    mixed = MixedShards(three_dirs["dirs"])
    sizes = np.array([p.num_tokens for p in mixed.parts], dtype=float)
    assert np.allclose(mixed.weights, sizes / sizes.sum())
    assert mixed.num_tokens == int(sizes.sum())


def test_directories_from_different_tokenizers_are_refused(three_dirs, tmp_path):
    other_tok = tmp_path / "tok2"
    src = _prepared(tmp_path, "q", _docs(200, ["星星", "火车", "海边", "蛋糕"], 9))
    train_tokenizer([str(src)], other_tok, vocab_size=280, progress=False)
    other = tmp_path / "shards_other"
    tokenize_to_shards([str(src)], other_tok, other, workers=0, progress=False)
    with pytest.raises(ShardMismatchError, match="shards_other.*share one tokenizer"):
        MixedShards([three_dirs["dirs"][0], str(other)])

    from xiaolm.cli import main

    assert main(["pretrain", "--data", three_dirs["dirs"][0], str(other), "--out", str(tmp_path / "run")]) == 2


def test_data_dir_weight_syntax():
    assert parse_data_dirs(["a/:0.5", "b:0.25", "c/:0.25"]) == (["a/", "b", "c/"], [0.5, 0.25, 0.25])
    assert parse_data_dirs(["a", "b"], [2, 1]) == (["a", "b"], [2, 1])
    assert parse_data_dirs("one/dir") == (["one/dir"], None)
    assert parse_data_dirs(["we:ird/dir"]) == (["we:ird/dir"], None)
    with pytest.raises(ValueError, match="2 weights for 3"):
        parse_data_dirs(["a", "b", "c"], [1, 2])
    with pytest.raises(ValueError, match="every directory has a :WEIGHT"):
        parse_data_dirs(["a:1", "b"])
    with pytest.raises(ValueError, match="non-negative"):
        parse_data_dirs(["a", "b"], [1, -1])


def test_pretrain_cli_trains_on_a_weighted_mix(three_dirs, tmp_path, capsys):
    from conftest import TINY_PRETRAIN
    from xiaolm.cli import main

    d = three_dirs["dirs"]
    args = [a for a in TINY_PRETRAIN]
    args[args.index("--seq-len") + 1] = str(SEQ)
    assert main(["pretrain", "--data", f"{d[0]}:0.6", f"{d[2]}:0.4", "--out", str(tmp_path / "run"),
                 "--max-steps", "3", "--eval-every", "0", *args]) == 0
    err = capsys.readouterr().err
    assert "data mix:" in err and "60.0%" in err and "40.0%" in err
