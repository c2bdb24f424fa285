"""The rule-based verifier of instruction constraints, and repetition measures.

Used by ``xiaolm eval instruct`` to score generations, and by the alignment stage as a verifiable reward.

Constraints are the structured fields ``xiaolm data instruct`` keeps beside each sample::

    {"词汇": [verb, noun, adjective], "特征": ["对话", "转折", ...], "随机句子": str, "开头": str, "摘要": str}

What is checked, and how (``score_response``):

- ``词汇``: every word appears in the response (exact substring).
- ``随机句子``: the sentence appears in the response (whitespace ignored on both sides).
- ``开头``: the response begins with the opening, verbatim (whitespace ignored).
- ``特征:对话``: a quoted utterance: Chinese quotation marks (“…” or 「…」) around at least two Han characters.
- ``特征:悲伤的结局`` / ``寓意`` / ``转折`` / ``伏笔`` / ``冲突``: *marker* checks, the marker words the built-in
  story generator writes for that feature and only for it (``xiaolm.data.synth``: 难过了很久 ..., 道理 ...,
  没想到 ..., a hint such as 没有在意 followed by 想起, 吵 ...). They are exact on the built-in corpus and only
  heuristics on other text: ``xiaolm eval instruct`` prints how often the reference stories
  themselves pass each check, so a weak check shows itself. They are reported but left out of ``all_met`` unless
  ``markers=True``.
- ``摘要`` (write a story from a summary) is not checkable by rule and is never scored.

Repetition (``repetition_metrics``), on characters with whitespace removed: ``rep4`` is the share of 4-gram
occurrences that repeat an earlier 4-gram of the same text (0 = no repeats; a looping text approaches 1);
``distinct1`` / ``distinct2`` are unique 1-/2-grams over all 1-/2-grams.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

from xiaolm.data import synth

# instruction.features (TinyStories layout) -> the Chinese constraint name used in prompts and checks
FEATURE_NAMES = {
    "Dialogue": "对话",
    "BadEnding": "悲伤的结局",
    "MoralValue": "寓意",
    "Twist": "转折",
    "Foreshadowing": "伏笔",
    "Conflict": "冲突",
}

# Marker checks for the features without an exact rule: the markers the built-in story generator writes for each
# feature (xiaolm.data.synth), so these checks are exact there and heuristics on other text.
FEATURE_MARKERS = {
    "悲伤的结局": synth.BAD_ENDING_MARKERS,
    "寓意": synth.MORAL_MARKERS,
    "转折": synth.TWIST_MARKERS,
    "冲突": synth.CONFLICT_MARKERS,
}
FORESHADOW_HINTS = synth.FORESHADOW_HINT_MARKERS  # 伏笔: a hint, then its payoff later in the text
FORESHADOW_PAYOFFS = synth.FORESHADOW_PAYOFF_MARKERS

RULE_CHECKS = ("词汇", "随机句子", "开头", "特征:对话")
UNSCORED = ("摘要",)

_WS = re.compile(r"\s+")
_HAN = re.compile(r"[\u4e00-\u9fff]")
_QUOTE = re.compile(r"“([^“”]*)”|「([^「」]*)」")


def _squash(text: str) -> str:
    return _WS.sub("", text)


# ------------------------------------------------------------------------------------------------ checks


def words_present(text: str, words: Iterable[str]) -> int:
    """How many of ``words`` appear in ``text``."""
    return sum(w in text for w in words)


def has_words(text: str, words: Iterable[str]) -> bool:
    words = list(words)
    return words_present(text, words) == len(words)


def has_sentence(text: str, sentence: str) -> bool:
    return bool(sentence) and _squash(sentence) in _squash(text)


def starts_with(text: str, opening: str) -> bool:
    return bool(opening) and _squash(text).startswith(_squash(opening))


def has_dialogue(text: str) -> bool:
    """A quoted utterance: “…” or 「…」 holding at least two Han characters."""
    for m in _QUOTE.finditer(text):
        inner = m.group(1) if m.group(1) is not None else m.group(2)
        if len(_HAN.findall(inner)) >= 2:
            return True
    return False


def has_marker(text: str, feature: str) -> Optional[bool]:
    """The feature's marker is in ``text`` (伏笔: a hint, then a payoff after it); None for an unknown feature."""
    if feature == "伏笔":
        hints = [text.find(m) for m in FORESHADOW_HINTS if m in text]
        return bool(hints) and any(text.find(m, min(hints)) >= 0 for m in FORESHADOW_PAYOFFS)
    markers = FEATURE_MARKERS.get(feature)
    if markers is None:
        return None
    return any(m in text for m in markers)


