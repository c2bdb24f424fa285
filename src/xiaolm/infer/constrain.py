"""Constrained decoding for tool calls: where a function must be called, the call's JSON is valid against its schema
by construction.

The grammar work is llguidance's (``pip install xiaolm[tools]``; the library llama.cpp and vLLM use for structured
output; one 3 MB wheel without dependencies, no GPU needed, and it takes our byte-level BPE tokenizer as it is).
xgrammar was looked at first: ``pip install --dry-run xgrammar`` would also pull triton and apache-tvm-ffi, which a
CPU install does not need, so llguidance it is.
Without llguidance nothing is constrained and the arguments are only checked afterwards (``argument_errors``, with
jsonschema when it is installed), and the caller reports what failed.

A ``CallConstraint`` is one row's state: ``mask(logits)`` leaves only the tokens the grammar allows next (the end of
text once the JSON is complete), ``accept(token)`` advances it. The grammar is the JSON object of one call,
``{"name": <one of the tools>, "arguments": <that tool's parameters>}``, written with ``json.dumps``'s separators,
which is how calls are written in training data (``<tool_call>\\n{json}\\n</tool_call>``). With ``several`` (the
ids of ``</tool_call>`` and ``<tool_call>``, special tokens of the vocabulary) the grammar allows further calls, each
after ``\\n</tool_call>\\n<tool_call>\\n`` as the chat format separates them (a Lark grammar around the JSON one).
"""
from __future__ import annotations

import json
from typing import Optional

import torch

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # json.dumps's layout


def have_llguidance() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def function_parameters(tool: dict) -> dict:
    """The JSON schema of a tool's arguments (an object; a tool without ``parameters`` takes none)."""
    params = tool.get("function", tool).get("parameters") or {"type": "object", "properties": {}}
    return params


def closed(schema):
    """``schema`` with ``additionalProperties: false`` on every object that leaves it unsaid (OpenAI's strict mode
    does the same): generation keeps to the keys the schema names, and whatever it writes is still valid."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (closed(v) if k in _SUBSCHEMAS else v) for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in schema[key].items()}
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema \
            and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out


_SUBSCHEMAS = ("items", "anyOf", "oneOf", "allOf", "not", "prefixItems", "additionalProperties", "if", "then", "else")


def call_schema(tools: list[dict]) -> dict:
    """The JSON schema of one call of any of ``tools`` (OpenAI's ``{"type": "function", "function": {...}}``), for
    generation (``closed``)."""
    options = []
    for tool in tools:
        fn = tool.get("function", tool)
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]},
                                                         "arguments": closed(function_parameters(tool))},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def argument_errors(tool: Optional[dict], arguments: dict) -> list[str]:
    """What is wrong with ``arguments`` for ``tool`` (its schema), as short messages; [] when they are valid or when
    jsonschema is not installed to tell."""
    if tool is None:
        return ["no such function"]
    try:
        import jsonschema
    except ImportError:
        return []
    validator = jsonschema.Draft202012Validator(function_parameters(tool))
    return [f"{'/'.join(map(str, e.absolute_path)) or 'arguments'}: {e.message}"
            for e in validator.iter_errors(arguments)]


class CallGrammar:
    """Compiles call grammars for one tokenizer; ``row()`` gives a fresh constraint for each generated row."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        import llguidance

        backend = getattr(tokenizer, "tok", None)  # the tokenizers.Tokenizer inside XTokenizer / HFTokenizer
        if backend is None:
            raise ValueError("constrained decoding needs a Hugging Face fast tokenizer")
        self.vocab_size = int(vocab_size)
        self._lltok = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=list(eos_ids))
        self._grammars: dict[str, str] = {}

    def grammar(self, schema: dict, several: Optional[tuple[int, int]] = None) -> str:
        import llguidance

        key = json.dumps([schema, several], sort_keys=True)
        if key not in self._grammars:
            if several is None:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
            else:
                end, start = several
                sep = r'"\n"'  # Lark's string literal of a newline
                layout = {**schema, "x-guidance": JSON_LAYOUT}
                grammar = llguidance.LLMatcher.grammar_from_lark(
                    f"start: call (sep call)*\nsep: {sep} <[{end}]> {sep} <[{start}]> {sep}\n"
                    f"call: %json {json.dumps(layout)}\n")
            problem = llguidance.LLMatcher.validate_grammar(grammar, self._lltok)
            if problem and not problem.startswith("WARNING"):
                raise ValueError(f"the tool schema cannot be compiled into a grammar: {problem}")
            self._grammars[key] = grammar
        return self._grammars[key]

    def row(self, schema: dict, several: Optional[tuple[int, int]] = None) -> "CallConstraint":
        import llguidance

        return CallConstraint(llguidance.LLMatcher(self._lltok, self.grammar(schema, several), log_level=0),
                              self.vocab_size)


class CallConstraint:
    """One row's grammar state."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """[V] bool: the tokens the grammar allows next."""
        import numpy as np

        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool))

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [V] with every token the grammar forbids at -inf."""
        allowed = self.allowed().to(logits.device)
        if logits.shape[-1] > allowed.shape[0]:
            allowed = torch.cat([allowed, allowed.new_zeros(logits.shape[-1] - allowed.shape[0])])
        return logits.masked_fill(~allowed[:logits.shape[-1]], float("-inf"))

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_accepting()
