"""Tool calls and thinking in the chat endpoint: what a request asks for (``tools``, ``tool_choice``,
``parallel_tool_calls``, ``chat_template_kwargs.enable_thinking``), the prompt it becomes, and each choice's output
taken apart into ``reasoning_content``, ``content`` and ``tool_calls`` as it streams (vLLM's layout for all three).

``tool_choice`` (OpenAI's): ``none`` (the tools are in the prompt, as vLLM renders them, but the output is never
read as calls), ``auto`` (the default with tools: the model decides, its ``<tool_call>`` blocks become calls),
``required`` or ``{"type": "function", "function": {"name": ...}}`` (the assistant turn is begun with an empty think
block and ``<tool_call>``, and the call's JSON is generated under a grammar made from the tools' schemas, so its
arguments are valid by construction: ``xiaolm.infer.constrain``; with ``parallel_tool_calls`` (the default) the
grammar lets further calls follow when the markers are tokens of the vocabulary, otherwise a forced turn holds one). Without llguidance
the forced call is generated unconstrained and checked against its schema afterwards. Every call is checked
against its function's schema; what fails is reported in the choice's ``tool_call_errors`` (an extension field;
OpenAI clients ignore it), as are malformed ``<tool_call>`` blocks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from xiaolm.infer.constrain import CallGrammar, argument_errors, call_schema, have_llguidance
from xiaolm.infer.toolstream import TOOL_CALL_START, ToolStreamParser

FORCED_PREFIX = TOOL_CALL_START + "\n"  # how a forced turn begins (after the empty think block)


class ToolRequestError(ValueError):
    """A request whose tools or tool_choice cannot be honoured (a 400 naming ``param``)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolPlan:
    tools: list[dict] = field(default_factory=list)  # OpenAI function tools, as sent
    choice: str = "none"  # none | auto | required | function
    function: Optional[str] = None  # the function tool_choice names
    parallel: bool = True
    enable_thinking: Optional[bool] = None

    @property
    def parse_tools(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    def forced_tools(self) -> list[dict]:
        return [t for t in self.tools if self.choice == "required" or t["function"]["name"] == self.function]

    def tool(self, name: str) -> Optional[dict]:
        return next((t for t in self.tools if t["function"]["name"] == name), None)


def plan_tools(body) -> ToolPlan:
    """The tool settings of a ``ChatCompletionRequest``; raises ``ToolRequestError`` for what cannot be done."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise ToolRequestError("tools holds two functions with the same name.", "tools")
    function = None
    if choice is None:
        choice = "auto" if tools else "none"
    elif not isinstance(choice, str):
        function, choice = choice.function.name, "function"
        if function not in names:
            raise ToolRequestError(f"tool_choice names the function {function!r}, which is not in tools.",
                                   "tool_choice")
    if choice in ("required", "function") and not tools:
        raise ToolRequestError(f"tool_choice {choice!r} needs tools.", "tool_choice")
    kwargs = body.chat_template_kwargs or {}
    thinking = kwargs.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise ToolRequestError("chat_template_kwargs.enable_thinking must be true or false.",
                               "chat_template_kwargs.enable_thinking")
    if choice in ("required", "function") and body.ignore_eos:
        raise ToolRequestError("ignore_eos cannot be used with a forced tool call (the call ends the turn).",
                               "ignore_eos")
    parallel = True if body.parallel_tool_calls is None else body.parallel_tool_calls
    return ToolPlan(tools, choice, function, parallel, thinking)


def request_messages(body) -> list[dict]:
    """The request's messages in the layout the chat format renders (OpenAI's: ``tool_calls`` with their
    ``arguments`` as JSON text, ``tool`` turns, ``reasoning_content``); a ``developer`` message is a system one.
    Raises ``ToolRequestError`` for a content part that is not text or arguments that are not a JSON object."""
    out = []
    for i, m in enumerate(body.messages):
        try:
            text = m.text()
        except ValueError as exc:
            raise ToolRequestError(str(exc), f"messages.{i}.content") from None
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": text}
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    arguments = None
                if not isinstance(arguments, dict):
                    raise ToolRequestError("the arguments of a tool call must be a JSON object (as text).",
                                           f"messages.{i}.tool_calls.{j}.function.arguments")
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            message["tool_calls"] = calls
        if m.role == "assistant" and isinstance(m.reasoning_content, str):
            message["reasoning_content"] = m.reasoning_content
        if m.role == "tool" and m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def request_chars(messages: list[dict], plan: ToolPlan) -> int:
    """Characters the rendered prompt holds at least (contents, answers, each call's name and arguments, each tool's
    JSON as the template prints it), for the length check before tokenising: it must never overcount."""
    from xiaolm.tokenizer.chat import split_reasoning

    calls = sum(len(c["function"]["name"]) + len(json.dumps(c["function"]["arguments"], ensure_ascii=False))
                for m in messages for c in m.get("tool_calls", []))
    # an assistant's thinking is left out of earlier turns' rendering, so only its answer counts
    texts = sum(len(split_reasoning(m)[1] if m["role"] == "assistant" else m["content"]) for m in messages)
    return texts + calls + sum(len(json.dumps(t, ensure_ascii=False)) for t in plan.tools)


def build_prompt(tokenizer, messages: list[dict], plan: ToolPlan) -> list[int]:
    """Prompt token ids: the conversation with the tools and thinking switch rendered as the chat format does; a
    forced call turns thinking off and begins the call."""
    from xiaolm.tokenizer.chat import prompt_ids

    thinking = False if plan.forced else plan.enable_thinking
    if not plan.tools and thinking is None and not any(len(m) > 2 for m in messages):
        ids = prompt_ids(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])
    else:
        ids = prompt_ids(tokenizer, messages, tools=plan.tools or None, enable_thinking=thinking)
    if plan.forced:
        ids = ids + tokenizer.encode(FORCED_PREFIX, allow_special=True)
    return ids


def several_calls(tokenizer, plan: ToolPlan) -> Optional[tuple[int, int]]:
    """The ids of ``</tool_call>`` and ``<tool_call>`` when a forced turn may hold several calls (None: one)."""
    from xiaolm.infer.toolstream import TOOL_CALL_END

    if not plan.parallel or not hasattr(tokenizer, "token_to_id"):
        return None
    end, start = tokenizer.token_to_id(TOOL_CALL_END), tokenizer.token_to_id(TOOL_CALL_START)
    return None if end is None or start is None else (end, start)


def constraint_factory(grammars: Callable[[], Optional[CallGrammar]], plan: ToolPlan,
                       several: Optional[tuple[int, int]] = None) -> Optional[Callable]:
    """Each row's grammar for a forced call (None when nothing is forced or llguidance is absent); ``several``:
    ``several_calls``."""
    if not plan.forced or not have_llguidance():
        return None
    grammar = grammars()
    if grammar is None:
        return None
    schema = call_schema(plan.forced_tools())
    try:
        grammar.grammar(schema, several)  # compile now: a bad schema is the client's 400, not a failed generation
    except ValueError as exc:
        raise ToolRequestError(str(exc), "tools") from None
    return lambda: grammar.row(schema, several)


class ChoiceOutput:
    """One choice's text taken apart as it streams: ``push(text)`` / ``finish()`` give OpenAI delta dicts (None
    when there is nothing to send yet), ``message()`` the whole message, ``errors`` what failed."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.parser = ToolStreamParser(parse_tools=plan.parse_tools or plan.forced,
                                       max_calls=None if plan.parallel else 1)
        if plan.forced:
            self.parser.push(FORCED_PREFIX)  # the prompt began the call; the output is its JSON

    def push(self, text: str) -> Optional[dict]:
        return self._delta(self.parser.push(text))

    def finish(self) -> Optional[dict]:
        return self._delta(self.parser.finish())

    @staticmethod
    def _delta(d) -> Optional[dict]:
        if not d:
            return None
        out: dict[str, Any] = {}
        if d.reasoning:
            out["reasoning_content"] = d.reasoning
        if d.content:
            out["content"] = d.content
        if d.tool_calls:
            out["tool_calls"] = [tc.openai() for tc in d.tool_calls]
        return out

    @property
    def errors(self) -> list[str]:
        result = self.parser.result()
        errors = list(result.errors)
        for call in result.tool_calls:
            problems = argument_errors(self.plan.tool(call.name), json.loads(call.arguments))
            errors += [f"{call.name}: {p}" for p in problems]
        return errors

    def message(self) -> dict:
        result = self.parser.result()
        message: dict[str, Any] = {"role": "assistant", "content": result.content}
        if result.content is None and not result.tool_calls:
            message["content"] = ""
        if result.reasoning is not None:
            message["reasoning_content"] = result.reasoning
        if result.tool_calls:
            message["tool_calls"] = [c.openai() for c in result.tool_calls]
        return message

    def finish_reason(self, reason: str) -> str:
        """``tool_calls`` when the turn ended by itself holding calls (OpenAI's rule), else the engine's reason."""
        return "tool_calls" if reason == "stop" and self.parser.calls else reason


def chat_choice(index: int, text: str, finish_reason: str, plan: ToolPlan, logprobs) -> dict:
    """One non-streamed chat choice: the text taken apart into reasoning, content and tool calls."""
    output = ChoiceOutput(plan)
    output.push(text)
    output.finish()
    choice = {"index": index, "message": output.message(), "logprobs": logprobs,
              "finish_reason": output.finish_reason(finish_reason)}
    if output.errors:
        choice["tool_call_errors"] = output.errors
    return choice
