"""The tool tasks (``xiaolm data tools``): Chinese problems a small model can only solve by calling a tool, each with
its reference answer, its checker and its reward, all here.

Kinds (``KINDS``): ``calc`` (word problems with 5-9 digit numbers, one ``calculator`` call), ``weekday``,
``date_add``, ``unit`` (``convert_unit``), ``lookup`` (``city_info`` on the generated city table), and two-step
problems needing two calls: ``date_weekday`` (``date_add`` then ``weekday``), ``lookup_calc`` (``city_info`` then
``calculator``) and ``compare`` (two ``city_info`` calls in one turn, several calls at once).

A sample is an OpenAI-messages record: the question, the assistant's calls, the ``tool`` results (computed by the
real tools), the final answer; ``tools`` holds the schemas and ``task`` what checking needs::

    {"messages": [...], "tools": [...], "task": {"kind", "question", "answer", "answer_type", "calls", "entities"}}

The thinking variant gives every assistant turn a short template ``reasoning_content``; the plain variant an empty
one (what the ``enable_thinking=False`` prompt renders). The held-out split is generated first, and a training
sample that shares any entity with it (an operand, a date, a city) is rejected, so held-out numbers and cities never
appear in training. Deterministic for a seed.
"""
from __future__ import annotations

import datetime as _dt
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from xiaolm.config import opt, parse_config, save_config
from xiaolm.tasks.toolbox import CITY_FIELDS, CITY_TABLE, TOOLS, schemas
from xiaolm.utils import atomic_write_json, fail, write_jsonl

KINDS = ("calc", "weekday", "date_add", "unit", "lookup", "date_weekday", "lookup_calc", "compare")
SYSTEM_PROMPT = "你是一个会使用工具的助手。需要精确计算、日期或资料时，先调用工具，再根据工具的结果回答。"
SYSTEM_PROMPT_SHORT = "先调用工具，再回答。"  # with --schemas names: small models, small contexts
SCHEMA_MODES = ("full", "brief", "names")
FORMAT_BONUS = 0.1  # the reward's format term, beside the checker's 1.0


@dataclass
class Step:
    calls: list[tuple[str, dict]]
    thought: str  # the reasoning before these calls


@dataclass
class Problem:
    kind: str
    question: str
    steps: list[Step]
    answer_type: str  # int | number | date | weekday | choice
    final: Callable[[list[str]], tuple[str, str]]  # tool results -> (answer, final sentence)
    final_thought: Callable[[list[str]], str]
    entities: list[str]
    choices: tuple[str, ...] = ()


def _city_split(heldout: bool) -> list[str]:
    """Cities of one split: every fifth city of the table is held out."""
    names = list(CITY_TABLE)
    return [c for k, c in enumerate(names) if (k % 5 == 0) == heldout]


def _big(rng: random.Random, lo: int, hi: int) -> int:
    return rng.randint(10 ** (lo - 1), 10 ** hi - 1)


def _date(rng: random.Random) -> _dt.date:
    return _dt.date(1990, 1, 1) + _dt.timedelta(days=rng.randint(0, 365 * 60))


def _zh_date(d: _dt.date) -> str:
    return f"{d.year}年{d.month}月{d.day}日"


_CALC = [
    ("一个工厂每天生产{a}个零件，{b}天一共生产多少个零件？", "{a}*{b}", (4, 6), (2, 3), "个零件"),
    ("小明的账户里有{a}元，又存入了{b}元，现在一共有多少元？", "{a}+{b}", (6, 9), (5, 8), "元"),
    ("一个仓库有{a}箱货物，运走了{b}箱，还剩多少箱？", "{a}-{b}", (7, 9), (5, 6), "箱"),
    ("一块长方形土地长{a}米，宽{b}米，面积是多少平方米？", "{a}*{b}", (4, 5), (3, 5), "平方米"),
    ("一所学校买了{b}套桌椅，每套{a}元，一共要付多少元？", "{a}*{b}", (3, 5), (3, 4), "元"),
]
_UNIT_PAIRS = [("公里", "英里"), ("英里", "公里"), ("千克", "磅"), ("磅", "千克"), ("升", "加仑"), ("加仑", "升"),
               ("英尺", "米"), ("英寸", "厘米"), ("斤", "克"), ("吨", "斤")]