# ------------------------------------------------------------------------------------------------ repetition


def _ngrams(chars: list[str], n: int) -> list[tuple]:
    return [tuple(chars[i : i + n]) for i in range(len(chars) - n + 1)]


def repetition_metrics(text: str) -> dict:
    """``rep4``, ``distinct1``, ``distinct2`` and ``chars`` for one text (see the module docstring).

    An empty text has ``chars`` 0 and the ratios None (it neither repeats nor varies; averages skip it)."""
    chars = list(_squash(text))
    out: dict = {"chars": len(chars)}
    if not chars:
        return {**out, "rep4": None, "distinct1": None, "distinct2": None}
    grams4 = _ngrams(chars, 4)
    out["rep4"] = 1.0 - len(set(grams4)) / len(grams4) if grams4 else 0.0
    out["distinct1"] = len(set(chars)) / len(chars)
    grams2 = _ngrams(chars, 2)
    out["distinct2"] = len(set(grams2)) / len(grams2) if grams2 else 1.0
    return out


def aggregate_repetition(metrics: list[dict]) -> dict:
    """Means over texts (empty texts are counted in ``empty`` and left out of the ratio means)."""
    out: dict = {"texts": len(metrics), "empty": sum(1 for m in metrics if not m["chars"])}
    out["mean_chars"] = sum(m["chars"] for m in metrics) / len(metrics) if metrics else 0.0
    for key in ("rep4", "distinct1", "distinct2"):
        vals = [m[key] for m in metrics if m[key] is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    return out


# ------------------------------------------------------------------------------------------------ scoring


def check_names(constraints: dict) -> list[str]:
    """The checks ``score_response`` runs for these constraints, in a stable order."""
    names = []
    if constraints.get("词汇"):
        names.append("词汇")
    if constraints.get("随机句子"):
        names.append("随机句子")
    if constraints.get("开头"):
        names.append("开头")
    for feat in constraints.get("特征") or []:
        names.append(f"特征:{feat}")
    return names


def score_response(constraints: dict, text: str, markers: bool = False) -> dict:
    """Check one response against its constraints.

    Returns ``{"checks": {name: bool}, "all_met": bool, "n_checked": int, "n_met": int, "unscored": [names],
    "repetition": repetition_metrics(text)}``. ``checks`` holds every checkable constraint (marker checks
    included); ``all_met`` / ``n_checked`` / ``n_met`` count the rule checks, plus the marker checks when
    ``markers`` is true. A sample with nothing checkable has ``all_met`` None.
    """
    checks: dict[str, bool] = {}
    counted: list[str] = []
    unscored = [k for k in UNSCORED if constraints.get(k)]
    for name in check_names(constraints):
        if name == "词汇":
            checks[name] = has_words(text, constraints["词汇"])
        elif name == "随机句子":
            checks[name] = has_sentence(text, constraints["随机句子"])
        elif name == "开头":
            checks[name] = starts_with(text, constraints["开头"])
        elif name == "特征:对话":
            checks[name] = has_dialogue(text)
        else:
            result = has_marker(text, name.split(":", 1)[1])
            if result is None:
                unscored.append(name)
                continue
            checks[name] = result
            if not markers:
                continue
        counted.append(name)
    n_met = sum(checks[n] for n in counted)
    return {
        "checks": checks,
        "all_met": (n_met == len(counted)) if counted else None,
        "n_checked": len(counted),
        "n_met": n_met,
        "unscored": unscored,
        "repetition": repetition_metrics(text),
    }


def constraint_reward(constraints: dict, text: str, repetition_weight: float = 1.0, all_met_bonus: float = 0.5,
                      markers: bool = False) -> float:
    """A scalar reward for RL / pair ranking: the share of checked constraints met, a bonus when all are met,
    minus ``repetition_weight * rep4``. An empty response scores -1 (so silence never beats an attempt)."""
    score = score_response(constraints, text, markers=markers)
    rep = score["repetition"]
    if not rep["chars"]:
        return -1.0
    frac = score["n_met"] / score["n_checked"] if score["n_checked"] else 0.0
    bonus = all_met_bonus if score["all_met"] else 0.0
    return frac + bonus - repetition_weight * (rep["rep4"] or 0.0)
