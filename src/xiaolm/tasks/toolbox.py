"""The built-in tools of the tool tasks: pure Python, deterministic, each with its OpenAI function schema.

``calculator`` (exact arithmetic read with ``ast``, never ``eval``), ``weekday`` and ``date_add`` (calendar),
``convert_unit`` (length, mass, volume) and ``city_info`` (a small generated table of made-up cities, so the facts
exist nowhere but here). ``TOOLS`` maps a name to ``(function, schema)``; calls go through
``xiaolm.tasks.sandbox.run_tool``.
"""
from __future__ import annotations

import ast
import datetime as _dt
import random
from fractions import Fraction
from typing import Callable

WEEKDAYS = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
MAX_DIGITS = 60  # results (and intermediate values) longer than this are refused: a calculator, not a bignum engine
MAX_EXPONENT = 64


class ToolError(ValueError):
    """A tool's refusal, returned to the model as ``error: ...``."""


# ------------------------------------------------------------------------------------------------ calculator

_BINARY = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: _divide(a, b), ast.FloorDiv: lambda a, b: Fraction(_divide(a, b).__floor__()),
    ast.Mod: lambda a, b: a - b * Fraction(_divide(a, b).__floor__()), ast.Pow: lambda a, b: _power(a, b),
}


def _divide(a: Fraction, b: Fraction) -> Fraction:
    if b == 0:
        raise ToolError("不能除以零 (division by zero)")
    return a / b


def _power(a: Fraction, b: Fraction) -> Fraction:
    if b.denominator != 1 or abs(b) > MAX_EXPONENT:
        raise ToolError(f"指数必须是绝对值不超过 {MAX_EXPONENT} 的整数")
    if a == 0 and b < 0:
        raise ToolError("不能除以零 (division by zero)")
    return a ** int(b)


def _check_size(x: Fraction) -> Fraction:
    if len(str(abs(x.numerator))) > MAX_DIGITS or len(str(x.denominator)) > MAX_DIGITS:
        raise ToolError(f"数字太大（超过 {MAX_DIGITS} 位）")
    return x


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check_size(Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _check_size(_BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    raise ToolError(f"算式里只能有数字、+ - * / // % ** 和括号，不认识 {type(node).__name__}")


def format_number(x: Fraction, places: int = 6) -> str:
    """An integer exactly; otherwise rounded to ``places`` decimals, trailing zeros dropped."""
    if x.denominator == 1:
        return str(x.numerator)
    rounded = round(x, places)
    text = f"{float(rounded):.{places}f}" if abs(rounded) < 1e15 else str(rounded)
    return text.rstrip("0").rstrip(".") if "." in text else text


def calculator(expression: str) -> str:
    """计算一个算术表达式（加减乘除、整除、取余、乘方和括号），结果精确。"""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("expression 必须是非空的算式字符串")
    if len(expression) > 200:
        raise ToolError("算式太长（超过 200 个字符）")
    text = (expression.replace("×", "*").replace("÷", "/").replace("（", "(").replace("）", ")")
            .replace("^", "**").replace(",", "").replace("，", "").strip())
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"看不懂这个算式：{expression}") from None
    return format_number(_evaluate(tree))


# ------------------------------------------------------------------------------------------------- calendar


def parse_date(text: str) -> _dt.date:
    try:
        return _dt.date.fromisoformat(str(text).strip())
    except ValueError:
        raise ToolError(f"日期要写成 YYYY-MM-DD，收到：{text}") from None


def weekday(date: str) -> str:
    """给出某一天（YYYY-MM-DD）是星期几。"""
    return WEEKDAYS[parse_date(date).weekday()]


def date_add(date: str, days: int) -> str:
    """从某一天（YYYY-MM-DD）起加上若干天（可以是负数），给出那一天的日期。"""
    if isinstance(days, bool) or not isinstance(days, int) or abs(days) > 100_000:
        raise ToolError("days 必须是绝对值不超过 100000 的整数")
    try:
        return (parse_date(date) + _dt.timedelta(days=days)).isoformat()
    except OverflowError:
        raise ToolError("日期超出范围") from None


# ------------------------------------------------------------------------------------------------------ units

UNITS = {  # unit -> (quantity, size in the quantity's base unit, exact)
    "千米": ("长度", Fraction(1000)), "公里": ("长度", Fraction(1000)), "米": ("长度", Fraction(1)),
    "厘米": ("长度", Fraction(1, 100)), "毫米": ("长度", Fraction(1, 1000)), "英里": ("长度", Fraction("1609.344")),
    "英尺": ("长度", Fraction("0.3048")), "英寸": ("长度", Fraction("0.0254")),
    "吨": ("质量", Fraction(1000)), "千克": ("质量", Fraction(1)), "公斤": ("质量", Fraction(1)),
    "克": ("质量", Fraction(1, 1000)), "斤": ("质量", Fraction(1, 2)), "磅": ("质量", Fraction("0.45359237")),
    "立方米": ("体积", Fraction(1000)), "升": ("体积", Fraction(1)), "毫升": ("体积", Fraction(1, 1000)),
    "加仑": ("体积", Fraction("3.785411784")),
}


def convert_unit(value: float, from_unit: str, to_unit: str) -> str:
    """把一个数值从一种单位换算成另一种（长度、质量、体积），结果保留 4 位小数。"""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToolError("value 必须是数字")
    for unit in (from_unit, to_unit):
        if unit not in UNITS:
            raise ToolError(f"不认识的单位：{unit}（认识：{'、'.join(UNITS)}）")
    (q1, s1), (q2, s2) = UNITS[from_unit], UNITS[to_unit]
    if q1 != q2:
        raise ToolError(f"{from_unit}是{q1}单位，{to_unit}是{q2}单位，不能换算")
    return format_number(Fraction(str(value)) * s1 / s2, 4)


# ----------------------------------------------------------------------------------------------- city table

CITY_FIELDS = {"人口": "人", "面积": "平方公里", "海拔": "米", "建城年份": "年"}
_FIRST = "青白金银石松云风雪霞星月河湖江海山林竹梅兰桃柳枫泉溪岚"
_SECOND = "川原岭岗桥港湾洲峰谷阳宁安平丰盛兴和乐"
_SUFFIX = "城镇"


def _make_city_table(seed: int = 2024) -> dict[str, dict[str, int]]:
    rng = random.Random(seed)
    names = [a + b + c for a in _FIRST for b in _SECOND for c in _SUFFIX]
    rng.shuffle(names)
    table = {}
    for name in names[:600]:
        table[name] = {"人口": rng.randint(12_000, 9_800_000), "面积": rng.randint(35, 16_000),
                       "海拔": rng.randint(3, 3_900), "建城年份": rng.randint(-300, 1990)}
    return table


CITY_TABLE = _make_city_table()


def city_info(city: str, field: str) -> str:
    """查询一座城市的资料：人口（人）、面积（平方公里）、海拔（米）或建城年份。"""
    row = CITY_TABLE.get(str(city).strip())
    if row is None:
        raise ToolError(f"资料库里没有“{city}”")
    if field not in CITY_FIELDS:
        raise ToolError(f"没有“{field}”这一项（有：{'、'.join(CITY_FIELDS)}）")
    return str(row[field])


# ---------------------------------------------------------------------------------------------------- schemas


def _schema(name: str, fn: Callable, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": fn.__doc__.strip(),
        "parameters": {"type": "object", "properties": properties, "required": required}}}


