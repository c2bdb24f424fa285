"""The six story features, the markers their stages leave, and ``detect_features`` that reads them back."""
from __future__ import annotations

import re

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
