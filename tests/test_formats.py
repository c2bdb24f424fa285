"""Instruction-data loaders: Alpaca, ShareGPT, OpenAI messages, in JSON and JSON Lines; malformed samples are
reported with file, line and reason and skipped. Checked on small hand-made files and on the real files."""
from __future__ import annotations

import json

import pytest

from xiaolm.data.formats import (
    RecordError,
    convert_record,
    detect_format,
    expand_paths,
    iter_json_records,
    load_conversations,
    load_file,
)


def test_each_layout_converts_to_messages():
    alpaca = {"instruction": "翻译", "input": "你好", "output": "hello", "system": "你是翻译",
              "history": [["一", "one"]]}
    msgs, note, fmt = convert_record(alpaca)
    assert fmt == "alpaca" and note is None
    assert msgs == [
        {"role": "system", "content": "你是翻译"},
        {"role": "user", "content": "一"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "翻译\n你好"}, {"role": "assistant", "content": "hello"},
    ]
    share = {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"},
                               {"from": "human", "value": "再问"}, {"from": "gpt", "value": "再答"}]}
    msgs, _, fmt = convert_record(share)
    assert fmt == "sharegpt" and [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    openai = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                           {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}
    msgs, _, fmt = convert_record(openai)
    assert fmt == "openai" and msgs[-1] == {"role": "assistant", "content": "a"}
    assert detect_format({"foo": 1}) is None


@pytest.mark.parametrize("record,reason", [
    ({"instruction": "x", "input": "", "output": ""}, "empty 'output'"),
    ({"instruction": "x"}, "missing field 'output'"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}, "expected 'user'"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "b"}]},
     "malformed tool JSON in 'conversations\\[1\\]'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "turns must alternate"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant answer"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "c"}]}, "expected a string"),
    ({"text": "hello"}, "no known layout"),
])
def test_malformed_records_name_the_reason(record, reason):
    with pytest.raises(RecordError, match=reason):
        convert_record(record)


def test_unanswered_last_turn_is_trimmed_and_reported(tmp_path):
    f = tmp_path / "c.jsonl"
    rec = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                             {"from": "human", "value": "c"}]}
    f.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    convs, report = load_file(f)
    assert len(convs) == 1 and [m["content"] for m in convs[0].messages] == ["a", "b"]
    assert report.trimmed == 1 and report.problems[0].where == f"{f}:1"


def test_json_lines_and_arrays_report_file_and_line(tmp_path):
    jl = tmp_path / "mixed.json"  # JSON Lines despite the .json name, like Belle_open_source_1k.json
    jl.write_text(
        json.dumps({"instruction": "a", "output": "b"}) + "\n"
        + "{not json\n"
        + "\n"
        + json.dumps({"instruction": "c", "output": ""}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}],
                      "story_id": "s1"}) + "\n",
        encoding="utf-8",
    )
    convs, report = load_file(jl)
    assert [c.where for c in convs] == [f"{jl}:1", f"{jl}:5"]
    assert convs[1].meta == {"story_id": "s1"}
    assert report.loaded == 2 and report.skipped == 2
    assert [p.where for p in report.problems] == [f"{jl}:2", f"{jl}:4"]
    assert "not valid JSON" in report.problems[0].reason and "empty 'output'" in report.problems[1].reason

    arr = tmp_path / "arr.json"
    arr.write_text('[\n  {"instruction": "a",\n   "output": "b"},\n  {"instruction": "c", "output": ""},\n'
                   '  {"instruction": "e", "output": "f"}\n]\n', encoding="utf-8")
    convs, report = load_file(arr)
    assert [c.where for c in convs] == [f"{arr}:2", f"{arr}:5"]
    assert report.problems[0].where == f"{arr}:4"

    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c", "output": \n]\n', encoding="utf-8")
    convs, report = load_file(broken)
    assert len(convs) == 1 and report.skipped == 1 and report.problems[0].where.startswith(f"{broken}:")
    assert "rest of the file is unread" in report.problems[0].reason


