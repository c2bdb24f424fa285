"""Issue headline for alignment, on the built-in task at a CPU budget with fixed seeds: the SFT model, SFT+DPO on
on-policy pairs and SFT+GRPO answer the same held-out instructions (greedy); the side-by-side table is printed
(``pytest -s`` shows it).

Asserted: DPO on on-policy pairs raises the rate of the rule-checked constraint a sub-1M-parameter model can
move (对话, quoted speech) by at least 10 points on the 40 held-out instructions that ask for it (the one-sided
Fisher exact p of the two counts is printed beside it); the all-constraints-met rate does not fall; repetition does
not rise. At this budget the words, sentence and opening constraints stay near zero for every model, so "all
constraints met" is mostly the 对话-only instructions. Measured 2026-12-07 on the recipe in
configs/dpo-stories.yaml (pairs with the greedy answer as a candidate; DPO lr 2e-4, beta 0.05, SFT weight 1.0,
3 epochs), loaded 2-core machine: 对话 24/40 -> 37/40 (p = 0.001), all constraints 7.2% -> 8.4% of 166, rep-4
0.058 -> 0.043; the same recipe with pairs sampled at seed 1: 对话 24/40 -> 30/40 (p = 0.12), all constraints
7.2% -> 7.8%, rep-4 0.058 -> 0.042.
The old recipe (no greedy candidate; lr 1e-4, beta 0.3, 2 epochs) gave 24/40 -> 25/40 on the same SFT model.

GRPO: a short run (12 steps) must not collapse into repetition or empty answers (fast). The ``slow`` test trains
longer (recipe below) and asserts that GRPO raises the held-out verifier reward over SFT by more than two standard
errors of the paired per-instruction difference. Measured 2026-12-07 (loaded 2-core machine, about 9 minutes for the
GRPO run), the reward of the greedy answers to 201 held-out instructions from 0.006 (SFT), paired gain per sampling
seed: seed 0 +0.115 +- 0.035 (3.3 SE; 对话 24/40 -> 33/40, all constraints 7.2% -> 7.8%, rep-4 0.058 -> 0.029);
seed 1 +0.107 +- 0.033 (3.2 SE; 对话 35/40, all constraints 7.8%, rep-4 0.031); seed 2 +0.086 +- 0.034 (2.5 SE;
对话 30/40, all constraints 6.0%, rep-4 0.030). The test runs seed 0.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from xiaolm.align.compare import side_by_side
from xiaolm.cli import main

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--no-progress", "--no-tensorboard", "--train.seed", "0"]
# verifier score for the pairs and the GRPO reward: constraints met (+ bonus when all are), required words credited
# one by one, repeated 4-grams penalised three times over (the weights of configs/dpo-stories.yaml and
# configs/grpo-stories.yaml)
VERIFIER = ["--word-credit", "1.0", "--repetition-weight", "3.0"]
DIALOGUE = "特征:对话"


def _fisher_greater(k1: int, n1: int, k0: int, n0: int) -> float:
    """One-sided Fisher exact p-value that rate k1/n1 exceeds k0/n0 (hypergeometric tail, margins fixed)."""
    from math import comb

    total, hits = n1 + n0, k1 + k0
    return sum(comb(n1, k) * comb(n0, hits - k) for k in range(k1, min(n1, hits) + 1)) / comb(total, hits)


def _paired_reward_gain(before: dict, after: dict) -> tuple[float, float, float, float]:
    """Held-out verifier reward (the training reward's weights) of two models' greedy answers to the same
    instructions: mean before, mean after, mean paired difference and its standard error."""
    from xiaolm.align.common import RewardWeights, rule_reward

    weights = RewardWeights(repetition_weight=3.0, word_credit=1.0)
    score = lambda r: [rule_reward(g["constraints"], g["response"], weights) for g in r["generations"]]  # noqa: E731
    b, a = score(before), score(after)
    assert [g["prompt"] for g in before["generations"]] == [g["prompt"] for g in after["generations"]]
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    return sum(b) / n, sum(a) / n, mean, se


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, story_sft) -> dict:
    root = tmp_path_factory.mktemp("aligned")
    sft, instruct = str(story_sft["sft"]), str(story_sft["instruct"])
    # the pairs recipe of configs/dpo-stories.yaml (its `pairs:` section); --greedy adds the greedy answer as a
    # candidate, so the loop or the missing quote that greedy decoding (the eval's) falls into can be the rejected side
    assert main(["data", "pairs", "--policy", sft, "--prompts", instruct, "--out", str(root / "pairs.jsonl"),
                 "--limit", "256", "--k", "6", "--greedy", "--max-new-tokens", "160", "--min-margin", "0.25",
                 "--batch-size", "128", "--sampling.seed", "0", *VERIFIER]) == 0
    assert main(["dpo", sft, "--config", str(REPO / "configs" / "dpo-stories.yaml"), "--data",
                 str(root / "pairs.jsonl"), "--out", str(root / "dpo"), *QUIET]) == 0
    assert main(["grpo", sft, "--prompts", instruct, "--out", str(root / "grpo"), "--max-steps", "12",
                 "--prompts-per-step", "8", "--group-size", "4", "--lr", "5e-5", "--max-new-tokens", "160",
                 *VERIFIER, *QUIET]) == 0
    report = json.loads((root / "pairs.jsonl.report.json").read_text())
    return {"dpo": root / "dpo", "grpo": root / "grpo", "pairs": report}


def test_dpo_on_on_policy_pairs_raises_constraints_met_without_more_repetition(story_sft, aligned, heldout_eval):
    results = {name: heldout_eval(run) for name, run in
               [("SFT", story_sft["sft"]), ("SFT+DPO", aligned["dpo"]), ("SFT+GRPO", aligned["grpo"])]}
    print(side_by_side(results))
    sft, dpo = results["SFT"], results["SFT+DPO"]
    assert aligned["pairs"]["pairs"] >= 80  # the pairs are really there, with a real margin between them
    before, after = sft["constraints"][DIALOGUE], dpo["constraints"][DIALOGUE]
    # Rates on ~40 instructions move in 2.5% steps: a margin of 10 points (4 answers), with the one-sided Fisher exact
    # p-value printed (measured 24/40 -> 37/40, p = 0.001; pairs sampled at seed 1: 30/40, p = 0.12)
    p = _fisher_greater(after["met"], after["n"], before["met"], before["n"])
    print(f"对话: SFT {before['met']}/{before['n']} -> DPO {after['met']}/{after['n']}, one-sided Fisher exact p = "
          f"{p:.3f}")
    assert after["rate"] >= before["rate"] + 0.10, (before, after, p)
    # the rate the test is named after: every constraint of an instruction met (measured 7.2% -> 8.4% of 166)
    assert dpo["all_constraints"]["rate"] >= sft["all_constraints"]["rate"], (sft["all_constraints"],
                                                                             dpo["all_constraints"])
    assert dpo["repetition"]["rep4"] <= sft["repetition"]["rep4"], (sft["repetition"], dpo["repetition"])


def test_grpo_short_run_does_not_collapse(story_sft, aligned, heldout_eval):
    """12 steps of GRPO: a smoke check that the policy stays a story writer (no loops, no empty answers); that GRPO
    helps is the slow test below."""
    sft, grpo = heldout_eval(story_sft["sft"]), heldout_eval(aligned["grpo"])
    assert grpo["repetition"]["rep4"] <= sft["repetition"]["rep4"] + 0.02 and grpo["repetition"]["empty"] == 0


# 60 steps, two updates on each batch of 16 prompts x 6 samples drawn at temperature 0.8 (closer to the greedy answers
# the eval scores), lr 1e-4: held-out reward gain beyond 2 SE at sampling seeds 0, 1 and 2 (figures above). Measured
# 2026-12-07 on the same SFT model, gain +- SE per seed: 40 steps of that recipe: +0.077 +- 0.029, -0.008 +- 0.042,
# +0.112 +- 0.032 (seed 1 fails); 40 steps with KL beta 0.2: seed 1 -0.014 +- 0.038; 40 steps of 16 x 8 (group 8):
# +0.026 +- 0.031, +0.099 +- 0.031, +0.069 +- 0.031 (seed 0 fails); 16 x 8 at lr 2e-4: seed 0 +0.074 +- 0.033
# (all constraints 7.2% -> 6.6%); 24 steps: +0.047 +- 0.034 (lr 1e-4), +0.061 +- 0.034 (lr 2e-4), seed 0; 20 steps
# of 8 x 6 at temperature 1 (lr 2e-4): +0.009 +- 0.036; the same without reward scaling (lr 3e-4): 对话 24/40 -> 20/40.
GRPO_RECIPE = ["--max-steps", "60", "--updates-per-batch", "2", "--prompts-per-step", "16", "--group-size", "6",
               "--lr", "1e-4", "--temperature", "0.8", "--max-new-tokens", "160", "--eval-every", "0"]


@pytest.mark.slow
def test_grpo_raises_heldout_reward_over_sft_beyond_noise(tmp_path, story_sft, heldout_eval):
    """GRPO from the same SFT model raises the held-out verifier reward (the training reward's weights, greedy answers
    to the ~200 held-out instructions) by more than two standard errors of the paired per-instruction difference,
    and does not collapse into repetition or empty answers."""
    sft, instruct = str(story_sft["sft"]), str(story_sft["instruct"])
    assert main(["grpo", sft, "--prompts", instruct, "--out", str(tmp_path / "grpo"), *GRPO_RECIPE, *VERIFIER,
                 *QUIET]) == 0
    before, after = heldout_eval(story_sft["sft"]), heldout_eval(tmp_path / "grpo")
    print(side_by_side({"SFT": before, "SFT+GRPO": after}))
    b, a, gain, se = _paired_reward_gain(before, after)
    d0, d1 = before["constraints"][DIALOGUE], after["constraints"][DIALOGUE]
    print(f"held-out verifier reward: SFT {b:.3f} -> GRPO {a:.3f}, paired gain {gain:.3f} ± {se:.3f} (SE); 对话 "
          f"{d0['met']}/{d0['n']} -> {d1['met']}/{d1['n']} (one-sided Fisher exact p = "
          f"{_fisher_greater(d1['met'], d1['n'], d0['met'], d0['n']):.3f})")
    assert gain > 2 * se, (b, a, gain, se)
    assert after["all_constraints"]["rate"] >= before["all_constraints"]["rate"]
    assert after["repetition"]["rep4"] <= before["repetition"]["rep4"] + 0.02 and after["repetition"]["empty"] == 0
