"""The incremental parser that splits model output into reasoning, answer and tool calls (vLLM's qwen3 reasoning
parser and hermes tool parser are the reference behaviours)."""
from __future__ import annotations

import json
import random

import pytest

from xiaolm.infer.toolstream import ToolStreamParser, parse_output

CALL_A = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "123 * 456"}}\n</tool_call>'
CALL_B = '<tool_call>\n{"name": "weekday", "arguments": {"date": "2026-12-07", "lang": {"zh": true}}}\n</tool_call>'


def _stream(text: str, pieces: list[int], **kwargs):
    """Feed ``text`` split at ``pieces`` and rebuild the message from the deltas alone, as a client would."""
    parser = ToolStreamParser(**kwargs)
    reasoning, content, calls = [], [], {}
    cuts = [0] + sorted(pieces) + [len(text)]
    deltas = [parser.push(text[a:b]) for a, b in zip(cuts, cuts[1:])] + [parser.finish()]
    for d in deltas:
        reasoning.append(d.reasoning)
        content.append(d.content)
        for tc in d.tool_calls:
            entry = tc.openai()
            slot = calls.setdefault(entry["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in entry:
                assert slot["id"] is None, "a call's id and name come once, in its first delta"
                slot["id"], slot["name"] = entry["id"], entry["function"]["name"]
                assert entry["type"] == "function"
            else:
                assert slot["id"] is not None, "argument chunks come after the call's first delta"
            slot["arguments"] += entry["function"]["arguments"]
    return "".join(reasoning), "".join(content), [calls[i] for i in sorted(calls)], parser.result()


CASES = [
    # (output, parse_tools, starts_in_reasoning, reasoning, content, [(name, arguments)])
    ("你好！", True, False, None, "你好！", []),
    ("<think>\n先算一下。\n</think>\n\n答案是 56088。", True, False, "\n先算一下。\n", "答案是 56088。", []),
    ("先想。\n</think>\n\n好的", True, True, "先想。\n", "好的", []),
    ("<think>\n想到一半", True, False, "\n想到一半", None, []),  # cut short: all reasoning
    ("我来算。\n" + CALL_A, True, False, None, "我来算。\n", [("calculator", {"expression": "123 * 456"})]),
    (CALL_A + "\n" + CALL_B + "\n", True, False, None, None,
     [("calculator", {"expression": "123 * 456"}), ("weekday", {"date": "2026-12-07", "lang": {"zh": True}})]),
    ("<think>\n要调用工具\n</think>\n\n" + CALL_A, True, False, "\n要调用工具\n", None,
     [("calculator", {"expression": "123 * 456"})]),
    (CALL_A, False, False, None, CALL_A, []),  # tool_choice none / no tools: the text stays text
    ("a <think> b", True, False, None, "a <think> b", []),  # <think> not at the start is text
]


@pytest.mark.parametrize("text,tools,in_reasoning,reasoning,content,calls", CASES)
def test_whole_and_every_split_agree(text, tools, in_reasoning, reasoning, content, calls):
    whole = parse_output(text, parse_tools=tools, starts_in_reasoning=in_reasoning)
    assert whole.reasoning == reasoning
    assert whole.content == content
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == calls
    assert not whole.errors
    rng = random.Random(0)
    splits = [list(range(1, len(text)))]  # one character at a time
    splits += [rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6))) for _ in range(20)]
    for pieces in splits:
        r, c, streamed, result = _stream(text, pieces, parse_tools=tools, starts_in_reasoning=in_reasoning)
        assert r == (reasoning or "") and c == (content or "")
        assert [(s["name"], json.loads(s["arguments"])) for s in streamed] == calls
        # the streamed arguments are exactly the message's arguments string, and the ids agree
        assert [(s["id"], s["arguments"]) for s in streamed] == [(t.id, t.arguments) for t in result.tool_calls]
        assert all(s["arguments"] == s["arguments"].strip() for s in streamed)


def test_arguments_stream_before_the_call_closes():
    parser = ToolStreamParser()
    first = parser.push('<tool_call>\n{"name": "calculator", "arguments": {"expression": "12')
    assert [tc.openai() for tc in first.tool_calls][0]["function"] == {"name": "calculator", "arguments": ""}
    assert first.tool_calls[1].arguments == '{"expression": "12'
    more = parser.push('3"}}\n</tool')
    assert "".join(tc.arguments for tc in more.tool_calls) == '3"'  # the closing braces wait for the end
    end = parser.push('_call>')
    assert "".join(tc.arguments for tc in end.tool_calls) == "}"


def test_malformed_calls_are_reported_not_returned_and_indices_stay_dense():
    text = '<tool_call>\n{"name": "calculator", "arguments": {"expression": \n</tool_call>\n' + CALL_B
    out = parse_output(text)
    assert [c.name for c in out.tool_calls] == ["weekday"]
    assert len(out.errors) == 1 and "not valid JSON" in out.errors[0]
    _, _, streamed, _ = _stream(text, list(range(1, len(text))))
    # streamed, the broken call's head went out before it broke; the good call follows under the next index
    assert [s["name"] for s in streamed] == ["calculator", "weekday"]
    assert json.loads(streamed[1]["arguments"]) == {"date": "2026-12-07", "lang": {"zh": True}}
    _, _, whole, _ = _stream(text, [])
    assert [s["name"] for s in whole] == ["weekday"]  # sent in one piece, it never shows the broken one
    assert parse_output('<tool_call>\n["calculator"]\n</tool_call>').errors
    assert parse_output('<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>').errors


