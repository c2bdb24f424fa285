"""The rule-based verifier, repetition measures, reference scores, and ``xiaolm eval instruct``.

The headline measurement lives here too: on the built-in corpus, after SFT the word constraint (词汇) is met at least
three times as often as by the pretrained model given the same instruction, and repetition does not rise.
"""
from __future__ import annotations

import json

import pytest

from xiaolm.tasks.constraints import (
    aggregate_repetition,
    constraint_reward,
    has_dialogue,
    has_marker,
    repetition_metrics,
    score_response,
)

STORY = ("小明今年五岁了。有一天，小明在公园里放风筝。风筝飞得很高很高。没想到，一阵大风把风筝吹走了。"
         "小明着急地说：“我的风筝！”后来，小明明白了一个道理：放风筝要拉紧线。")


def test_rule_checks_on_a_story():
    cons = {"词汇": ["风筝", "公园", "着急"], "随机句子": "风筝飞得很高很高。", "开头": "小明今年五岁了。",
            "特征": ["对话", "转折", "寓意"], "摘要": "小明的风筝被吹走了。"}
    s = score_response(cons, STORY)
    assert s["checks"] == {"词汇": True, "随机句子": True, "开头": True, "特征:对话": True, "特征:转折": True,
                           "特征:寓意": True}
    assert s["all_met"] is True and s["n_checked"] == 4 and s["unscored"] == ["摘要"]
    assert score_response(cons, STORY, markers=True)["n_checked"] == 6

    wrong = "有一天，小红在家里画画。她画了一只小猫，很开心。"
    s = score_response(cons, wrong)
    assert s["checks"]["词汇"] is False and s["checks"]["随机句子"] is False and s["checks"]["开头"] is False
    assert s["checks"]["特征:对话"] is False and s["all_met"] is False and s["n_met"] == 0
    # two of three words is not enough
    assert score_response({"词汇": ["风筝", "公园", "大象"]}, STORY)["checks"]["词汇"] is False
    # the opening must be at the start, not anywhere
    assert score_response({"开头": "风筝飞得很高很高。"}, STORY)["checks"]["开头"] is False
    # whitespace does not matter for sentences and openings
    assert score_response({"随机句子": "风筝飞得 很高很高。"}, STORY.replace("飞得", "飞得\n"))["checks"]["随机句子"]


def test_dialogue_needs_quoted_speech():
    assert has_dialogue("妈妈说：“快来吃饭。”")
    assert has_dialogue("他喊道「等等我」")
    assert not has_dialogue("他读了“书”这个字。")  # one character in quotes is not speech
    assert not has_dialogue("妈妈说快来吃饭。")
    assert not has_dialogue("“”")


def test_marker_checks_follow_the_generator():
    assert has_marker("小猫难过了很久。", "悲伤的结局")
    assert not has_marker("小猫很开心。", "悲伤的结局")
    # 伏笔 needs the hint first, then the payoff
    assert has_marker("奶奶说要带伞，他没有在意。后来下雨了，他想起了奶奶的话。", "伏笔")
    assert not has_marker("他想起了奶奶的话。奶奶说要带伞，他没有在意。", "伏笔")
    assert has_marker("x", "不存在") is None


def test_reference_stories_pass_their_own_feature_checks():
    """On the built-in corpus the feature checks agree with the declared features, both ways."""
    from xiaolm.data.synth import generate_stories
    from xiaolm.tasks.constraints import FEATURE_NAMES

    for rec in generate_stories(200, seed=11):
        declared = {FEATURE_NAMES[f] for f in rec["instruction"]["features"]}
        cons = {"特征": list(FEATURE_NAMES.values())}
        checks = score_response(cons, rec["story_zh"], markers=True)["checks"]
        shown = {name.split(":")[1] for name, ok in checks.items() if ok}
        assert shown == declared, (rec["story_zh"], declared, shown)


