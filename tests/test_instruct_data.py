"""``xiaolm data instruct``: constraints read off the story itself, several wordings, split by story, deterministic."""
from __future__ import annotations

import json

import pytest

from xiaolm.cli import main
from xiaolm.tasks.constraints import score_response
from xiaolm.tasks.instruct import (
    InstructConfig,
    build_instruct,
    is_heldout,
    split_sentences,
    story_id_of,
    word_candidates,
)
from xiaolm.utils import read_jsonl


@pytest.fixture(scope="module")
def small_stories(tmp_path_factory):
    from xiaolm.data.synth import write_stories

    path = tmp_path_factory.mktemp("instruct_stories") / "stories.jsonl"
    write_stories(path, num=300, seed=7)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_stories):
    out = tmp_path_factory.mktemp("instruct_out")
    assert main(["data", "instruct", str(small_stories), "--out", str(out), "--heldout-fraction", "0.2",
                 "--samples-per-story", "2", "--seed", "3"]) == 0
    return out


def _records(d):
    return list(read_jsonl(d / "train.jsonl")), list(read_jsonl(d / "heldout.jsonl"))


def test_records_are_openai_messages_with_structured_constraints(built):
    train, heldout = _records(built)
    assert len(train) > 300 and len(heldout) > 40
    for rec in train + heldout:
        roles = [m["role"] for m in rec["messages"]]
        assert roles == ["user", "assistant"]
        assert rec["constraints"] and set(rec["constraints"]) <= {"词汇", "特征", "随机句子", "开头", "摘要"}
        assert rec["story_id"] == story_id_of(rec["messages"][1]["content"])
    report = json.loads((built / "report.json").read_text(encoding="utf-8"))
    assert report["train_samples"] == len(train) and report["heldout_samples"] == len(heldout)
    assert all(report["constraint_counts"][k] > 0 for k in ("词汇", "特征", "随机句子", "开头", "摘要"))
    assert (built / "config.yaml").is_file()


def test_every_constraint_is_true_of_its_story(built):
    """The reference story meets every constraint by the same rules the eval uses, markers included."""
    train, heldout = _records(built)
    for rec in train + heldout:
        story = rec["messages"][1]["content"]
        cons = rec["constraints"]
        result = score_response(cons, story, markers=True)
        assert result["all_met"] is not False, (cons, result["checks"])
        if "随机句子" in cons:
            assert cons["随机句子"] in split_sentences(story)[1:]
        if "开头" in cons:
            assert story.startswith(cons["开头"])
        if "词汇" in cons:
            assert len(cons["词汇"]) == 3 and all(len(w) >= 2 for w in cons["词汇"])


def test_words_are_verb_noun_adjective_by_jieba():
    import jieba.posseg as pseg

    text = "小明很勇敢，他在公园里放风筝。风筝飞得很高，天气很暖和，小明开心地跑来跑去。"
    found = word_candidates(text)
    tags = {p.word: p.flag for p in pseg.lcut(text, HMM=False)}
    for kind, flag in (("verb", "v"), ("noun", "n"), ("adj", "a")):
        assert found[kind], kind
        assert all(tags[w] == flag for w in found[kind])


def test_prompts_name_their_constraints_in_several_wordings(built):
    train, _ = _records(built)
    styles = {r["wording"] for r in train}
    assert styles == {"list", "sentences"}
    orders = set()
    for rec in train:
        prompt = rec["messages"][0]["content"]
        cons = rec["constraints"]
        for word in cons.get("词汇", []):
            assert word in prompt
        for key in ("随机句子", "开头", "摘要"):
            if key in cons:
                assert cons[key] in prompt
        for feat in cons.get("特征", []):
            assert feat in prompt
        orders.add(tuple(cons))
    assert len(orders) > 10  # random subsets in random order
    assert len({r["messages"][0]["content"].split("\n")[0][:6] for r in train}) > 3


def test_split_is_by_story_and_deterministic(built, small_stories, tmp_path):
    train, heldout = _records(built)
    train_ids = {r["story_id"] for r in train}
    held_ids = {r["story_id"] for r in heldout}
    assert not train_ids & held_ids
    assert all(is_heldout(s, 0.2) for s in held_ids) and not any(is_heldout(s, 0.2) for s in train_ids)
    # two samples per story, both on the story's side
    assert len(train) == 2 * len(train_ids) and len(heldout) == 2 * len(held_ids)

    again = tmp_path / "again"
    build_instruct(InstructConfig(stories=[str(small_stories)], out=str(again), heldout_fraction=0.2,
                                  samples_per_story=2, seed=3))
    assert (again / "train.jsonl").read_bytes() == (built / "train.jsonl").read_bytes()
    assert (again / "heldout.jsonl").read_bytes() == (built / "heldout.jsonl").read_bytes()

    other = tmp_path / "other"
    build_instruct(InstructConfig(stories=[str(small_stories)], out=str(other), heldout_fraction=0.2,
                                  samples_per_story=2, seed=4))
    t2, h2 = _records(other)
    assert {r["story_id"] for r in h2} == held_ids  # same split whatever the seed
    assert [r["constraints"] for r in t2] != [r["constraints"] for r in train]  # different draws


def test_english_summary_is_not_used_and_malformed_records_are_reported(tmp_path):
    stories = tmp_path / "s.jsonl"
    good = {"story": "x", "instruction": {"prompt:": "p", "words": ["run", "dog", "happy"], "features": ["Dialogue"]},
            "summary": "A dog runs.", "source": "GPT-4",
            "story_zh": "小狗很开心。它在草地上跑来跑去，找到了一个红色的球。小狗说：“我真高兴！”"}
    lines = [json.dumps(good, ensure_ascii=False), "{broken", json.dumps({"story": "no chinese"})]
    stories.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    report = build_instruct(InstructConfig(stories=[str(stories)], out=str(out), heldout_fraction=0.0,
                                           samples_per_story=8, keep_prob=1.0))
    assert report["malformed_records"] == 2
    assert report["problems"][0].startswith(f"{stories}:2:") and report["problems"][1].startswith(f"{stories}:3:")
    train, _ = _records(out)
    assert len(train) == 8
    for rec in train:
        assert "摘要" not in rec["constraints"]  # TinyStoriesChinese's summaries are English
        assert rec["constraints"].get("特征") == ["对话"]


def test_missing_story_file_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "instruct", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
