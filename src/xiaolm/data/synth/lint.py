"""The consistency check run when the assets load (``Bank``): markers only in their own stages."""
from __future__ import annotations

from typing import TYPE_CHECKING

from xiaolm.data.synth.features import (BAD_ENDING_MARKERS, CONFLICT_MARKERS, FORESHADOW_HINT_MARKERS,
                                        FORESHADOW_PAYOFF_MARKERS, MORAL_MARKERS, TWIST_MARKERS)
from xiaolm.data.synth.templates import Foreshadow

if TYPE_CHECKING:
    from xiaolm.data.synth.assets import Bank


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