def test_repetition_metrics():
    assert repetition_metrics("")["rep4"] is None
    clean = repetition_metrics("从前有一只小猫它很喜欢晒太阳")
    assert clean["rep4"] == 0.0 and clean["distinct1"] == 1.0 and clean["distinct2"] == 1.0
    loop = repetition_metrics("小猫跑啊跑" * 20)
    assert loop["rep4"] > 0.9 and loop["distinct2"] < 0.1
    # 4-grams of "abcdabcd" = abcd bcda cdab dabc abcd: one of five repeats
    assert repetition_metrics("一二三四一二三四")["rep4"] == pytest.approx(1 / 5)
    agg = aggregate_repetition([clean, loop, repetition_metrics("")])
    assert agg["empty"] == 1 and agg["texts"] == 3 and agg["rep4"] == pytest.approx(loop["rep4"] / 2)


def test_reward_prefers_met_constraints_and_punishes_loops():
    cons = {"词汇": ["风筝", "公园", "着急"], "开头": "小明今年五岁了。"}
    good = constraint_reward(cons, STORY)
    half = constraint_reward(cons, "小明今年五岁了。他在家里。")
    looping = constraint_reward(cons, STORY + "风筝风筝风筝风筝" * 30)
    assert good > half > constraint_reward(cons, "")
    assert good > looping
    assert constraint_reward(cons, "") == -1.0


def test_reference_scores_are_character_level():
    from xiaolm.eval.instruct import reference_scores

    same = reference_scores(["今天天气很好，我们去公园玩。"], ["今天天气很好，我们去公园玩。"])
    assert same["bleu4"] == pytest.approx(100.0) and same["rouge_l"] == pytest.approx(100.0)
    part = reference_scores(["今天天气很好。"], ["今天天气很好，我们去公园玩。"])
    assert 0 < part["rouge_l"] < 100 and part["bleu4"] < 100
    assert reference_scores(["完全不同的句子"], ["今天天气很好"])["rouge_l"] == 0.0


def test_word_rate_by_chance_separates_following_from_common_words():
    """The 词汇 rate of a model that ignores the instruction equals its chance rate (another instruction's words in
    the same answer); one that follows it is far above."""
    from xiaolm.eval.instruct import format_table, summarise

    words = [["红花", "小河"], ["月亮", "星星"], ["西瓜", "苹果"], ["小船", "大海"]]
    samples = [{"constraints": {"词汇": w}, "reference": None} for w in words]
    follows = summarise(samples, ["".join(w) + "的故事。" for w in words])["words"]
    assert (follows["rate"], follows["chance_rate"], follows["chance_asked"]) == (1.0, 0.0, 8)
    every_word = "".join(sum(words, []))
    ignores = summarise(samples, [every_word] * 4)["words"]
    assert ignores["rate"] == ignores["chance_rate"] == 1.0
    one_story = summarise(samples, ["红花开在小河边。"] * 4)
    assert one_story["words"]["rate"] == one_story["words"]["chance_rate"] == 0.25
    assert "by chance, another instruction's words: 25.0%" in format_table(one_story)


def test_summarise_counts_each_constraint_and_the_references():
    from xiaolm.eval.instruct import format_table, summarise

    samples = [
        {"constraints": {"词汇": ["风筝", "公园", "着急"]}, "reference": STORY},
        {"constraints": {"词汇": ["小猫", "公园", "着急"], "开头": "小明今年五岁了。"}, "reference": STORY},
        {"constraints": {"摘要": "x"}, "reference": None},
    ]
    result = summarise(samples, [STORY, STORY, "随便"])
    assert result["constraints"]["词汇"] == {"n": 2, "met": 1, "rate": 0.5, "reference_rate": 0.5, "kind": "rule"}
    assert result["constraints"]["开头"]["rate"] == 1.0
    assert result["all_constraints"] == {"n": 2, "met": 1, "rate": 0.5, "counts": "rule checks"}
    assert result["unscored"] == {"摘要": 1}
    # 小猫 is the one word missing; the two instructions share words, so neither can stand in as the other's chance
    assert result["words"] == {"asked": 6, "used": 5, "rate": 5 / 6, "chance_asked": 0, "chance_used": 0,
                               "chance_rate": None}
    assert result["references"] == 2 and result["bleu4"] == pytest.approx(100.0)
    table = format_table(result)
    assert "词汇" in table and "50.0%" in table and "83.3%" in table and "BLEU-4" in table
