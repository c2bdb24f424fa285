"""``xiaolm data pairs``: every preference layout normalised into one pair format (on inline records and on the real
files in ../shared/data), malformed records reported with file, line and reason, and on-policy pairs sampled from a
model (held-out prompts refused, margins respected, throughput reported, deterministic for a seed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from xiaolm.cli import main
from xiaolm.data.pairs import PairError, convert_pair_record, load_preference_file
from xiaolm.utils import read_jsonl

USER = [{"role": "user", "content": "讲一个小猫的故事。"}]


def _write(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("rec, layout, prompt", [
    ({"prompt": "讲一个小猫的故事。", "chosen": "好的故事", "rejected": "坏的故事"}, "prompt", USER),
    ({"question": "讲一个小猫的故事。", "chosen": "好的故事", "rejected": "坏的故事", "system": "你是助手。"}, "prompt",
     [{"role": "system", "content": "你是助手。"}, *USER]),
    ({"prompt": USER, "chosen": "好的故事", "rejected": "坏的故事"}, "prompt", USER),
    ({"prompt": USER, "chosen": [{"role": "assistant", "content": "好的故事"}],  # TRL conversational
      "rejected": [{"role": "assistant", "content": "坏的故事"}]}, "prompt", USER),
    ({"conversations": [{"from": "human", "value": "讲一个小猫的故事。"}],
      "chosen": {"from": "gpt", "value": "好的故事"}, "rejected": {"from": "gpt", "value": "坏的故事"}},
     "llamafactory", USER),
    ({"conversations": [{"from": "human", "value": "讲一个小猫的故事。"}], "chosen": "好的故事",
      "rejected": "坏的故事"}, "medicalgpt", USER),
    ({"question": "讲一个小猫的故事。", "response_chosen": "好的故事", "response_rejected": "坏的故事",
      "history": [["你好", "你好呀"]]}, "medicalgpt",
     [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好呀"}, *USER]),
    ({"chosen": [*USER, {"role": "assistant", "content": "好的故事"}],
      "rejected": [*USER, {"role": "assistant", "content": "坏的故事"}]}, "minimind", USER),
])
def test_each_layout_normalises_to_one_pair_format(rec, layout, prompt):
    kind, norm, got = convert_pair_record(rec)
    assert (kind, got) == ("pair", layout)
    assert norm["prompt"] == prompt and norm["chosen"] == "好的故事" and norm["rejected"] == "坏的故事"


def test_labelled_records_and_metadata_are_kept():
    kind, norm, layout = convert_pair_record({"prompt": "讲故事", "completion": "从前……", "label": False, "id": 7})
    assert (kind, layout) == ("labelled", "kto") and norm["label"] is False and norm["id"] == 7
    _, norm, _ = convert_pair_record({"prompt": USER, "chosen": "a", "rejected": "b", "constraints": {"词汇": ["x"]}})
    assert norm["constraints"] == {"词汇": ["x"]}


@pytest.mark.parametrize("rec, reason", [
    ({"prompt": "讲故事", "chosen": "一样", "rejected": "一样"}, "identical"),
    ({"prompt": "讲故事", "chosen": "好"}, "missing field 'rejected'"),
    ({"chosen": "好", "rejected": "坏"}, "no prompt"),
    ({"prompt": "讲故事", "chosen": 3, "rejected": "坏"}, "expected a string"),
    ({"prompt": "", "chosen": "好", "rejected": "坏"}, "empty"),
    ({"chosen": [*USER, {"role": "assistant", "content": "好"}],
      "rejected": [{"role": "user", "content": "别的问题"}, {"role": "assistant", "content": "坏"}]},
     "different prompts"),
    ({"conversations": [{"from": "gpt", "value": "我先说"}], "chosen": "好", "rejected": "坏"}, "user turn"),
    ({"conversations": [{"from": "human", "value": "问"}], "chosen": {"from": "human", "value": "好"},
      "rejected": {"from": "gpt", "value": "坏"}}, "assistant turn"),
    ({"prompt": "讲故事", "completion": "好", "label": "yes"}, "expected true or false"),
    (["not", "an", "object"], "JSON object"),
])
def test_malformed_records_say_why(rec, reason):
    with pytest.raises(PairError, match=reason):
        convert_pair_record(rec)


def test_malformed_records_are_reported_with_file_and_line_and_skipped(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [
        {"prompt": "讲故事", "chosen": "好", "rejected": "坏"},
        "{broken json",
        {"prompt": "讲故事", "chosen": "同", "rejected": "同"},
        {"prompt": "讲故事", "completion": "好", "label": True},
    ])
    pairs, labelled, report = load_preference_file(path)
    assert len(pairs) == 1 and len(labelled) == 1 and report.skipped == 2
    assert report.problems[0].startswith(f"{path}:2: not valid JSON")
    assert report.problems[1].startswith(f"{path}:3:") and "identical" in report.problems[1]
    assert pairs[0]["source"] == f"{path}:1"


def test_cli_normalises_files_and_reports(tmp_path, capsys):
    src = _write(tmp_path / "in.jsonl", [{"prompt": "讲故事", "chosen": "好", "rejected": "坏"}, "{oops"])
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "pairs", "--data", str(src), "--out", str(out)]) == 0
    assert "1 pairs" in capsys.readouterr().out
    recs = list(read_jsonl(out))
    assert recs[0]["prompt"] == [{"role": "user", "content": "讲故事"}] and recs[0]["layout"] == "prompt"
    report = json.loads((tmp_path / "pairs.jsonl.report.json").read_text())
    assert report["skipped"] == 1 and f"{src}:2" in report["files"][0]["problems"][0]
    assert (tmp_path / "pairs.jsonl.config.yaml").is_file()
    # normalised output reads back as is
    assert main(["data", "pairs", "--data", str(out), "--out", str(tmp_path / "again.jsonl")]) == 0
    assert main(["data", "pairs", "--data", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert main(["data", "pairs", "--out", str(out)]) == 2  # neither --data nor --policy


# ------------------------------------------------------------------------------------------------ real files


def test_real_llamafactory_and_medicalgpt_files(shared_data):
    pairs, labelled, report = load_preference_file(shared_data / "llamafactory_demo_zh" / "dpo_zh_demo.json")
    assert report.layouts == {"llamafactory": 300} and len(pairs) == 300 and report.skipped == 0 and not labelled
    for p in pairs:
        assert p["prompt"][-1]["role"] == "user" and p["chosen"] != p["rejected"]
        roles = [m["role"] for m in p["prompt"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
    assert sum(p["prompt"][0]["role"] == "system" for p in pairs) > 0  # the file's system prompts are kept

    pairs, _, report = load_preference_file(shared_data / "medicalgpt" / "reward_medical_test.json")
    assert report.layouts == {"medicalgpt": 100} and len(pairs) == 100 and report.skipped == 0
    assert pairs[0]["prompt"] == [{"role": "user", "content": "肛门病变可能是什么疾病的症状?"}]
    assert pairs[0]["chosen"] == "食管克罗恩病"


# ------------------------------------------------------------------------------------------------ on-policy


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory, stories_file):
    out = tmp_path_factory.mktemp("pairs_instruct")
    assert main(["data", "instruct", str(stories_file), "--out", str(out), "--limit", "300",
                 "--heldout-fraction", "0.2"]) == 0
    return out


ONPOLICY = ["--k", "3", "--limit", "16", "--max-new-tokens", "24", "--min-margin", "0.0", "--batch-size", "18",
            "--device", "cpu"]


def test_on_policy_pairs(tmp_path, tiny_run, instruct_dir, capsys):
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "pairs", "--policy", str(tiny_run), "--prompts", str(instruct_dir), "--out", str(out),
                 *ONPOLICY]) == 0
    printed = capsys.readouterr().out
    assert "samples/s" in printed and "tokens/s" in printed
    report = json.loads(out.with_name("pairs.jsonl.report.json").read_text())
    g = report["generation"]
    usable = 16 - report["prompts_too_long"]  # the tiny model's context is 128 tokens: a long prompt may not fit
    assert usable >= 8 and g["samples"] == 3 * usable and g["samples_per_s"] > 0 and g["tokens_per_s"] > 0
    assert report["heldout_files"] == [str(instruct_dir / "heldout.jsonl")]
    pairs = list(read_jsonl(out))
    assert pairs and len(pairs) + report["dropped_below_margin"] == usable
    held = {r["story_id"] for r in read_jsonl(instruct_dir / "heldout.jsonl")}
    for p in pairs:
        assert p["story_id"] not in held
        assert p["scores"]["chosen"] >= p["scores"]["rejected"] and p["margin"] >= 0
        assert p["scores"]["chosen"] == max(p["sample_scores"]) and p["scores"]["rejected"] == min(p["sample_scores"])
        assert p["chosen"] != p["rejected"] and p["constraints"]
    # the same seed gives the same pairs
    again = tmp_path / "again.jsonl"
    assert main(["data", "pairs", "--policy", str(tiny_run), "--prompts", str(instruct_dir), "--out", str(again),
                 *ONPOLICY]) == 0
    assert list(read_jsonl(again)) == pairs
    # a minimum margin drops pairs whose best and worst are too close
    strict = tmp_path / "strict.jsonl"
    assert main(["data", "pairs", "--policy", str(tiny_run), "--prompts", str(instruct_dir), "--out", str(strict),
                 *ONPOLICY, "--min-margin", "0.3"]) == 0
    assert all(p["margin"] >= 0.3 for p in read_jsonl(strict))


def test_on_policy_refuses_heldout_prompts_and_reference_mode(tmp_path, tiny_run, instruct_dir):
    out = tmp_path / "pairs.jsonl"
    # every prompt of the held-out file is held out
    assert main(["data", "pairs", "--policy", str(tiny_run), "--prompts", str(instruct_dir / "heldout.jsonl"),
                 "--heldout", str(instruct_dir / "heldout.jsonl"), "--out", str(out), *ONPOLICY]) == 2
    assert main(["data", "pairs", "--policy", str(tiny_run), "--prompts", str(instruct_dir / "train.jsonl"),
                 "--out", str(out), *ONPOLICY, "--mode", "reference"]) == 0
    train = {json.dumps(r["messages"][:-1], ensure_ascii=False): r["messages"][-1]["content"]
             for r in read_jsonl(instruct_dir / "train.jsonl")}
    pairs = list(read_jsonl(out))
    assert pairs
    for p in pairs:  # chosen is the reference story
        assert p["chosen"] == train[json.dumps(p["prompt"], ensure_ascii=False)] and p["mode"] == "reference"
