"""Composing: features, a plot and one of its shapes, rendered stage by stage into a ``Story``."""
from __future__ import annotations

import random
from dataclasses import dataclass

from xiaolm.data.synth.assets import Bank, load_bank
from xiaolm.data.synth.cast import _cast, _setup_plot
from xiaolm.data.synth.features import FEATURE_RATES, FEATURES
from xiaolm.data.synth.templates import Foreshadow, Template

SPEECH_SHARE = 0.45      # in a Dialogue story, chance that a stage picks one of its speech lines when it has one
PRONOUN_SHARE = 0.35     # chance that a sentence continuing with the hero as subject uses the pronoun


@dataclass
class Story:
    """A generated story before it becomes a record (the tests look at ``stages``)."""

    text: str
    plot: str
    features: list[str]
    outcome: str
    slots: dict
    info: dict
    stages: list[str]
    words: list[str]          # declared [verb, noun, adjective]


class _Writer:
    """Renders the stages of one story into paragraphs."""

    def __init__(self, bank: Bank, rng: random.Random, plot: str, slots: dict, tags: set, features: set,
                 outcome: str, cycles: dict):
        self.bank, self.rng, self.plot, self.slots = bank, rng, plot, slots
        self.tags = frozenset(tags)
        self.dialogue = "Dialogue" in features
        self.features = features
        self.outcome = outcome
        self.cycles = cycles
        self.known: set[str] = set()
        self.used: set[int] = set()
        self.paragraphs: list[list[str]] = [[]]
        self.speech = 0
        self.stages: list[str] = []
        self.fore: Foreshadow | None = None
        self.hero_subject = False       # the last sentence began with the hero's name

    def advance(self) -> None:
        for slot, values in self.cycles.items():
            if values:
                self.slots[slot] = values.pop()

    def pick(self, options) -> object | None:
        usable = [t for t in options if id(t) not in self.used and (self.dialogue or not t.speech)]
        if not usable:
            usable = [t for t in options if self.dialogue or not t.speech]
        ready = [t for t in usable if t.needs <= self.known]
        # a character already on stage is not introduced again
        ready = [t for t in ready if not (t.intros & self.known)] or ready
        if not ready and usable:
            # introduce whoever the lines need, then use them
            for who in sorted(set().union(*(t.needs for t in usable)) - self.known):
                self.say("intro_" + who)
            ready = [t for t in usable if t.needs <= self.known]
        if not ready:
            return None
        if self.dialogue:
            spoken = [t for t in ready if t.speech]
            if spoken and (self.speech == 0 or self.rng.random() < SPEECH_SHARE):
                if self.rng.random() < SPEECH_SHARE + (0.25 if self.speech == 0 else 0.0):
                    ready = spoken
                else:
                    ready = [t for t in ready if not t.speech] or ready
            else:
                ready = [t for t in ready if not t.speech] or ready
        choice = ready[int(self.rng.random() * len(ready))]
        self.used.add(id(choice))
        return choice

    def emit(self, template: Template) -> str:
        text = template.render(self.rng, self.slots)
        # a sentence that goes on with the same subject sometimes calls the hero 他/她/它
        hero = self.slots["p"]
        starts_with_hero = text.startswith(hero)
        if starts_with_hero and self.hero_subject and self.rng.random() < PRONOUN_SHARE:
            text = self.slots["P"] + text[len(hero):]
        self.hero_subject = starts_with_hero
        self.known |= template.intros
        if template.speech:
            self.speech += 1
        self.paragraphs[-1].append(text)
        return text

    def say(self, stage: str, outcome: str | None = None) -> bool:
        options = self.bank.options(self.plot, stage, outcome or self.outcome, self.tags)
        template = self.pick(options)
        if template is None:
            return False
        if stage == "conflict":
            # the reconciliation names whoever this conflict was with
            if "sib" in template.slots:
                self.slots["rv"] = self.slots["sib"]
            elif "comp" in template.slots:
                self.slots["rv"] = self.slots["comp"]
            else:
                self.slots["rv"] = self.slots["f"]
        before = set(self.known)
        self.emit(template)
        if "f" in self.known - before and self.plot == "adventure":
            self.slots["comp"] = self.slots["f"]
        self.stages.append(stage)
        return True

    def new_paragraph(self) -> None:
        if self.paragraphs[-1]:
            self.paragraphs.append([])
        self.hero_subject = False

    def text(self) -> str:
        return "\n".join("".join(p) for p in self.paragraphs if p)


def _draw_features(rng: random.Random) -> set[str]:
    return {f for f in FEATURES if rng.random() < FEATURE_RATES[f]}


