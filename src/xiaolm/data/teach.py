"""``xiaolm data teach``: instruction data from a teacher model behind any OpenAI-compatible endpoint.

Records go through ``POST {endpoint}/chat/completions`` (a cloud API, a local vLLM or llama.cpp server, or
``xiaolm serve`` itself) with a prompt template per task:

- ``translate``: a TinyStories record's story and its instruction to Chinese (two requests per record), as
  Chinese_LLM_From_Scratch built its SFT set;
- ``answer``: answer an instruction (Alpaca ``instruction``/``input``, or any field via ``--template``): distillation;
- ``rewrite``: rewrite an existing answer (``output``) better;
- ``reason``: answer an instruction thinking first (reasoning distillation): the reasoning comes from the teacher's
  ``message.reasoning_content`` (DeepSeek-R1's API, vLLM's reasoning parsers) or a ``<think>...</think>`` block the
  prompt asks for; the sample stores both (``reasoning_content`` beside ``content``); an answer without reasoning is
  counted (``without_reasoning``) and not kept.

Requests run with bounded concurrency and are retried with exponential backoff (and the server's Retry-After) on
429, 5xx and connection errors. Every answer is appended to ``OUT/cache.jsonl`` the moment it arrives, keyed by
(endpoint, model, template, sampling, record): a rerun, or a run killed half-way, pays only for what is missing.
Tokens (from the server's ``usage``) and cost (from ``--price-input`` / ``--price-output`` per million tokens) are
counted, cached answers apart. Output: ``OUT/train.jsonl`` in our instruction-data layout (OpenAI ``messages``) with
the source record kept under ``source``; ``report.json`` and ``config.yaml`` beside it. The API key is read from the
environment variable named by ``--api-key-env`` and never written anywhere.

    xiaolm data teach alpaca.json --task answer --endpoint https://api.openai.com/v1 --model gpt-4o-mini \\
        --price-input 0.15 --price-output 0.6 --out data/teach
    xiaolm data teach data00_en.jsonl --task translate --endpoint http://127.0.0.1:8000/v1 --model local
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from xiaolm.config import opt, parse_config, save_config
from xiaolm.utils import atomic_write_json, fail, log, read_log_lines, write_jsonl

# Built-in templates: slot -> (system, user). ``{{path}}`` is a field of the record (dotted for nested keys);
# ``{{path?}}`` may be missing or empty.
TEMPLATES: dict[str, dict[str, tuple[str, str]]] = {
    "translate": {
        "instruction": ("你是一名专业的英译中翻译。只输出译文，不要解释。",
                        "把下面的写作要求翻译成简体中文：\n\n{{instruction.prompt:}}"),
        "story": ("你是一名专业的英译中翻译，擅长儿童文学。只输出译文，不要解释。",
                  "把下面的儿童故事翻译成简体中文，用词简单、自然，保留对话和段落：\n\n{{story}}"),
    },
    "answer": {
        "answer": ("你是一个乐于助人的中文助手。回答准确、清楚、简洁。",
                   "{{instruction}}\n\n{{input?}}"),
    },
    "reason": {
        "answer": ("你是一个善于推理的中文助手。先一步一步地思考，把思考过程写在 <think> 和 </think> 之间，"
                   "然后在 </think> 之后给出清楚、简洁的最终回答。",
                   "{{instruction}}\n\n{{input?}}"),
    },
    "rewrite": {
        "answer": ("你是一个严谨的中文编辑。",
                   "改写下面这个回答，使它更准确、清楚、有条理；只输出改写后的回答。\n\n问题：{{instruction}}\n"
                   "{{input?}}\n\n原回答：{{output}}"),
    },
}
# The user turn of the produced sample (the question the answer answers).
QUESTION = "{{instruction}}\n\n{{input?}}"

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")


class TemplateError(ValueError):
    """A record that lacks a field its template needs."""


@dataclass
class TeachConfig:
    """Send records through a teacher model at any OpenAI-compatible endpoint (translate, answer or rewrite), with \