def make_problem(kind: str, rng: random.Random, heldout: bool) -> Problem:
    cities = _city_split(heldout)
    if kind == "calc":
        text, expr, da, db, unit = rng.choice(_CALC)
        a, b = _big(rng, *da), _big(rng, *db)
        if "-" in expr and a < b:
            a, b = b, a
        e = expr.format(a=a, b=b)
        return Problem(kind, text.format(a=a, b=b), [Step([("calculator", {"expression": e})],
                       f"要算 {e}，数字很大，心算容易出错，用计算器算。")], "int",
                       lambda r: (r[0], f"答案是 {r[0]}{unit}。"), lambda r: f"计算器算出 {e} = {r[0]}。",
                       [str(a), str(b)])
    if kind == "weekday":
        d = _date(rng)
        return Problem(kind, f"{_zh_date(d)}是星期几？", [Step([("weekday", {"date": d.isoformat()})],
                       f"要知道 {d.isoformat()} 是星期几，用 weekday 工具查。")], "weekday",
                       lambda r: (r[0], f"{_zh_date(d)}是{r[0]}。"), lambda r: f"工具说是{r[0]}。", [d.isoformat()])
    if kind == "date_add":
        d, n = _date(rng), rng.randint(20, 2000)
        return Problem(kind, f"从{_zh_date(d)}算起，再过{n}天是哪一天？",
                       [Step([("date_add", {"date": d.isoformat(), "days": n})],
                             f"从 {d.isoformat()} 加 {n} 天，用 date_add 算。")], "date",
                       lambda r: (r[0], f"再过{n}天是 {r[0]}。"), lambda r: f"工具给出 {r[0]}。",
                       [d.isoformat(), str(n)])
    if kind == "unit":
        src, dst = rng.choice(_UNIT_PAIRS)
        v = rng.randint(13, 99_999)
        return Problem(kind, f"{v}{src}等于多少{dst}？", [Step([("convert_unit", {
                       "value": v, "from_unit": src, "to_unit": dst})], f"把 {v} {src} 换算成{dst}，用换算工具。")],
                       "number", lambda r: (r[0], f"{v}{src}约等于 {r[0]}{dst}。"),
                       lambda r: f"换算结果是 {r[0]}。", [str(v)])
    if kind == "lookup":
        city, field = rng.choice(cities), rng.choice(list(CITY_FIELDS))
        return Problem(kind, f"{city}的{field}是多少？", [Step([("city_info", {"city": city, "field": field})],
                       f"{city}的{field}要查资料，用 city_info。")], "int",
                       lambda r: (r[0], f"{city}的{field}是 {r[0]}{CITY_FIELDS[field]}。"),
                       lambda r: f"资料里是 {r[0]}。", [city])
    if kind == "date_weekday":
        d, n = _date(rng), rng.randint(20, 2000)
        return Problem(kind, f"从{_zh_date(d)}算起，再过{n}天是星期几？", [
            Step([("date_add", {"date": d.isoformat(), "days": n})], f"先用 date_add 算出 {d.isoformat()} 加 {n} 天是哪天。"),
            Step([("weekday", {"date": "{0}"})], "再用 weekday 查那天是星期几。")], "weekday",
            lambda r: (r[1], f"那天是 {r[0]}，{r[1]}。"), lambda r: f"{r[0]} 是{r[1]}。", [d.isoformat(), str(n)])
    if kind == "lookup_calc":
        city, k = rng.choice(cities), rng.randint(11, 997)
        return Problem(kind, f"{city}每平方公里要种{k}棵树，整个{city}一共要种多少棵树？", [
            Step([("city_info", {"city": city, "field": "面积"})], f"先查{city}的面积。"),
            Step([("calculator", {"expression": "{0}*" + str(k)})], f"再用计算器把面积乘以 {k}。")], "int",
            lambda r: (r[1], f"{city}面积 {r[0]} 平方公里，一共要种 {r[1]} 棵树。"),
            lambda r: f"{r[0]}×{k} = {r[1]}。", [city, str(k)])
    if kind == "compare":
        a, b = rng.sample(cities, 2)
        field = rng.choice(["人口", "面积", "海拔"])
        word = {"人口": "人口更多", "面积": "面积更大", "海拔": "海拔更高"}[field]
        return Problem(kind, f"{a}和{b}，哪个{word}？", [Step([("city_info", {"city": a, "field": field}),
                       ("city_info", {"city": b, "field": field})], f"两座城市的{field}都要查，同时查。")], "choice",
                       lambda r: ((a, f"{a}是 {r[0]}，{b}是 {r[1]}，{a}{word}。") if int(r[0]) > int(r[1])
                                  else (b, f"{a}是 {r[0]}，{b}是 {r[1]}，{b}{word}。")),
                       lambda r: f"{a} {r[0]}，{b} {r[1]}，比一比。", [a, b], (a, b))
    raise ValueError(f"unknown tool task kind {kind!r}; choose from {', '.join(KINDS)}")


