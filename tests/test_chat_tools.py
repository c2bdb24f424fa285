"""``xiaolm chat`` with thinking and tools: a user's functions become tools (schema from signature and docstring),
calls the model makes are run in the sandbox and shown with their results, the result goes back as a tool turn and
the model goes on; thinking is shown dimmed on a terminal; /think on|off switches the prompt."""
from __future__ import annotations

import io
import json
import re
from typing import Literal, Optional

import pytest

from xiaolm.infer.chat import DIM, RESET, ChatSession, run_chat
from xiaolm.infer.chat_tools import ToolBox, function_schema, load_tool_file
from xiaolm.infer.generate import SamplingConfig

USER_TOOLS = '''
from typing import Literal


def add(a: int, b: int = 0) -> int:
    """Add two integers.

    Args:
        a: the first number
        b (int): the second number
    """
    return a + b


def shout(text: str, lang: Literal["zh", "en"]) -> str:
    """Repeat the text loudly."""
    return text.upper() + "!"


def _private(x: int) -> int:
    """not a tool"""
    return x
'''


def test_schema_from_signature_and_docstring():
    def search(query: str, limit: Optional[int] = None, tags: list[str] = (), mode: Literal["a", "b"] = "a",
               strict: bool = False, weight: float = 1.0) -> str:
        """Search the notes.

        query: what to look for
        """
        return query

    schema = function_schema(search)
    assert schema == {"type": "function", "function": {"name": "search", "description": "Search the notes.",
                      "parameters": {"type": "object", "required": ["query"], "properties": {
                          "query": {"type": "string", "description": "what to look for"},
                          "limit": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
                          "mode": {"enum": ["a", "b"]}, "strict": {"type": "boolean"}, "weight": {"type": "number"}}}}}

    def untyped(x):
        """No types."""

    with pytest.raises(ValueError, match="parameter 'x': add a type annotation"):
        function_schema(untyped)

    def undocumented(x: int):
        pass

    with pytest.raises(ValueError, match="add a docstring"):
        function_schema(undocumented)


def test_a_tool_file_gives_its_public_functions(tmp_path):
    path = tmp_path / "mytools.py"
    path.write_text(USER_TOOLS, encoding="utf-8")
    tools = load_tool_file(path)
    assert sorted(tools) == ["add", "shout"]
    params = tools["add"][1]["function"]["parameters"]
    assert params["required"] == ["a"] and params["properties"]["b"]["description"] == "the second number"
    box = ToolBox(files=[str(path)])
    assert [s["function"]["name"] for s in box.schemas] == ["add", "shout"]
    assert box.run("add", '{"a": 2, "b": 40}') == "42"
    assert box.run("add", '{"a": "x"}').startswith("error:")  # the sandbox reports, never raises
    assert box.run("calculator", '{"expression": "48317*365"}') == str(48317 * 365)  # built-ins run either way
    assert box.run("nope", "{}").startswith("error: no tool named nope")
    (tmp_path / "bad.py").write_text("import nonexistent_module_xyz\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.py: cannot load it: ModuleNotFoundError"):
        load_tool_file(tmp_path / "bad.py")


class _Scripted:
    """Stands in for ``generate_samples``: each call streams the next scripted output and records the prompt."""

    def __init__(self, tokenizer, outputs):
        self.tokenizer, self.outputs, self.prompts = tokenizer, list(outputs), []

    def __call__(self, model, tokenizer, prompts, sampling, *, stream=None, prompt_ids=None, keep_ids=(), **_kw):
        from xiaolm.infer.generate import Generated, StreamDecoder

        self.prompts.append(tokenizer.decode(prompt_ids[0]))
        decoder = StreamDecoder(tokenizer, keep_ids=keep_ids)  # the real decoding of the scripted tokens
        for token in tokenizer.encode(self.outputs.pop(0)):
            delta = decoder.push(token)
            if delta:
                stream(0, delta)
        tail = decoder.finish()
        if tail:
            stream(0, tail)
        return [Generated(decoder.text(), "eos", len(decoder.ids))]


def test_chat_runs_the_call_shows_it_and_goes_on(loaded, tmp_path, monkeypatch):
    model, tokenizer = loaded
    path = tmp_path / "mytools.py"
    path.write_text(USER_TOOLS, encoding="utf-8")
    script = _Scripted(tokenizer, [
        '<think>\n要算一下\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 20, "b": 22}}\n</tool_call>',
        "<think>\n结果是42\n</think>\n\n答案是42。",
    ])
    monkeypatch.setattr("xiaolm.infer.generate.generate_samples", script)
    session = ChatSession(model, tokenizer, SamplingConfig(max_new_tokens=8), context=4096,
                          tools=ToolBox(files=[str(path)]))
    stdout, stderr = io.StringIO(), io.StringIO()
    assert run_chat(session, stdin=io.StringIO("20加22是多少？\n"), stdout=stdout, stderr=stderr,
                    interactive=False) == 0
    notes = stderr.getvalue()
    assert '[调用 add({"a": 20, "b": 22})]' in notes and "[结果 42]" in notes
    assert stdout.getvalue() == "\n要算一下\n\n结果是42\n答案是42。\n"
    roles = [m["role"] for m in session.turns]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert session.turns[2]["content"] == "42"
    assert session.turns[2]["tool_call_id"] == session.turns[1]["tool_calls"][0]["id"]
    assert session.turns[3] == {"role": "assistant", "content": "答案是42。", "reasoning_content": "\n结果是42\n"}
    # the second prompt holds the tool schemas, the call and its result, in the chat format
    second = script.prompts[1]
    assert '"name": "add"' in second and "<tool_response>\n42\n</tool_response>" in second
    assert json.loads(second.split("<tool_call>\n")[-1].split("\n</tool_call>")[0])["arguments"] == {"a": 20, "b": 22}


def test_thinking_is_dimmed_on_a_terminal_and_think_switches_the_prompt(loaded, monkeypatch):
    model, tokenizer = loaded
    script = _Scripted(tokenizer, ["<think>\n想\n</think>\n\n好。", "好。"])
    monkeypatch.setattr("xiaolm.infer.generate.generate_samples", script)
    session = ChatSession(model, tokenizer, SamplingConfig(max_new_tokens=8), context=4096, tools=ToolBox())
    stdout, stderr = io.StringIO(), io.StringIO()
    run_chat(session, stdin=io.StringIO("你好\n/think off\n你好\n"), stdout=stdout, stderr=stderr, interactive=True)
    out = stdout.getvalue()
    dimmed = re.findall(re.escape(DIM) + "(.*?)" + re.escape(RESET), out, re.S)
    assert "".join(dimmed) == "\n想\n"  # the thinking, all of it dimmed, and nothing else
    assert re.sub(re.escape(DIM) + ".*?" + re.escape(RESET), "", out, flags=re.S).count("好。") == 2
    assert "[thinking off]" in stderr.getvalue()
    assert not script.prompts[0].endswith("</think>\n\n")
    assert script.prompts[1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # enable_thinking off


def test_chat_cli_reports_a_bad_tool_file(tiny_run, tmp_path, capsys):
    from xiaolm.cli import main

    (tmp_path / "t.py").write_text("def f(x):\n    '''doc'''\n", encoding="utf-8")
    assert main(["chat", str(tiny_run), "--tools", str(tmp_path / "t.py")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xiaolm: error: --tools") and "add a type annotation" in err[0]
