"""Splitting a chat model's output into thinking, answer and tool calls, incrementally, as the text streams.

The output format is the one the ecosystem already parses (see ``xiaolm.tokenizer.chat``): an assistant turn may
open with ``<think>\\n...\\n</think>\\n\\n`` (Qwen3 / DeepSeek-R1) and may hold calls as
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks (Hermes / Qwen). The reference behaviours
are vLLM's ``qwen3`` reasoning parser and ``hermes`` tool parser:

- thinking: a ``<think>`` at the very start of the output opens the reasoning, ``</think>`` closes it; without a
  ``</think>`` (the answer was cut short) everything after ``<think>`` is reasoning. A prompt that already ends
  inside ``<think>`` (``starts_in_reasoning``) starts in the reasoning. Output that does not open with ``<think>`` is
  all answer. The blank line after ``</think>`` is not part of the answer.
- tool calls (only when ``parse_tools``): text before the first ``<tool_call>`` is the answer; each block's JSON
  object gives a call (``name``, ``arguments``); whitespace between blocks is dropped. A block that is not a JSON
  object with a string ``name`` and an object ``arguments`` is reported in ``errors`` and dropped from the calls.

``ToolStreamParser.push(text)`` takes the next piece of text (any split, even inside a marker) and returns what may
be shown now: ``StreamDelta(reasoning, content, tool_calls)``. A call streams as OpenAI streams one: a first delta
with its ``index``, ``id``, ``name`` and empty ``arguments``, then argument chunks whose concatenation is the call's
``arguments`` string (the JSON text the model wrote between ``"arguments":`` and the object's closing brace).
``finish()`` flushes the rest; ``result()`` is the whole message, the same as joining every delta.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Optional

from xiaolm.tokenizer.chat import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START

# The start of a call whose name is known: {"name": "...", "arguments": (what the model writes, in this order).
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    """An id for a tool call, in OpenAI's shape (``call_`` + 24 characters)."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCallDelta:
    index: int
    id: Optional[str] = None  # only in a call's first delta
    name: Optional[str] = None  # only in a call's first delta
    arguments: str = ""

    def openai(self) -> dict:
        """The ``delta.tool_calls`` entry of a streamed chunk."""
        entry: dict = {"index": self.index}
        function: dict = {"arguments": self.arguments}
        if self.id is not None:
            entry["id"], entry["type"] = self.id, "function"
            function = {"name": self.name, "arguments": self.arguments}
        entry["function"] = function
        return entry


