"""Request bodies of the OpenAI-compatible API, as pydantic models.

Only requests are modelled: validation is where a schema earns its keep (a wrong type or a missing field becomes a
400 naming the field). Responses are plain dicts built in ``app.py``, in exactly the shape OpenAI's documentation
and its Python client use.

Types are strict, as OpenAI's API is: ``"max_tokens": "3"``, ``true`` or ``3.0`` is a 400, not a 3 (an integer is
accepted where a number is expected). Every number has the safe range of
``xiaolm.infer.limits.SAMPLING_LIMITS`` (``seed`` a 64-bit signed integer; Infinity and NaN, which Python's JSON
parser accepts, are refused), the table the CLI checks its flags against too. Fields that change what a client gets
back and that we do not implement (``response_format``, ``logit_bias``, ... : ``UNSUPPORTED``) are a 400
naming the field, as vLLM does, unless they hold their no-op value; other unknown fields are tolerated and ignored
(``extra="allow"``), so clients that send newer harmless options still get an answer. A few extensions that vLLM and
llama.cpp also accept are honoured: ``top_k``, ``repetition_penalty`` and ``ignore_eos``.
``logprobs`` / ``top_logprobs``, ``frequency_penalty`` and ``presence_penalty`` are OpenAI's. Tools are OpenAI's
(``tools``, ``tool_choice``, ``parallel_tool_calls``; assistant ``tool_calls`` and ``tool`` turns in ``messages``), and
thinking is switched as vLLM does it (``chat_template_kwargs.enable_thinking``); see ``serve/tools.py``.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from xiaolm.infer.limits import SAMPLING_LIMITS

MAX_STOP = 4  # stop strings per request, as OpenAI allows

# Fields we do not implement that change the answer a client expects, with the values that mean "not used".
UNSUPPORTED: dict[str, tuple] = {
    "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "logit_bias": (None, {}),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "best_of": (None, 1), "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,),
    "guided_grammar": (None,), "grammar": (None,), "json_schema": (None,),
}

class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    def unsupported_field(self) -> Optional[str]:
        """The first field of ``UNSUPPORTED`` this request sets to something other than its no-op value."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and not _is_noop(value, UNSUPPORTED[name]):
                return name
        return None


def _checked(name: str, value):
    """``value`` when it is None or inside ``SAMPLING_LIMITS[name]`` (Infinity and NaN never are)."""
    if value is not None:
        problem = SAMPLING_LIMITS[name].problem(value)
        if problem:
            raise ValueError(problem)
    return value


def _is_noop(value: Any, noops: tuple) -> bool:
    return any(value == noop and type(value) is type(noop) for noop in noops)


class StreamOptions(_Tolerant):
    include_usage: bool = False


class TextPart(_Tolerant):
    """One element of a message's ``content`` list; only text parts are meaningful to a text-only model."""

    type: str
    text: Optional[str] = None


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionCall(_Tolerant):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Tolerant):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(_Tolerant):
    name: str = Field(..., pattern=FUNCTION_NAME)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Tolerant):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Tolerant):
    name: str


class NamedToolChoice(_Tolerant):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(_Tolerant):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant turn that called tools
    tool_call_id: Optional[str] = None  # a tool turn: which call it answers
    reasoning_content: Optional[str] = None  # an assistant turn's thinking (vLLM's field)

    def text(self) -> str:
        """The message's text; a list of content parts is joined, and a non-text part is an error."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part of type {part.type!r} is not supported (this model reads text only)")
            pieces.append(part.text)
        return "".join(pieces)


class _SamplingRequest(_Tolerant):
    """What chat and text completions share."""

    model: str
    # numbers are checked against SAMPLING_LIMITS (one table for the server and the CLI) by _sampling_in_range
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    # extensions (vLLM / llama.cpp spelling)
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: Optional[bool] = False

    @field_validator("temperature", "top_p", "n", "seed", "frequency_penalty", "presence_penalty", "top_k",
                     "repetition_penalty")
    @classmethod
    def _sampling_in_range(cls, value, info: ValidationInfo):
        return _checked(info.field_name, value)

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(value)}")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None  # the newer name for max_tokens
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None  # vLLM's: enable_thinking

    @field_validator("max_tokens", "max_completion_tokens", "top_logprobs")
    @classmethod
    def _chat_numbers_in_range(cls, value, info: ValidationInfo):
        return _checked("max_tokens" if info.field_name == "max_completion_tokens" else info.field_name, value)

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingRequest):
    # A string, a list of strings, a list of token ids, or a list of token-id lists (OpenAI's four forms).
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16  # OpenAI's default; 0 only with echo (score the prompt)
    echo: Optional[bool] = False
    logprobs: Optional[int] = None  # the legacy form: how many alternatives (top_logprobs' range)
    suffix: Optional[str] = None

    @field_validator("max_tokens", "logprobs")
    @classmethod
    def _completion_numbers_in_range(cls, value, info: ValidationInfo):
        if info.field_name == "max_tokens":
            return value if value == 0 else _checked("max_tokens", value)  # 0 scores the prompt (echo)
        return _checked("top_logprobs", value)

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def prompt_list(self) -> list[Union[str, list[int]]]:
        """The prompts as a list whose items are strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt is an empty list")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one tokenised prompt
        return list(p)