def test_other_key_order_and_string_arguments_still_give_a_json_object():
    out = parse_output('<tool_call>\n{"arguments": {"x": 1}, "name": "f"}\n</tool_call>')
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [("f", {"x": 1})]
    out = parse_output('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 2}"}\n</tool_call>')
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [("f", {"x": 2})]


def test_parallel_tool_calls_false_keeps_the_first_call():
    out = parse_output(CALL_A + "\n" + CALL_B, max_calls=1)
    assert [c.name for c in out.tool_calls] == ["calculator"]
    _, _, streamed, _ = _stream(CALL_A + "\n" + CALL_B, list(range(1, 200, 7)), max_calls=1)
    assert [s["name"] for s in streamed] == ["calculator"]


def test_call_ids_are_openai_shaped_and_unique():
    out = parse_output(CALL_A + CALL_A)
    ids = [c.id for c in out.tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") and len(i) == 29 for i in ids)


def test_stream_decoder_keeps_the_marker_tokens(tokenizer_dir):
    """The markers are special tokens; generated text drops special tokens, except these (the parser needs them)."""
    from xiaolm.infer.generate import StreamDecoder
    from xiaolm.infer.toolstream import marker_ids
    from xiaolm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    text = "<think>\n想\n</think>\n\n好<tool_call>\n{}\n</tool_call>"
    ids = tokenizer.encode(text) + [tokenizer.im_start_id]  # a stray special token is still dropped
    keep = marker_ids(tokenizer)
    assert len(keep) == 4 and set(keep) <= set(ids)
    kept, plain = StreamDecoder(tokenizer, keep_ids=keep), StreamDecoder(tokenizer)
    assert "".join(kept.push(i) for i in ids) + kept.finish() == text
    assert "".join(plain.push(i) for i in ids) + plain.finish() == "\n想\n\n\n好\n{}\n"
    parsed = parse_output(text)
    assert parsed.reasoning == "\n想\n" and parsed.content == "好" and parsed.errors


def _plan(**kw):
    from xiaolm.serve.tools import ToolPlan

    tools = [{"type": "function", "function": {"name": n, "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
        for n in ("calculator", "other")]
    return ToolPlan(**{"tools": tools, "choice": "auto", **kw})


def test_server_choice_shapes_reasoning_content_and_tool_calls():
    """What the chat endpoint sends for one choice, whole and streamed (vLLM's reasoning_content, OpenAI's calls)."""
    from xiaolm.serve.tools import ChoiceOutput, chat_choice

    text = "<think>\n先算\n</think>\n\n" + CALL_A + "\n" + CALL_A.replace("123 * 456", "1+1")
    choice = chat_choice(0, text, "stop", _plan(), None)
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and "tool_call_errors" not in choice
    assert message["reasoning_content"] == "\n先算\n" and message["content"] is None
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [
        {"expression": "123 * 456"}, {"expression": "1+1"}]
    streamed = ChoiceOutput(_plan())
    deltas = [streamed.push(ch) for ch in text] + [streamed.finish()]
    deltas = [d for d in deltas if d]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "\n先算\n"
    assert not any("content" in d for d in deltas)
    heads = [tc for d in deltas for tc in d.get("tool_calls", []) if "id" in tc]
    assert [(h["index"], h["function"]["name"]) for h in heads] == [(0, "calculator"), (1, "calculator")]
    # parallel_tool_calls false keeps the first call; tool_choice none leaves the text as text
    assert len(chat_choice(0, text, "stop", _plan(parallel=False), None)["message"]["tool_calls"]) == 1
    none = chat_choice(0, text, "stop", _plan(choice="none"), None)
    assert none["finish_reason"] == "stop" and "tool_calls" not in none["message"]
    assert none["message"]["content"].startswith("<tool_call>")
    # a cut-short answer keeps finish_reason length; a call of an unknown function or against the schema is reported
    bad = '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call><tool_call>\n' \
          '{"name": "other", "arguments": {"expression": 3}}\n</tool_call>'
    reported = chat_choice(0, bad, "length", _plan(), None)
    assert reported["finish_reason"] == "length"
    assert reported["tool_call_errors"] == ["nope: no such function", "other: expression: 3 is not of type 'string'"]


def test_the_cheap_length_bound_never_overcounts_the_rendered_prompt():
    """The server refuses a prompt untokenised when its characters alone prove it too long: the count it uses must
    be at most the rendered prompt's (earlier turns' thinking is not rendered; calls are rendered compactly)."""
    from xiaolm.serve.tools import request_chars
    from xiaolm.tokenizer.chat import render_conversation

    plan = _plan()
    call = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": {"expression": "1+1"}}}
    messages = [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "", "reasoning_content": "想" * 500, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"},
        {"role": "assistant", "content": "<think>\n" + "想" * 300 + "\n</think>\n\n是2。"},
        {"role": "user", "content": "再来"},
    ]
    rendered = render_conversation(messages, tools=plan.tools, add_generation_prompt=True)
    assert "想" not in rendered  # earlier turns' thinking is left out
    assert 0 < request_chars(messages, plan) <= len(rendered)
