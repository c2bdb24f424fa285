"""The chat format, in one place: ChatML turns (``<|im_start|>{role}\\n{content}<|im_end|>\\n``) with Qwen3's
conventions for thinking and tool calls, as a Jinja template (``CHAT_TEMPLATE``, what transformers, the GGUF and
llama.cpp render), as text (``render_conversation``, byte-identical to the template; the tests check them on a table
of conversations), as token ids with the assistant-label mask SFT trains on (``encode_conversation``), and parsed
back (``parse_assistant_text``).

Conventions (Qwen3's template, ``Qwen/Qwen3-8B`` tokenizer_config.json):

- thinking: an assistant turn opens with ``<think>\\n{reasoning}\\n</think>\\n\\n`` when it carries
  ``reasoning_content`` (or spells the block in its content), and only after the last real user query (older turns
  drop their reasoning, as Qwen3 does). ``enable_thinking=False`` puts an empty block in the generation prompt.
- tools: the schemas go into the system turn (Qwen3's English preamble, one ``tojson`` line per tool); calls are
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (what vLLM's ``hermes`` parser reads),
  several per turn; ``tool`` turns are one ``user`` turn of ``<tool_response>`` blocks.

One departure from Qwen3: a final assistant turn with no reasoning renders no empty think block (Qwen3 always adds
one), so conversations without thinking render as plain ChatML, as every model trained before this format did
(SkyRL's ``qwen3_acc_thinking`` template makes the same change). Training data for "thinking off" carries
``reasoning_content: ""``: its empty block renders as the ``enable_thinking=False`` prompt ends, and is not learnt
(no label), so a model trained on a mix thinks whenever the prompt leaves the block open and ``enable_thinking``
is a real switch.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

IM_START = "<|im_start|>"  # special token 1 (see xiaolm.tokenizer.core)
IM_END = "<|im_end|>"  # special token 2
THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"
# Special tokens of tokenizers trained from now on (ids 8..13); older tokenizers get them added (core.add_markers).
MARKERS = [THINK_START, THINK_END, TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END]

TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_EPILOGUE = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                  "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                  "<args-json-object>}\n</tool_call>")


def _jinja_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# Qwen3's template, less the empty think block on a final turn without reasoning (module docstring). Jinja's
# whitespace control (``{%-``) keeps the layout readable without changing the output.
CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    "    {{- " + _jinja_literal(TOOLS_PREAMBLE) + " }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- '\\n' }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- " + _jinja_literal(TOOLS_EPILOGUE + IM_END + "\n") + " }}\n"
    "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == 'user' and message.content is string and not"
    "(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n"
    "    {%- else %}\n"
    "        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    "    {%- if message.role == 'system' and loop.first %}\n"
    "    {%- elif message.role == 'assistant' %}\n"
    "        {%- set reasoning_content = none %}\n"
    "        {%- if message.reasoning_content is string %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n"
    "        {%- elif '</think>' in content %}\n"
    "            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]"
    ".lstrip('\\n') %}\n"
    "            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index and reasoning_content is string %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n"
    "                {%- endif %}\n"
    "                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n"
    "                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n"
    "                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n"
    "                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n"
    "                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == 'tool' %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)


@dataclass(frozen=True)
class Segment:
    """A piece of the rendering. ``literal`` text comes from users, tools or data and is encoded with
    ``allow_special=False`` (a marker it spells stays text); the rest is markup. ``label``: SFT learns it."""

    text: str
    literal: bool = False
    label: bool = False


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def tool_call_json(call: Mapping) -> str:
    """The JSON line of one call, as the template prints it: ``{"name": "f", "arguments": {...}}``."""
    fn = call.get("function") or call
    args = fn.get("arguments")
    args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return '{"name": "' + str(fn.get("name")) + '", "arguments": ' + args_text + "}"


def _last_query_index(messages: list[Mapping]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        m = messages[index]
        c = m.get("content")
        if m.get("role") == "user" and isinstance(c, str) and not (
                c.startswith(TOOL_RESPONSE_START) and c.endswith(TOOL_RESPONSE_END)):
            return index
    return len(messages) - 1


def split_reasoning(message: Mapping) -> tuple[Optional[str], str]:
    """``(reasoning, content)`` of an assistant message: its ``reasoning_content`` if a string, else a think block
    spelled in its content (Qwen3's rule), else ``(None, content)``."""
    content = _str(message.get("content"))
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if THINK_END in content:
        return (content.split(THINK_END)[0].rstrip("\n").split(THINK_START)[-1].lstrip("\n"),
                content.split(THINK_END)[-1].lstrip("\n"))
    return None, content


def conversation_segments(messages: Iterable[Mapping[str, object]], tools: Optional[list] = None,
                          enable_thinking: Optional[bool] = None, add_generation_prompt: bool = False,
                          ) -> list[Segment]:
    """The rendering as segments; ``"".join`` of their texts is exactly what ``CHAT_TEMPLATE`` renders."""
    messages = list(messages)
    segs: list[Segment] = []
    first_system = bool(messages) and messages[0].get("role") == "system"
    if tools:
        segs.append(Segment(IM_START + "system\n"))
        if first_system:
            segs.append(Segment(_str(messages[0].get("content")) + "\n\n", literal=True))
        segs.append(Segment(TOOLS_PREAMBLE))
        for tool in tools:
            segs.append(Segment("\n" + json.dumps(tool, ensure_ascii=False), literal=True))
        segs += [Segment(TOOLS_EPILOGUE), Segment(IM_END), Segment("\n")]
    elif first_system:
        segs += [Segment(IM_START + "system\n"), Segment(_str(messages[0].get("content")), literal=True),
                 Segment(IM_END), Segment("\n")]
    last_query = _last_query_index(messages)
    for k, m in enumerate(messages):
        role = str(m.get("role"))
        content = _str(m.get("content"))
        if k == 0 and role == "system":
            continue
        if role == "assistant":
            reasoning, content = split_reasoning(m)
            segs.append(Segment(IM_START + "assistant\n"))
            if k > last_query and reasoning is not None:
                # an empty block is what the enable_thinking=False prompt supplies, so it is context, not a label:
                # a model that learnt to emit it would skip thinking on its own and the switch would mean nothing
                thinks = bool(reasoning.strip())
                segs += [Segment(THINK_START + "\n", label=thinks),
                         Segment(reasoning.strip("\n"), literal=True, label=thinks),
                         Segment("\n" + THINK_END + "\n\n", label=thinks)]
                content = content.lstrip("\n")
            segs.append(Segment(content, literal=True, label=True))
            for j, call in enumerate(m.get("tool_calls") or []):
                opener = "\n" if (j == 0 and content) or j > 0 else ""
                segs += [Segment(opener + TOOL_CALL_START + "\n", label=True),
                         Segment(tool_call_json(call), literal=True, label=True),
                         Segment("\n" + TOOL_CALL_END, label=True)]
            segs += [Segment(IM_END, label=True), Segment("\n")]
        elif role == "tool":
            if k == 0 or messages[k - 1].get("role") != "tool":
                segs.append(Segment(IM_START + "user"))
            segs += [Segment("\n" + TOOL_RESPONSE_START + "\n"), Segment(content, literal=True),
                     Segment("\n" + TOOL_RESPONSE_END)]
            if k == len(messages) - 1 or messages[k + 1].get("role") != "tool":
                segs += [Segment(IM_END), Segment("\n")]
        else:
            segs += [Segment(IM_START + role + "\n"), Segment(content, literal=True), Segment(IM_END),
                     Segment("\n")]
    if add_generation_prompt:
        segs.append(Segment(IM_START + "assistant\n"))
        if enable_thinking is False:
            segs.append(Segment(THINK_START + "\n\n" + THINK_END + "\n\n"))
    return [s for s in segs if s.text]


def render_conversation(messages: Iterable[Mapping[str, object]], tools: Optional[list] = None,
                        enable_thinking: Optional[bool] = None, add_generation_prompt: bool = False) -> str:
    """The prompt text for ``messages`` (OpenAI layout: system/user/assistant/tool; an assistant may carry
    ``reasoning_content`` and ``tool_calls``), ``tools`` (OpenAI function schemas) and ``enable_thinking``;
    byte-identical to transformers' ``apply_chat_template`` with ``CHAT_TEMPLATE``."""
    return "".join(s.text for s in conversation_segments(messages, tools, enable_thinking, add_generation_prompt))


def render_chat(messages: Iterable[Mapping[str, object]], add_generation_prompt: bool = False) -> str:
    """``render_conversation`` without tools (the older name; plain ChatML for plain messages)."""
    return render_conversation(messages, add_generation_prompt=add_generation_prompt)


def uses_markers(messages: Iterable[Mapping[str, object]], tools: Optional[list] = None) -> bool:
    """Whether the rendering of ``messages`` contains the thinking / tool markers (SFT adds them as tokens then)."""
    if tools:
        return True
    for m in messages:
        if m.get("role") == "tool" or m.get("tool_calls"):
            return True
        if m.get("role") == "assistant" and split_reasoning(m)[0] is not None:
            return True
    return False


# ------------------------------------------------------------------------------------------------ encoding


class SegmentEncoder:
    """Encodes segments with a cache for markup (it repeats) and one fast batch for literal texts."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._markup: dict[str, list[int]] = {}

    def markup(self, text: str) -> list[int]:
        ids = self._markup.get(text)
        if ids is None:
            ids = self._markup[text] = self.tokenizer.encode(text, allow_special=True)
        return ids

    def encode_many(self, segment_lists: list[list[Segment]], drop_final_newline: bool = True,
                    ) -> list[tuple[list[int], list[bool]]]:
        literals = [s.text for segs in segment_lists for s in segs if s.literal]
        encoded = iter(self.tokenizer.encode_batch(literals, allow_special=False) if literals else [])
        out = []
        for segs in segment_lists:
            if drop_final_newline and segs and segs[-1].text == "\n" and not segs[-1].literal:
                segs = segs[:-1]  # an input after the last <|im_end|> with nothing to predict
            ids: list[int] = []
            mask: list[bool] = []
            for s in segs:
                piece = next(encoded) if s.literal else self.markup(s.text)
                ids += piece
                mask += [s.label] * len(piece)
            out.append((ids, mask))
        return out


def encode_conversation(tokenizer, messages: list[dict], content_ids: Optional[list[list[int]]] = None,
                        tools: Optional[list] = None, enable_thinking: Optional[bool] = None,
                        ) -> tuple[list[int], list[bool]]:
    """Token ids of the rendering of ``messages`` and, per token, whether it carries a label: True exactly on what
    an assistant turn says (its think block unless empty, content, tool calls) and its closing ``<|im_end|>``;
    never on system turns, tool schemas or tool responses. The final newline after the last ``<|im_end|>`` is left
    off (it would be an input with nothing to predict).

    Literal texts are encoded with ``allow_special=False``, so text that spells a marker stays text.
    ``content_ids`` (each message's content already encoded) is accepted for plain conversations."""
    if content_ids is not None and tools is None and not uses_markers(messages):
        return _encode_plain(tokenizer, messages, content_ids)
    return SegmentEncoder(tokenizer).encode_many([conversation_segments(messages, tools, enable_thinking)])[0]


def _encode_plain(tokenizer, messages: list[dict], content_ids: list[list[int]]) -> tuple[list[int], list[bool]]:
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    mask: list[bool] = []
    for k, (m, body) in enumerate(zip(messages, content_ids)):
        header = [tokenizer.im_start_id] + tokenizer.encode(f"{m['role']}\n")
        is_answer = m["role"] == "assistant"
        ids += header
        mask += [False] * len(header)
        ids += body
        mask += [is_answer] * len(body)
        ids.append(tokenizer.im_end_id)
        mask.append(is_answer)
        if k < len(messages) - 1:
            ids += newline
            mask += [False] * len(newline)
    return ids, mask


def prompt_ids(tokenizer, messages: list[dict], tools: Optional[list] = None,
               enable_thinking: Optional[bool] = None) -> list[int]:
    """Token ids of the chat prompt for ``messages``, ending with the generation prompt (piecewise, as SFT)."""
    segs = conversation_segments(messages, tools, enable_thinking, add_generation_prompt=True)
    return SegmentEncoder(tokenizer).encode_many([segs], drop_final_newline=False)[0][0]


# ------------------------------------------------------------------------------------------------- parsing


@dataclass
class ParsedAssistant:
    """An assistant's text taken apart: ``reasoning`` (None without a think block), ``content`` (the answer),
    ``tool_calls`` (each ``{"name": str, "arguments": dict}``) and ``errors`` (malformed calls, reported)."""

    reasoning: Optional[str]
    content: str
    tool_calls: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


_CALL_RE = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.DOTALL)


def parse_tool_call(body: str) -> dict:
    """``{"name", "arguments"}`` of one call's JSON; raises ValueError saying what is wrong."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"tool call is not JSON ({exc.msg} at char {exc.pos}): {body[:80]!r}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"tool call is {type(obj).__name__}, expected an object: {body[:80]!r}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool call has no 'name': {body[:80]!r}")
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise ValueError(f"tool call {name!r}: 'arguments' is a string that is not JSON") from None
    if not isinstance(args, dict):
        raise ValueError(f"tool call {name!r}: 'arguments' is {type(args).__name__}, expected an object")
    return {"name": name, "arguments": args}


def parse_assistant_text(text: str) -> ParsedAssistant:
    """Take generated assistant text apart (the inverse of the assistant part of ``render_conversation``): a
    leading think block (also one left open when generation stopped), then content, then ``<tool_call>`` blocks.
    Malformed calls go to ``errors``; nothing raises."""
    reasoning: Optional[str] = None
    rest = text
    if THINK_END in rest:
        reasoning = rest.split(THINK_END)[0].rstrip("\n").split(THINK_START)[-1].lstrip("\n")
        rest = rest.split(THINK_END)[-1].lstrip("\n")
    elif rest.lstrip("\n").startswith(THINK_START):
        reasoning = rest.lstrip("\n")[len(THINK_START):].strip("\n")
        rest = ""
    calls: list[dict] = []
    errors: list[str] = []
    first = rest.find(TOOL_CALL_START)
    if first < 0:
        return ParsedAssistant(reasoning, rest, calls, errors)
    content = rest[:first]
    content = content[:-1] if content.endswith("\n") else content
    tail = rest[first:]
    end = 0
    for match in _CALL_RE.finditer(tail):
        between = tail[end:match.start()].strip()
        if between:
            content += ("\n" if content else "") + between
        end = match.end()
        try:
            calls.append(parse_tool_call(match.group(1).strip()))
        except ValueError as exc:
            errors.append(str(exc))
    leftover = tail[end:]
    if TOOL_CALL_START in leftover:
        errors.append("unterminated <tool_call> (no </tool_call>)")
        leftover = leftover[:leftover.find(TOOL_CALL_START)]
    if leftover.strip():
        content += ("\n" if content else "") + leftover.strip()
    return ParsedAssistant(reasoning, content, calls, errors)
