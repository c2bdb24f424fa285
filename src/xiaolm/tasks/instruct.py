"""``xiaolm data instruct``: instruction data with checkable constraints, built from story records.

The TinyStories-Instruct recipe (a story plus the constraints it satisfies, asked for as an instruction), done in
Chinese and without any translation model: every constraint is read off the Chinese story itself.

- ``词汇``: three words the story uses, a verb, a noun and an adjective, found with jieba's part-of-speech tagger
  (two or more Han characters each, so a constraint is never met by a stray character);
- ``特征``: the record's ``instruction.features`` in Chinese (Dialogue→对话, BadEnding→悲伤的结局, MoralValue→寓意,
  Twist→转折, Foreshadowing→伏笔, Conflict→冲突);
- ``随机句子``: one sentence of the story (not the first) that must appear;
- ``开头``: the story's first sentence, which the answer must begin with and continue;
- ``摘要``: the record's ``summary``, when it is Chinese (the built-in stories have one; TinyStoriesChinese's is
  English and is not used).

Each sample keeps a random subset of the story's constraints (each with probability ``keep_prob``, at least one), in
random order, phrased in one of several wordings (a labelled list like TinyStories-Instruct's, or sentences). The
answer is the story. Records are OpenAI messages with the constraints kept as structured fields, so they can be
checked later (``xiaolm.tasks.constraints``)::

    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "constraints": {...}, "story_id": "..."}

The split into ``train.jsonl`` / ``heldout.jsonl`` is by story (a hash of the story text), never by sample, so no
held-out story is ever trained on, whatever the seed. Everything is deterministic for a seed.
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from xiaolm.config import opt, parse_config, save_config
from xiaolm.tasks.constraints import FEATURE_NAMES
from xiaolm.utils import atomic_write_json, fail, log, stable_hash, write_jsonl

CONSTRAINT_KEYS = ("词汇", "特征", "随机句子", "开头", "摘要")


@dataclass
class InstructConfig:
    """Build Chinese instruction data with checkable constraints (词汇, 特征, 随机句子, 开头, 摘要) from story records, split \
