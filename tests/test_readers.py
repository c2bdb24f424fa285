"""Input discovery and reading: every format (plain and .gz), field paths, txt modes, malformed records."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from xiaolm.data.readers import InputError, ReadLog, extract_field, iter_records, resolve_inputs


def write(path: Path, data: str | bytes, gz: bool = False) -> Path:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if gz:
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def read(inputs, **kw):
    log = ReadLog()
    records = list(iter_records([str(i) for i in inputs], collector=log, **kw))
    return records, log


STORIES = [{"story_zh": "小猫在花园里追蝴蝶。", "n": 1}, {"story_zh": "老奶奶给小明讲故事。", "n": 2}]


# --------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_plain_and_gzip(tmp_path, gz):
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in STORIES) + "\n"
    path = write(tmp_path / ("s.jsonl.gz" if gz else "s.jsonl"), text, gz)
    records, log = read([path], field="story_zh")
    assert [r.text for r in records] == [s["story_zh"] for s in STORIES]
    assert [r.line for r in records] == [1, 2]
    assert records[1].source == f"{path}:2"
    assert log.malformed_total == 0


@pytest.mark.parametrize("gz", [False, True])
def test_json_array_gives_row_of_each_record(tmp_path, gz):
    """Arrays are streamed (ijson), so an item is named by its row, as in an object holding a list."""
    text = json.dumps(STORIES, ensure_ascii=False, indent=2)
    path = write(tmp_path / ("a.json.gz" if gz else "a.json"), text, gz)
    records, _ = read([path], field="story_zh")
    assert [r.text for r in records] == [s["story_zh"] for s in STORIES]
    assert [r.row for r in records] == [1, 2] and records[1].source == f"{path}#2"


def test_json_object_holding_a_list_and_single_record(tmp_path):
    path = write(tmp_path / "o.json", json.dumps({"version": 1, "data": STORIES}, ensure_ascii=False))
    records, _ = read([path], field="story_zh")
    assert [r.text for r in records] == [s["story_zh"] for s in STORIES]
    assert [r.row for r in records] == [1, 2] and records[0].source == f"{path}#1"
    keyed = write(tmp_path / "k.json", json.dumps({"a": [{"x": 1}], "b": STORIES}, ensure_ascii=False))
    records, _ = read([keyed], field="story_zh", json_key="b")
    assert len(records) == 2
    single = write(tmp_path / "one.json", json.dumps(STORIES[0], ensure_ascii=False))
    records, _ = read([single], field="story_zh")
    assert [r.text for r in records] == [STORIES[0]["story_zh"]]


def test_json_file_that_is_really_json_lines(tmp_path):
    # medicalgpt's Belle_open_source_1k.json is JSON Lines under a .json name
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in STORIES)
    records, log = read([write(tmp_path / "lines.json", text)], field="story_zh")
    assert [r.line for r in records] == [1, 2] and log.malformed_total == 0


@pytest.mark.parametrize("gz", [False, True])
def test_csv(tmp_path, gz):
    text = 'id,text,label\r\n1,"第一行，有逗号",a\r\n2,"多行\n文本",b\r\n3,普通文本,c\r\n'
    path = write(tmp_path / ("t.csv.gz" if gz else "t.csv"), text, gz)
    records, log = read([path])
    assert [r.text for r in records] == ["第一行，有逗号", "多行\n文本", "普通文本"]
    assert [r.line for r in records] == [2, 3, 5]  # the quoted newline makes record 2 span two lines
    assert log.malformed_total == 0


@pytest.mark.parametrize("gz", [False, True])
def test_parquet_with_nested_struct(tmp_path, gz):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"meta": [{"zh": {"body": "春眠不觉晓。"}}, {"zh": {"body": "处处闻啼鸟。"}}],
                      "text": ["一", "二"]})
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
    if gz:
        path = write(tmp_path / "p.parquet.gz", path.read_bytes(), gz=True)
    records, log = read([path], field="meta.zh.body")
    assert [r.text for r in records] == ["春眠不觉晓。", "处处闻啼鸟。"]
    assert [r.row for r in records] == [1, 2]
    records, log = read([path], field="nope")
    assert records == [] and log.malformed_total == 2
    assert any("missing from every record" in w for w in log.warnings)


def test_hf_dataset_from_a_local_directory(tmp_path):
    pytest.importorskip("datasets")
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    write(ds_dir / "train.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in STORIES))
    records, log = read([f"hf:{ds_dir}"], field="story_zh", hf_cache_dir=str(tmp_path / "cache"))
    assert [r.text for r in records] == [s["story_zh"] for s in STORIES]
    assert records[0].source == f"hf:{ds_dir}#1"
    with pytest.raises(InputError, match="hf:"):
        resolve_inputs([f"hf:{tmp_path / 'absent'}"], hf_cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------- txt modes

NOVEL = ("《小说》作者\r\n\r\n第一回 开篇\r\n    话说天下大势。\r\n\r\n    第二回中提到的事，此处不表。\r\n"
         "第二回　继续\r\n    又说一事。\r\n\t\t\r\n第三回 结局\r\n    完。\r\n")


def test_txt_chapter_mode_with_crlf(tmp_path):
    path = write(tmp_path / "novel.txt", NOVEL)
    records, log = read([path], txt_mode="chapter", chapter_regex="第.+回")
    assert [r.text.split("\n")[0] for r in records] == ["《小说》作者", "第一回 开篇", "第二回　继续", "第三回 结局"]
    assert [r.line for r in records] == [1, 3, 7, 10]
    assert all("\r" not in r.text for r in records)
    # the indented mention of 第二回 inside chapter one did not start a chapter
    assert "第二回中提到的事" in records[1].text
    assert log.warnings == []


def test_txt_line_paragraph_file_modes_and_gzip(tmp_path):
    text = "第一段第一行\r\n第一段第二行\r\n\r\n  \r\n第二段\r\n\r\n第三段\r"
    path = write(tmp_path / "t.txt.gz", text, gz=True)
    lines, _ = read([path], txt_mode="line")
    assert [(r.text, r.line) for r in lines] == [("第一段第一行", 1), ("第一段第二行", 2), ("第二段", 5), ("第三段", 7)]
    paras, _ = read([path], txt_mode="paragraph")
    assert [(r.text, r.line) for r in paras] == [("第一段第一行\n第一段第二行", 1), ("第二段", 5), ("第三段", 7)]
    whole, _ = read([path], txt_mode="file")
    assert len(whole) == 1 and whole[0].text.startswith("第一段第一行\n第一段第二行\n") and whole[0].line == 1


def test_txt_bare_cr_line_ends(tmp_path):
    records, _ = read([write(tmp_path / "mac.txt", "甲\r乙\r丙")], txt_mode="line")
    assert [r.text for r in records] == ["甲", "乙", "丙"]


def test_chapter_regex_without_match_warns(tmp_path):
    records, log = read([write(tmp_path / "x.txt", "没有标题的文本。\n第二行。")], txt_mode="chapter")
    assert len(records) == 1 and any("matched no line" in w for w in log.warnings)


# ------------------------------------------------------------------------------------------- field paths


def test_field_paths():
    rec = {"paragraphs": ["气和玉烛，", "睿化著鸿明。"], "a": {"b": {"c": "深"}}, "prompt:": "colon key",
           "turns": [{"value": "你好"}], "n": 3, "none": None, "mixed": ["a", 1]}
    assert extract_field(rec, "paragraphs") == ("气和玉烛，睿化著鸿明。", None)
    assert extract_field(rec, "paragraphs", joiner="\n") == ("气和玉烛，\n睿化著鸿明。", None)
    assert extract_field(rec, "a.b.c") == ("深", None)
    assert extract_field(rec, "prompt:") == ("colon key", None)
    assert extract_field(rec, "turns.0.value") == ("你好", None)
    assert extract_field("整条记录", "") == ("整条记录", None)
    assert extract_field(rec, "modern|a.b.c|paragraphs") == ("深", None)  # first alternative present
    assert extract_field(rec, "x|y")[1].startswith("missing field: none of 'x|y'")
    assert extract_field(rec, "n|a.b.c")[1].startswith("non-string")  # present but wrong type: no fallback
    for path, reason in [("a.b.x", "missing field"), ("missing", "missing field"), ("n", "non-string"),
                         ("none", "non-string"), ("mixed", "non-string"), ("turns.5.value", "missing field"),
                         ("n.x", "missing field")]:
        text, why = extract_field(rec, path)
        assert text is None and why.startswith(reason), (path, why)


# ------------------------------------------------------------------------------------------ malformed


def test_malformed_jsonl_records_are_reported_with_line_and_reason(tmp_path):
    good = json.dumps({"text": "好的记录一。"}, ensure_ascii=False).encode()
    lines = [
        good,                                                  # 1 ok
        b'{"text": "broken',                                   # 2 bad JSON
        json.dumps({"other": "x"}).encode(),                   # 3 missing field
        json.dumps({"text": 42}).encode(),                     # 4 non-string
        b'{"text": "\xff\xfe bad bytes"}',                     # 5 non-UTF-8
        b"",                                                   # 6 blank: not a record
        json.dumps({"text": "\ud800x"}).encode(),              # 7 unpaired surrogate escape
        json.dumps({"text": "好的记录二。"}, ensure_ascii=False).encode(),  # 8 ok
    ]
    path = write(tmp_path / "m.jsonl", b"\n".join(lines) + b"\n")
    records, log = read([path])
    assert [(r.text, r.line) for r in records] == [("好的记录一。", 1), ("好的记录二。", 8)]
    got = [(m.file, m.line, m.reason.split(":")[0]) for m in log.malformed]
    assert got == [(str(path), 2, "bad JSON"), (str(path), 3, "missing field"), (str(path), 4, "non-string field"),
                   (str(path), 5, "non-UTF-8 bytes"), (str(path), 7, "invalid Unicode")]
    assert log.malformed_total == 5 and log.files[str(path)].malformed == 5 and log.files[str(path)].records == 2
    assert log.by_reason["bad JSON"] == 1


def test_malformed_csv_and_txt_and_json_array(tmp_path):
    csv_path = write(tmp_path / "b.csv", b"id,text\n1,ok one\n2,too,many\n3,\xff\xfe\n4,ok two\n")
    records, log = read([csv_path])
    assert [r.text for r in records] == ["ok one", "ok two"]
    assert [(m.line, m.reason.split(":")[0]) for m in log.malformed] == [(3, "bad CSV row"), (4, "non-UTF-8 bytes")]

    txt_path = write(tmp_path / "b.txt", "第一行\n".encode() + b"\xc3\x28bad\n" + "第三行\n".encode())
    records, log = read([txt_path])
    assert [r.text for r in records] == ["第一行", "第三行"]
    assert [(m.line, m.reason.split(":")[0]) for m in log.malformed] == [(2, "non-UTF-8 bytes")]

    arr = '[\n  {"text": "一"},\n  {"text": 5},\n  {"text": "三"},\n  {"text": oops}\n]'
    records, log = read([write(tmp_path / "b.json", arr)])
    assert [r.text for r in records] == ["一", "三"]
    assert [(m.row, m.reason.split(":")[0]) for m in log.malformed] == [(2, "non-string field"), (4, "bad JSON")]


def test_truncated_gzip_is_reported_not_fatal(tmp_path):
    payload = gzip.compress(("\n".join(json.dumps({"text": f"第{i}条"}, ensure_ascii=False)
                                       for i in range(2000)) + "\n").encode())
    path = write(tmp_path / "cut.jsonl.gz", payload[: len(payload) // 2])
    records, log = read([path])
    assert 0 < len(records) < 2000
    assert log.malformed_total == 1 and "unreadable file" in log.malformed[0].reason


def test_collector_default_prints_malformed(tmp_path, capsys):
    path = write(tmp_path / "m.jsonl", '{"text": "ok"}\n{bad\n')
    assert [r.text for r in iter_records([str(path)])] == ["ok"]
    assert f"{path}:2" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ resolving


def test_resolve_directories_globs_and_errors(tmp_path):
    sub = tmp_path / "corpus" / "nested"
    sub.mkdir(parents=True)
    write(tmp_path / "corpus" / "b.jsonl", "{}")
    write(sub / "a.txt", "x")
    write(sub / "skip.md", "x")
    write(tmp_path / "corpus" / ".hidden.txt", "x")
    found = [Path(f.path).name for f in resolve_inputs([str(tmp_path / "corpus")])]
    assert found == ["b.jsonl", "a.txt"]  # sorted walk, directories after files at each level, no .md/.hidden
    globbed = [Path(f.path).name for f in resolve_inputs([str(tmp_path / "corpus" / "**" / "*.txt")])]
    assert globbed == ["a.txt"]
    with pytest.raises(InputError, match="not found: .*missing.jsonl"):
        resolve_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(InputError, match="matches no input files"):
        resolve_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(InputError, match="unsupported input type"):
        resolve_inputs([str(sub / "skip.md")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no input files"):
        resolve_inputs([str(tmp_path / "empty")])
    write(tmp_path / "fake.jsonl.gz", "not gzip")
    with pytest.raises(InputError, match="not gzip"):
        resolve_inputs([str(tmp_path / "fake.jsonl.gz")])
    write(tmp_path / "bad.parquet", "not parquet")
    with pytest.raises(InputError, match="parquet"):
        resolve_inputs([str(tmp_path / "bad.parquet")])


def test_iter_records_checks_all_inputs_before_reading(tmp_path):
    good = write(tmp_path / "g.jsonl", '{"text": "x"}\n')
    with pytest.raises(InputError, match="absent.txt"):
        iter_records([str(good), str(tmp_path / "absent.txt")])  # raised at the call, not on first next()


# ------------------------------------------------------------------------ files written by Hugging Face datasets


def _hf_dataset(n: int = 7):
    datasets = pytest.importorskip("datasets")
    texts = [f"第{i}个故事：小猫和小狗在花园里玩。" for i in range(n)]
    return datasets.Dataset.from_dict({"text": texts, "id": list(range(n))}), texts


def test_datasets_parquet_arrow_and_save_to_disk_are_read_with_rows_named(tmp_path):
    import datasets

    ds, texts = _hf_dataset()
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = sorted((tmp_path / "saved").glob("*.arrow"))[0]
    (tmp_path / "single.arrow").write_bytes(arrow.read_bytes())
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    for inp, want in ((tmp_path / "d.parquet", texts), (tmp_path / "saved", texts),
                      (tmp_path / "single.arrow", texts), (tmp_path / "dict", texts)):
        records, log = read([inp])
        assert [r.text for r in records] == want, inp
        assert log.malformed_total == 0 and not log.warnings, (inp, log.warnings)
        assert records[2].source.endswith("#3")
        assert not any("state.json" in r.source or "dataset_info" in r.source for r in records)
    records, _ = read([tmp_path / "dict"], hf_split="test")
    assert [r.text for r in records] == texts[:2]
    with pytest.raises(InputError, match="without split 'validation'"):
        resolve_inputs([str(tmp_path / "dict")], hf_split="validation")


def test_a_directory_with_a_saved_dataset_inside_skips_its_json_bookkeeping(tmp_path):
    ds, texts = _hf_dataset(4)
    ds.save_to_disk(str(tmp_path / "corpus" / "part1"))
    records, log = read([tmp_path / "corpus"])
    assert [r.text for r in records] == texts and log.malformed_total == 0 and not log.warnings


def test_arrow_rows_missing_the_field_are_reported_with_file_and_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["好的故事。", None, "另一个故事。"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    records, log = read([tmp_path / "saved"])
    assert [r.text for r in records] == ["好的故事。", "另一个故事。"]
    assert log.malformed_total == 1 and log.malformed[0].row == 2 and log.malformed[0].file.endswith(".arrow")


def test_prepare_and_tokenize_read_a_save_to_disk_directory(tmp_path, tokenizer_dir, stories_file):
    import datasets

    from xiaolm.cli import main
    from xiaolm.data.shards import TokenShards

    texts = [json.loads(line)["story_zh"] for line in stories_file.read_text().splitlines()[:30]]
    ds = datasets.Dataset.from_dict({"text": texts})
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert main(["data", "prepare", str(tmp_path / "saved"), "--out", str(tmp_path / "prep")]) == 0
    n = sum(len((tmp_path / "prep" / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "val"))
    assert n == len(texts)
    for inp in ("saved", "d.parquet"):
        out = tmp_path / f"shards-{inp}"
        assert main(["data", "tokenize", str(tmp_path / inp), "--tokenizer", str(tokenizer_dir),
                     "--out", str(out), "--workers", "1", "--no-progress"]) == 0
        assert len(TokenShards(out, "train").doc_starts) == len(texts)


# ------------------------------------------------------------------------------------------ encodings

CORPUS = ["从前有一座山，山里有一座庙。庙里有个老和尚在给小和尚讲故事。",
          "小猫在花园里追蝴蝶，蝴蝶飞到了高高的树上。",
          "老奶奶给小明讲了一个关于月亮和星星的故事。"] * 4


@pytest.mark.parametrize("codec,found", [("gbk", "gb18030"), ("gb18030", "gb18030"), ("utf-16-le", "utf-16-le"),
                                         ("utf-16", "utf-16-le")])
@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "csv"])
def test_gbk_gb18030_and_utf16_inputs_are_detected(tmp_path, codec, found, kind):
    if kind == "txt":
        text = "\n".join(CORPUS) + "\n"
    elif kind == "jsonl":
        text = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in CORPUS)
    elif kind == "json":
        text = json.dumps([{"text": t} for t in CORPUS], ensure_ascii=False)
    else:
        text = "id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(CORPUS))
    path = write(tmp_path / f"c.{kind}", text.encode(codec))
    records, log = read([path])
    assert [r.text for r in records] == CORPUS and log.malformed_total == 0
    assert log.files[str(path)].encoding == found  # utf-16 with a BOM: the BOM names the byte order


def test_encoding_given_explicitly_and_a_bad_name_is_refused(tmp_path):
    path = write(tmp_path / "c.txt", "一丌丐专丕业\n".encode("gbk"))  # these GBK bytes happen to be valid UTF-8
    records, log = read([path])
    assert log.files[str(path)].encoding == "utf-8" and records[0].text != "一丌丐专丕业"  # undetectable
    records, log = read([path], encoding="GBK")
    assert [r.text for r in records] == ["一丌丐专丕业"] and log.files[str(path)].encoding == "gb18030"
    with pytest.raises(ValueError, match="--encoding 'klingon'"):
        read([path], encoding="klingon")


def test_a_gbk_line_in_a_utf8_file_is_dropped_alone(tmp_path):
    path = write(tmp_path / "mixed.txt", ("\n".join(CORPUS) + "\n").encode() + "坏行\n".encode("gbk"))
    records, log = read([path])
    assert [r.text for r in records] == CORPUS and log.malformed_total == 1
    assert log.malformed[0].line == len(CORPUS) + 1 and log.files[str(path)].encoding == "utf-8"


def test_json_array_with_bad_bytes_in_one_item_keeps_the_others(tmp_path):
    items = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in CORPUS[:3]]
    items[1] = items[1].replace("小猫".encode(), b"\xff\xfe")
    path = write(tmp_path / "a.json", b"[" + b",\n".join(items) + b"]")
    records, log = read([path])
    assert [r.text for r in records] == [CORPUS[0], CORPUS[2]]
    assert [(m.row, m.reason.split(":")[0]) for m in log.malformed] == [(2, "non-UTF-8 bytes")]


def test_data_prepare_reads_a_gbk_corpus_and_names_file_and_encoding(tmp_path, capsys):
    from xiaolm.cli import main

    gbk = write(tmp_path / "gbk.txt", ("\n".join(CORPUS[:3]) + "\n").encode("gbk") + b"\xff\xff\xff\n")
    utf16 = write(tmp_path / "u16.txt", ("\n".join(CORPUS[3:6]) + "\n").encode("utf-16"))
    assert main(["data", "prepare", str(gbk), str(utf16), "--out", str(tmp_path / "out"), "--val-fraction", "0",
                 "--no-exact", "--no-near"]) == 0
    err = capsys.readouterr().err
    assert f"{gbk}: 1 malformed records dropped, read as gb18030" in err
    assert f"{utf16}: read as utf-16-le" in err
    kept = [json.loads(x)["text"] for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert len(kept) == 6 and kept[0] == CORPUS[0]
    assert main(["data", "prepare", str(gbk), "--out", str(tmp_path / "o2"), "--encoding", "nope"]) == 2
    assert "--encoding 'nope'" in capsys.readouterr().err