def _fill(args: dict, results: list[str]) -> dict:
    """Arguments of a later step may name an earlier result as ``{0}``, ``{1}``..."""
    return {k: v.format(*results) if isinstance(v, str) else v for k, v in args.items()}


def offered_tools(problem: Problem, rng: random.Random, distractors: int) -> list[str]:
    """The tools a sample offers: those it needs plus ``distractors`` others, in random order."""
    needed = sorted({name for s in problem.steps for name, _ in s.calls})
    others = [n for n in TOOLS if n not in needed]
    names = needed + rng.sample(others, min(distractors, len(others)))
    rng.shuffle(names)
    return names


def run_builtin(name: str, arguments: dict) -> str:
    """A built-in tool called in-process (data generation runs our own pure functions; a model's calls go through
    the sandbox, ``toolbox.call_tool``)."""
    from xiaolm.tasks.sandbox import format_result
    from xiaolm.tasks.toolbox import ToolError

    try:
        return format_result(TOOLS[name][0](**arguments), 2000)
    except ToolError as exc:
        return f"error: ToolError: {exc}"


def brief_tools(tool_names: list[str], describe: bool = True) -> str:
    """One line per tool, ``name(arg, ...): description``: the system prompt's tool list with ``--schemas brief``;
    without ``describe`` (``--schemas names``) only ``name(arg, ...)``, on one line."""
    import inspect

    lines = []
    for name in tool_names:
        fn = TOOLS[name][0]
        head = f"{name}({', '.join(inspect.signature(fn).parameters)})"
        lines.append(f"- {head}: {fn.__doc__.strip()}" if describe else head)
    return "可用工具：\n" + "\n".join(lines) if describe else "可用工具：" + "、".join(lines)


def system_prompt(tool_names: list[str], schemas_mode: str = "full") -> str:
    """The system turn's text: the instruction, plus the tool list when the schemas are not rendered (``brief``,
    ``names``); ``names`` is short enough (about 80 tokens with a 4k vocabulary, against 230 for ``brief``) that a
    tool conversation fits a 512-token context with room for two calls and the reasoning."""
    if schemas_mode == "full":
        return SYSTEM_PROMPT
    if schemas_mode == "names":
        return SYSTEM_PROMPT_SHORT + brief_tools(tool_names, describe=False)
    return SYSTEM_PROMPT + "\n" + brief_tools(tool_names)


def solve(problem: Problem, thinking: bool, tool_names: list[str], schemas_mode: str = "full") -> dict:
    """The record for ``problem``: messages with the calls executed by the real tools, the answer, the task.
    ``schemas_mode`` ``brief`` / ``names`` list the tools in the system prompt instead of rendering their JSON
    schemas (``system_prompt``)."""
    system = system_prompt(tool_names, schemas_mode)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": problem.question}]
    results: list[str] = []
    calls_made = []
    for step in problem.steps:
        calls = [(name, _fill(args, results)) for name, args in step.calls]
        messages.append({"role": "assistant", "reasoning_content": step.thought if thinking else "", "content": "",
                         "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}}
                                        for n, a in calls]})
        for name, args in calls:
            out = run_builtin(name, args)
            if out.startswith("error:"):
                raise RuntimeError(f"built-in task {problem.kind}: {name}({args}) failed: {out}")
            results.append(out)
            messages.append({"role": "tool", "name": name, "content": out})
            calls_made.append({"name": name, "arguments": args})
    answer, sentence = problem.final(results)
    messages.append({"role": "assistant", "reasoning_content": problem.final_thought(results) if thinking else "",
                     "content": sentence})
    return {"messages": messages, "tools": schemas(tool_names) if schemas_mode == "full" else [],
            "task": {"kind": problem.kind, "question": problem.question, "answer": answer,
                     "answer_type": problem.answer_type, "choices": list(problem.choices), "calls": calls_made,
                     "entities": problem.entities}}