into train and held-out by story."""

    stories: list[str] = opt([], "story files (JSON Lines or JSON arrays in TinyStoriesChinese's layout)")
    out: str = opt("data/instruct", "output directory: train.jsonl, heldout.jsonl, report.json, config.yaml")
    field: str = opt("story_zh", "field holding the Chinese story")
    samples_per_story: int = opt(1, "instruction samples made from each story (different constraint subsets)")
    keep_prob: float = opt(0.6, "chance that each constraint a story offers is kept in a sample (at least one is)")
    heldout_fraction: float = opt(0.05, "share of stories (by hash of the story text) held out for evaluation")
    seed: int = opt(0, "seed for constraint subsets, word choice and wordings")
    limit: Optional[int] = opt(None, "use at most this many stories (the first ones read)")
    min_sentence_chars: int = opt(8, "shortest sentence usable as 随机句子 (characters)")
    max_sentence_chars: int = opt(40, "longest sentence usable as 随机句子 or 开头 (characters)")


# ------------------------------------------------------------------------------------------------ text bits

_SENTENCE = re.compile(r"[^。！？!?\n]*[。！？!?]+[”」』]?|[^。！？!?\n]+$", re.M)
_HAN_ONLY = re.compile(r"^[\u4e00-\u9fff]+$")
_HAN = re.compile(r"[\u4e00-\u9fff]")
_LATIN = re.compile(r"[A-Za-z]")

# A few very common words that make a weak constraint (they appear in nearly every story).
_COMMON = {"一个", "他们", "我们", "你们", "自己", "什么", "没有", "可以", "知道", "就是", "还是", "这个", "那个",
           "时候", "一起", "起来", "出来", "看到", "觉得", "开始", "非常"}


def split_sentences(text: str) -> list[str]:
    """Sentences ending in 。！？ (a closing quotation mark stays with its sentence)."""
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def is_chinese(text: Optional[str]) -> bool:
    if not text:
        return False
    return len(_HAN.findall(text)) > len(_LATIN.findall(text))


_JIEBA_READY = False


def _posseg():
    global _JIEBA_READY
    import jieba
    import jieba.posseg as pseg

    if not _JIEBA_READY:
        jieba.setLogLevel(logging.WARNING)
        _JIEBA_READY = True
    return pseg


def word_candidates(text: str, counts: Optional[dict] = None) -> dict[str, list[str]]:
    """Distinct verbs, nouns and adjectives of ``text`` (jieba tags v, n, a), two or more Han characters each, in
    order of first appearance. ``counts``, when given, receives how often each one occurs."""
    pseg = _posseg()
    found: dict[str, list[str]] = {"verb": [], "noun": [], "adj": []}
    kinds = {"v": "verb", "n": "noun", "a": "adj"}
    seen: dict[str, int] = {}
    for pair in pseg.lcut(text, HMM=False):
        word, flag = pair.word, pair.flag
        kind = kinds.get(flag)
        if kind is None or len(word) < 2 or word in _COMMON or not _HAN_ONLY.match(word):
            continue
        if word not in seen:
            found[kind].append(word)
        seen[word] = seen.get(word, 0) + 1
    if counts is not None:
        counts.update(seen)
    return found


def _central_word(words: list[str], counts: dict, rng: random.Random) -> str:
    """One of ``words``, drawn in proportion to the square of how often the story uses it: the words a story is
    built around (its object, its feeling) are the ones an instruction names, not a word it used once in passing."""
    return rng.choices(words, weights=[counts[w] ** 2 for w in words])[0]


def story_constraints(record: dict, text: str, rng: random.Random, cfg: InstructConfig) -> dict:
    """Every constraint this story can offer (one choice of words and sentence, drawn with ``rng``)."""
    out: dict = {}
    counts: dict[str, int] = {}
    cands = word_candidates(text, counts)
    if all(cands.values()):
        out["词汇"] = [_central_word(cands[k], counts, rng) for k in ("verb", "noun", "adj")]
    features = (record.get("instruction") or {}).get("features") or []
    names = [FEATURE_NAMES[f] for f in features if f in FEATURE_NAMES]
    if names:
        out["特征"] = list(dict.fromkeys(names))
    sentences = split_sentences(text)
    if sentences and 2 <= len(sentences[0]) <= cfg.max_sentence_chars:
        out["开头"] = sentences[0]
    usable = [s for s in sentences[1:] if cfg.min_sentence_chars <= len(s) <= cfg.max_sentence_chars]
    if usable:
        out["随机句子"] = rng.choice(usable)
    summary = record.get("summary")
    if isinstance(summary, str) and is_chinese(summary):
        out["摘要"] = summary.strip()
    return out


# ------------------------------------------------------------------------------------------------ wordings

_HEADERS_LIST = ["请按下面的要求写一个故事。", "写一个短故事，要求如下：", "给小朋友讲一个故事，满足这些要求：",
                 "请创作一个儿童故事。"]
_HEADERS_PLAIN = ["请写一个故事。", "写一个短故事。", "给小朋友讲一个故事。", "请编一个小故事。", ""]
_LABELS = {"词汇": "词汇", "特征": "特征", "随机句子": "随机句子", "开头": "开头", "摘要": "摘要"}


def _quote(text: str) -> str:
    """“text”, or text after a colon when it already holds quotation marks."""
    return f"：{text}" if "“" in text or "”" in text else f"：“{text}”"


def _join_cn(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return "、".join(items[:-1]) + "和" + items[-1]


def _sentence_for(key: str, value, rng: random.Random) -> str:
    if key == "词汇":
        a, b, c = value
        return rng.choice([
            f"故事里要用到这三个词：{a}、{b}、{c}。",
            f"请在故事中使用“{a}”“{b}”和“{c}”这几个词。",
            f"故事必须包含词语{a}、{b}和{c}。",
            f"用上“{a}”、“{b}”、“{c}”三个词。",
        ])
    if key == "特征":
        feats = _join_cn(value)
        return rng.choice([f"故事要有{feats}。", f"请让故事带有{feats}。", f"故事里需要{feats}。"])
    if key == "随机句子":
        return rng.choice([f"故事中要出现这句话{_quote(value)}", f"请把这句话写进故事里{_quote(value)}",
                           f"故事里要有一句{_quote(value)}"])
    if key == "开头":
        return rng.choice([f"故事用这句话开头{_quote(value)}", f"请接着这个开头写下去{_quote(value)}",
                           f"开头是{_quote(value)}"])
    if key == "摘要":
        return rng.choice([f"故事的大意是：{value}", f"按照这个梗概来写：{value}", f"故事讲的是：{value}"])
    raise KeyError(key)


def _line_for(key: str, value) -> str:
    if key == "词汇":
        return f"{_LABELS[key]}：{'、'.join(value)}"
    if key == "特征":
        return f"{_LABELS[key]}：{'、'.join(value)}"
    return f"{_LABELS[key]}：{value}"


def render_instruction(constraints: dict, order: list[str], rng: random.Random) -> tuple[str, str]:
    """The user message asking for a story with ``constraints`` (keys in ``order``) and the wording style used."""
    if rng.random() < 0.5:
        header = rng.choice(_HEADERS_LIST)
        lines = [_line_for(k, constraints[k]) for k in order]
        return header + "\n" + "\n".join(lines), "list"
    header = rng.choice(_HEADERS_PLAIN)
    body = "".join(_sentence_for(k, constraints[k], rng) for k in order)
    return header + body, "sentences"


def make_sample(record: dict, text: str, story_id: str, index: int, cfg: InstructConfig) -> Optional[dict]:
    """One instruction sample (or None when the story offers no constraint)."""
    rng = random.Random(f"{cfg.seed}:{story_id}:{index}")
    available = story_constraints(record, text, rng, cfg)
    keys = [k for k in CONSTRAINT_KEYS if k in available]
    if not keys:
        return None
    kept = [k for k in keys if rng.random() < cfg.keep_prob] or [rng.choice(keys)]
    rng.shuffle(kept)
    constraints = {k: available[k] for k in kept}
    prompt, style = render_instruction(constraints, kept, rng)
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}],
        "constraints": constraints,
        "story_id": story_id,
        "wording": style,
    }


def story_id_of(text: str) -> str:
    return f"{stable_hash(text):016x}"


def is_heldout(story_id: str, fraction: float) -> bool:
    """By the story's hash alone: the same story is always on the same side, for every seed and file order."""
    return int(story_id, 16) % 10_000 < round(fraction * 10_000)