@dataclass
class StreamDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object

    def openai(self) -> dict:
        """The ``message.tool_calls`` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedOutput:
    reasoning: Optional[str]
    content: Optional[str]
    tool_calls: list[ToolCall]
    errors: list[str]


def _held_prefix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of one of ``markers`` (it may still become it)."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best


class _Call:
    """One ``<tool_call>`` block being read. ``index`` is the streamed index: the calls announced before it (a
    malformed block whose head was already streamed keeps its index; one that never showed a head leaves no gap)."""

    def __init__(self, counter: list[int]):
        self._counter = counter
        self.index = -1  # given when the call is first announced
        self.id = new_call_id()
        self.text = ""  # everything inside the block so far
        self.name: Optional[str] = None  # set once the head has been read (and announced)
        self.args_start = 0
        self.sent = 0  # characters of the arguments already streamed

    def stream(self) -> list[ToolCallDelta]:
        """Deltas that are safe now: the head once the name is known, then arguments up to (not including) a tail
        of braces and whitespace, which may be the object's closing brace."""
        out = []
        if self.name is None:
            m = _CALL_HEAD.match(self.text)
            if m is None or m.end() == len(self.text):  # wait for the arguments' first character (not a space)
                return out
            try:
                self.name = json.loads(f'"{m.group(1)}"')
            except json.JSONDecodeError:
                return out
            self.args_start = m.end()
            self.index = self._take_index()
            out.append(ToolCallDelta(self.index, self.id, self.name, ""))
        body = self.text[self.args_start:]
        safe = len(body.rstrip("} \t\r\n"))
        if safe > self.sent:
            out.append(ToolCallDelta(self.index, arguments=body[self.sent:safe]))
            self.sent = safe
        return out

    def _take_index(self) -> int:
        self._counter[0] += 1
        return self._counter[0] - 1

    def close(self) -> tuple[Optional[ToolCall], list[ToolCallDelta], Optional[str]]:
        """The finished call (None if the block is not a valid call), the deltas still owed, and the error."""
        try:
            obj = json.loads(self.text)
        except json.JSONDecodeError as exc:
            return None, [], f"tool call {self.index}: not valid JSON ({exc.msg} at character {exc.pos})"
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None, [], f"tool call {self.index}: a JSON object with a string 'name' is expected"
        arguments = obj.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string already
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            return None, [], f"tool call {self.index}: 'arguments' of {obj['name']!r} is not a JSON object"
        if self.name is None or self.name != obj["name"]:  # no streamable head (other key order): whole call now
            text = json.dumps(arguments, ensure_ascii=False)
            self.index = self._take_index() if self.index < 0 else self.index
            return ToolCall(self.id, obj["name"], text), [ToolCallDelta(self.index, self.id, obj["name"], text)], None
        body = self.text[self.args_start:].rstrip()
        raw = body[:-1].rstrip() if body.endswith("}") else body  # drop the call object's closing brace
        try:
            ok = json.loads(raw) == obj["arguments"]
        except json.JSONDecodeError:
            ok = False
        if not ok or not raw.startswith(body[:self.sent]):
            # The streamed text was not the arguments after all (e.g. keys after "arguments"): still send valid JSON.
            text = json.dumps(arguments, ensure_ascii=False)
            return ToolCall(self.id, obj["name"], text), [], \
                f"tool call {self.index}: arguments streamed in an unexpected layout"
        rest = [ToolCallDelta(self.index, arguments=raw[self.sent:])] if len(raw) > self.sent else []
        self.sent = len(raw)
        return ToolCall(self.id, obj["name"], raw), rest, None


