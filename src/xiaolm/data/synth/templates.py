"""Template lines of the assets: literal text, [a|b] alternatives and {slot}s, compiled once."""
from __future__ import annotations

import random
import re

_SLOT_RE = re.compile(r"\{(\w+)\}")
_ALT_RE = re.compile(r"\[([^\[\]]*)\]")
# characters that must be introduced before a template may name them: slot -> character key
_NEEDS = {"f": "f", "F": "f", "h": "h", "H": "h"}
_INTROS = {"fi": "f", "hi": "h"}


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
