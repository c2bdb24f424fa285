"""The built-in corpus: simple Chinese children's stories in the spirit of TinyStories, generated offline.

``xiaolm data synth --num N --seed S --out stories.jsonl`` writes N records in TinyStoriesChinese's layout::

    {"story": <short English gloss>, "instruction": {"prompt:": <Chinese prompt>, "words": [verb, noun, adjective],
     "features": [...]}, "summary": <one Chinese sentence>, "source": "xiaolm-synth", "story_zh": <the story>}

How a story is made. The templates and the vocabulary live in ``synth_assets/`` (``plots.yaml``, ``lexicon.yaml``);
this module is the machinery:

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

import functools
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from xiaolm.config import opt

ASSETS = Path(__file__).with_name("synth_assets")
SOURCE = "xiaolm-synth"
FEATURES = ("Dialogue", "BadEnding", "MoralValue", "Twist", "Foreshadowing", "Conflict")
# how often each feature is drawn (independently)
FEATURE_RATES = {"Dialogue": 0.6, "BadEnding": 0.25, "MoralValue": 0.4, "Twist": 0.3, "Foreshadowing": 0.25,
                 "Conflict": 0.3}

# Markers: each is written only by the stage of its feature (enforced by _lint when the assets load).
TWIST_MARKERS = ("没想到", "原来", "竟然", "谁知道")
CONFLICT_MARKERS = ("吵", "争", "抢", "谁也不让谁")
MORAL_MARKERS = ("道理", "告诉我们", "懂得")
FORESHADOW_HINT_MARKERS = ("没有在意", "派上用场", "用得上")
FORESHADOW_PAYOFF_MARKERS = ("想起",)
BAD_ENDING_MARKERS = ("难过了很久", "心里空落落的", "闷闷不乐", "哭了很久", "伤心了好几天")
SPEECH_RE = re.compile(r"“[^“”]+”")

_SLOT_RE = re.compile(r"\{(\w+)\}")
_ALT_RE = re.compile(r"\[([^\[\]]*)\]")
# characters that must be introduced before a template may name them: slot -> character key
_NEEDS = {"f": "f", "F": "f", "h": "h", "H": "h"}
_INTROS = {"fi": "f", "hi": "h"}
SPEECH_SHARE = 0.45      # in a Dialogue story, chance that a stage picks one of its speech lines when it has one
PRONOUN_SHARE = 0.35     # chance that a sentence continuing with the hero as subject uses the pronoun


# ----------------------------------------------------------------------------------------------- config


@dataclass
class SynthConfig:
    out: str = opt("", "output JSON Lines file (the resolved config is written beside it as OUT.config.yaml)")
    num: int = opt(10_000, "number of stories to generate")
    seed: int = opt(0, "random seed; story i depends only on (seed, i), so a shorter run is a prefix of a longer one")
    start: int = opt(0, "index of the first story (to generate a corpus in pieces)")


# ---------------------------------------------------------------------------------------------- templates


class Template:
    """One template line: literal text, [a|b] alternatives and {slot}s, compiled once."""

    __slots__ = ("text", "parts", "speech", "needs", "intros", "slots", "key")

    def __init__(self, text: str, key: str):
        self.text = text
        self.key = key
        parts: list = []
        pos = 0
        for m in _ALT_RE.finditer(text):
            if m.start() > pos:
                parts.append(text[pos:m.start()])
            parts.append(tuple(m.group(1).split("|")))
            pos = m.end()
        if pos < len(text):
            parts.append(text[pos:])
        self.parts = parts[0] if len(parts) == 1 and isinstance(parts[0], str) else tuple(parts)
        self.speech = "“" in text
        self.slots = frozenset(_SLOT_RE.findall(text))
        self.intros = frozenset(_INTROS[s] for s in self.slots if s in _INTROS)
        self.needs = frozenset(_NEEDS[s] for s in self.slots if s in _NEEDS) - self.intros

    def render(self, rng: random.Random, slots: dict) -> str:
        parts = self.parts
        if isinstance(parts, str):
            text = parts
        else:
            text = "".join(p if isinstance(p, str) else p[int(rng.random() * len(p))] for p in parts)
        try:
            return text.format_map(slots)
        except KeyError as exc:
            raise KeyError(f"synth template {self.key!r} uses an unknown slot {exc}: {self.text}") from None


class Foreshadow:
    """A hint, and its payoff for a good and for a bad ending (one line "hint || good || bad")."""

    __slots__ = ("hint", "good", "bad", "speech", "needs", "intros", "key", "text")

    def __init__(self, text: str, key: str):
        pieces = [p.strip() for p in text.split("||")]
        if len(pieces) != 3:
            raise ValueError(f"synth assets: {key}: a foreshadowing line needs 'hint || good payoff || bad payoff'")
        self.text = text
        self.key = key
        self.hint, self.good, self.bad = (Template(p, key) for p in pieces)
        self.speech = any(t.speech for t in (self.hint, self.good, self.bad))
        self.needs, self.intros = self.hint.needs, self.hint.intros


def _lines(block: str) -> list[str]:
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _load_yaml(path: Path):
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as fh:
        return yaml.load(fh, Loader=loader)


class Bank:
    """Templates, plots and vocabulary from ``synth_assets``, checked once when loaded."""

    def __init__(self, assets: Path = ASSETS):
        plots_doc = _load_yaml(assets / "plots.yaml")
        self.lex = _load_yaml(assets / "lexicon.yaml")
        # parsed once: plain word lists and "a|b|c" records
        self.words = {k: v.split() for k, v in self.lex.items() if isinstance(v, str)}
        self.records = {k: _records(v) for k, v in self.lex.items()}
        self.generic = self._compile_groups("generic", plots_doc["generic"])
        self.lessons = {theme: [Template(t, f"lessons.{theme}") for t in _lines(block)]
                        for theme, block in plots_doc["lessons"].items()}
        self.plots: dict[str, dict] = {}
        for name, spec in plots_doc["plots"].items():
            groups = {k: v for k, v in spec.items() if k not in ("en", "morals_good", "morals_bad", "shapes")}
            self.plots[name] = {
                "en": spec["en"],
                "morals_good": spec["morals_good"].split(),
                "morals_bad": spec["morals_bad"].split(),
                "shapes": [_parse_shape(s, f"{name}.shapes") for s in spec["shapes"]],
                "groups": self._compile_groups(name, groups),
            }
        # words a story may declare: part of speech -> {word: [jieba tokens that swallow it, e.g. 很漂亮]}
        self.keywords: dict[str, dict[str, list[str]]] = json.loads(
            (assets / "keywords.json").read_text(encoding="utf-8"))
        self._keyword_res = {pos: _alternation(list(words)) for pos, words in self.keywords.items()}
        self._cache: dict = {}
        _lint(self)

    @staticmethod
    def _compile_groups(owner: str, groups: dict) -> dict[str, list]:
        out = {}
        for name, block in groups.items():
            key = f"{owner}.{name}"
            lines = _lines(block)
            if name.split(".")[0] == "fore":
                out[name] = [Foreshadow(ln, key) for ln in lines]
            else:
                out[name] = [Template(ln, key) for ln in lines]
        return out

    def options(self, plot: str, stage: str, outcome: str, tags: frozenset) -> tuple:
        """Templates for a stage: the plot's own before the generic ones; ``stage_good``/``stage_bad`` before
        ``stage``; each group together with its tagged variants (``res_good.food`` when the story has tag food)."""
        ck = (plot, stage, outcome, tags)
        hit = self._cache.get(ck)
        if hit is not None:
            return hit
        found: tuple = ()
        for groups in (self.plots[plot]["groups"], self.generic):
            for base in (f"{stage}_{outcome}", stage):
                merged = list(groups.get(base, ()))
                for tag in sorted(tags):
                    merged.extend(groups.get(f"{base}.{tag}", ()))
                if merged:
                    found = tuple(merged)
                    break
            if found:
                break
        self._cache[ck] = found
        return found

    def keywords_in(self, text: str, pos: str) -> list[str]:
        """Keywords of a part of speech ("v", "n", "a") that the text uses at least once as a word of their
        own, i.e. not only inside a longer jieba token such as 很漂亮 or 快快乐乐. Sorted, so choices are stable."""
        rx = self._keyword_res.get(pos)
        if rx is None:
            return []
        swallowing = self.keywords[pos]
        usable = []
        for word in sorted(set(rx.findall(text))):
            inside = sum(text.count(tok) * tok.count(word) for tok in swallowing[word])
            if text.count(word) > inside:
                usable.append(word)
        return usable


def _alternation(words: list[str]):
    if not words:
        return None
    return re.compile("|".join(re.escape(w) for w in sorted(set(words), key=lambda w: (-len(w), w))))


def _parse_shape(text: str, where: str) -> list[tuple[str, int, int, float]]:
    """'open trait? step*1-2 / R' -> [(stage, min, max, probability)]."""
    out = []
    for tok in text.split():
        m = re.fullmatch(r"([A-Za-z_0-9/]+)(\?|\*(\d+)-(\d+))?", tok)
        if not m:
            raise ValueError(f"synth assets: {where}: bad stage token {tok!r}")
        name, suffix = m.group(1), m.group(2) or ""
        if suffix == "?":
            out.append((name, 1, 1, 0.5))
        elif suffix.startswith("*"):
            out.append((name, int(m.group(3)), int(m.group(4)), 1.0))
        else:
            out.append((name, 1, 1, 1.0))
    return out


def _lint(bank: Bank) -> None:
    """Feature markers appear only in their own stages, and every feature stage carries its marker, so the
    features of a story can be read back from its text (``detect_features``). Also: lexicon text is plain."""
    problems = []

    def check(text: str, where: str, kind: str) -> None:
        rules = [("twist", TWIST_MARKERS), ("conflict", CONFLICT_MARKERS), ("moral", MORAL_MARKERS),
                 ("fore", FORESHADOW_HINT_MARKERS + FORESHADOW_PAYOFF_MARKERS), ("end_bad", BAD_ENDING_MARKERS)]
        for family, markers in rules:
            hits = [m for m in markers if m in text]
            if hits and family != kind:
                problems.append(f"{where}: {hits} belongs to {family} stages only: {text}")
        if text.count("“") != text.count("”"):
            problems.append(f"{where}: unbalanced quotation marks: {text}")

    def kind_of(group: str) -> str:
        base = group.split(".")[0]
        if base.startswith("twist"):
            return "twist"
        if "conflict" in group or base.startswith("reconcile"):
            return "conflict"
        if base == "moral":
            return "moral"
        if base == "fore":
            return "fore"
        if base == "end_bad":
            return "end_bad"
        return ""

    def must(text: str, where: str, markers) -> None:
        if not any(m in text for m in markers):
            problems.append(f"{where}: needs one of {markers}: {text}")

    all_groups = [("generic", bank.generic)] + [(p, spec["groups"]) for p, spec in bank.plots.items()]
    for owner, groups in all_groups:
        for gname, items in groups.items():
            kind = kind_of(gname)
            for item in items:
                where = f"{owner}.{gname}"
                check(item.text, where, kind)
                if isinstance(item, Foreshadow):
                    must(item.hint.text, where, FORESHADOW_HINT_MARKERS)
                    must(item.good.text, where, FORESHADOW_PAYOFF_MARKERS)
                    must(item.bad.text, where, FORESHADOW_PAYOFF_MARKERS)
                    if any(m in item.hint.text for m in FORESHADOW_PAYOFF_MARKERS):
                        problems.append(f"{where}: a hint must not contain the payoff marker: {item.hint.text}")
                elif kind == "twist":
                    must(item.text, where, TWIST_MARKERS)
                elif kind == "conflict" and gname.split(".")[0] != "reconcile":
                    must(item.text, where, CONFLICT_MARKERS)
                elif kind == "moral":
                    must(item.text, where, MORAL_MARKERS)
                elif kind == "end_bad":
                    must(item.text, where, BAD_ENDING_MARKERS)
            # a group every story may need must work without dialogue
            if items and all(getattr(i, "speech", False) for i in items) and gname not in ("talk_good", "talk_bad"):
                problems.append(f"{owner}.{gname}: every line is speech; it needs one without quotation marks")
    for theme, items in bank.lessons.items():
        for item in items:
            check(item.text, f"lessons.{theme}", "")
            if item.speech:
                problems.append(f"lessons.{theme}: lessons are plain statements: {item.text}")

    def walk(value, where):
        if isinstance(value, str):
            check(value, where, "")
            if "“" in value:
                problems.append(f"{where}: lexicon text must not contain speech: {value}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}")

    walk(bank.lex, "lexicon")
    for plot, spec in bank.plots.items():
        for k, shape in enumerate(spec["shapes"]):
            names = [tok[0] for tok in shape]
            # feature points must always be there (probability 1), the hint before its payoff
            for point in ("H", "Y", "C", "R", "E", "M"):
                if [t for t in shape if t[0] == point and t[3] < 1.0] or point not in names:
                    problems.append(f"{plot}.shapes[{k}]: needs a plain {point}")
            if "H" in names and "Y" in names and names.index("H") > names.index("Y"):
                problems.append(f"{plot}.shapes[{k}]: H must come before Y")
            if [t for t in shape if t[0] == "T" and t[3] < 1.0]:
                problems.append(f"{plot}.shapes[{k}]: T cannot be optional")
        for stage in ("res",):
            for outcome in ("good", "bad"):
                if not bank.options(plot, stage, outcome, frozenset()):
                    problems.append(f"{plot}: no {stage}_{outcome} templates")
    if problems:
        raise ValueError("synth assets are inconsistent:\n  " + "\n  ".join(problems[:40]))


@functools.lru_cache(maxsize=1)
def load_bank() -> Bank:
    return Bank()


# ------------------------------------------------------------------------------------------- vocabulary


def _records(items) -> list[list[str]]:
    """'a|b|c' strings (a YAML list, or a space-separated string) -> [[a, b, c], ...]."""
    if isinstance(items, str):
        items = items.split()
    return [str(x).split("|") for x in items]


def _measure(mw: str, noun: str, desc: str = "") -> str:
    return f"一{mw}{desc}{noun}"


# -------------------------------------------------------------------------------------------------- cast


def _cast(rng: random.Random, bank: "Bank") -> tuple[dict, set, dict]:
    """Characters, places, things and times of one story. Returns (slots, tags, info for the record)."""
    W, R = bank.words, bank.records
    s: dict = {}
    tags: set = set()
    info: dict = {}
    world = "animal" if rng.random() < 0.4 else "human"
    tags.add(world)
    info["world"] = world
    s["t_long"] = rng.choice(W["times_long"])
    s["t_day"] = rng.choice(W["times_day"])
    if world == "human":
        girl = rng.random() < 0.5
        names = W["girls" if girl else "boys"]
        name = rng.choice(names)
        pk = "小女孩" if girl else "小男孩"
        age = rng.choice(W["ages"])
        s.update(p=name, P="她" if girl else "他", pk=pk, age=age)
        quality = rng.choice(["可爱", "活泼", "聪明", "勇敢", "善良", "乖巧", "顽皮", "好奇", "勤劳", "温柔"])
        s["pi"] = rng.choice([f"一个叫{name}的{pk}", f"一个名叫{name}的{pk}", f"一个{quality}的{pk}{name}",
                              f"一个{quality}的{pk}{name}"])
        # "pie" may end with ", named X": only where the introduction ends the sentence
        s["pie"] = s["pi"] if rng.random() < 0.6 else rng.choice([f"一个{age}的{pk}，名字叫{name}",
                                                                   f"一个{quality}的{pk}，名字叫{name}"])
        info["who_en"] = "a little girl" if girl else "a little boy"
        root = ""
        s.update(mom="妈妈", dad="爸爸")
        el, el_p = rng.choice(R["elders"])
        s.update(el=el, EL=el_p, el_call=el)
        sib, sib_p = rng.choice(R["siblings"])
        s["sib"] = sib
        f_girl = rng.random() < 0.5
        f_name = rng.choice([n for n in W["girls" if f_girl else "boys"] if n != name])
        s.update(f=f_name, F="她" if f_girl else "他")
        he = s["P"]
        s["fi"] = rng.choice([f"{he}的好朋友{f_name}", f"邻居家的{f_name}", f"小伙伴{f_name}", f"{he}的同学{f_name}"])
        hi, h, h_p = rng.choice(R["helpers_human"])
        s.update(hi=hi, h=h, H=h_p)
        s["homeplace"] = rng.choice(W["homeplaces_human"])
        places = R["places_human"]
        s["teacher"], s["place_school"] = "老师", "幼儿园"
        info["spots"] = W["spots_human"]
        info["spot_people"] = W["spot_people_human"]
    else:
        species, mw, root, en = rng.choice(R["animals"])
        named = rng.random() < 0.7
        look = rng.choice(W["animal_looks"])
        if named:
            name = rng.choice(W["animal_names"])
            s["pi"] = rng.choice([f"一{mw}叫{name}的{species}", f"一{mw}名叫{name}的{species}"])
            s["pie"] = s["pi"] if rng.random() < 0.5 else f"一{mw}{look}{species}，名字叫{name}"
        else:
            name = species
            s["pi"] = s["pie"] = f"一{mw}{look}{species}"
        s.update(p=name, P="它", pk=species, age="")
        info["who_en"] = f"a {en}"
        s.update(mom=f"{root}妈妈", dad=f"{root}爸爸")
        el_word, el_p = rng.choice(R["elders"][:2])    # 奶奶 / 爷爷
        s.update(el=f"{root}{el_word}", EL=el_p, el_call=el_word)
        sib_word, _ = rng.choice(R["siblings"])
        s["sib"] = f"{root}{sib_word}"
        others = [a for a in R["animals"] if a[2] != root]
        f_species, f_mw, f_root, _ = rng.choice(others)
        if rng.random() < 0.6:
            f_name = rng.choice([n for n in W["animal_names"] if n != name])
            s["fi"] = rng.choice([f"它的好朋友{f_species}{f_name}", f"{f_species}{f_name}",
                                  f"一{f_mw}叫{f_name}的{f_species}"])
        else:
            f_name = f_species
            s["fi"] = rng.choice([f"它的好朋友{f_species}", f"一{f_mw}{f_species}"])
        s.update(f=f_name, F="它")
        hi, h, h_p, h_root = rng.choice([r for r in R["helpers_animal"] if r[3] != root])
        s.update(hi=hi, h=h, H=h_p)
        s["homeplace"] = rng.choice(W["homeplaces_animal"])
        places = R["places_animal"]
        s["teacher"] = "猫头鹰老师"
        s["place_school"] = "森林学校"
        info["spots"] = W["spots_animal"]
        info["spot_people"] = W["spot_people_animal"]
    info["root"] = root
    s.update(mom_call="妈妈", dad_call="爸爸")
    if rng.random() < 0.5:
        s.update(pa=s["mom"], PA="她", pa_call="妈妈")
    else:
        s.update(pa=s["dad"], PA="他", pa_call="爸爸")
    place, loc = rng.choice(places)
    s.update(place=place, placeL=place + loc)
    s["trait"] = rng.choice(W["traits"])
    s["hobby"] = rng.choice(W["hobbies"])
    s["wish"] = rng.choice(W["wishes"])
    obj, mw, size, descs = rng.choice(R["objects"])
    s.update(obj=obj, omw=mw, obj1=_measure(mw, obj), objA=_measure(mw, obj, rng.choice(descs.split())))
    tags.add("small" if size == "s" else "big")
    food, fmw, fdescs = rng.choice(R["foods"])
    s.update(food=food, food1=_measure(fmw, food), foodA=_measure(fmw, food, rng.choice(fdescs.split())))
    info["object"] = obj
    # two characters together: people are 两个人 / 他们, animals 它们俩 / 它们
    if world == "human":
        s.update(both="两个人", they="他们")
    else:
        s.update(both=rng.choice(["它们俩", "两个小伙伴"]), they="它们")
    s["comp"] = s["pa"]     # who goes along (the adventure sets it)
    s["rv"] = s["f"]        # who the conflict is with (set when a conflict line is chosen)
    return s, tags, info


def _fill(text: str, slots: dict) -> str:
    """Expand the slots inside a lexicon phrase ({P}, {mom}, {placeL} ...)."""
    return text.format_map(slots) if "{" in text else text


def _setup_plot(plot: str, rng: random.Random, bank: "Bank", s: dict, tags: set, info: dict) -> dict:
    """Plot-specific slots. Returns the cycles: slot -> values to take in turn (a fresh one per repeat)."""
    W, R = bank.words, bank.records
    cycles: dict[str, list[str]] = {}
    world = info["world"]
    if plot == "lost":
        for slot, values in (("spot", info["spots"]), ("spot_who", info["spot_people"]),
                             ("junk", W["junk"])):
            values = list(values)
            rng.shuffle(values)
            cycles[slot] = values
        info["key_noun"] = s["obj"]
    elif plot == "skill":
        skill, phys, f1, f2, tip, done = rng.choice(R["skills"])
        s.update(skill=skill, sk_fail1=_fill(f1, s), sk_fail2=_fill(f2, s), sk_tip=_fill(tip, s),
                 sk_done=_fill(done, s))
        if phys == "1":
            tags.add("phys")
    elif plot == "share":
        if rng.random() < 0.6:
            rows = R["foods"]
            tags.add("food")
            s.update(eat="吃", try_it="尝一尝", wow="香")
        else:
            rows = [[o, m, d] for o, m, _sz, d in R["objects"]]
            tags.add("toy")
            s.update(eat="玩", try_it="玩一会儿", wow="好玩")
        (name, mw, descs), (name2, mw2, descs2) = rng.sample(rows, 2)
        s.update(sh=name, sh1=_measure(mw, name), shA=_measure(mw, name, rng.choice(descs.split())),
                 sh2A=_measure(mw2, name2, rng.choice(descs2.split())))
        info["key_noun"] = name
    elif plot == "help":
        rows = [r for r in R["troubles"] if r[9] in ("-", world[0]) and r[10] != info["root"]]
        vi, v, vp, sound, prob, vfail, vfix, vafter, vbad, _w, _root = rng.choice(rows)
        s.update(vi=vi, v=v, V=vp, vsound=sound, prob=_fill(prob, s), vfail=_fill(vfail, s), vfix=_fill(vfix, s),
                 vafter=_fill(vafter, s), vbad=_fill(vbad, s))
    elif plot == "gift":
        gift, mw, verb, mat, make, acc, fix = rng.choice(R["gifts"])
        occ, who = rng.choice(R["occasions"])
        if who == "any":
            who = rng.choice(["mom", "dad", "el"])
        rc = {"mom": s["mom"], "dad": s["dad"], "el": s["el"]}[who]
        rc_p = {"mom": "她", "dad": "他", "el": s["EL"]}[who]
        rc_call = {"mom": "妈妈", "dad": "爸爸", "el": s["el_call"]}[who]
        occ_full = f"{rc}的生日" if occ == "生日" else occ
        occ_wish = {"生日": "生日快乐", "新年": "新年快乐"}.get(occ, "节日快乐")
        s.update(occ_wish=occ_wish, gift=gift, gift1=_measure(mw, gift), gverb=verb, gmat=mat, gmake=_fill(make, s), gacc=_fill(acc, s),
                 gfix=_fill(fix, s), rc=rc, RC=rc_p, rc_call=rc_call, occ_full=occ_full,
                 occ_day=f"{occ_full}那天" if occ == "生日" else f"{occ}那天")
        info["key_noun"] = gift
    elif plot == "adventure":
        sight, where, desc, _when = rng.choice(R["sights"])
        s.update(sight=sight, sight_where=where, sight_desc=desc, comp=s["dad"])
        steps = list(bank.lex["journey_steps"])
        rng.shuffle(steps)
        cycles["step"] = steps
        jt, jfix = rng.choice(R["journey_troubles"])
        s.update(jt=jt, jfix=jfix)
        info["key_noun"] = sight
    elif plot == "warning":
        wnot, wdo, wrong, rescue, harm = rng.choice(R["warnings"])
        s.update(wnot=wnot, wdo_short=wnot, wdo=_fill(wdo, s), wwrong=_fill(wrong, s), wrescue=_fill(rescue, s),
                 wharm=_fill(harm, s))
    elif plot == "fear":
        fear, come, show, comfort, real, brave = rng.choice(R["fears"])
        s.update(fear=fear, fcome=_fill(come, s), fshow=_fill(show, s), fcomfort=_fill(comfort, s),
                 freal=_fill(real, s), fbrave=_fill(brave, s))
    elif plot == "plant":
        rows = R["plants"]
        (plant, seed, sprout, grown), other = rng.sample(rows, 2)
        s.update(plant=plant, seed=seed, sprout=_fill(sprout, s), grown=_fill(grown, s), plant2=other[0],
                 seed_ref="小苗" if "苗" in seed else "种子")
        info["key_noun"] = plant
    elif plot == "rain":
        plan, spoil, indoor = rng.choice(R["outings"])
        s.update(plan=plan, spoil=spoil, indoor=indoor)
    elif plot == "contest":
        contest, cdo, close, win = rng.choice(R["contests"])
        s.update(contest=contest, cdo=cdo, close=_fill(close, s), cwin=_fill(win, s))
        if contest == "赛跑":
            tags.add("race")
            s["fast"] = "小兔子" if info["root"] != "兔" else "小鹿"
    elif plot == "cook":
        dish, mw, steps, mistake, taste, hot, eat = rng.choice(R["dishes"])
        s.update(dish=dish, dmw=mw, dsteps=_fill(steps, s), dmistake=_fill(mistake, s), dtaste=_fill(taste, s),
                 deat=eat)
        if hot == "1":
            tags.add("hot")
        info["key_noun"] = dish
    elif plot == "newfriend":
        rows = [r for r in R["newcomers"] if r[5] == world[0]]
        ni, n, np_, diff, talent, _w = rng.choice(rows)
        s.update(ni=ni, n=n, N=np_, ndiff=diff, ntalent=talent)
    return cycles


# ------------------------------------------------------------------------------------------------ stories


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


# ------------------------------------------------------------------------------------------------ records

_FEATURE_ZH = {"Dialogue": "包含人物之间的对话", "BadEnding": "结局是悲伤的", "MoralValue": "讲出一个道理",
               "Twist": "有一个意想不到的转折", "Foreshadowing": "前面埋下伏笔，后面呼应", "Conflict": "人物之间发生冲突"}
_PROMPTS = (
    "写一个简短的儿童故事，只用三岁小孩能听懂的简单词语。故事里要用到动词“{v}”、名词“{n}”和形容词“{a}”。{feat}",
    "请用简单的中文写一个给小朋友听的短故事，故事中要出现“{v}”“{n}”“{a}”这三个词。{feat}",
    "编一个适合幼儿的小故事，语言要简单。请在故事里用上动词“{v}”、名词“{n}”、形容词“{a}”。{feat}",
)


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


def detect_features(text: str) -> list[str]:
    """The features a story's text shows, read from the markers its stages leave (see the module docstring)."""
    found = []
    if SPEECH_RE.search(text):
        found.append("Dialogue")
    if any(m in text for m in BAD_ENDING_MARKERS):
        found.append("BadEnding")
    if any(m in text for m in MORAL_MARKERS):
        found.append("MoralValue")
    if any(m in text for m in TWIST_MARKERS):
        found.append("Twist")
    hints = [text.find(m) for m in FORESHADOW_HINT_MARKERS if m in text]
    if hints and any(text.find(m, min(hints)) >= 0 for m in FORESHADOW_PAYOFF_MARKERS):
        found.append("Foreshadowing")
    if any(m in text for m in CONFLICT_MARKERS):
        found.append("Conflict")
    return found


