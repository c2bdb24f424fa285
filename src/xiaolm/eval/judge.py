"""``xiaolm eval judge``: stories graded by a judge model, the way the TinyStories paper graded them.

Eldan & Li (2023) gave a strong model the opening of a story and a student's completion, asked for a short written
assessment, then 1-10 grades for grammar, creativity and consistency with the opening (plot included), and a guess of
the writer's age group. This does the same in Chinese against any OpenAI-compatible endpoint:

- the model under test completes each of the held-out openings (``judge_openings.py``, 60, none of them produced
  by the built-in story generator) ``--samples`` times;
- two reference rows make a score mean something without knowing the judge: stories of the built-in corpus itself,
  split after their first sentence (the ceiling the data allows), and the same stories with the sentences of the
  completion shuffled (a floor: every sentence is fluent, the story is not);
- each (opening, completion) is sent with the rubric (``PROMPT``); the reply is parsed strictly
  (``parse_grade``): one that does not parse is asked again once with a reminder of the format, then counted as
  unparsed, never guessed;
- requests run with bounded concurrency, retried with backoff on 429/5xx/timeouts (``xiaolm.data.teach.Teacher``);
  every outcome is cached in ``OUT/cache.jsonl`` keyed by (judge, prompt, sample), so a rerun costs nothing;
- ``OUT/judge.json`` and ``OUT/judge.md``: mean and 95% interval per criterion, the age-group histogram, the
  best and worst stories with their assessments, the tokens used.

The API key comes from ``$XIAOLM_JUDGE_API_KEY``, else ``$OPENAI_API_KEY`` (``--api-key-env`` names another);
it is never written anywhere.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from xiaolm.config import opt, parse_config
from xiaolm.utils import atomic_write_json, atomic_write_text, fail, log

CRITERIA = {"grammar": "语法", "creativity": "创造力", "consistency": "一致性"}
AGE_GROUPS = {"A": "3岁及以下", "B": "4-5岁", "C": "6-7岁", "D": "8-9岁", "E": "10-12岁", "F": "13-16岁"}
SEPARATOR = "***"

SYSTEM = "你是一位经验丰富的小学语文老师，负责批改学生的故事续写练习。"
PROMPT = """下面是一道练习：学生拿到一个故事的开头，需要把它续写成一个完整的故事。这道练习考查学生的语言能力和创造力。\
符号 *** 分隔了给定的开头和学生续写的部分。

{opening}***{completion}

请先对学生写的部分（*** 之后的内容）给出总体评价：语法是否正确？是否与故事的开头一致？情节是否合理？\
请特别注意学生是否把被 *** 从中间断开的句子接完整了。

然后，从语法、创造力、与开头的一致性（包括情节是否合理）三个方面给学生的续写打分，每项是 1 到 10 的整数。\
最后，根据续写体现的水平，猜一猜学生的年龄组：A：3岁及以下；B：4-5岁；C：6-7岁；D：8-9岁；E：10-12岁；F：13-16岁。

严格按照下面的格式回答，一共五行，不要输出其他内容：
评价：<一段简短的书面评价>
语法：<1 到 10 的整数>
创造力：<1 到 10 的整数>
一致性：<1 到 10 的整数>
年龄组：<A、B、C、D、E、F 中的一个字母>"""
REMINDER = "\n\n（你上一次的回答不符合规定的格式。请只输出上面规定的五行。）"
PROMPT_VERSION = hashlib.sha256((SYSTEM + PROMPT + REMINDER).encode("utf-8")).hexdigest()[:12]
ROWS = {"model": "the model", "corpus": "built-in corpus (ceiling)", "shuffled": "corpus, sentences shuffled (floor)"}


@dataclass
class JudgeConfig:
    """Grade stories the model writes from held-out openings with a judge model at an OpenAI-compatible endpoint \
