"""Readers for tool-calling and reasoning data, into OpenAI messages (what ``xiaolm.tokenizer.chat`` renders).

- LLaMA-Factory / glaive ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"function_call"|"observation",
  "value"}], "tools": "<JSON string>", "system"?}``; a ``function_call`` value is ``{"name", "arguments"}`` JSON and
  becomes an assistant turn's ``tool_calls`` (consecutive calls, or a ``gpt`` turn followed by calls, are one turn),
  an ``observation`` becomes a ``tool`` turn; glaive's bare ``{"name", "description", "parameters"}`` tools are
  wrapped as OpenAI ``{"type": "function", "function": ...}``.
- OpenAI messages with ``tool_calls`` (arguments as objects or JSON strings) and ``tool`` turns, ``tools`` beside them.
- Reasoning: an assistant's ``reasoning_content`` is kept; the DeepSeek-R1 distillation layout (``{"input" or
  "instruction", "content" or "output", "reasoning_content"}``) is the ``reasoning`` layout.

Everything malformed (tool JSON that does not parse, a call without a name, a tool turn with no call before it) raises
``RecordError`` with the field, which the loader (``xiaolm.data.formats.load_file``) counts and reports as ``file:line``.
"""
from __future__ import annotations

import json
from typing import Optional

from xiaolm.data.chatrecord import SHAREGPT_ROLES, RecordError
from xiaolm.data.chatrecord import text_field as _text

TOOL_SPEAKERS = {"function_call": "call", "observation": "tool", "tool": "tool", "function": "tool"}


def is_tool_record(rec: dict) -> bool:
    """Whether a ShareGPT/OpenAI record carries tools, calls, tool turns or reasoning (read here, not by the plain
    converters)."""
    if rec.get("tools"):
        return True
    turns = rec.get("conversations") if isinstance(rec.get("conversations"), list) else rec.get("messages")
    for t in turns if isinstance(turns, list) else []:
        if isinstance(t, dict) and (str(t.get("from", "")).lower() in TOOL_SPEAKERS or t.get("role") == "tool"
                                    or t.get("tool_calls") or "reasoning_content" in t):
            return True
    return False


def is_reasoning_record(rec: dict) -> bool:
    """The DeepSeek-R1 distillation layout: a question, an answer and ``reasoning_content`` at the top level."""
    return (isinstance(rec.get("reasoning_content"), str) and ("input" in rec or "instruction" in rec)
            and ("content" in rec or "output" in rec) and "messages" not in rec and "conversations" not in rec)


def parse_tools(value: object, where: str = "field 'tools'") -> list[dict]:
    """Tool schemas from a list or a JSON string, in OpenAI layout."""
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError(f"malformed tool JSON in {where}: {exc.msg} at char {exc.pos}") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError(f"{where} is {type(value).__name__}, expected a list of function schemas")
    tools = []
    for k, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordError(f"malformed tool schema in {where}[{k}]: needs a 'name'")
        tools.append({"type": "function", "function": fn})
    return tools