# ------------------------------------------------------------------------------------------------ measures


def max_ngram_overlap(texts: list[str], n: int = 5, block: int = 500) -> dict:
    """Exact maximum overlap of character n-gram sets over all pairs of texts (whitespace removed).

    Two measures: containment |A & B| / min(|A|, |B|) (strict: a short story inside a long one counts) and
    Jaccard |A & B| / |A | B|. A texts x n-grams 0/1 sparse matrix is multiplied by its transpose in row
    blocks, so every pair is counted exactly, with no sampling or hashing. Returns the maxima, the pairs that
    reach them, and how many pairs have containment above 0.5 / 0.6 / 0.7 / 0.8.
    """
    import numpy as np
    import scipy.sparse as sp

    vocab: dict[str, int] = {}
    indptr, indices = [0], []
    for text in texts:
        t = "".join(text.split())
        grams = {t[j:j + n] for j in range(len(t) - n + 1)} or {t}
        indices.extend(vocab.setdefault(g, len(vocab)) for g in grams)
        indptr.append(len(indices))
    m = sp.csr_matrix((np.ones(len(indices), dtype=np.float32), np.asarray(indices, dtype=np.int64),
                       np.asarray(indptr, dtype=np.int64)), shape=(len(texts), max(len(vocab), 1)))
    sizes = np.diff(m.indptr).astype(np.float64)
    mt = m.T.tocsr()
    best = {"containment": 0.0, "containment_pair": None, "jaccard": 0.0, "jaccard_pair": None}
    above = {0.5: 0, 0.6: 0, 0.7: 0, 0.8: 0}
    for start in range(0, len(texts), block):
        inter = (m[start:start + block] @ mt).tocoo()
        rows = inter.row.astype(np.int64) + start
        keep = rows < inter.col
        rows, cols, shared = rows[keep], inter.col[keep].astype(np.int64), inter.data[keep].astype(np.float64)
        if not len(shared):
            continue
        containment = shared / np.minimum(sizes[rows], sizes[cols])
        jaccard = shared / (sizes[rows] + sizes[cols] - shared)
        for threshold in above:
            above[threshold] += int((containment > threshold).sum())
        k = int(containment.argmax())
        if containment[k] > best["containment"]:
            best["containment"], best["containment_pair"] = float(containment[k]), (int(rows[k]), int(cols[k]))
        k = int(jaccard.argmax())
        if jaccard[k] > best["jaccard"]:
            best["jaccard"], best["jaccard_pair"] = float(jaccard[k]), (int(rows[k]), int(cols[k]))
    best["pairs_above"] = {str(k): v for k, v in above.items()}
    best["pairs"] = len(texts) * (len(texts) - 1) // 2
    return best


