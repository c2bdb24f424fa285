"""The safe range of every sampling parameter, defined once.

The server's request schema (``serve/schemas.py``, a 400 naming the parameter) and the verbs that sample from flags
(``generate``, ``chat``: one ``xiaolm: error:`` line) both check against ``SAMPLING_LIMITS``. Inside a range the
arithmetic of sampling stays finite in float32 (a repetition penalty of 1e-300 is 0 in float32, and dividing a logit
by it gives infinity), and values outside it mean nothing a client could want. Infinity and NaN are outside every
range. The batched engine still fails alone a row whose numbers go bad anyway (``sample_rows``), so one request can
never fail another.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


@dataclass(frozen=True)
class Limit:
    """``low`` .. ``high`` inclusive; ``zero`` says what 0 means when 0 is allowed below ``low`` (else None)."""

    low: float
    high: float
    integer: bool = False
    zero: Optional[str] = None
    note: str = ""

    def describe(self) -> str:
        span = f"from {_num(self.low)} to {_num(self.high)}"
        return f"0 ({self.zero}) or {span}" if self.zero else span

    def problem(self, value) -> Optional[str]:
        """Why ``value`` is outside the range (``must be ..., got X``), or None when it is fine."""
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.integer and not isinstance(value, int)):
            return f"must be {kind} {self.describe()}, got {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number {self.describe()}, got {value}"
        if (self.zero and value == 0) or self.low <= value <= self.high:
            return None
        return f"must be {self.describe()}, got {_num(value)}"


def _num(value) -> str:
    shown = {INT64_MAX: "2**63 - 1", INT64_MIN: "-2**63"}
    return f"{value:g}" if isinstance(value, float) else shown.get(value, str(value))


SAMPLING_LIMITS: dict[str, Limit] = {
    # 1e-2: a logit of 100 divided by it is 1e4, well inside float32; OpenAI's maximum.
    "temperature": Limit(0.01, 2.0, zero="greedy", note="OpenAI's maximum"),
    "top_p": Limit(0.0, 1.0, note="0 keeps only the most likely token (greedy); 1 is off"),
    "top_k": Limit(0, INT64_MAX, integer=True, note="0 is off"),
    # Hugging Face's rule divides (or multiplies) a logit by it: 100x either way is already absurd, and stays finite.
    "repetition_penalty": Limit(0.01, 100.0, note="1 is off"),
    "frequency_penalty": Limit(-2.0, 2.0, note="OpenAI's range"),
    "presence_penalty": Limit(-2.0, 2.0, note="OpenAI's range"),
    "max_tokens": Limit(1, INT64_MAX, integer=True, note="also bounded by the context window"),
    "n": Limit(1, 16, integer=True, note="choices per request; each is a row of a batch"),
    "seed": Limit(INT64_MIN, INT64_MAX, integer=True, note="OpenAI's seed is a 64-bit signed integer"),
    "top_logprobs": Limit(0, 20, integer=True, note="alternatives per token, as OpenAI allows"),
}


def limit_problem(name: str, value, shown: Optional[str] = None) -> Optional[str]:
    """``"<shown> must be ..., got X"`` when ``value`` is outside ``SAMPLING_LIMITS[name]``, else None."""
    problem = SAMPLING_LIMITS[name].problem(value)
    return None if problem is None else f"{shown or name} {problem}"


def limits_table() -> str:
    """The table as Markdown (the README's copy is checked against it by a test)."""
    rows = ["| parameter | allowed | note |", "|---|---|---|"]
    rows += [f"| `{name}` | {lim.describe()} | {lim.note} |" for name, lim in SAMPLING_LIMITS.items()]
    return "\n".join(rows)