bounded concurrency, retries with backoff, a resumable cache and token/cost accounting; writes instruction data \
(OpenAI messages, source record kept)."""

    inputs: list[str] = opt([], "records: JSON Lines or JSON array files (TinyStories, Alpaca, or any layout "
                                "the template names fields of)")
    out: str = opt("data/teach", "output directory: train.jsonl, cache.jsonl, report.json, config.yaml")
    task: Literal["translate", "answer", "reason", "rewrite"] = opt(
        "answer", "translate (story + instruction to Chinese), answer an instruction, reason (think, then answer: "
                  "both stored), or rewrite an answer")
    endpoint: str = opt("http://127.0.0.1:8000/v1", "OpenAI-compatible base URL (.../v1)")
    model: str = opt("gpt-4o-mini", "model name sent in each request")
    api_key_env: str = opt("OPENAI_API_KEY", "environment variable holding the API key (none set: no auth header)")
    system: Optional[str] = opt(None, "system prompt instead of the task's (\"\": none)")
    template: Optional[str] = opt(None, "user prompt template instead of the task's (answer / rewrite tasks): "
                                        "{{field}} / {{a.b}} name record fields, {{field?}} may be missing")
    question: str = opt(QUESTION, "template of the produced sample's user turn (answer / rewrite tasks)")
    temperature: float = opt(0.3, "sampling temperature sent to the teacher")
    max_tokens: int = opt(1024, "max_tokens of each answer")
    concurrency: int = opt(8, "requests in flight at once")
    max_retries: int = opt(6, "retries of a request after 429, 5xx or a connection error")
    backoff: float = opt(1.0, "first retry delay in seconds (doubles each retry, with jitter; Retry-After wins)")
    timeout: float = opt(120.0, "seconds one request may take")
    limit: Optional[int] = opt(None, "use at most this many records (the first ones)")
    price_input: float = opt(0.0, "price per million prompt tokens (for the cost figure)")
    price_output: float = opt(0.0, "price per million completion tokens")
    heldout_fraction: float = opt(0.0, "share of samples (by source hash) written to heldout.jsonl instead")
    seed: int = opt(0, "seed for the retry jitter")


@dataclass
class Request:
    index: int          # record number (input order)
    slot: str           # which answer of the record (translate: instruction, story)
    system: str
    user: str
    key: str


def render(template: str, record: dict, where: str) -> str:
    """Fill ``{{path}}`` placeholders from ``record``; a missing required field is a TemplateError naming it."""

    def value(match: re.Match) -> str:
        path = match.group(1)
        optional = path.endswith("?")
        path = path.rstrip("?")
        node: object = record
        for part in path.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                if optional:
                    return ""
                raise TemplateError(f"{where}: the template needs field '{path}', which the record lacks")
        if node is None or node == "":
            if optional:
                return ""
            raise TemplateError(f"{where}: field '{path}' is empty")
        return node if isinstance(node, str) else json.dumps(node, ensure_ascii=False)

    return _PLACEHOLDER.sub(value, template).strip()


def templates_for(cfg: TeachConfig) -> dict[str, tuple[str, str]]:
    base = dict(TEMPLATES[cfg.task])
    if cfg.template is not None:
        if cfg.task == "translate":
            raise fail("--template replaces the answer and rewrite prompt; translate has two fixed prompts")
        base["answer"] = (base["answer"][0], cfg.template)
    if cfg.system is not None:
        base = {slot: (cfg.system, user) for slot, (_s, user) in base.items()}
    return base


def cache_key(cfg: TeachConfig, slot: str, system: str, user_template: str, record: dict) -> str:
    body = [cfg.endpoint.rstrip("/"), cfg.model, slot, system, user_template, cfg.temperature, cfg.max_tokens,
            record]
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Cache:
    """``cache.jsonl``: one line per answer, appended (and flushed) as it arrives; later lines win."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.is_file():
            # A line cut by a kill is dropped (and cut off the file, so the next answer starts a line of its own):
            # that answer is simply asked again.
            for line in read_log_lines(path, truncate=True, strict=False):
                try:
                    rec = json.loads(line)
                    self.entries[rec["key"]] = rec
                except (ValueError, KeyError, TypeError):
                    continue
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[dict]:
        return self.entries.get(key)

    def put(self, rec: dict) -> None:
        with self._lock:
            self.entries[rec["key"]] = rec
            self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class Teacher:
    """POSTs chat requests with retries; counts what it sent, retried and spent."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, cfg: TeachConfig):
        import httpx

        self.cfg = cfg
        self.url = cfg.endpoint.rstrip("/") + "/chat/completions"
        key = os.environ.get(cfg.api_key_env or "", "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=cfg.timeout, headers=headers,
                                   limits=httpx.Limits(max_connections=max(1, cfg.concurrency)))
        self.rng = random.Random(cfg.seed)
        self.lock = threading.Lock()
        self.stats = {"sent": 0, "retries": 0, "failed": 0, "status_counts": {}}

    def _count(self, name: str, status: Optional[int] = None) -> None:
        with self.lock:
            self.stats[name] += 1
            if status is not None:
                self.stats["status_counts"][str(status)] = self.stats["status_counts"].get(str(status), 0) + 1

    def _delay(self, attempt: int, retry_after: Optional[str]) -> float:
        if retry_after:
            try:
                return max(0.0, float(retry_after))
            except ValueError:
                pass
        with self.lock:
            jitter = 0.5 + self.rng.random()
        return self.cfg.backoff * (2 ** attempt) * jitter

    def ask(self, req: Request) -> dict:
        """The answer record for ``req`` (for the cache), or {"error": ...} after the retries are spent."""
        import httpx

        messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
            [{"role": "user", "content": req.user}]
        body = {"model": self.cfg.model, "messages": messages,
                "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        error = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self._count("retries")
            retry_after = None
            try:
                self._count("sent")
                resp = self.client.post(self.url, json=body)
            except httpx.HTTPError as exc:  # connection refused, reset, timeout: worth another try
                error = f"{type(exc).__name__}: {exc}"
            else:
                with self.lock:
                    sc = self.stats["status_counts"]
                    sc[str(resp.status_code)] = sc.get(str(resp.status_code), 0) + 1
                if resp.status_code == 200:
                    try:
                        data = resp.json()
                        choice = data["choices"][0]
                        text = choice["message"]["content"] or ""
                        thought = choice["message"].get("reasoning_content") or choice["message"].get("reasoning")
                        if self.cfg.task == "reason" and isinstance(thought, str) and thought.strip() \
                                and "</think>" not in text:  # kept in the cached text, in the chat format's layout
                            text = f"<think>\n{thought.strip()}\n</think>\n\n{text.lstrip()}"
                    except (ValueError, KeyError, IndexError, TypeError):
                        error = f"HTTP 200 with a body that is not a chat completion: {resp.text[:200]!r}"
                        break
                    usage = data.get("usage") or {}
                    return {"key": req.key, "text": text, "finish_reason": choice.get("finish_reason"),
                            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                            "completion_tokens": int(usage.get("completion_tokens") or 0)}
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code not in self.RETRY_STATUS:
                    break  # 400, 401, 404...: asking again gets the same answer
                retry_after = resp.headers.get("retry-after")
            if attempt < self.cfg.max_retries:
                time.sleep(self._delay(attempt, retry_after))
        self._count("failed")
        return {"key": req.key, "error": error}

    def close(self) -> None:
        self.client.close()


def read_records(paths: list[str], limit: Optional[int]) -> tuple[list[tuple[str, dict]], list[str]]:
    from xiaolm.data.formats import iter_json_records

    records, problems = [], []
    for p in paths:
        if not Path(p).is_file():
            raise fail(f"{p}: no such file")
        for line, rec, error in iter_json_records(p):
            where = f"{p}:{line}"
            if error is not None or not isinstance(rec, dict):
                problems.append(f"{where}: {error or 'a record must be a JSON object'}")
                continue
            records.append((where, rec))
            if limit is not None and len(records) >= limit:
                return records, problems
    return records, problems


def build_sample(cfg: TeachConfig, rec: dict, answers: dict[str, str], where: str) -> dict:
    """One sample in our instruction-data layout, the source record kept."""
    teacher = {"endpoint": cfg.endpoint, "model": cfg.model, "task": cfg.task}
    if cfg.task == "translate":
        instruction, story = answers["instruction"].strip(), answers["story"].strip()
        return {"messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": story}],
                "story_zh": story, "instruction_zh": instruction, "source": rec, "teacher": teacher}
    question = render(cfg.question, rec, where)
    answer: dict = {"role": "assistant", "content": answers["answer"].strip()}
    if cfg.task == "reason":
        from xiaolm.tokenizer.chat import split_reasoning

        reasoning, content = split_reasoning({"content": answers["answer"]})
        answer = {"role": "assistant", "reasoning_content": (reasoning or "").strip(), "content": content.strip()}
    return {"messages": [{"role": "user", "content": question}, answer], "source": rec, "teacher": teacher}


def teach(cfg: TeachConfig) -> dict:
    if not cfg.inputs:
        raise fail("give at least one record file: xiaolm data teach RECORDS... --out DIR")
    if cfg.concurrency < 1 or cfg.max_retries < 0:
        raise fail("--concurrency must be >= 1 and --max-retries >= 0")
    started = time.perf_counter()
    records, problems = read_records(cfg.inputs, cfg.limit)
    templates = templates_for(cfg)
    out = Path(cfg.out)
    requests: list[Request] = []
    bad: set[int] = set()
    for i, (where, rec) in enumerate(records):
        for slot, (system, user_t) in templates.items():
            try:
                user = render(user_t, rec, where)
                if cfg.task != "translate":
                    render(cfg.question, rec, where)
            except TemplateError as exc:
                problems.append(str(exc))
                bad.add(i)
                break
            requests.append(Request(i, slot, system, user, cache_key(cfg, slot, system, user_t, rec)))
    requests = [r for r in requests if r.index not in bad]
    if not requests:
        raise fail("no record fits the template (see report problems: "
                    + (problems[0] if problems else "no records") + ")")
    cache = Cache(out / "cache.jsonl")
    todo = [r for r in requests if cache.get(r.key) is None or "text" not in cache.get(r.key)]
    cached = len(requests) - len(todo)
    log(f"teach: {len(records)} records, {len(requests)} requests ({cached} answered from the cache, {len(todo)} "
        f"to send to {cfg.endpoint} with model {cfg.model}, {cfg.concurrency} at a time)")
    teacher = Teacher(cfg)
    failures: dict[str, str] = {}
    done = [0]

    def run(req: Request) -> None:
        result = teacher.ask(req)
        if "text" in result:
            cache.put({**result, "slot": req.slot, "record": req.index})
        else:
            failures[req.key] = result["error"]
        done[0] += 1
        if done[0] % 50 == 0:
            log(f"teach: {done[0]}/{len(todo)} answered")

    try:
        with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
            list(pool.map(run, todo))
    finally:
        teacher.close()
        cache.close()
    fresh_keys = {r.key for r in todo} - set(failures)
    by_record: dict[int, dict[str, str]] = {}
    tokens = {"prompt": 0, "completion": 0, "cached_prompt": 0, "cached_completion": 0}
    truncated = 0
    for r in requests:
        hit = cache.get(r.key)
        if hit is None or "text" not in hit:
            continue
        by_record.setdefault(r.index, {})[r.slot] = hit["text"]
        prefix = "" if r.key in fresh_keys else "cached_"
        tokens[prefix + "prompt"] += hit.get("prompt_tokens", 0)
        tokens[prefix + "completion"] += hit.get("completion_tokens", 0)
        truncated += hit.get("finish_reason") == "length"
    samples, failed_records = [], []
    empty = without_reasoning = 0
    for i, (where, rec) in enumerate(records):
        answers = by_record.get(i, {})
        if i in bad:
            continue
        if set(answers) != set(templates):
            failed_records.append(where)
            continue
        if not all(a.strip() for a in answers.values()):
            empty += 1  # an empty answer teaches nothing; it stays cached (a rerun with other options re-asks)
            continue
        sample = build_sample(cfg, rec, answers, where)
        if cfg.task == "reason" and not (sample["messages"][1]["reasoning_content"]
                                         and sample["messages"][1]["content"]):
            without_reasoning += 1
            continue
        samples.append(sample)
    from xiaolm.utils import stable_hash

    cut = round(cfg.heldout_fraction * 10_000)
    keyed = [(stable_hash(json.dumps(s["source"], sort_keys=True, ensure_ascii=False)) % 10_000 < cut, s)
             for s in samples]
    train = [s for h, s in keyed if not h]
    heldout = [s for h, s in keyed if h]
    write_jsonl(out / "train.jsonl", train)
    if cfg.heldout_fraction > 0:
        write_jsonl(out / "heldout.jsonl", heldout)
    save_config(cfg, out / "config.yaml")
    cost = (tokens["prompt"] * cfg.price_input + tokens["completion"] * cfg.price_output) / 1e6
    saved = (tokens["cached_prompt"] * cfg.price_input + tokens["cached_completion"] * cfg.price_output) / 1e6
    wall = time.perf_counter() - started
    report = {
        "task": cfg.task, "endpoint": cfg.endpoint, "model": cfg.model, "records": len(records),
        "requests": len(requests), "cached": cached, "to_send": len(todo), "answered": len(todo) - len(failures),
        "failed_requests": len(failures), "failed_records": failed_records[:200],
        "http": teacher.stats, "tokens": tokens, "cost": round(cost, 6), "cost_saved_by_cache": round(saved, 6),
        "price_per_million": {"input": cfg.price_input, "output": cfg.price_output},
        "truncated_answers": truncated, "empty_answers": empty,
        "without_reasoning": without_reasoning, "samples": len(samples), "train": len(train), "heldout": len(heldout),
        "skipped_records": len(bad), "problems": problems[:200], "failures": list(failures.values())[:50],
        "wall_s": round(wall, 2), "requests_per_s": round((len(todo) - len(failures)) / max(wall, 1e-9), 2),
    }
    atomic_write_json(out / "report.json", report)
    return report


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(TeachConfig, argv, "xiaolm data teach", positionals={"inputs": "RECORDS"})
    report = teach(cfg)
    t = report["tokens"]
    print(f"{report['samples']} samples from {report['records']} records: {report['answered']} requests answered, "
          f"{report['cached']} from the cache, {report['failed_requests']} failed after retries "
          f"({report['http']['retries']} retries); tokens {t['prompt']:,} in / {t['completion']:,} out, cost "
          f"{report['cost']:.4f} (saved {report['cost_saved_by_cache']:.4f} by the cache); wrote {cfg.out}/train.jsonl",
          file=sys.stdout)
    if report["failed_requests"]:
        print(f"xiaolm: error: {report['failed_requests']} requests failed (first: {report['failures'][0]}); "
              f"rerun the same command to retry only those", file=sys.stderr)
        return 1
    return 0
