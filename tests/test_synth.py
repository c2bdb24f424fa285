"""The built-in story corpus (xiaolm data synth): layout, variety, declared words and features, determinism, CLI.

The corpus-level figures are measured on 10,000 stories of seed 0, generated once for the module.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from itertools import combinations
from pathlib import Path

import pytest
import yaml

from xiaolm.data import synth
from xiaolm.data.synth import (FEATURES, detect_features, generate_stories, iter_stories, max_ngram_overlap,
                               write_stories)

N = 10_000
CJK = re.compile(r"[\u3400-\u9fff]")


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return generate_stories(N, seed=0)


@pytest.fixture(scope="module")
def texts(records) -> list[str]:
    return [r["story_zh"] for r in records]


@pytest.fixture(scope="module")
def jieba_mod():
    jieba = pytest.importorskip("jieba")
    jieba.setLogLevel(60)
    jieba.initialize()
    return jieba


@pytest.fixture(scope="module")
def tokens(texts, jieba_mod) -> list[list[str]]:
    return [jieba_mod.lcut(t) for t in texts]


# ------------------------------------------------------------------------------------------------- layout


def test_records_have_tinystorieschinese_layout(records):
    assert len(records) == N
    for rec in records[:2000]:
        assert set(rec) == {"story", "instruction", "summary", "source", "story_zh"}
        assert set(rec["instruction"]) == {"prompt:", "words", "features"}   # the key really has a colon
        assert rec["source"] == "xiaolm-synth"
        assert isinstance(rec["story"], str) and rec["story"].startswith("A short story about")
        assert CJK.search(rec["summary"]) and rec["summary"].endswith("。")
        assert "\n" not in rec["summary"]
        words = rec["instruction"]["words"]
        assert len(words) == 3 and all(isinstance(w, str) and w for w in words)
        assert all(w in rec["instruction"]["prompt:"] for w in words)
        feats = rec["instruction"]["features"]
        assert feats == [f for f in FEATURES if f in feats]    # known names, canonical order, no repeats
    json.dumps(records[:10], ensure_ascii=False)


def test_text_is_chinese_with_full_width_punctuation(texts):
    lengths = [len(t) for t in texts]
    assert min(lengths) >= synth.MIN_CHARS
    assert 150 <= sum(lengths) / len(lengths) <= 450
    for t in texts:
        assert not re.search(r'[,.!?;:"\']', t), t              # no ASCII punctuation in the stories
        assert t.count("“") == t.count("”"), t
        for paragraph in t.split("\n"):
            assert paragraph and paragraph[-1] in "。！？”…", t
        assert "{" not in t and "[" not in t and "|" not in t, t   # no template syntax left over


def test_measure_words_agree_with_nouns(texts):
    """一只风筝, 一本图画书, 一根香蕉: wherever a known thing follows 一 and a measure word, it is one of its own."""
    lex = synth.load_bank().records
    allowed: dict[str, set[str]] = {}
    for key in ("objects", "foods", "dishes"):
        for row in lex[key]:
            allowed.setdefault(row[0], set()).add(row[1])
    measure_words = set().union(*allowed.values())
    checked = 0
    for noun, mws in allowed.items():
        # the noun on its own (not the head of a compound such as 贝壳项链)
        pattern = re.compile("一(.)(?:[\u3400-\u4dff\u4e01-\u9fff]{1,5}的)?" + re.escape(noun)
                             + r"(?=[^\u3400-\u9fff]|[了在和也就都呀])")
        for t in texts:
            for m in pattern.finditer(t):
                if m.group(1) in measure_words:
                    assert m.group(1) in mws, (noun, m.group(0), t)
                    checked += 1
    assert checked > 1000


def test_animal_heroes_are_it_and_people_he_or_she():
    bank = synth.load_bank()
    for i in range(400):
        story = synth.compose_story(0, i, bank)
        if story.info["world"] == "animal":
            assert story.slots["P"] == "它"
            assert story.slots["mom"].endswith("妈妈") and story.slots["mom"] != "妈妈"
        else:
            assert story.slots["P"] in ("他", "她")
            assert story.slots["pk"] == ("小男孩" if story.slots["P"] == "他" else "小女孩")


# ------------------------------------------------------------------------------------------------ variety


def test_at_least_99_percent_of_stories_are_distinct(texts):
    assert len(set(texts)) / len(texts) >= 0.99


def test_max_ngram_overlap_is_exact_on_a_sample(texts):
    """The sparse computation equals a brute-force pass over every pair (no pair can be missed)."""
    sample = texts[:120]

    def grams(t):
        t = "".join(t.split())
        return {t[i:i + 5] for i in range(len(t) - 4)}

    sets = [grams(t) for t in sample]
    best_c = best_j = 0.0
    for a, b in combinations(range(len(sample)), 2):
        shared = len(sets[a] & sets[b])
        best_c = max(best_c, shared / min(len(sets[a]), len(sets[b])))
        best_j = max(best_j, shared / len(sets[a] | sets[b]))
    got = max_ngram_overlap(sample, n=5, block=37)
    assert got["containment"] == pytest.approx(best_c, abs=1e-9)
    assert got["jaccard"] == pytest.approx(best_j, abs=1e-9)
    assert got["pairs"] == len(sample) * (len(sample) - 1) // 2
    # and it notices a near copy
    twin = sample + [sample[3] + "小明笑了。"]
    assert max_ngram_overlap(twin)["containment"] == pytest.approx(1.0)


def test_no_two_stories_share_more_than_80_percent_of_their_5grams(texts):
    result = max_ngram_overlap(texts, n=5)
    print(f"\nmax 5-gram containment {result['containment']:.3f}, max Jaccard {result['jaccard']:.3f}, "
          f"pairs above: {result['pairs_above']}")
    assert result["containment"] <= 0.8, result
    assert result["jaccard"] <= 0.8, result


def test_stories_use_at_least_1500_distinct_words(tokens):
    vocab = {w for toks in tokens for w in toks if CJK.search(w)}
    print(f"\ndistinct jieba words: {len(vocab)}")
    assert len(vocab) >= 1500


def test_structure_varies_not_only_fillers():
    """Plots, shapes and stage sequences vary: many distinct stage sequences, every plot used."""
    bank = synth.load_bank()
    stories = [synth.compose_story(7, i, bank) for i in range(2000)]
    assert {s.plot for s in stories} == set(bank.plots)
    sequences = {tuple(s.stages) for s in stories}
    assert len(sequences) > 1000
    assert len({len(s.stages) for s in stories}) >= 8


# ---------------------------------------------------------------------------------- words and features


def test_declared_words_are_in_the_story_as_jieba_tokens(records, tokens):
    for rec, toks in zip(records, tokens):
        text, token_set = rec["story_zh"], set(toks)
        for word in rec["instruction"]["words"]:
            assert word in text, (word, text)
            assert word in token_set, (word, rec["instruction"]["words"], text)
    # the three words vary
    assert len({tuple(r["instruction"]["words"]) for r in records}) > N * 0.8


def test_declared_words_have_the_right_part_of_speech(records, jieba_mod):
    import jieba.posseg as pseg

    wanted = ("v", "n", "a")
    for rec in records[:300]:
        tagged = {(w, flag) for w, flag in pseg.lcut(rec["story_zh"])}
        for word, tag in zip(rec["instruction"]["words"], wanted):
            assert (word, tag) in tagged, (word, tag, rec["story_zh"])


def test_declared_features_are_exactly_the_ones_in_the_text(records):
    for rec in records:
        assert detect_features(rec["story_zh"]) == rec["instruction"]["features"], rec


def test_feature_markers(records):
    speech_intro = re.compile(r"：“|”[^。！？“]{0,12}(说|问|喊)")
    seen = {f: 0 for f in FEATURES}
    attributed = 0
    for rec in records:
        text, feats = rec["story_zh"], rec["instruction"]["features"]
        for f in feats:
            seen[f] += 1
        if "Dialogue" in feats:                                    # quoted speech, mostly with a speech verb
            assert any(len(CJK.findall(q)) >= 2 for q in synth.SPEECH_RE.findall(text)), text
            attributed += bool(speech_intro.search(text))
        else:
            assert "“" not in text and "”" not in text, text
        if "BadEnding" in feats:                                   # the sad closing is near the end
            assert max(text.rfind(m) for m in synth.BAD_ENDING_MARKERS) > len(text) * 0.6, text
        if "Foreshadowing" in feats:
            hint = min(text.find(m) for m in synth.FORESHADOW_HINT_MARKERS if m in text)
            assert text.find("想起", hint) > hint, text          # the payoff comes after the hint
    assert attributed >= 0.9 * seen["Dialogue"], (attributed, seen["Dialogue"])
    for f, count in seen.items():
        assert count >= N * 0.15, (f, count)                      # every feature is common enough
    assert sum(1 for r in records if not r["instruction"]["features"]) > 100


def test_feature_stages_are_rendered():
    bank = synth.load_bank()
    for i in range(1500):
        story = synth.compose_story(3, i, bank)
        stages = set(story.stages)
        feats = set(story.features)
        assert ("twist" in stages) == ("Twist" in feats), (story.features, story.stages)
        assert ("conflict" in stages) == ("Conflict" in feats)
        assert ("moral" in stages) == ("MoralValue" in feats)
        assert {"fore_hint", "fore_payoff"} <= stages if "Foreshadowing" in feats else not {"fore_hint"} & stages
        assert story.outcome == ("bad" if "BadEnding" in feats else "good")


def test_assets_check_rejects_a_marker_outside_its_stage(tmp_path):
    for name in ("plots.yaml", "lexicon.yaml", "keywords.json"):
        shutil.copy(synth.ASSETS / name, tmp_path / name)
    synth.Bank(tmp_path)                                           # the shipped assets pass
    plots = (tmp_path / "plots.yaml").read_text(encoding="utf-8")
    leaked = plots.replace("{p}急得快要哭了", "没想到{p}急得快要哭了", 1) if "{p}急得快要哭了" in plots else \
        plots.replace("      {p}[急得|难过得]快要哭了。", "      没想到，{p}[急得|难过得]快要哭了。", 1)
    assert leaked != plots
    (tmp_path / "plots.yaml").write_text(leaked, encoding="utf-8")
    with pytest.raises(ValueError, match="twist"):
        synth.Bank(tmp_path)


# ------------------------------------------------------------------------------------- determinism, CLI


def test_same_seed_same_stories_and_other_seed_other_stories(records):
    again = generate_stories(300, seed=0)
    assert again == records[:300]                 # also: a shorter run is a prefix of a longer one
    other = generate_stories(300, seed=1)
    assert sum(a["story_zh"] == b["story_zh"] for a, b in zip(again, other)) == 0
    assert list(iter_stories(5, seed=0, start=100)) == records[100:105]


def test_generation_ignores_global_random_state():
    random.seed(1)
    a = generate_stories(20, seed=5)
    random.seed(2)
    _ = random.random()
    b = generate_stories(20, seed=5)
    assert a == b


def test_write_stories_and_cli(tmp_path, capsys):
    path = tmp_path / "a" / "stories.jsonl"
    assert write_stories(path, num=25, seed=4) == 25
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == generate_stories(25, seed=4)
    assert "“" in path.read_text(encoding="utf-8") or "。" in lines[0]      # written unescaped (UTF-8)

    from xiaolm.cli import main as cli

    out = tmp_path / "cli" / "s.jsonl"
    assert cli(["data", "synth", "--num", "40", "--seed", "4", "--out", str(out)]) == 0
    recs = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert recs[:25] == generate_stories(25, seed=4) and len(recs) == 40
    cfg = yaml.safe_load((out.parent / "s.jsonl.config.yaml").read_text(encoding="utf-8"))
    assert cfg == {"out": str(out), "num": 40, "seed": 4, "start": 0}


def test_cli_help_and_bad_arguments(tmp_path, capsys):
    from xiaolm.cli import main as cli

    with pytest.raises(SystemExit) as exc:
        cli(["data", "synth", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert "--num" in help_text and "--seed" in help_text and "--out" in help_text
    code = cli(["data", "synth", "--num", "5"])  # no --out
    assert code == 2
    assert "--out" in capsys.readouterr().err
    code = cli(["data", "synth", "--num", "0", "--out", str(tmp_path / "x.jsonl")])
    assert code == 2
    assert not (tmp_path / "x.jsonl").exists()


# --------------------------------------------------------------------------------------------- large runs


def test_the_stories_that_used_to_run_out_of_draws():
    """Seed 0 died at story 107,383, seed 1 at 105,771, seed 5 at 73,031 ("no usable [...] after 8 draws")."""
    bank = synth.load_bank()
    for seed, index in ((0, 107_383), (1, 105_771), (5, 73_031)):
        story = synth.compose_story(seed, index, bank)
        assert all(story.words) and all(w in story.text for w in story.words), (seed, index, story.words)


def _check_large_run(seed: int, num: int) -> None:
    bank = synth.load_bank()
    seen = set()
    for index in range(num):
        story = synth.compose_story(seed, index, bank)
        assert all(story.words) and all(w in story.text for w in story.words), (seed, index, story.words)
        seen.add(story.text)
    assert len(seen) == num      # all distinct


def test_100k_stories_of_seed_0_all_distinct_with_their_words():
    """Past the old crash rate (about one story in 100k ran out of draws; the known crash points have their own test),
    in about 20 s on 2 cores; the GPU quickstart's 200k and more run under -m slow, for three seeds."""
    _check_large_run(0, 100_000)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_250k_stories_all_distinct_with_their_words(seed):
    _check_large_run(seed, 250_000)