# ------------------------------------------------------------------------------------------------ build


def read_stories(paths: Iterable[str], field: str, problems: list[str], limit: Optional[int] = None):
    """Yield ``(record, story_text)``; malformed records go to ``problems`` as ``file:line: reason``."""
    from xiaolm.data.formats import iter_json_records

    n = 0
    for path in paths:
        for line, rec, error in iter_json_records(path):
            where = f"{path}:{line}"
            if error is not None:
                problems.append(f"{where}: {error}")
                continue
            if not isinstance(rec, dict):
                problems.append(f"{where}: a story record must be a JSON object")
                continue
            text = rec.get(field)
            if not isinstance(text, str) or not text.strip():
                problems.append(f"{where}: missing or empty field '{field}'")
                continue
            yield rec, text.strip()
            n += 1
            if limit is not None and n >= limit:
                return


def build_instruct(cfg: InstructConfig) -> dict:
    """Write ``train.jsonl``, ``heldout.jsonl`` and ``report.json`` into ``cfg.out``; return the report."""
    from xiaolm.data.readers import is_saved_dataset

    if not cfg.stories:
        raise fail("give at least one story file: xiaolm data instruct STORIES... --out DIR")
    for p in cfg.stories:
        if not Path(p).is_file() and not is_saved_dataset(p):
            raise fail(f"{p}: no such file")
    if not 0 <= cfg.heldout_fraction < 1:
        raise fail("--heldout-fraction must be in [0, 1)")
    problems: list[str] = []
    train, heldout = [], []
    seen: set[str] = set()
    duplicates = no_constraint = stories = 0
    for rec, text in read_stories(cfg.stories, cfg.field, problems, cfg.limit):
        sid = story_id_of(text)
        if sid in seen:
            duplicates += 1
            continue
        seen.add(sid)
        stories += 1
        side = heldout if is_heldout(sid, cfg.heldout_fraction) else train
        made = 0
        for k in range(cfg.samples_per_story):
            sample = make_sample(rec, text, sid, k, cfg)
            if sample is not None:
                side.append(sample)
                made += 1
        no_constraint += made == 0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    save_config(cfg, out / "config.yaml")
    freq = {k: 0 for k in CONSTRAINT_KEYS}
    for s in train + heldout:
        for k in s["constraints"]:
            freq[k] += 1
    report = {
        "stories": stories, "duplicate_stories_skipped": duplicates, "stories_without_constraints": no_constraint,
        "malformed_records": len(problems), "problems": problems[:200],
        "train_samples": len(train), "heldout_samples": len(heldout),
        "train_stories": len({s["story_id"] for s in train}), "heldout_stories": len({s["story_id"] for s in heldout}),
        "constraint_counts": freq,
    }
    atomic_write_json(out / "report.json", report)
    return report


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(InstructConfig, argv, "xiaolm data instruct", positionals={"stories": "STORIES"})
    report = build_instruct(cfg)
    for p in report["problems"][:10]:
        log(f"malformed: {p}")
    if report["malformed_records"] > 10:
        log(f"... {report['malformed_records'] - 10} more malformed records (see report.json)")
    counts = ", ".join(f"{k} {v}" for k, v in report["constraint_counts"].items())
    print(f"{report['stories']} stories -> {report['train_samples']} train samples ({report['train_stories']} "
          f"stories), {report['heldout_samples']} held-out samples ({report['heldout_stories']} stories); "
          f"{report['malformed_records']} malformed records skipped; constraints: {counts}; wrote {cfg.out}")
    return 0
