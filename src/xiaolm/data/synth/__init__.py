"""The built-in corpus: simple Chinese children's stories in the spirit of TinyStories, generated offline.

``xiaolm data synth --num N --seed S --out stories.jsonl`` writes N records in TinyStoriesChinese's layout::

    {"story": <short English gloss>, "instruction": {"prompt:": <Chinese prompt>, "words": [verb, noun, adjective],
     "features": [...]}, "summary": <one Chinese sentence>, "source": "xiaolm-synth", "story_zh": <the story>}

How a story is made. The templates and the vocabulary live in ``synth_assets/`` (``plots.yaml``, ``lexicon.yaml``);
this package is the machinery (one module per job, see each module's docstring):

1. Cast: a hero from the human world (小明, 莉莉 ... with 他/她) or the animal world (一只叫咪咪的小猫, 它, whose
   mother is 猫妈妈), a friend, an elder, a grown-up helper, a home, a place, an object with its measure word
   (一只风筝, 一本图画书) -- so every template agrees in pronoun and measure word.
2. Features are drawn first (Dialogue, BadEnding, MoralValue, Twist, Foreshadowing, Conflict), then a plot
   (lost, skill, share, help, gift, adventure, warning, fear, plant, rain, contest, cook, newfriend) and one of
   its shapes: a sequence of stages (setup, desire, obstacle, attempts, help, resolution, ending ...), some
   optional, some repeated, with the places where the features go. Each stage has several alternative
   sentences with inline alternatives, so stories differ in structure, not only in names.
3. Each feature is rendered by its own stage and leaves a marker that only that stage may write (checked when
   the assets load): speech in “……” for Dialogue, 没想到/原来 for Twist, 吵/争 for Conflict, 道理/懂得 for
   MoralValue, a hint (没有在意) and its payoff (想起) for Foreshadowing, a sad closing (难过了很久 ...) for
   BadEnding. ``detect_features(text)`` recovers the feature set from the text alone, and the tests check that
   it equals the declared set for every story.
4. ``words`` are a verb, a noun and an adjective that the story really uses, taken from word lists whose
   jieba dictionary tags are v / n / a (``synth_assets/keywords.json``, built by ``bench/synth_stats.py``).

Every story ``i`` of a run depends only on ``(seed, i)`` (its own ``random.Random``), so runs are reproducible,
a shorter run is a prefix of a longer one, and nothing reads global random state or ``hash()``.
"""
from __future__ import annotations

from xiaolm.data.synth.assets import ASSETS, Bank, load_bank
from xiaolm.data.synth.cli import SynthConfig, main
from xiaolm.data.synth.compose import MAX_ATTEMPTS, MIN_CHARS, PRONOUN_SHARE, SPEECH_SHARE, Story, compose_story
from xiaolm.data.synth.features import (BAD_ENDING_MARKERS, CONFLICT_MARKERS, FEATURE_RATES, FEATURES,
                                        FORESHADOW_HINT_MARKERS, FORESHADOW_PAYOFF_MARKERS, MORAL_MARKERS,
                                        SPEECH_RE, TWIST_MARKERS, detect_features)
from xiaolm.data.synth.records import SOURCE, generate_stories, iter_stories, story_record, write_stories
from xiaolm.data.synth.stats import max_ngram_overlap
from xiaolm.data.synth.templates import Foreshadow, Template

__all__ = ["ASSETS", "BAD_ENDING_MARKERS", "CONFLICT_MARKERS", "FEATURES", "FEATURE_RATES", "FORESHADOW_HINT_MARKERS",
           "FORESHADOW_PAYOFF_MARKERS", "MAX_ATTEMPTS", "MIN_CHARS", "MORAL_MARKERS", "PRONOUN_SHARE", "SOURCE",
           "SPEECH_RE", "SPEECH_SHARE", "TWIST_MARKERS", "Bank", "Foreshadow", "Story", "SynthConfig", "Template",
           "compose_story", "detect_features", "generate_stories", "iter_stories", "load_bank", "main",
           "max_ngram_overlap", "story_record", "write_stories"]