(TinyStories' rubric, in Chinese): written assessment, 1-10 grammar / creativity / consistency, age group; beside \
the built-in corpus's own stories (ceiling) and a sentence-shuffled version (floor)."""

    run: str = opt(None, "the model under test: RUNDIR, checkpoint, quantised or Hugging Face directory")
    endpoint: Optional[str] = opt(None, "the judge's OpenAI-compatible base URL (.../v1)")
    model: Optional[str] = opt(None, "the judge's model name")
    api_key_env: Optional[str] = opt(None, "environment variable holding the judge's API key (default: "
                                           "XIAOLM_JUDGE_API_KEY, else OPENAI_API_KEY; none set: no auth header)")
    out: Optional[str] = opt(None, "output directory: judge.json, judge.md, cache.jsonl (default: RUN/judge)")
    samples: int = opt(2, "completions per opening")
    openings: Optional[int] = opt(None, "use the first N openings (default: all 60)")
    references: int = opt(40, "corpus stories in the ceiling and floor rows (0: no reference rows)")
    reference_chars: int = opt(300, "a reference completion is cut back to a sentence end within this many characters")
    max_new_tokens: int = opt(200, "tokens per completion at most (cut back to a sentence end when reached)")
    temperature: float = opt(0.8, "sampling temperature of the model under test")
    top_k: int = opt(50, "top-k of the model under test")
    batch_size: int = opt(16, "completions generated together")
    seed: int = opt(0, "seed for sampling and the shuffled floor")
    judge_temperature: float = opt(0.0, "temperature sent to the judge")
    judge_max_tokens: int = opt(600, "max_tokens of each grade")
    concurrency: int = opt(4, "judge requests in flight at once")
    max_retries: int = opt(4, "retries of a request after 429, 5xx, a timeout or a connection error")
    backoff: float = opt(1.0, "first retry delay in seconds (doubles each retry, with jitter; Retry-After wins)")
    timeout: float = opt(120.0, "seconds one judge request may take")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    checkpoint: str = opt("latest", "which checkpoint of a RUNDIR: latest or best")


@dataclass
class Item:
    row: str           # "model", "corpus" or "shuffled"
    opening: str
    completion: str
    key: str = ""
    cut: bool = False  # the model's completion reached the token budget


# ------------------------------------------------------------------------------------------------ parsing

_FIELD = re.compile(r"^(评价|语法|创造力|一致性|年龄组)\s*[:：]\s*(.*)$")
_SCORE = re.compile(r"^(\d{1,2})\s*(?:分|/\s*10)?$")
_AGE = re.compile(r"^([A-F])(?![A-Za-z])")


def parse_grade(text: str) -> Optional[dict]:
    """The grade in a judge's reply, or None when the reply does not follow the format exactly.

    Five fields, each once: 评价 (may continue on the lines after it), 语法 / 创造力 / 一致性 (an integer 1-10,
    ``7``, ``7分`` or ``7/10``) and 年龄组 (a letter A-F, a description after it allowed). Markdown bold and list
    dashes around a field name are tolerated; any other line, a missing or repeated field, or a score out of range
    is a reply that does not parse."""
    fields: dict[str, str] = {}
    last = None
    for raw in (text or "").splitlines():
        line = raw.strip().lstrip("-").strip().replace("**", "").strip()
        if not line:
            continue
        m = _FIELD.match(line)
        if m is None:
            if last == "评价":   # the assessment may run over several lines
                fields["评价"] += "\n" + line
                continue
            return None
        name, value = m.group(1), m.group(2).strip()
        if name in fields:
            return None
        fields[name], last = value, name
    if set(fields) != {"评价", *CRITERIA.values(), "年龄组"} or not fields["评价"].strip():
        return None
    grade: dict = {"assessment": fields["评价"].strip()}
    for key, name in CRITERIA.items():
        m = _SCORE.match(fields[name])
        if m is None or not 1 <= int(m.group(1)) <= 10:
            return None
        grade[key] = int(m.group(1))
    m = _AGE.match(fields["年龄组"])
    if m is None:
        return None
    grade["age_group"] = m.group(1)
    return grade


# ------------------------------------------------------------------------------------------------ items


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, each with its end mark and closing quotes (a tail without one is a sentence too)."""
    from xiaolm.infer.stories import CLOSERS, SENTENCE_ENDS

    ends = re.escape(SENTENCE_ENDS)
    pattern = rf"[^{ends}]*[{ends}]+[{re.escape(CLOSERS)}]*|[^{ends}]+$"
    return [s for s in (m.group().strip() for m in re.finditer(pattern, text)) if s]


def reference_items(n: int, max_chars: int, seed: int) -> list[Item]:
    """The ceiling and floor rows: ``n`` stories of the built-in corpus (seed 0, the corpus everyone trains on)
    split after their first sentence, and the same completions with their sentences shuffled."""
    from xiaolm.data.synth import iter_stories
    from xiaolm.infer.stories import last_sentence_end

    rng = random.Random(seed)
    items: list[Item] = []
    for rec in iter_stories(n, seed=0):
        sentences = split_sentences("".join(rec["story_zh"].split()))
        if len(sentences) < 3:
            continue
        opening, rest = sentences[0], "".join(sentences[1:])
        completion = rest[:last_sentence_end(rest[:max_chars]) or max_chars]
        parts = split_sentences(completion)
        shuffled = parts[:]
        while len(parts) > 1 and shuffled == parts:
            rng.shuffle(shuffled)
        items.append(Item("corpus", opening, completion))
        items.append(Item("shuffled", opening, "".join(shuffled)))
    return items


def model_items(cfg: JudgeConfig, openings: list[str]) -> list[Item]:
    """``cfg.samples`` completions of every opening by the model under test (whole characters, cut back to a
    sentence end at the token budget)."""
    from xiaolm.infer.generate import SamplingConfig
    from xiaolm.infer.stories import tell_stories
    from xiaolm.model.io import CheckpointError, load_model
    from xiaolm.utils import pick_device

    try:
        model, tokenizer, _ = load_model(cfg.run, device=pick_device(cfg.device), which=cfg.checkpoint)
    except CheckpointError as exc:
        raise fail(str(exc))
    model.eval()
    prompts = [o for o in openings for _ in range(cfg.samples)]
    items: list[Item] = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start:start + cfg.batch_size]
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  top_k=cfg.top_k, seed=cfg.seed + start)
        for story in tell_stories(model, tokenizer, batch, sampling):
            items.append(Item("model", story.opening, story.text, cut=story.cut))
    return items