def parse_call(value: object, where: str) -> dict:
    """One call, ``{"name", "arguments"}`` (JSON text or an object; OpenAI's ``{"function": {...}}`` too), as an
    OpenAI ``tool_calls`` entry with the arguments as an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError(f"malformed tool JSON in {where}: {exc.msg} at char {exc.pos}") from None
    if not isinstance(value, dict):
        raise RecordError(f"malformed tool call in {where}: expected an object")
    fn = value.get("function") if isinstance(value.get("function"), dict) else value
    name, args = fn.get("name"), fn.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise RecordError(f"malformed tool call in {where}: no 'name'")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            raise RecordError(f"malformed tool JSON in {where}.arguments: {exc.msg} at char {exc.pos}") from None
    if not isinstance(args, dict):
        raise RecordError(f"malformed tool call in {where}: 'arguments' is {type(args).__name__}, expected an object")
    call = {"type": "function", "function": {"name": name, "arguments": args}}
    if isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call


def from_sharegpt_tools(rec: dict) -> list[dict]:
    key = "conversations" if "conversations" in rec else "messages"
    turns = rec.get(key)
    if not isinstance(turns, list):
        raise RecordError(f"missing field '{key}' (a list)")
    messages: list[dict] = []
    if rec.get("system"):
        messages.append({"role": "system", "content": _text(rec["system"], "field 'system'")})
    for k, turn in enumerate(turns):
        where = f"'{key}[{k}]'"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RecordError(f"{where} needs 'from' and 'value'")
        speaker = str(turn["from"]).lower()
        kind = TOOL_SPEAKERS.get(speaker)
        if kind == "call":
            call = parse_call(turn["value"], where)
            prev = messages[-1] if messages else None
            if prev is not None and prev["role"] == "assistant":
                prev.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "tool":
            messages.append({"role": "tool", "content": _text(turn["value"], f"{where}.value")})
        else:
            role = SHAREGPT_ROLES.get(speaker)
            if role is None:
                raise RecordError(f"{where}.from is {turn['from']!r}")
            messages.append({"role": role, "content": _text(turn["value"], f"{where}.value")})
    return messages


def from_openai_tools(rec: dict) -> list[dict]:
    key = "messages" if "messages" in rec else "conversations"
    turns = rec.get(key)
    if not isinstance(turns, list):
        raise RecordError(f"missing field '{key}' (a list)")
    messages = []
    for k, turn in enumerate(turns):
        where = f"'{key}[{k}]'"
        if not isinstance(turn, dict) or "role" not in turn:
            raise RecordError(f"{where} needs 'role'")
        role = turn["role"]
        if role not in ("system", "user", "assistant", "tool"):
            raise RecordError(f"{where}.role is {role!r}, expected system, user, assistant or tool")
        content = turn.get("content")
        m: dict = {"role": role, "content": "" if content is None and role == "assistant"
                   else _text(content, f"{where}.content")}
        if role == "assistant":
            if isinstance(turn.get("reasoning_content"), str):
                m["reasoning_content"] = turn["reasoning_content"]
            calls = turn.get("tool_calls") or []
            if not isinstance(calls, list):
                raise RecordError(f"{where}.tool_calls is not a list")
            if calls:
                m["tool_calls"] = [parse_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        if role == "tool":
            for field in ("tool_call_id", "name"):
                if isinstance(turn.get(field), str):
                    m[field] = turn[field]
        messages.append(m)
    return messages


def from_reasoning(rec: dict) -> list[dict]:
    question = _text(rec.get("input") if "input" in rec else rec.get("instruction"), "field 'input'")
    answer = _text(rec.get("content") if "content" in rec else rec.get("output"), "field 'content'")
    if not question.strip():
        raise RecordError("empty 'input'")
    if not answer.strip():
        raise RecordError("empty 'content'")
    messages = []
    if rec.get("system"):
        messages.append({"role": "system", "content": _text(rec["system"], "field 'system'")})
    return messages + [{"role": "user", "content": question},
                       {"role": "assistant", "reasoning_content": _text(rec["reasoning_content"],
                                                                         "field 'reasoning_content'"),
                        "content": answer}]


def validate_tool_messages(messages: list[dict], require_answer: bool = True) -> tuple[list[dict], Optional[str]]:
    """Turn structure with tools: an optional first system message; a user turn first; an assistant after a user
    or a tool turn; tool turns only after an assistant's calls (or another tool turn); a user turn after an
    assistant's answer. A final user turn is trimmed (``require_answer``), as for plain conversations."""
    if not messages:
        raise RecordError("no messages")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        raise RecordError("no user turn")
    allowed_after = {None: {"user"}, "user": {"assistant"}, "tool": {"tool", "assistant"}}
    prev = None
    for k, m in enumerate(body):
        role = m["role"]
        if role == "system":
            raise RecordError(f"a system message at turn {k + 1}; only the first message may be one")
        if prev == "assistant":
            want = {"tool"} if body[k - 1].get("tool_calls") else {"user"}
        else:
            want = allowed_after[prev]
        if role not in want:
            why = " (a tool turn needs an assistant call before it)" if role == "tool" else ""
            raise RecordError(f"turn {k + 1} is '{role}', expected {' or '.join(sorted(want))}{why}")
        if role == "assistant" and not m.get("content", "").strip() and not m.get("tool_calls"):
            raise RecordError(f"turn {k + 1} ('assistant') is empty")
        if role == "user" and not m["content"].strip():
            raise RecordError(f"turn {k + 1} ('user') is empty")
        prev = role
    note = None
    if require_answer and body[-1]["role"] in ("user", "tool"):
        last = max(k for k, m in enumerate(messages) if m["role"] == "assistant") if any(
            m["role"] == "assistant" for m in messages) else None
        if last is None:
            raise RecordError("no assistant answer")
        messages = messages[:last + 1]
        note = "last turn has no answer"
    return messages, note
