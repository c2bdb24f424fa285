"""Cleaning that respects Chinese, and the quality filters of ``xiaolm data prepare``.

Cleaning (:class:`Cleaner`), in this order:

1. Line ends: CRLF, CR, U+2028/U+2029, NEL, vertical tab and form feed all become LF.
2. Control characters (C0/C1 except LF and TAB) and zero-width / invisible format characters are removed:
   U+200B-U+200F (zero-width space, joiners, direction marks), U+202A-U+202E and U+2066-U+2069 (bidi controls),
   U+2060-U+2064 (word joiner, invisible operators), U+FEFF (BOM), U+00AD (soft hyphen), U+180E, U+034F.
   Unpaired surrogates never reach here (the readers report them as malformed).
3. Whitespace: TAB, NBSP and the typographic spaces (U+2000-U+200A, U+202F, U+205F) become an ASCII space.
   The ideographic space U+3000 is kept where it means something: inside a line a run of spaces that contains
   one becomes a single U+3000 (it separates the halves of a heading such as ``第一回　王教头私走延安府　九纹龙…``);
   at the start of a line it is indentation and, like ASCII indentation, is removed (``strip_indent``); at the
   end of a line it is removed. Other runs of spaces collapse to one space.
4. Blank lines: at most ``max_blank_lines`` in a row; the document is stripped.
5. Optional: full-width ASCII letters and digits (``Ａ``-``ｚ``, ``０``-``９``) fold to ASCII
   (``fold_fullwidth_alnum``). Full-width *punctuation* is never touched: ``，。！？“”（）：；、`` stay as they are
   (no blanket NFKC, which would turn ``，`` into ``,`` and ``（`` into ``(``).
6. Optional Traditional -> Simplified (``to_simplified``) with OpenCC's ``t2s`` profile: it converts phrase by
   phrase (so 乾隆 stays 乾隆 while 乾淨 becomes 干净, 頭髮 becomes 头发), is about 20x faster than zhconv (C++), and
   leaves punctuation alone, whereas zhconv's ``zh-cn`` also rewrites 「」 as “”. zhconv (pure Python, always
   installed) is the fallback when OpenCC is not importable, or when ``converter: zhconv`` is asked for.

Filters (:func:`filter_reason`), each configurable and counted by name in the report; a document is counted
under the first rule that drops it, in this order:

- ``empty``: nothing left after cleaning.
- ``too_short``: fewer than ``min_chars`` characters.
- ``too_long``: more than ``max_chars`` characters, when ``too_long: drop``; with ``too_long: split`` (the
  default) the document is cut at paragraph, then sentence, then character boundaries into pieces of at most
  ``max_chars`` (:func:`split_long`), and each piece is filtered on its own.
- ``low_cjk``: the share of Han characters among non-space characters is below ``min_cjk_fraction``.
- ``repeated_lines``: the share of non-blank lines that repeat an earlier line exceeds ``max_dup_line_fraction``
  (Gopher's duplicate-line fraction; 0.4 by default rather than Gopher's 0.3, because children's stories with a
  refrain such as 我可以念给谁听呢？ reach 0.33).
- ``repeated_ngrams``: the share of characters covered by the most frequent character n-gram
  (``top_ngram_size``, default 5; an n-gram seen once does not count) exceeds ``max_top_ngram_fraction`` (default
  0.6). Gopher's top n-gram coverage, on characters because Chinese has no spaces. On the real corpora in
  ../shared/data the 99.9th percentile is 0.43 (short modern sentences), 0.33 (stories), 0.2 (Song ci) and 0.03
  (novel chapters), while 点击这里购买！×4 scores 0.71 and 哈哈哈… 1.0.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np

from xiaolm.config import opt

FILTER_RULES = ("empty", "too_short", "too_long", "low_cjk", "repeated_lines", "repeated_ngrams")


@dataclass
class CleanConfig:
    fold_fullwidth_alnum: bool = opt(True, "fold full-width letters and digits (Ａ１) to ASCII; full-width "
                                           "punctuation (，。！？“”（）：) is never folded")
    strip_indent: bool = opt(True, "remove indentation (ASCII spaces, U+3000) at the start of each line")
    max_blank_lines: int = opt(1, "longest run of blank lines kept inside a document")
    to_simplified: bool = opt(False, "convert Traditional Chinese to Simplified")
    converter: Literal["opencc", "zhconv"] = opt("opencc", "Traditional->Simplified converter: opencc (phrase-"
                                                           "aware, fast) or zhconv (pure Python fallback)")


@dataclass
class FilterConfig:
    min_chars: int = opt(10, "drop documents shorter than this many characters (0 disables)")
    max_chars: int = opt(100_000, "longest document in characters (0 disables); see too_long")
    too_long: Literal["split", "drop"] = opt("split", "what to do with a document over max_chars: split it at "
                                                      "paragraph/sentence boundaries, or drop it")
    min_cjk_fraction: float = opt(0.3, "drop documents whose share of Han characters among non-space "
                                       "characters is below this (0 disables)")
    max_dup_line_fraction: float = opt(0.4, "drop documents in which more than this share of non-blank lines "
                                            "repeat an earlier line (1 disables)")
    max_top_ngram_fraction: float = opt(0.6, "drop documents in which the most frequent character n-gram "
                                             "covers more than this share of characters (1 disables)")
    top_ngram_size: int = opt(5, "n of the character n-gram used by max_top_ngram_fraction")


# ---------------------------------------------------------------------------------------------- cleaning

_NEWLINES = re.compile("\r\n|[\r\u2028\u2029\x85\x0b\x0c]")
_INVISIBLE = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f"  # C0/C1 controls except TAB, LF (CR, VT, FF, NEL handled above)
    "\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\u00ad\u180e\u034f]"
)
_SPACES = re.compile("[\t\u00a0\u2000-\u200a\u202f\u205f]")
_IDEO_RUN = re.compile("[ \u3000]*\u3000[ \u3000]*")
_SPACE_RUN = re.compile(" {2,}")
_LINE_END_SPACE = re.compile("[ \u3000]+$", re.MULTILINE)
_LINE_START_SPACE = re.compile("^[ \u3000]+", re.MULTILINE)
_HAS_FULLWIDTH_ALNUM = re.compile("[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a]")
_FULLWIDTH_ALNUM = {cp: cp - 0xFEE0 for r in ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))
                    for cp in range(r[0], r[1] + 1)}


def _make_converter(name: str):
    """A callable str -> str doing Traditional -> Simplified."""
    if name == "opencc":
        try:
            import opencc

            converter = opencc.OpenCC("t2s")
            return converter.convert
        except Exception:  # not installed or its data missing: fall back to zhconv
            pass
    import zhconv

    return lambda text: zhconv.convert(text, "zh-hans")


class Cleaner:
    """``Cleaner(cfg)(text) -> cleaned text``; see the module docstring for what it does and why."""

    def __init__(self, cfg: CleanConfig | None = None):
        self.cfg = cfg or CleanConfig()
        if self.cfg.max_blank_lines < 0:
            raise ValueError("max_blank_lines must be >= 0")
        self._blank_runs = re.compile("\n{%d,}" % (self.cfg.max_blank_lines + 2))
        self._blank_repl = "\n" * (self.cfg.max_blank_lines + 1)
        self._convert = _make_converter(self.cfg.converter) if self.cfg.to_simplified else None

    def __call__(self, text: str) -> str:
        cfg = self.cfg
        text = _NEWLINES.sub("\n", text)
        text = _INVISIBLE.sub("", text)
        text = _SPACES.sub(" ", text)
        if cfg.fold_fullwidth_alnum and _HAS_FULLWIDTH_ALNUM.search(text):
            text = text.translate(_FULLWIDTH_ALNUM)
        if self._convert is not None:
            text = self._convert(text)
        text = _LINE_END_SPACE.sub("", text)
        if cfg.strip_indent:
            text = _LINE_START_SPACE.sub("", text)
        text = _IDEO_RUN.sub("\u3000", text) if "\u3000" in text else text
        text = _SPACE_RUN.sub(" ", text)
        text = self._blank_runs.sub(self._blank_repl, text)
        return text.strip()


def clean_text(text: str, cfg: CleanConfig | None = None) -> str:
    """One-off cleaning; build a :class:`Cleaner` once for many documents."""
    return Cleaner(cfg)(text)


# ----------------------------------------------------------------------------------------------- measures

_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_WHITESPACE = re.compile(r"\s+")


def cjk_fraction(text: str) -> float:
    """Han characters / non-whitespace characters (0 for a text with none)."""
    visible = len(text) - sum(len(m) for m in _WHITESPACE.findall(text))
    if visible <= 0:
        return 0.0
    return (len(text) - len(_HAN.sub("", text))) / visible


def dup_line_fraction(text: str) -> float:
    """Share of non-blank lines that repeat an earlier line (0 for fewer than two lines)."""
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    if len(lines) < 2:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def top_ngram_fraction(text: str, n: int = 5) -> float:
    """Share of (non-whitespace) characters covered by the most frequent character n-gram.

    An n-gram that occurs only once covers nothing, so short ordinary sentences score 0.
    """
    chars = _WHITESPACE.sub("", text)
    m = len(chars) - n + 1
    if m < 2:
        return 0.0
    if len(chars) < 512:
        counts = Counter(chars[i:i + n] for i in range(m))
        gram, count = max(counts.items(), key=lambda kv: kv[1])
        if count < 2:
            return 0.0
        starts = np.fromiter((i for i in range(m) if chars[i:i + n] == gram), dtype=np.int64)
    else:  # long texts: hash every n-gram with numpy instead of slicing Python strings
        cps = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        h = np.zeros(m, dtype=np.uint64)
        for j in range(n):
            h = (h * np.uint64(0x100000001B3)) ^ cps[j:j + m]
        values, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
        top = int(np.argmax(counts))
        if counts[top] < 2:
            return 0.0
        starts = np.flatnonzero(inverse == top)
    cover = np.zeros(len(chars) + 1, dtype=np.int64)
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    return float(np.count_nonzero(np.cumsum(cover)[: len(chars)] > 0)) / len(chars)


# ------------------------------------------------------------------------------------------------ filters


def filter_reason(text: str, cfg: FilterConfig) -> str | None:
    """The name of the first rule that drops ``text`` (one of FILTER_RULES), or None to keep it.

    Length over ``max_chars`` is reported as ``too_long`` here; splitting is the caller's choice (split_long).
    """
    reason = _cheap_filter_reason(text, cfg)
    if reason is None and cfg.max_top_ngram_fraction < 1:
        if top_ngram_fraction(text, cfg.top_ngram_size) > cfg.max_top_ngram_fraction:
            return "repeated_ngrams"
    return reason


def _cheap_filter_reason(text: str, cfg: FilterConfig) -> str | None:
    """Every rule but repeated_ngrams, in order."""
    if not text:
        return "empty"
    if cfg.min_chars > 0 and len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars > 0 and len(text) > cfg.max_chars:
        return "too_long"
    if cfg.min_cjk_fraction > 0 and cjk_fraction(text) < cfg.min_cjk_fraction:
        return "low_cjk"
    if cfg.max_dup_line_fraction < 1 and dup_line_fraction(text) > cfg.max_dup_line_fraction:
        return "repeated_lines"
    return None


def top_ngram_max_counts(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each text (whitespace removed): the count of its most frequent character n-gram, and its length.

    Vectorised over the whole batch: every n-gram of every text is hashed into one array keyed by text, sorted
    once, and the longest run of equal keys per text is its top count.
    """
    stripped = [_WHITESPACE.sub("", t) for t in texts]
    lengths = np.fromiter((len(s) for s in stripped), dtype=np.int64, count=len(stripped))
    top = np.zeros(len(stripped), dtype=np.int64)
    cps = np.frombuffer("".join(stripped).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    m = len(cps) - n + 1
    if m <= 0:
        return top, lengths
    h = np.zeros(m, dtype=np.uint64)
    for j in range(n):
        h = (h * np.uint64(0x100000001B3)) ^ cps[j:j + m]
    doc_of = np.repeat(np.arange(len(stripped), dtype=np.uint64), lengths)[:m]
    valid = np.arange(m) + n <= np.cumsum(lengths)[doc_of.astype(np.int64)]
    # 40 bits of n-gram hash under 24 bits of text index: one sortable key per (text, n-gram).
    keys = np.sort((doc_of[valid] << np.uint64(40)) | (h[valid] & np.uint64((1 << 40) - 1)))
    if len(keys) == 0:
        return top, lengths
    run_starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    run_lengths = np.diff(np.concatenate([run_starts, [len(keys)]]))
    run_doc = (keys[run_starts] >> np.uint64(40)).astype(np.int64)
    np.maximum.at(top, run_doc, run_lengths)
    return top, lengths


def filter_reasons(texts: list[str], cfg: FilterConfig) -> list[str | None]:
    """``[filter_reason(t, cfg) for t in texts]``, with the repeated n-gram rule vectorised over the batch.

    A text can only exceed ``max_top_ngram_fraction`` if ``top_count * n / length`` does (each occurrence covers
    at most n characters), so the exact coverage is computed only for the few texts above that bound.
    """
    reasons = [_cheap_filter_reason(t, cfg) for t in texts]
    if cfg.max_top_ngram_fraction >= 1:
        return reasons
    todo = [i for i, r in enumerate(reasons) if r is None]
    for start in range(0, len(todo), 1 << 14):  # the key packs the text index into 24 bits
        chunk = todo[start:start + (1 << 14)]
        n = cfg.top_ngram_size
        top, lengths = top_ngram_max_counts([texts[i] for i in chunk], n)
        bound = np.where(lengths > 0, top * n / np.maximum(lengths, 1), 0.0)
        for k in np.flatnonzero((top >= 2) & (bound > cfg.max_top_ngram_fraction)):
            i = chunk[int(k)]
            if top_ngram_fraction(texts[i], n) > cfg.max_top_ngram_fraction:
                reasons[i] = "repeated_ngrams"
    return reasons


# A sentence: text up to and including its end mark(s) and any closing quote or bracket after them.
_SENTENCE = re.compile(r"[^。！？!?；;…]*(?:[。！？!?；;…]+[”’」』）)]*|$)", re.S)


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` characters, preferring paragraph (blank line), then line,
    then sentence (。！？；) boundaries, and only then a hard cut. Joining the pieces with the separators they were
    cut at gives back ``text``; pieces are stripped of the separators themselves.
    """
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    for separator in ("\n\n", "\n", None):
        parts = text.split(separator) if separator else [p for p in _SENTENCE.findall(text) if p]
        if len(parts) > 1:
            joiner = separator or ""
            pieces: list[str] = []
            current = ""
            for part in parts:
                candidate = current + joiner + part if current else part
                if len(candidate) <= max_chars:
                    current = candidate
                    continue
                if current:
                    pieces.append(current)
                if len(part) > max_chars:
                    pieces.extend(split_long(part, max_chars))
                    current = ""
                else:
                    current = part
            if current:
                pieces.append(current)
            return [p.strip() for p in pieces if p.strip()]
    return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]


def validate_filters(cfg: FilterConfig) -> None:
    """Raise ValueError naming the option for out-of-range settings."""
    if cfg.min_chars < 0 or cfg.max_chars < 0:
        raise ValueError("filters.min_chars and filters.max_chars must be >= 0")
    if cfg.max_chars and cfg.min_chars > cfg.max_chars:
        raise ValueError(f"filters.min_chars ({cfg.min_chars}) is above filters.max_chars ({cfg.max_chars})")
    for name in ("min_cjk_fraction", "max_dup_line_fraction", "max_top_ngram_fraction"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"filters.{name} must be between 0 and 1, got {value}")
    if cfg.top_ngram_size < 2:
        raise ValueError("filters.top_ngram_size must be at least 2")