# ------------------------------------------------------------------------------------------------ checking

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_DATE = re.compile(r"(\d{4})(?:-|年)(\d{1,2})(?:-|月)(\d{1,2})日?")
_WEEKDAY = re.compile("星期[一二三四五六日天]")


def _numbers(text: str) -> list[str]:
    return _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3})", "", text))


def check_answer(task: dict, text: str) -> bool:
    """Whether a final answer ``text`` states the task's answer: the last number, date, weekday or named choice in
    it (so listing every candidate does not pass)."""
    want, kind = str(task["answer"]), task["answer_type"]
    if kind == "int":
        nums = _numbers(text)
        return bool(nums) and nums[-1] == want
    if kind == "number":
        nums = _numbers(text)
        return bool(nums) and abs(float(nums[-1]) - float(want)) <= 1e-4 * max(1.0, abs(float(want)))
    if kind == "date":
        found = _DATE.findall(text)
        return bool(found) and "%04d-%02d-%02d" % tuple(int(x) for x in found[-1]) == want
    if kind == "weekday":
        found = [w.replace("星期天", "星期日") for w in _WEEKDAY.findall(text)]
        return bool(found) and found[-1] == want
    if kind == "choice":
        positions = [(text.rfind(c), c) for c in task.get("choices") or [want] if c in text]
        return bool(positions) and max(positions)[1] == want
    raise ValueError(f"unknown answer_type {kind!r}")


def expected_calls(task: dict) -> list[dict]:
    return list(task.get("calls") or [])


def reward(task: dict, final_text: Optional[str], calls: list[dict], errors: int) -> float:
    """The GRPO reward: 1 when the final answer checks, plus ``FORMAT_BONUS`` when the episode was well formed
    (it ended with an answer, made at least one call, every call parsed and named a known tool)."""
    correct = final_text is not None and check_answer(task, final_text)
    well_formed = (final_text is not None and errors == 0 and bool(calls)
                   and all(c.get("name") in TOOLS for c in calls))
    return float(correct) + FORMAT_BONUS * float(well_formed)


# ------------------------------------------------------------------------------------------------- prompts

def tool_prompt(rec: dict) -> dict:
    """A ``data tools`` record as a prompt: the turns before the first assistant turn, its tools, its task."""
    msgs = rec.get("messages") or []
    cut = next((k for k, m in enumerate(msgs) if m.get("role") == "assistant"), len(msgs))
    return {"prompt": msgs[:cut], "tools": rec.get("tools") or None, "task": rec["task"]}


