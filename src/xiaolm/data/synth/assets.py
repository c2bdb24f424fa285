"""The templates, plots and vocabulary of ``synth_assets/`` (``plots.yaml``, ``lexicon.yaml``, ``keywords.json``)."""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from xiaolm.data.synth.lint import _lint
from xiaolm.data.synth.templates import Foreshadow, Template, _lines

ASSETS = Path(__file__).parent.with_name("synth_assets")


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


@functools.lru_cache(maxsize=1)
def load_bank() -> Bank:
    return Bank()


# ------------------------------------------------------------------------------------------- vocabulary


def _records(items) -> list[list[str]]:
    """'a|b|c' strings (a YAML list, or a space-separated string) -> [[a, b, c], ...]."""
    if isinstance(items, str):
        items = items.split()
    return [str(x).split("|") for x in items]
