"""Issue headline for instruction tuning, measured on the built-in stories at a CPU budget with fixed seeds.

The pretrained model and the SFT model answer the same held-out instructions through the chat template ("prompted
the same way"), greedy. Asserted:

- the SFT model reads the instruction: it uses the required words (词汇, counted word by word) at least 1.5x as
  often as the words another instruction asked for (``chance_rate``: common story words turn up anyway, and a
  better pretrained model writes more of them; measured with the untied recipe-v2 base: the pretrained model
  alone already used 8.3% of the asked words through the chat template; with document masking, the default
  since, 6.4%, and SFT 18.6% against 8.8% by chance), and more often than the pretrained
  model. The stricter figure, all three words in one story, is printed beside it: at this budget it stays near
  zero for both models.
- repetition does not rise. Given the chat template, the pretrained model answers with shorter texts (it never saw
  the template) and a short text has less room to repeat itself, while the SFT model writes whole stories;
  so the share of repeated 4-grams is compared at equal length: each SFT answer is cut to the length of the
  pretrained model's answer to the same instruction. The raw figures are printed too.
"""
from __future__ import annotations

from fractions import Fraction

from xiaolm.eval.instruct import format_table
from xiaolm.tasks.constraints import repetition_metrics

from conftest import load_bench


def length_matched_rep4(reference_answers: list[str], answers: list[str]) -> tuple[float, float]:
    """Mean rep-4 of ``reference_answers`` and of ``answers`` each cut to its reference's length. A pair whose
    reference is empty is left out: cut to nothing, neither text repeats nor varies (``repetition_metrics`` gives
    None, and its own averages skip such texts)."""
    pairs = [(r, a[: len(r)]) for r, a in zip(reference_answers, answers) if r]
    ref = [repetition_metrics(r)["rep4"] for r, _ in pairs]
    cut = [repetition_metrics(a)["rep4"] for _, a in pairs]
    return sum(ref) / len(ref), sum(cut) / len(cut)


def test_length_matched_rep4_cuts_to_the_reference_length():
    base, same = length_matched_rep4(["小猫小猫小猫小猫", "今天天气好"], ["小猫小猫小猫小猫后来", "今天天气好"])
    assert base == same > 0  # the loop is inside the first eight characters, so the cut keeps it
    base, other = length_matched_rep4(["今天天气很好啊"], ["小猫小猫小猫小猫"])
    assert base == 0 and other > 0
    # an empty reference (the pretrained model answered nothing) leaves its pair out instead of failing on None
    loop = repetition_metrics("小猫小猫小猫小猫")["rep4"]
    assert length_matched_rep4(["", "小猫小猫小猫小猫"], ["小狗小狗小狗小狗", "小猫小猫小猫小猫"]) == (loop, loop)


def test_sft_uses_the_asked_words_well_above_chance_without_more_repetition(story_sft, heldout_eval):
    base = heldout_eval(story_sft["base"])
    sft = heldout_eval(story_sft["sft"])
    print(format_table(base, "pretrained model, chat template"))
    print(format_table(sft, "after SFT, chat template"))
    assert base["words"]["asked"] >= 100  # enough word constraints among the held-out samples to mean something
    # exact fractions, so that "1.5x as often" includes an exact tie
    sft_rate, base_rate = (Fraction(r["words"]["used"], r["words"]["asked"]) for r in (sft, base))
    sft_chance = Fraction(sft["words"]["chance_used"], sft["words"]["chance_asked"])
    assert sft_rate >= Fraction(3, 2) * max(sft_chance, Fraction(1, 100)), sft["words"]
    assert sft_rate > base_rate, (base["words"], sft["words"])
    base_rep, sft_rep = length_matched_rep4([g["response"] for g in base["generations"]],
                                            [g["response"] for g in sft["generations"]])
    print(f"rep-4 at equal length: pretrained {base_rep:.4f}, SFT {sft_rep:.4f}")
    assert sft_rep <= base_rep, (base_rep, sft_rep)
    # SFT answers with whole stories (to the 200-token cap), longer than the pretrained model's chat-template answers
    # (measured: 194 vs 74 characters on the default base, 187 vs 120 without document masking; with the tied
    # recipe-1201 base the latter were fragments of ~50)
    assert sft["repetition"]["mean_chars"] >= 1.3 * base["repetition"]["mean_chars"], (sft["repetition"],
                                                                                       base["repetition"])


def test_copy_probe_sees_names_copied_and_the_prompt_read(story_sft, stories_file):
    """bench/copy_probe.py, the reading behind docs/RECIPE.md's headline: the pretrained model copies a fresh name
    from its context (later mentions far cheaper than the first: measured 17.8 vs 5.7 nats), and the SFT model's
    answers are likelier under their own instruction than under another story's (measured gap on 开头 +0.20
    nats/token), yet far from copying the given opening (own loss 0.6 nats/token, not near zero)."""
    import json

    from xiaolm.model.io import load_model

    probe = load_bench("copy_probe")
    with stories_file.open(encoding="utf-8") as f:
        stories = [json.loads(line)["story_zh"] for line, _ in zip(f, range(300))]
    with (story_sft["instruct"] / "heldout.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    base, base_tok, _ = load_model(story_sft["base"], device="cpu")
    names = probe.name_probe(base.eval(), base_tok, stories)
    print(names)
    assert names["stories"] >= 30 and names["later"] < 0.5 * names["first"], names
    sft, sft_tok, _ = load_model(story_sft["sft"], device="cpu")
    read = probe.prompt_probe(sft.eval(), sft_tok, rows)
    print(read)
    assert read["开头"]["n"] >= 30 and read["开头"]["swapped"] - read["开头"]["own"] > 0.05, read