def load_tool_prompts(paths: list[str], heldout: Optional[list[str]] = None, limit: Optional[int] = None,
                      refuse_heldout: bool = True) -> tuple[list[dict], int]:
    """Prompts from ``data tools`` directories (their ``train.jsonl``) or files, less any whose question is held out
    (in ``heldout`` or the ``heldout.jsonl`` beside a directory) when ``refuse_heldout``. Returns
    ``(prompts, refused)``."""
    files, held_files = [], list(heldout or []) if refuse_heldout else []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files.append(path / "train.jsonl")
            if refuse_heldout and not heldout and (path / "heldout.jsonl").is_file():
                held_files.append(str(path / "heldout.jsonl"))
        else:
            files.append(path)
    held_questions = {json.loads(line)["task"]["question"] for f in held_files
                      for line in Path(f).read_text(encoding="utf-8").splitlines() if line.strip()}
    prompts, refused = [], 0
    for f in files:
        if not f.is_file():
            raise fail(f"{f}: no such file (make tool tasks with `xiaolm data tools`)")
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                task = rec["task"]
                task["question"], task["answer"], task["answer_type"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise fail(f"{f}:{n}: not a tool-task record ({type(exc).__name__}: {exc})") from None
            if task["question"] in held_questions:
                refused += 1
                continue
            prompts.append(tool_prompt(rec))
            if limit is not None and len(prompts) >= limit:
                return prompts, refused
    return prompts, refused


def reference_turn_tokens(tokenizer, records: list[dict]) -> int:
    """The longest reference assistant turn of ``records`` in tokens (its think block, calls or answer and the
    closing ``<|im_end|>``): the least ``max_new_tokens`` with which a model that says exactly the references is
    never cut off."""
    from xiaolm.tokenizer.chat import encode_conversation

    longest = 0
    for rec in records:
        _ids, mask = encode_conversation(tokenizer, rec["messages"], tools=rec.get("tools") or None)
        run = 0
        for labelled in mask + [False]:
            if labelled:
                run += 1
            else:
                longest, run = max(longest, run), 0
    return longest


# ---------------------------------------------------------------------------------------------------- the verb


@dataclass
class ToolDataConfig:
    """Build verifiable tool-use data: Chinese problems needing a calculator, dates, unit conversion, a city table, or \
two calls; train and held-out splits share no numbers or cities."""

    out: str = opt("data/tools", "output directory: train.jsonl, heldout.jsonl, report.json, config.yaml")
    train: int = opt(4000, "training samples", short=False)
    heldout: int = opt(400, "held-out samples", short=False)
    kinds: list[str] = opt(list(KINDS), f"task kinds, from {', '.join(KINDS)}", short=False)
    thinking: str = opt("mix", "reasoning traces: on (every sample), off (empty think blocks), mix (half each)",
                        short=False)
    distractors: int = opt(1, "tools offered beyond those a problem needs (the model must pick the right one)",
                           short=False)
    schemas: str = opt("full", "full: the tools' JSON schemas in the system turn (Qwen3's layout; 500+ tokens with a "
                               "small vocabulary); brief: one line per tool with its description in the system "
                               "prompt (about 230 tokens); names: only the tools' names and arguments (about 80), "
                               "for small models and 512-token contexts", short=False)
    seed: int = opt(0, "seed")


def build_tool_data(cfg: ToolDataConfig) -> dict:
    """Write ``train.jsonl``, ``heldout.jsonl``, ``report.json``, ``config.yaml`` into ``cfg.out``."""
    unknown = [k for k in cfg.kinds if k not in KINDS]
    if unknown:
        raise fail(f"--kinds: unknown {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    if cfg.thinking not in ("on", "off", "mix"):
        raise fail(f"--thinking must be on, off or mix, not {cfg.thinking!r}")
    if cfg.schemas not in SCHEMA_MODES:
        raise fail(f"--schemas must be one of {', '.join(SCHEMA_MODES)}, not {cfg.schemas!r}")
    if cfg.train < 0 or cfg.heldout < 0:
        raise fail("--train and --heldout must be >= 0")
    rng = random.Random(cfg.seed)

    def make(n: int, heldout: bool, banned: set[str]) -> tuple[list[dict], int]:
        out, rejected = [], 0
        while len(out) < n:
            problem = make_problem(cfg.kinds[len(out) % len(cfg.kinds)], rng, heldout)
            if banned & set(problem.entities):
                rejected += 1
                continue
            thinking = cfg.thinking == "on" or (cfg.thinking == "mix" and rng.random() < 0.5)
            out.append(solve(problem, thinking, offered_tools(problem, rng, cfg.distractors), cfg.schemas))
        return out, rejected

    heldout, _ = make(cfg.heldout, True, set())
    held_entities = {e for s in heldout for e in s["task"]["entities"]}
    train, rejected = make(cfg.train, False, held_entities)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    save_config(cfg, out / "config.yaml")
    counts = {k: sum(s["task"]["kind"] == k for s in train) for k in cfg.kinds}
    report = {"train_samples": len(train), "heldout_samples": len(heldout), "kinds": counts,
              "train_rejected_for_sharing_heldout_entities": rejected,
              "thinking_samples": sum(bool(s["messages"][-1]["reasoning_content"]) for s in train)}
    atomic_write_json(out / "report.json", report)
    return report


def main(argv: list[str]) -> int:
    cfg, _ = parse_config(ToolDataConfig, argv, "xiaolm data tools")
    report = build_tool_data(cfg)
    kinds = ", ".join(f"{k} {v}" for k, v in report["kinds"].items())
    print(f"{report['train_samples']} train samples ({kinds}; {report['thinking_samples']} with reasoning), "
          f"{report['heldout_samples']} held-out samples sharing no number or city with them; wrote {cfg.out}")
    return 0
