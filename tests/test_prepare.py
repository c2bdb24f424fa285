"""``xiaolm data prepare``: cleaning, filters, the pipeline, the split, the report, the CLI, real data."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import yaml

from xiaolm.data.clean import (CleanConfig, Cleaner, FilterConfig, clean_text, cjk_fraction, dup_line_fraction,
                               filter_reason, filter_reasons, split_long, top_ngram_fraction)
from xiaolm.data.prepare import PrepareConfig, is_validation, prepare
from xiaolm.data.readers import InputError

STORIES = [
    "从前有一只小猫，它住在村子旁边的大树下。每天早上，小猫都会去河边看小鱼游来游去。",
    "莉莉很喜欢画画。她的房间里贴满了自己画的太阳、花朵和大海。妈妈说明天要带她去海边。",
    "小明的风筝挂在了树上。他请爷爷帮忙，爷爷拿来一根长竹竿，轻轻地把风筝取了下来。",
    "老奶奶种的西瓜熟了。她把最大的一个送给邻居小红，小红高兴地说：“谢谢奶奶！”",
    "冬天来了，小狗和小兔一起堆雪人。它们给雪人戴上红帽子，还插上一根胡萝卜当鼻子。",
]


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_split(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def all_docs(out: Path) -> list[dict]:
    return read_split(out, "train") + read_split(out, "val")


# ---------------------------------------------------------------------------------------------- cleaning


def test_cleaning_keeps_fullwidth_punctuation():
    text = "他说：“你好！”（笑）她问：‘真的吗？’——是的；好、对…《书》【注】〔一〕～"
    assert clean_text(text) == text


def test_cleaning_removes_zero_width_and_control_characters():
    dirty = "\ufeff小\u200b明\u200c和\u200d小\u2060猫\u00ad在\x00玩\x07。\u202e\x1b"
    assert clean_text(dirty) == "小明和小猫在玩。"


def test_cleaning_whitespace_and_line_ends():
    text = "  第一回\u3000\u3000王教头  \t私走延安府\u3000 \r\n\r\n\r\n\r\n\u3000\u3000话说\u00a0大宋。\r末行\u2028新行"
    assert clean_text(text) == "第一回\u3000王教头 私走延安府\n\n话说 大宋。\n末行\n新行"
    kept_indent = Cleaner(CleanConfig(strip_indent=False, max_blank_lines=0))(text)
    assert kept_indent == "第一回\u3000王教头 私走延安府\n\u3000话说 大宋。\n末行\n新行"


def test_cleaning_fullwidth_alnum_and_traditional_to_simplified():
    assert clean_text("ＡＢＣ１２３，ｘｙｚ！") == "ABC123，xyz！"
    assert Cleaner(CleanConfig(fold_fullwidth_alnum=False))("Ａ１，") == "Ａ１，"
    to_simple = Cleaner(CleanConfig(to_simplified=True))
    assert to_simple("頭髮很長，「說」：乾隆") == "头发很长，「说」：乾隆"  # punctuation untouched, 乾隆 kept
    zh = Cleaner(CleanConfig(to_simplified=True, converter="zhconv"))
    assert zh("頭髮很長") == "头发很长"


# ----------------------------------------------------------------------------------------------- filters


def test_filter_measures():
    assert cjk_fraction("abc你好 ") == pytest.approx(2 / 5)
    assert cjk_fraction("   ") == 0.0
    assert dup_line_fraction("甲\n乙\n甲\n\n甲") == pytest.approx(0.5)
    assert top_ngram_fraction("哈哈哈哈哈哈", 2) == 1.0
    assert top_ngram_fraction("春眠不觉晓，处处闻啼鸟。", 5) == 0.0  # no 5-gram occurs twice
    long_spam = "点击这里购买！" * 100  # long texts take the numpy path: same answer
    assert top_ngram_fraction(long_spam, 5) == pytest.approx(top_ngram_fraction("点击这里购买！" * 4, 5), abs=0.01)


def test_each_filter_rule_drops_what_it_should():
    cfg = FilterConfig(min_chars=10, max_chars=60, too_long="drop")
    story = STORIES[0]
    cases = {
        "": "empty",
        "太短了。": "too_short",
        story * 2: "too_long",
        "This text is English with only 一点 Chinese in it.": "low_cjk",
        "买一送一！\n买一送一！\n买一送一！\n快来看看。": "repeated_lines",
        "点击这里购买！点击这里购买！点击这里购买！点击这里购买！": "repeated_ngrams",
        story: None,
    }
    for text, reason in cases.items():
        assert filter_reason(text, cfg) == reason, text
    assert filter_reasons(list(cases), cfg) == list(cases.values())


def test_split_long_prefers_paragraphs_then_sentences():
    text = "第一段第一句。第一段第二句。\n\n第二段。\n\n" + "很长的一句话没有句号" * 5
    assert split_long(text, 16)[0] == "第一段第一句。第一段第二句。"  # a paragraph that fits stays whole
    pieces = split_long(text, 10)
    assert all(len(p) <= 10 for p in pieces)
    assert pieces[:4] == ["第一段第一句。", "第一段第二句。", "第二段。", "很长的一句话没有句号"]
    assert "".join(pieces) == "".join(text.split())


# ---------------------------------------------------------------------------------------------- pipeline


_rng = random.Random(5)
LONG_DOC = "\n".join("".join(_rng.choice(STORIES)[_rng.randrange(20):][:15] for _ in range(3)) + "。"
                     for _ in range(40))  # ~1,800 characters of shuffled story fragments


def test_pipeline_counts_every_rule_and_duplicate(tmp_path):
    long_story = STORIES[0] + STORIES[1] + STORIES[2]
    near_copy = long_story.replace("小猫", "小狗", 1)  # one word changed: a near duplicate
    records = [{"text": s} for s in STORIES]
    records += [
        {"text": STORIES[0]},                                   # exact duplicate
        {"text": STORIES[1].replace("。", "。\n")},             # exact duplicate up to whitespace
        {"text": long_story}, {"text": near_copy},             # near duplicate
        {"text": "短。"},                                       # too_short
        {"text": "Mostly English words here, 中文很少 indeed."},  # low_cjk
        {"text": "同一行。\n同一行。\n同一行。\n另一行。"},       # repeated_lines
        {"text": "好好学习！好好学习！好好学习！好好学习！好好学习！"},  # repeated_ngrams
        {"text": "\u200b\u200b  \x00"},                         # empty after cleaning
        {"text": LONG_DOC},                                     # too_long: split into pieces
        {"no_text": "x"},                                       # malformed: missing field
    ]
    src = jsonl(tmp_path / "in.jsonl", records)
    report = prepare([str(src)], tmp_path / "out", quiet=True, max_chars=200, val_fraction=0.0)
    assert report["documents_in"] == len(records) - 1
    assert report["dropped"] == {"empty": 1, "too_short": 1, "too_long": 0, "low_cjk": 1, "repeated_lines": 1,
                                 "repeated_ngrams": 1}
    assert report["duplicates_exact"] == 2 and report["duplicates_near"] == 1
    assert report["dropped_examples"]["too_short"] == [f"{src}:10"]
    assert report["dropped_examples"]["repeated_ngrams"] == [f"{src}:13"]
    assert report["long_documents_split"] == 1 and report["pieces_added_by_split"] >= 4
    assert report["malformed_count"] == 1 and report["malformed"][0]["line"] == len(records)
    # Every document is accounted for exactly once.
    assert (report["documents_in"] + report["pieces_added_by_split"]
            == report["documents_kept"] + sum(report["dropped"].values())
            + report["duplicates_exact"] + report["duplicates_near"])
    docs = all_docs(tmp_path / "out")
    assert len(docs) == report["documents_kept"]
    assert [d["text"] for d in docs[:6]] == STORIES + [long_story]
    assert report["near_duplicate_examples"][0] == {"dropped": f"{src}:9", "kept": f"{src}:8",
                                                    "similarity": report["near_duplicate_examples"][0]["similarity"]}
    pieces = [d for d in docs if re.search(r":\d+/p\d+$", d["source"])]
    assert all(len(d["text"]) <= 200 for d in pieces) and pieces[0]["source"] == f"{src}:15/p1"
    # Dropping instead of splitting counts the long document under too_long.
    dropped = prepare([str(src)], tmp_path / "out2", quiet=True, max_chars=200, too_long="drop")
    assert dropped["dropped"]["too_long"] == 1 and dropped["pieces_added_by_split"] == 0


def test_output_records_and_report_keys(tmp_path):
    src = jsonl(tmp_path / "in.jsonl", [{"story_zh": s} for s in STORIES])
    out = tmp_path / "out"
    report = prepare([str(src)], out, field="story_zh", quiet=True)
    for key in ("documents_in", "documents_kept", "characters_in", "characters_kept", "dropped", "duplicates_exact",
                "duplicates_near", "malformed", "files", "train", "val", "wall_seconds", "documents_per_second"):
        assert key in report, key
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == report
    assert report["characters_in"] == report["characters_kept"] == sum(len(s) for s in STORIES)
    assert report["files"] == [{"file": str(src), "format": "jsonl", "documents_in": 5, "documents_kept": 5,
                                "characters_in": report["characters_in"], "characters_kept": report["characters_kept"],
                                "malformed": 0, "encoding": "utf-8"}]
    for doc in all_docs(out):
        assert set(doc) == {"text", "id", "source"}
        assert len(doc["id"]) == 16 and doc["source"].startswith(f"{src}:")
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert saved["field"] == "story_zh" and saved["inputs"] == [str(src)] and saved["dedup"]["ngram"] == 5


def test_split_is_stable_when_data_is_added(tmp_path):
    rng = random.Random(0)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]

    def doc():
        return "".join(rng.choice(han) for _ in range(40)) + "。"

    first = [{"text": doc()} for _ in range(400)]
    more = [{"text": doc()} for _ in range(400)]
    a = prepare([str(jsonl(tmp_path / "a.jsonl", first))], tmp_path / "a", quiet=True, val_fraction=0.1)
    both = [str(jsonl(tmp_path / "b0.jsonl", more[:200])), str(tmp_path / "a.jsonl"),
            str(jsonl(tmp_path / "b1.jsonl", more[200:]))]
    b = prepare(both, tmp_path / "b", quiet=True, val_fraction=0.1)
    assert a["documents_kept"] == 400 and b["documents_kept"] == 800
    split_a = {d["id"]: s for s in ("train", "val") for d in read_split(tmp_path / "a", s)}
    split_b = {d["id"]: s for s in ("train", "val") for d in read_split(tmp_path / "b", s)}
    assert all(split_b[i] == s for i, s in split_a.items())
    assert 20 <= a["val"]["documents"] <= 60  # about 10 %
    assert all(is_validation(d["text"], 0.1) for d in read_split(tmp_path / "b", "val"))


def test_output_is_deterministic_and_independent_of_workers(tmp_path, monkeypatch):
    import xiaolm.data.prepare_core as prep

    monkeypatch.setattr(prep, "BATCH_DOCS", 7)  # many small batches through the worker pool
    records = [{"text": s} for s in STORIES * 2] + [{"text": LONG_DOC}] + [{"text": "短"}]
    records += [{"text": s[::-1] + s} for s in STORIES]
    src = jsonl(tmp_path / "in.jsonl", records)
    reports = [prepare([str(src)], tmp_path / name, quiet=True, val_fraction=0.3, workers=workers, max_chars=300)
               for name, workers in (("x", 0), ("y", 0), ("z", 2))]
    assert reports[2]["workers"] == 2
    for key in ("documents_kept", "dropped", "duplicates_exact", "duplicates_near", "pieces_added_by_split"):
        assert reports[0][key] == reports[1][key] == reports[2][key], key
    for name in ("train.jsonl", "val.jsonl"):
        x = (tmp_path / "x" / name).read_bytes()
        assert x == (tmp_path / "y" / name).read_bytes() == (tmp_path / "z" / name).read_bytes()


def test_mixed_formats_and_per_file_counts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    jsonl(tmp_path / "in" / "a.jsonl", [{"modern": STORIES[0]}, {"modern": 7}])
    (tmp_path / "in" / "b.json").write_text(json.dumps([{"paragraphs": [STORIES[1][:20], STORIES[1][20:]]}],
                                                       ensure_ascii=False), "utf-8")
    (tmp_path / "in" / "c.csv").write_text(f"modern\n{STORIES[2]}\n{STORIES[0]}\n", encoding="utf-8")
    pq.write_table(pa.table({"modern": [STORIES[3]]}), tmp_path / "in" / "d.parquet")
    report = prepare([str(tmp_path / "in")], tmp_path / "out", field="modern|paragraphs", quiet=True)
    per_file = {Path(f["file"]).name: (f["documents_in"], f["documents_kept"], f["malformed"]) for f in report["files"]}
    assert per_file == {"a.jsonl": (1, 1, 1), "b.json": (1, 1, 0), "c.csv": (2, 1, 0), "d.parquet": (1, 1, 0)}
    assert report["duplicates_exact"] == 1  # c.csv's second row repeats a.jsonl's story
    assert report["malformed"] == [{"file": str(tmp_path / "in" / "a.jsonl"), "line": 2,
                                    "reason": "non-string field: 'modern' is int"}]
    assert STORIES[1] in [d["text"] for d in all_docs(tmp_path / "out")]  # the paragraphs, joined


def test_missing_input_fails_before_any_work(tmp_path):
    good = jsonl(tmp_path / "good.jsonl", [{"text": STORIES[0]}])
    out = tmp_path / "out"
    with pytest.raises(InputError, match="nope.jsonl"):
        prepare([str(good), str(tmp_path / "nope.jsonl")], out, quiet=True)
    assert not out.exists()
    with pytest.raises(InputError, match="matches no input files"):
        prepare([str(tmp_path / "*.csv")], out, quiet=True)
    with pytest.raises(ValueError, match="ngram"):
        prepare([str(good)], out, quiet=True, ngram=1)
    with pytest.raises(TypeError, match="unknown option"):
        prepare([str(good)], out, no_such_option=1)


def test_overrides_by_name_path_and_config_object(tmp_path):
    src = jsonl(tmp_path / "in.jsonl", [{"text": s} for s in STORIES])
    cfg = PrepareConfig(quiet=True)
    cfg.filters.min_chars = 45
    report = prepare([str(src)], tmp_path / "o", cfg, **{"dedup.threshold": 0.9})
    assert report["dropped"]["too_short"] == sum(len(s) < 45 for s in STORIES) > 0
    saved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text(encoding="utf-8"))
    assert saved["filters"]["min_chars"] == 45 and saved["dedup"]["threshold"] == 0.9
    assert cfg.dedup.threshold == 0.8  # the caller's config is not modified


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path, capsys):
    from xiaolm.cli import main

    novel = tmp_path / "novel.txt"
    novel.write_bytes(("第一回 开端\r\n" + STORIES[0] + "\r\n\r\n第二回 发展\r\n" + STORIES[1] + "\r\n").encode())
    ci = tmp_path / "ci.json"
    ci.write_text(json.dumps([{"paragraphs": ["春眠不觉晓，", "处处闻啼鸟。", "夜来风雨声，", "花落知多少。"]}],
                             ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    code = main(["data", "prepare", str(novel), "--txt-mode", "chapter", "--out", str(out), "--quiet",
                 "--min-chars", "5", "--dedup.threshold", "0.85"])
    assert code == 0
    docs = all_docs(out)
    assert [d["text"].split("\n")[0] for d in docs] == ["第一回 开端", "第二回 发展"]
    assert [d["source"] for d in docs] == [f"{novel}:1", f"{novel}:4"]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["documents_kept"] == 2
    # The saved config is a recipe: replaying it with another input and field works.
    out2 = tmp_path / "out2"
    code = main(["data", "prepare", str(ci), "--config", str(out / "config.yaml"), "--field", "paragraphs",
                 "--out", str(out2), "--no-quiet"])
    assert code == 0
    assert [d["text"] for d in all_docs(out2)] == ["春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"]
    saved = yaml.safe_load((out2 / "config.yaml").read_text(encoding="utf-8"))
    assert saved["dedup"]["threshold"] == 0.85 and saved["filters"]["min_chars"] == 5
    assert "documents in 1" in capsys.readouterr().err
    # A missing input is one clear error line naming it, before anything is written.
    code = main(["data", "prepare", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "out3")])
    assert code == 2 and "absent.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "out3").exists()
    with pytest.raises(SystemExit) as exc:
        main(["data", "prepare", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--field", "--txt-mode", "--min-chars", "--threshold", "--val-fraction", "--to-simplified"):
        assert flag in help_text


# ------------------------------------------------------------------------------------------- real data


def test_real_data_storybooks_and_a_novel_by_chapter(shared_data, tmp_path):
    novel = shared_data / "classic_novels" / "红楼梦.txt"
    stories = shared_data / "storybooks" / "stories_zh.jsonl"
    report = prepare([str(stories), str(novel)], tmp_path / "out", txt_mode="chapter", quiet=True)
    files = {Path(f["file"]).name: f for f in report["files"]}
    # 54 stories; 120 chapters plus the title line before 第一回.
    assert files["stories_zh.jsonl"]["documents_in"] == 54
    assert files["红楼梦.txt"]["documents_in"] == 121
    assert files["stories_zh.jsonl"]["documents_kept"] >= 50
    assert files["红楼梦.txt"]["documents_kept"] == 120
    assert report["malformed_count"] == 0 and report["duplicates_exact"] == 0
    docs = all_docs(tmp_path / "out")
    chapters = [d for d in docs if "红楼梦" in d["source"]]
    assert all(d["text"].startswith("第") and "回" in d["text"][:8] for d in chapters)
    assert all("\r" not in d["text"] and "\u3000\u3000" not in d["text"] for d in docs)
    assert sum(len(d["text"]) for d in chapters) > 800_000  # the whole novel, less indentation
    assert "“" in chapters[0]["text"] and "，" in chapters[0]["text"]  # full-width punctuation kept