MIN_CHARS = 150       # a shorter draw is made again (short stories are the ones most alike)
# A single draw lacks a usable adjective up to ~40% of the time (a sad warning story), so 8 draws failed about
# once in 100k stories; 64 draws cost nothing (a draw is ~0.1 ms) and fail with probability below 1e-25.
MAX_ATTEMPTS = 64


def compose_story(seed: int, index: int, bank: Bank | None = None) -> Story:
    """Story ``index`` of the run with ``seed``: the same arguments always give the same story.

    A draw that comes out shorter than ``MIN_CHARS`` or lacks a usable verb, noun or adjective is drawn again
    with the same generator (so still deterministic); the features stay the ones drawn first.
    """
    bank = bank or load_bank()
    rng = random.Random(f"xiaolm-synth/{seed}/{index}")
    features = _draw_features(rng)
    story = None
    for _ in range(MAX_ATTEMPTS):
        story = _compose_once(rng, bank, features)
        story.words = _pick_words(story, bank, rng)
        if len(story.text) >= MIN_CHARS and all(story.words):
            return story
    if not all(story.words):
        raise RuntimeError(f"synth: story {index} of seed {seed} has no usable {story.words} after "
                           f"{MAX_ATTEMPTS} draws; the keyword lists in synth_assets/keywords.json are too short")
    return story


def _compose_once(rng: random.Random, bank: Bank, features: set[str]) -> Story:
    outcome = "bad" if "BadEnding" in features else "good"
    plot = rng.choice(sorted(bank.plots))
    spec = bank.plots[plot]
    slots, tags, info = _cast(rng, bank)
    cycles = _setup_plot(plot, rng, bank, slots, tags, info)
    if "Conflict" in features:
        tags.add("conflict")
    shape = rng.choice(spec["shapes"])
    writer = _Writer(bank, rng, plot, slots, tags, features, outcome, cycles)
    twist_alone = any(tok[0] == "T" for tok in shape)
    conflict_points = [i for i, tok in enumerate(shape) if tok[0] == "C"]
    conflict_at = rng.choice(conflict_points) if conflict_points else -1
    # the moral sometimes comes before the closing line
    order = list(range(len(shape)))
    names = [tok[0] for tok in shape]
    if "E" in names and "M" in names and rng.random() < 0.3:
        e, m = names.index("E"), names.index("M")
        order[e], order[m] = order[m], order[e]
    cycle_stages = {"search", "step"}
    last = ""
    for i in order:
        name, lo, hi, prob = shape[i]
        if name == "/":
            if rng.random() < 0.8:
                writer.new_paragraph()
            continue
        if prob < 1.0 and rng.random() >= prob:
            continue
        reps = lo if lo == hi else rng.randint(lo, hi)
        for _ in range(reps):
            if name in cycle_stages or (name == "Y" and plot == "lost") or (name == "R" and plot == "lost" and last != "Y"):
                writer.advance()
            if name == "H":
                if "Foreshadowing" in features:
                    fore = writer.pick(bank.options(plot, "fore", outcome, writer.tags))
                    if fore is not None:
                        writer.fore = fore
                        writer.emit(fore.hint)
                        writer.stages.append("fore_hint")
            elif name == "Y":
                if writer.fore is not None:
                    writer.emit(writer.fore.good if outcome == "good" else writer.fore.bad)
                    writer.stages.append("fore_payoff")
            elif name == "C":
                if "Conflict" in features and i == conflict_at:
                    writer.say("conflict")
                    if outcome == "good":
                        writer.say("reconcile")
            elif name == "R":
                if "Twist" in features and not twist_alone:
                    writer.say("twist")
                else:
                    writer.say("res")
            elif name == "T":
                if "Twist" in features:
                    writer.say("twist")
            elif name == "E":
                if writer.dialogue and writer.speech == 0:
                    writer.say("talk")
                writer.say("end")
            elif name == "M":
                if "MoralValue" in features:
                    themes = spec["morals_good" if outcome == "good" else "morals_bad"]
                    lesson = rng.choice(bank.lessons[rng.choice(themes)])
                    slots["lesson"] = lesson.render(rng, slots)
                    writer.say("moral")
            else:
                writer.say(name)
            last = name
    if writer.dialogue and writer.speech == 0:
        writer.say("talk")
    declared = sorted(features, key=FEATURES.index)
    return Story(text=writer.text(), plot=plot, features=declared, outcome=outcome, slots=slots, info=info,
                 stages=writer.stages, words=[])


def _pick_words(story: Story, bank: Bank, rng: random.Random) -> list[str]:
    words = []
    for pos in ("v", "n", "a"):
        found = bank.keywords_in(story.text, pos)
        key = story.info.get("key_noun") if pos == "n" else None
        if key and key in found and rng.random() < 0.5:
            words.append(key)    # usually the thing the story is about
        elif found:
            words.append(found[int(rng.random() * len(found))])
        else:
            words.append("")
    return words