TOOLS: dict[str, tuple[Callable, dict]] = {
    "calculator": (calculator, _schema("calculator", calculator, {
        "expression": {"type": "string", "description": "算式，例如 \"48317*365\""}}, ["expression"])),
    "weekday": (weekday, _schema("weekday", weekday, {
        "date": {"type": "string", "description": "日期，YYYY-MM-DD"}}, ["date"])),
    "date_add": (date_add, _schema("date_add", date_add, {
        "date": {"type": "string", "description": "起始日期，YYYY-MM-DD"},
        "days": {"type": "integer", "description": "加上的天数"}}, ["date", "days"])),
    "convert_unit": (convert_unit, _schema("convert_unit", convert_unit, {
        "value": {"type": "number", "description": "数值"},
        "from_unit": {"type": "string", "description": "原单位，例如 公里", "enum": list(UNITS)},
        "to_unit": {"type": "string", "description": "目标单位，例如 英里", "enum": list(UNITS)}},
        ["value", "from_unit", "to_unit"])),
    "city_info": (city_info, _schema("city_info", city_info, {
        "city": {"type": "string", "description": "城市名"},
        "field": {"type": "string", "description": "查询的项目", "enum": list(CITY_FIELDS)}}, ["city", "field"])),
}


def schemas(names: list[str] | None = None) -> list[dict]:
    return [TOOLS[n][1] for n in (names or list(TOOLS))]


def call_tool(name: str, arguments: object, timeout_s: float = 2.0, max_chars: int = 2000) -> str:
    """Run the built-in tool ``name`` in the sandbox; an unknown name is an ``error:`` answer, as any failure."""
    from xiaolm.tasks.sandbox import run_tool

    if name not in TOOLS:
        return f"error: 没有名为 {name} 的工具（有：{', '.join(TOOLS)}）"
    return run_tool(TOOLS[name][0], arguments, timeout_s=timeout_s, max_chars=max_chars)