def test_forced_format_and_directories(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n", encoding="utf-8")
    convs, report = load_file(f, fmt="sharegpt")
    assert not convs and report.skipped == 1 and "conversations" in report.problems[0].reason
    d = tmp_path / "instruct"
    d.mkdir()
    (d / "train.jsonl").write_text("", encoding="utf-8")
    (d / "heldout.jsonl").write_text("", encoding="utf-8")
    assert expand_paths([str(d)]) == [d / "train.jsonl"]
    assert expand_paths([str(d)], split="heldout") == [d / "heldout.jsonl"]
    assert expand_paths([str(tmp_path / "instruct" / "..")])  # a plain directory: all its JSON files
    with pytest.raises(FileNotFoundError, match="nope"):
        expand_paths([str(tmp_path / "nope")])


# ------------------------------------------------------------------------------------------------ real files


def _first_line_of_element(path, line):
    return path.read_text(encoding="utf-8").splitlines()[line - 1]


def test_real_alpaca_zh(shared_data):
    path = shared_data / "alpaca_zh" / "zh-data-part-00.json"
    convs, report = load_file(path)
    assert report.format == "alpaca" and report.loaded > 10_000 and report.loaded + report.skipped == 10_021
    # The real file has a few samples with an empty output: each reported at the line where its object starts.
    assert report.skipped >= 1
    for p in report.problems:
        assert p.reason == "empty 'output'"
        line = int(p.where.rsplit(":", 1)[1])
        assert _first_line_of_element(path, line).strip() == "{"
        assert '"output": ""' in "\n".join(path.read_text(encoding="utf-8").splitlines()[line - 1 : line + 4])
    c = convs[0]
    assert [m["role"] for m in c.messages] == ["user", "assistant"] and c.reference


def test_real_llamafactory_alpaca_demo(shared_data):
    convs, report = load_file(shared_data / "llamafactory_demo_zh" / "alpaca_zh_demo.json")
    assert report.format == "alpaca" and report.loaded == 1000 and report.skipped == 0
    with_input = [c for c in convs if "\n" in c.messages[0]["content"]]
    assert with_input  # instruction + input joined into the user turn


def test_real_medicalgpt_sharegpt(shared_data):
    path = shared_data / "medicalgpt" / "sharegpt_zh_1K_format.jsonl"
    convs, report = load_file(path)
    assert report.format == "sharegpt" and report.loaded + report.skipped == 1000
    assert report.trimmed > 0  # some conversations end with an unanswered question
    assert any(len(c.messages) > 2 for c in convs)  # multi-turn
    for c in convs:
        roles = [m["role"] for m in c.messages]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:]))
    for p in report.problems:
        line = int(p.where.rsplit(":", 1)[1])
        assert json.loads(_first_line_of_element(path, line))  # the reported line is that record


def test_real_files_together_and_tool_calls_read(shared_data):
    convs, reports = load_conversations([
        shared_data / "medicalgpt" / "Belle_open_source_1k.json",  # JSON Lines under a .json name
        shared_data / "llamafactory_demo_zh" / "glaive_toolcall_zh_demo.json",
    ])
    belle, tools = reports
    assert belle.format == "alpaca" and belle.loaded == 1000
    # tool calls are read now (xiaolm.data.toolformats); the two records whose tool turn follows no call are reported
    assert tools.loaded == 298 and tools.skipped == 2
    assert all("needs an assistant call before it" in p.reason for p in tools.problems if p.action == "skipped")
    assert len(convs) == belle.loaded + tools.loaded


