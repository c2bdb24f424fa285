"""Stories as records in TinyStoriesChinese's layout, and the JSON Lines writer."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

from xiaolm.data.synth.assets import Bank, load_bank
from xiaolm.data.synth.compose import Story, compose_story

SOURCE = "xiaolm-synth"

_FEATURE_ZH = {"Dialogue": "包含人物之间的对话", "BadEnding": "结局是悲伤的", "MoralValue": "讲出一个道理",
               "Twist": "有一个意想不到的转折", "Foreshadowing": "前面埋下伏笔，后面呼应", "Conflict": "人物之间发生冲突"}
_PROMPTS = (
    "写一个简短的儿童故事，只用三岁小孩能听懂的简单词语。故事里要用到动词“{v}”、名词“{n}”和形容词“{a}”。{feat}",
    "请用简单的中文写一个给小朋友听的短故事，故事中要出现“{v}”“{n}”“{a}”这三个词。{feat}",
    "编一个适合幼儿的小故事，语言要简单。请在故事里用上动词“{v}”、名词“{n}”、形容词“{a}”。{feat}",
)


def story_record(story: Story, seed: int, index: int, bank: Bank | None = None) -> dict:
    bank = bank or load_bank()
    rng = random.Random(f"xiaolm-synth-record/{seed}/{index}")
    verb, noun, adj = story.words
    feats = story.features
    feat = ("故事要有这些特点：" + "、".join(_FEATURE_ZH[f] for f in feats) + "。") if feats else ""
    prompt = rng.choice(_PROMPTS).format(v=verb, n=noun, a=adj, feat=feat)
    summary = bank.options(story.plot, "summary", story.outcome, frozenset())
    summary_text = summary[int(rng.random() * len(summary))].render(rng, story.slots) if summary else ""
    gloss = f"A short story about {story.info['who_en']} who {bank.plots[story.plot]['en']}"
    gloss += "; it ends sadly." if story.outcome == "bad" else "."
    return {
        "story": gloss,
        "instruction": {"prompt:": prompt, "words": [verb, noun, adj], "features": list(feats)},
        "summary": summary_text,
        "source": SOURCE,
        "story_zh": story.text,
    }


def iter_stories(num: int, seed: int, start: int = 0) -> Iterator[dict]:
    """Records ``start .. start+num-1`` of the run with ``seed``."""
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    bank = load_bank()
    for index in range(start, start + num):
        yield story_record(compose_story(seed, index, bank), seed, index, bank)


def generate_stories(num: int, seed: int) -> list[dict]:
    return list(iter_stories(num, seed))


def write_stories(path: str | Path, num: int, seed: int, start: int = 0) -> int:
    """Write ``num`` stories as JSON Lines (atomically). Returns the count."""
    from xiaolm.utils import write_jsonl

    return write_jsonl(path, iter_stories(num, seed, start))