class ToolStreamParser:
    """Incremental split of a model's output into reasoning, content and tool calls (see the module docstring)."""

    def __init__(self, parse_tools: bool = True, starts_in_reasoning: bool = False, parse_thinking: bool = True,
                 max_calls: Optional[int] = None):
        self.parse_tools = parse_tools
        self.parse_thinking = parse_thinking
        self.max_calls = max_calls  # parallel_tool_calls=false: the first call only
        self._mode = "reasoning" if starts_in_reasoning else ("start" if parse_thinking else "content")
        self._pending = ""  # text not yet classified (may hold the start of a marker)
        self._strip_newlines = False  # after </think>: the blank line is not part of the answer
        self._call: Optional[_Call] = None
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[ToolCall] = []
        self.errors: list[str] = []
        self._any_reasoning = starts_in_reasoning
        self._announced = [0]  # calls whose first delta has been produced (their streamed indices)
        self._after_block = False  # a block has closed and no answer text followed yet

    # ------------------------------------------------------------------------------------------- input

    def push(self, text: str) -> StreamDelta:
        self._pending += text
        return self._run(final=False)

    def finish(self) -> StreamDelta:
        delta = self._run(final=True)
        if self._call is not None:  # a block cut short: report it, as the hermes parser would drop it
            call, rest, error = self._call.close()
            self._add_call(call, rest, error, delta)
            self._call = None
        return delta

    def result(self) -> ParsedOutput:
        reasoning = "".join(self.reasoning) if self._any_reasoning else None
        content = "".join(self.content)
        return ParsedOutput(reasoning, content or None, list(self.calls), list(self.errors))

    # ------------------------------------------------------------------------------------------- state

    def _run(self, final: bool) -> StreamDelta:
        delta = StreamDelta()
        while True:
            before = (self._mode, len(self._pending))
            getattr(self, f"_in_{self._mode}")(delta, final)
            if (self._mode, len(self._pending)) == before:
                return delta

    def _in_start(self, delta: StreamDelta, final: bool) -> None:
        text = self._pending
        if text.startswith(THINK_START):
            self._pending = text[len(THINK_START):]
            self._mode, self._any_reasoning = "reasoning", True
        elif THINK_START.startswith(text) and not final:
            return  # may still become <think>
        else:
            self._mode = "content"

    def _in_reasoning(self, delta: StreamDelta, final: bool) -> None:
        text = self._pending
        cut = text.find(THINK_END)
        if cut != -1:
            self._emit_reasoning(text[:cut], delta)
            self._pending = text[cut + len(THINK_END):]
            self._mode, self._strip_newlines = "content", True
            return
        keep = 0 if final else _held_prefix(text, (THINK_END,))
        self._emit_reasoning(text[:len(text) - keep], delta)
        self._pending = text[len(text) - keep:]

    def _in_content(self, delta: StreamDelta, final: bool) -> None:
        text = self._pending
        if self._strip_newlines:
            stripped = text.lstrip("\n")
            if not stripped and not final:
                self._pending = ""
                return
            self._strip_newlines = False
            text = self._pending = stripped
        if self.parse_tools:
            cut = text.find(TOOL_CALL_START)
            if cut != -1:
                before = text[:cut]
                self._emit_content(before.strip() if self._after_block else before, delta)
                self._pending = text[cut + len(TOOL_CALL_START):]
                self._call = _Call(self._announced)
                self._mode = "call"
                return
        keep = 0 if final else _held_prefix(text, (TOOL_CALL_START,) if self.parse_tools else ())
        shown = text[:len(text) - keep]
        if self._after_block:  # whitespace after a call is layout (another call may follow), not answer
            if not shown.strip():
                self._pending = "" if final else text
                return
            shown, self._after_block = shown.lstrip(), False
        self._emit_content(shown, delta)
        self._pending = text[len(text) - keep:]

    def _in_call(self, delta: StreamDelta, final: bool) -> None:
        call = self._call
        text = self._pending
        cut = text.find(TOOL_CALL_END)
        if cut == -1:
            keep = 0 if final else _held_prefix(text, (TOOL_CALL_END,))
            call.text += text[:len(text) - keep]
            self._pending = text[len(text) - keep:]
            if self._within_limit(call):
                delta.tool_calls += call.stream()
            return
        call.text += text[:cut]
        self._pending = text[cut + len(TOOL_CALL_END):]
        if self._within_limit(call) and call.name is not None:
            delta.tool_calls += call.stream()  # a call not announced yet is checked whole before it is sent
        result, rest, error = call.close()
        self._add_call(result, rest, error, delta)
        self._call = None
        self._mode, self._after_block = "content", True

    # ------------------------------------------------------------------------------------------ output

    def _within_limit(self, call: _Call) -> bool:
        return self.max_calls is None or len(self.calls) < self.max_calls

    def _add_call(self, call: Optional[ToolCall], rest: list[ToolCallDelta], error: Optional[str],
                  delta: StreamDelta) -> None:
        if error:
            self.errors.append(error)
        if call is None:
            return
        if self.max_calls is not None and len(self.calls) >= self.max_calls:
            self.errors.append(f"a further call of {call.name!r} was dropped (parallel_tool_calls is false)")
            return
        self.calls.append(call)
        delta.tool_calls += rest

    def _emit_reasoning(self, text: str, delta: StreamDelta) -> None:
        if text:
            self.reasoning.append(text)
            delta.reasoning += text

    def _emit_content(self, text: str, delta: StreamDelta) -> None:
        if text:
            self.content.append(text)
            delta.content += text


def marker_ids(tokenizer) -> list[int]:
    """Ids of the thinking / tool-call markers that are special tokens of ``tokenizer``: decoding must keep them in
    the text (they are the format this parser reads), while other special tokens are still dropped."""
    ids = []
    for marker in (THINK_START, THINK_END, TOOL_CALL_START, TOOL_CALL_END):
        found = tokenizer.token_to_id(marker) if hasattr(tokenizer, "token_to_id") else None
        if found is not None:
            ids.append(found)
    return ids


def parse_output(text: str, **kwargs) -> ParsedOutput:
    """The whole output at once (``ToolStreamParser`` fed in one piece)."""
    parser = ToolStreamParser(**kwargs)
    parser.push(text)
    parser.finish()
    return parser.result()