def test_iter_json_records_single_object(tmp_path):
    f = tmp_path / "one.json"
    f.write_text('\n\n{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    assert [(line, rec) for line, rec, _ in iter_json_records(f)] == [(3, {"instruction": "a", "output": "b"})]


# ------------------------------------------------- files written by Hugging Face datasets, for every data verb


ALPACA = [{"instruction": "写一个故事", "input": "", "output": "从前有一只小猫。"},
          {"instruction": "翻译：cat", "input": "", "output": ""},  # no answer: reported with its row
          {"instruction": "讲个笑话", "input": "关于狗", "output": "小狗追尾巴。"}]
MESSAGES = [{"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
            {"messages": [{"role": "user", "content": "再见"}, {"role": "assistant", "content": "再见！"}]}]


def _datasets_files(tmp_path, records, name):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(str(tmp_path / f"{name}.parquet"))
    ds.save_to_disk(str(tmp_path / f"{name}_saved"))
    arrow = sorted((tmp_path / f"{name}_saved").glob("*.arrow"))[0]
    (tmp_path / f"{name}.arrow").write_bytes(arrow.read_bytes())
    ds.to_csv(str(tmp_path / f"{name}.csv"), index=False)
    return [tmp_path / f"{name}.parquet", tmp_path / f"{name}_saved", tmp_path / f"{name}.arrow",
            tmp_path / f"{name}.csv"]


def test_conversations_from_parquet_arrow_csv_and_save_to_disk_with_file_row_problems(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ALPACA))
    want, _ = load_conversations(expand_paths([str(tmp_path / "a.jsonl")]))
    for path in _datasets_files(tmp_path, ALPACA, "alpaca"):
        files = expand_paths([str(path)])
        assert files == [path]  # a saved dataset is one input: its state.json is never data
        convs, reports = load_conversations(files)
        assert [c.messages for c in convs] == [c.messages for c in want], path
        assert reports[0].skipped == 1 and reports[0].problems[0].where == f"{path}:{3 if path.suffix == '.csv' else 2}"
    for path in _datasets_files(tmp_path, MESSAGES, "chat")[:3]:  # nested columns (lists of structs)
        convs, reports = load_conversations(expand_paths([str(path)]))
        assert [c.messages for c in convs] == [r["messages"] for r in MESSAGES] and reports[0].skipped == 0
    # a directory of them
    convs, _ = load_conversations(expand_paths([str(tmp_path)], split=None))
    assert len(convs) >= 4 * 2


def test_prompt_sets_eval_samples_and_preference_pairs_read_parquet(tmp_path):
    from xiaolm.data.pairs import load_preference_file, load_prompt_set
    from xiaolm.eval.instruct import load_eval_samples

    parquet = _datasets_files(tmp_path, MESSAGES, "chat")[0]
    assert len(load_prompt_set([str(parquet)], heldout=[]).prompts) == 2
    samples, _ = load_eval_samples([str(parquet)])
    assert [s["prompt"][-1]["content"] for s in samples] == ["你好", "再见"]
    pairs = [{"prompt": "写一句诗", "chosen": "春眠不觉晓。", "rejected": "诗诗诗。"},
             {"prompt": "问候", "chosen": "你好！", "rejected": None}]
    for path in _datasets_files(tmp_path, pairs, "pairs")[:3]:
        got, _labelled, report = load_preference_file(path)
        assert [p["chosen"] for p in got] == ["春眠不觉晓。"] and report.skipped == 1, path
        assert report.problems[0].startswith(f"{path}:2: ")


def test_data_instruct_reads_stories_from_parquet_and_save_to_disk(tmp_path, stories_file):
    datasets = pytest.importorskip("datasets")
    from xiaolm.cli import main

    lines = stories_file.read_text().splitlines()[:40]
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    ds = datasets.Dataset.from_list([json.loads(x) for x in lines])
    ds.to_parquet(str(tmp_path / "s.parquet"))
    ds.save_to_disk(str(tmp_path / "s_saved"))
    outs = {}
    for name in ("s.jsonl", "s.parquet", "s_saved"):
        assert main(["data", "instruct", str(tmp_path / name), "--out", str(tmp_path / f"out-{name}"),
                     "--seed", "0"]) == 0
        outs[name] = [json.loads(x)["messages"] for x in (tmp_path / f"out-{name}" / "train.jsonl").read_text().splitlines()]
    assert outs["s.jsonl"] and outs["s.parquet"] == outs["s.jsonl"] == outs["s_saved"]