def item_key(cfg: JudgeConfig, item: Item) -> str:
    """The cache key: the judge (endpoint, model, its settings), the prompt's version and the sample."""
    body = [(cfg.endpoint or "").rstrip("/"), cfg.model, cfg.judge_temperature, cfg.judge_max_tokens,
            PROMPT_VERSION, item.opening, item.completion]
    return hashlib.sha256(json.dumps(body, ensure_ascii=False).encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------ grading


def api_key_env(cfg: JudgeConfig) -> str:
    """The environment variable the key is read from: the one named, else the first of the defaults that is set."""
    if cfg.api_key_env:
        return cfg.api_key_env
    for name in ("XIAOLM_JUDGE_API_KEY", "OPENAI_API_KEY"):
        if os.environ.get(name):
            return name
    return "XIAOLM_JUDGE_API_KEY"


def grade_items(cfg: JudgeConfig, items: list[Item], out: Path) -> tuple[dict[str, dict], dict]:
    """Grade every item (cache first); returns ``({key: outcome}, accounting)``. An outcome is cached whether it
    parsed or not; a request that still fails after its retries is not, so a rerun asks it again."""
    from xiaolm.data.teach import Cache, Request, Teacher

    cache = Cache(out / "cache.jsonl")
    todo = {it.key: it for it in items if cache.get(it.key) is None}
    client_cfg = SimpleNamespace(endpoint=cfg.endpoint, model=cfg.model, api_key_env=api_key_env(cfg),
                                 timeout=cfg.timeout, concurrency=cfg.concurrency, seed=cfg.seed,
                                 temperature=cfg.judge_temperature, max_tokens=cfg.judge_max_tokens,
                                 max_retries=cfg.max_retries, backoff=cfg.backoff,
                                 task="judge")  # not "reason": a grade is the reply's content alone
    teacher = Teacher(client_cfg)
    failures: dict[str, str] = {}

    def grade(item: Item) -> None:
        prompt = PROMPT.format(opening=item.opening, completion=item.completion)
        replies, tokens = [], [0, 0]
        grade_ = None
        for attempt in range(2):   # a reply that does not parse is asked again once, with a reminder
            answer = teacher.ask(Request(0, "grade", SYSTEM, prompt + (REMINDER if attempt else ""), item.key))
            if "error" in answer:
                failures[item.key] = answer["error"]
                return
            replies.append(answer["text"])
            tokens[0] += answer["prompt_tokens"]
            tokens[1] += answer["completion_tokens"]
            grade_ = parse_grade(answer["text"])
            if grade_ is not None:
                break
        cache.put({"key": item.key, "grade": grade_, "replies": replies, "asked": len(replies),
                   "prompt_tokens": tokens[0], "completion_tokens": tokens[1]})

    log(f"judge: {len(items)} stories to grade, {len(items) - len(todo)} from the cache, {len(todo)} to send to "
        f"{cfg.endpoint} (model {cfg.model}, {cfg.concurrency} at a time)")
    try:
        with ThreadPoolExecutor(max_workers=max(1, cfg.concurrency)) as pool:
            list(pool.map(grade, todo.values()))
    finally:
        teacher.close()
        cache.close()
    outcomes = {it.key: cache.get(it.key) for it in items if cache.get(it.key) is not None}
    fresh = set(todo) - set(failures)
    tokens = {"prompt": 0, "completion": 0, "cached_prompt": 0, "cached_completion": 0}
    for key, rec in outcomes.items():
        prefix = "" if key in fresh else "cached_"
        tokens[prefix + "prompt"] += rec.get("prompt_tokens", 0)
        tokens[prefix + "completion"] += rec.get("completion_tokens", 0)
    accounting = {"requests": dict(teacher.stats), "tokens": tokens, "to_send": len(todo),
                  "cached": len(items) - len(todo), "failed": len(failures),
                  "failures": sorted(set(failures.values()))[:20]}
    return outcomes, accounting


# ------------------------------------------------------------------------------------------------ statistics


def interval(values: list[float]) -> dict:
    """Mean and a 95% interval (normal approximation: mean ± 1.96 standard errors; none below two values)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "low": None, "high": None}
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "low": None, "high": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half}


def summarise(items: list[Item], outcomes: dict[str, dict], keep: int = 3) -> dict:
    rows: dict[str, dict] = {}
    for row in ROWS:
        mine = [it for it in items if it.row == row]
        if not mine:
            continue
        graded = [(it, outcomes[it.key]["grade"]) for it in mine
                  if it.key in outcomes and outcomes[it.key].get("grade") is not None]
        unparsed = sum(1 for it in mine if it.key in outcomes and outcomes[it.key].get("grade") is None)
        r = {"stories": len(mine), "graded": len(graded), "unparsed": unparsed,
             "failed": len(mine) - len(graded) - unparsed,
             "criteria": {c: interval([g[c] for _, g in graded]) for c in CRITERIA},
             "age_groups": {a: sum(1 for _, g in graded if g["age_group"] == a) for a in AGE_GROUPS}}
        if row == "model":
            r["cut"] = sum(it.cut for it in mine)
            ranked = sorted(graded, key=lambda p: (sum(p[1][c] for c in CRITERIA), p[0].key))
            show = [{"opening": it.opening, "completion": it.completion, "mean": sum(g[c] for c in CRITERIA) / 3,
                     **g} for it, g in ranked]
            r["worst"], r["best"] = show[:keep], show[::-1][:keep]
        rows[row] = r
    return rows


# ------------------------------------------------------------------------------------------------ report


def _ci(c: dict) -> str:
    if c["mean"] is None:
        return "-"
    return f"{c['mean']:.2f}" + (f" ({c['low']:.2f}–{c['high']:.2f})" if c["low"] is not None else "")


def format_table(result: dict) -> str:
    """The grades table in Markdown: one row per kind of story, mean (95% interval) per criterion."""
    lines = ["| stories | graded | unparsed | failed | grammar | creativity | consistency | most common age group |",
             "|---|---|---|---|---|---|---|---|"]
    for row, r in result["rows"].items():
        ages = r["age_groups"]
        top = max(ages, key=lambda a: (ages[a], a)) if any(ages.values()) else None
        age = f"{top} ({AGE_GROUPS[top]})" if top else "-"
        lines.append(f"| {ROWS[row]} | {r['graded']} | {r['unparsed']} | {r['failed']} | "
                     + " | ".join(_ci(r["criteria"][c]) for c in CRITERIA) + f" | {age} |")
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    j, acc = result["judge"], result["accounting"]
    t = acc["tokens"]
    L = [f"# Story grades: {result['run']}", "",
         f"Judge `{j['model']}` at {j['endpoint']}, graded as in TinyStories (Eldan & Li, 2023): a written "
         f"assessment, then 1-10 for grammar, creativity and consistency with the opening (plot included), and "
         f"a guess of the writer's age group. {result['openings']} held-out openings × {result['samples']} "
         f"completions; prompt version {j['prompt_version']}. Intervals: mean ± 1.96 standard errors.", "",
         format_table(result), "",
         "## Age groups", "", "| stories | " + " | ".join(f"{a} {AGE_GROUPS[a]}" for a in AGE_GROUPS) + " |",
         "|---|" + "---|" * len(AGE_GROUPS)]
    for row, r in result["rows"].items():
        L.append(f"| {ROWS[row]} | " + " | ".join(str(r["age_groups"][a]) for a in AGE_GROUPS) + " |")
    model = result["rows"].get("model") or {}
    for title, key in (("Best", "best"), ("Worst", "worst")):
        if model.get(key):
            L += ["", f"## {title} stories of the model", ""]
            for s in model[key]:
                scores = ", ".join(f"{c} {s[c]}" for c in CRITERIA)
                L.append(f"- **{s['mean']:.1f}** ({scores}, age {s['age_group']}): {s['opening']}{SEPARATOR}"
                         f"{' '.join(s['completion'].split())}  \n  *{' '.join(s['assessment'].split())}*")
    L += ["", f"Tokens: {t['prompt']:,} prompt + {t['completion']:,} completion sent now; {t['cached_prompt']:,} + "
              f"{t['cached_completion']:,} answered from the cache. Requests: {acc['requests']['sent']} sent, "
              f"{acc['requests']['retries']} retries, {acc['failed']} stories failed after retries."]
    if model.get("cut"):
        L.append(f"{model['cut']} of the model's completions reached the {result['max_new_tokens']}-token budget "
                 f"and were cut back to their last full sentence.")
    return "\n".join(L) + "\n"


def judge(cfg: JudgeConfig) -> dict:
    from xiaolm.eval.judge_openings import OPENINGS

    if not cfg.endpoint or not cfg.model:
        raise fail("eval judge needs a judge: --endpoint URL (an OpenAI-compatible .../v1) and --model NAME")
    if cfg.samples < 1 or cfg.concurrency < 1 or cfg.max_retries < 0 or cfg.references < 0:
        raise fail("--samples and --concurrency must be at least 1, --max-retries and --references at least 0")
    if cfg.openings is not None and not 1 <= cfg.openings <= len(OPENINGS):
        raise fail(f"--openings must be between 1 and {len(OPENINGS)}, got {cfg.openings}")
    if not Path(cfg.run).exists():
        raise fail(f"{cfg.run}: no such model directory")
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "judge"
    openings = OPENINGS[:cfg.openings] if cfg.openings else OPENINGS
    started = time.perf_counter()
    items = model_items(cfg, openings) + reference_items(cfg.references, cfg.reference_chars, cfg.seed)
    for it in items:
        it.key = item_key(cfg, it)
    outcomes, accounting = grade_items(cfg, items, out)
    result = {
        "run": str(cfg.run), "judge": {"endpoint": cfg.endpoint, "model": cfg.model,
                                       "temperature": cfg.judge_temperature, "prompt_version": PROMPT_VERSION},
        "openings": len(openings), "samples": cfg.samples, "max_new_tokens": cfg.max_new_tokens,
        "rows": summarise(items, outcomes), "accounting": accounting,
        "wall_s": round(time.perf_counter() - started, 2),
    }
    atomic_write_json(out / "judge.json", result)
    atomic_write_text(out / "judge.md", format_markdown(result))
    result["out"] = str(out)
    return result


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(JudgeConfig, argv, "xiaolm eval judge", positionals={"run": "RUNDIR"})
    result = judge(cfg)
    print(format_table(result))
    t, acc = result["accounting"]["tokens"], result["accounting"]
    print(f"tokens {t['prompt']:,} in / {t['completion']:,} out ({t['cached_prompt']:,} / {t['cached_completion']:,} "
          f"from the cache); wrote {result['out']}/judge.md and judge.json")
    if acc["failed"]:
        print(f"xiaolm: error: {acc['failed']} stories could not be graded (first: {acc['failures'][0]}); rerun the "
              f"same command to retry only those", file=sys.stderr)
        return 1
    return 0