# ---------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    from xiaolm.config import parse_config, save_config
    from xiaolm.utils import fail, log

    cfg, _ = parse_config(
        SynthConfig, argv, prog="xiaolm data synth",
        description="Generate the built-in corpus: simple Chinese children's stories (TinyStories-style), offline and\n"
                    "deterministic for a seed, as JSON Lines in TinyStoriesChinese's layout (story_zh, summary,\n"
                    "instruction.words = a verb, a noun and an adjective the story uses, instruction.features from\n"
                    "Dialogue, BadEnding, MoralValue, Twist, Foreshadowing, Conflict).",
        epilog="example:\n  xiaolm data synth --num 20000 --seed 0 --out data/stories.jsonl",
    )
    if not cfg.out:
        raise fail("--out FILE is required")
    if cfg.num < 1:
        raise fail(f"--num must be at least 1, got {cfg.num}")
    if cfg.start < 0:
        raise fail(f"--start must be >= 0, got {cfg.start}")
    out = Path(cfg.out)
    t0 = time.perf_counter()
    count = write_stories(out, cfg.num, cfg.seed, cfg.start)
    wall = time.perf_counter() - t0
    save_config(cfg, out.with_name(out.name + ".config.yaml"))
    log(f"synth: wrote {count:,} stories to {out} in {wall:.1f} s ({count / max(wall, 1e-9):,.0f} stories/s); "
        f"config in {out.name}.config.yaml")
    return 0
