"""Tool calls and thinking through ``xiaolm serve``: the official ``openai`` client does a whole tool round trip
(request with tools -> tool_calls -> the tool's result -> a final answer), streamed and not, against a real server
process; forced calls are valid against their schema by construction (llguidance), and without it they are checked
and what fails is reported.

The model is a tiny one pretrained for two steps: it would never call a tool by itself, so the calls here are forced
(``tool_choice`` required or named), which is exactly the path that must hold by construction. Its context is 2048
tokens because the tool schemas take room in the prompt.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from conftest import stop_process  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查城市天气",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["北京", "上海", "广州"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "两数相加",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 999}, "b": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["a", "b"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
QUESTION = [{"role": "user", "content": "北京明天天气怎么样？"}]


@pytest.fixture(scope="module")
def server(tool_run):
    """``xiaolm serve`` as a process on a free loopback port; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "xiaolm", "serve", str(tool_run), "--host", "127.0.0.1",
                             "--port", str(port), "--model-name", "tiny", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
        try:
            httpx.get(url + "/health", timeout=2)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield url
    log = stop_process(proc)
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def _check_call(call) -> dict:
    """An OpenAI tool call whose arguments are a JSON object valid against its function's schema."""
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def _round_trip_messages(message, result: str) -> list[dict]:
    """The conversation after the call: the assistant turn as the client got it, then the tool's result."""
    return QUESTION + [message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": result}]


def test_openai_client_tool_round_trip(client):
    first = client.chat.completions.create(
        model="tiny", messages=QUESTION, tools=[WEATHER, ADD], max_tokens=120, temperature=1.0, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    arguments = _check_call(call)
    result = json.dumps({"city": arguments["city"], "weather": "晴", "temp_c": 21}, ensure_ascii=False)
    final = client.chat.completions.create(
        model="tiny", messages=_round_trip_messages(choice.message, result), tools=[WEATHER, ADD],
        tool_choice="none", max_tokens=12, temperature=0.0)
    answer = final.choices[0]
    assert answer.message.tool_calls is None and isinstance(answer.message.content, str)
    assert answer.finish_reason in ("stop", "length")
    # The tool's turn reached the prompt: the second prompt holds the first plus the call and the result.
    assert final.usage.prompt_tokens > first.usage.prompt_tokens + len(result)


def test_openai_client_streamed_tool_round_trip(client):
    calls: dict[int, dict] = {}
    finish = None
    stream = client.chat.completions.create(
        model="tiny", messages=QUESTION, tools=[WEATHER, ADD], tool_choice="required", max_tokens=120,
        temperature=1.0, seed=5, stream=True, parallel_tool_calls=False)
    for chunk in stream:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id is not None:  # the first delta of a call: id, type, name (OpenAI's streaming shape)
                    assert slot["id"] is None and tc.type == "function" and tc.function.name
                    slot["id"], slot["name"] = tc.id, tc.function.name
                else:
                    assert slot["id"] is not None and tc.function.name is None
                slot["arguments"] += tc.function.arguments or ""
            assert not choice.delta.content
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    call = calls[0]
    assert call["name"] in SCHEMAS and call["id"].startswith("call_")
    arguments = json.loads(call["arguments"])
    jsonschema.validate(arguments, SCHEMAS[call["name"]])
    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]}
    text = ""
    stream = client.chat.completions.create(
        model="tiny", messages=QUESTION + [assistant, {"role": "tool", "tool_call_id": call["id"], "content": "42"}],
        tools=[WEATHER, ADD], max_tokens=12, temperature=0.0, stream=True,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    reasons = []
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reasons.append(choice.finish_reason)
    assert reasons[-1] in ("stop", "length", "tool_calls")


def test_forced_calls_are_valid_by_construction(client):
    """Many sampled rows at temperature 1.5: every one is a call whose arguments meet the schema; with
    parallel_tool_calls (OpenAI's default) the grammar lets more calls follow, each valid too."""
    response = client.chat.completions.create(
        model="tiny", messages=QUESTION, tools=[WEATHER, ADD], tool_choice="required", n=6, max_tokens=120,
        temperature=1.5, seed=11, parallel_tool_calls=False)
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        assert not (choice.model_extra or {}).get("tool_call_errors")
        assert len(choice.message.tool_calls) == 1
        _check_call(choice.message.tool_calls[0])
    response = client.chat.completions.create(
        model="tiny", messages=QUESTION, tools=[WEATHER, ADD], tool_choice="required", n=6, max_tokens=1000,
        temperature=1.5, seed=11)
    counts = []
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        assert not (choice.model_extra or {}).get("tool_call_errors")
        ids = [call.id for call in choice.message.tool_calls]
        assert len(set(ids)) == len(ids)
        for call in choice.message.tool_calls:
            _check_call(call)
        counts.append(len(ids))
    assert max(counts) > 1  # (seeded) some row went on to a second call


def test_tool_requests_that_cannot_be_honoured_are_400s(server):
    import httpx

    def post(**body):
        return httpx.post(server + "/v1/chat/completions", timeout=60,
                          json={"model": "tiny", "messages": QUESTION, "max_tokens": 4, **body})

    cases = [
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[WEATHER, WEATHER]), "tools"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools.0.function.name"),
        (dict(chat_template_kwargs={"enable_thinking": "yes"}), "chat_template_kwargs.enable_thinking"),
        (dict(messages=QUESTION + [{"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "[1, 2]"}}]}]),
         "messages.1.tool_calls.0.function.arguments"),
        (dict(tools=[WEATHER], tool_choice="required", ignore_eos=True), "ignore_eos"),
        (dict(functions=[{"name": "f"}]), "functions"),  # the deprecated form stays unsupported
    ]
    for body, param in cases:
        r = post(**body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    # tools with tool_choice auto were a 400 before; now the model may answer or call
    r = post(tools=[WEATHER], tool_choice="auto", parallel_tool_calls=False)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


def test_enable_thinking_false_renders_the_empty_think_block(server, tool_run):
    import httpx

    from xiaolm.tokenizer import load_tokenizer
    from xiaolm.tokenizer.chat import THINK_END, THINK_START

    tokenizer = load_tokenizer(tool_run / "tokenizer")
    block = tokenizer.encode(f"{THINK_START}\n\n{THINK_END}\n\n")
    assert tokenizer.token_to_id(THINK_START) in block  # the markers are tokens of this vocabulary

    def prompt_tokens(**extra):
        r = httpx.post(server + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": QUESTION, "max_tokens": 1, **extra})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    plain, off = prompt_tokens(), prompt_tokens(chat_template_kwargs={"enable_thinking": False})
    assert prompt_tokens(chat_template_kwargs={"enable_thinking": True}) == plain
    assert off - plain == len(block)


def test_without_llguidance_forced_calls_are_checked_and_reported(tokenizer_dir, monkeypatch):
    """The fallback: unconstrained generation, then every call checked; a choice is a valid call exactly when it
    reports no errors (a random model's JSON mostly fails, and says so)."""
    from fastapi.testclient import TestClient

    import xiaolm.serve.tools as serve_tools
    from xiaolm.model.llama import Llama, preset_config
    from xiaolm.serve.app import create_app
    from xiaolm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    monkeypatch.setattr(serve_tools, "have_llguidance", lambda: False)
    model = Llama(preset_config("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=2048)).eval()
    with TestClient(create_app(model=model, tokenizer=tokenizer, model_name="m")) as http:
        r = http.post("/v1/chat/completions", json={
            "model": "m", "messages": QUESTION, "tools": [ADD], "tool_choice": "required", "n": 4,
            "max_tokens": 24, "temperature": 1.0, "seed": 0})
    assert r.status_code == 200
    reported = 0
    for choice in r.json()["choices"]:
        errors = choice.get("tool_call_errors", [])
        calls = choice["message"].get("tool_calls") or []
        valid = False
        if calls:
            try:
                jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), SCHEMAS["add"])
                valid = True
            except (json.JSONDecodeError, jsonschema.ValidationError):
                pass
        assert valid == (not errors), choice
        reported += bool(errors)
    assert reported > 0  # unconstrained, the random model does not write valid calls: the errors are reported


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_both_schedulers_constrain_forced_calls(tokenizer_dir, scheduler):
    """The grammar is applied in the continuous scheduler's sampling and in the static batches' logits processor;
    an untrained model with sampled (not greedy) tokens still writes valid calls."""
    import torch
    from fastapi.testclient import TestClient

    from xiaolm.model.llama import Llama, preset_config
    from xiaolm.serve.app import create_app
    from xiaolm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = Llama(preset_config("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=2048)).eval()
    with TestClient(create_app(model=model, tokenizer=tokenizer, model_name="m", scheduler=scheduler)) as http:
        r = http.post("/v1/chat/completions", json={
            "model": "m", "messages": QUESTION, "tools": [ADD], "n": 3, "max_tokens": 60, "temperature": 1.0,
            "seed": 2, "tool_choice": {"type": "function", "function": {"name": "add"}}, "parallel_tool_calls": False})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "tool_calls" and "tool_call_errors" not in choice
        call = choice["message"]["tool_calls"][0]["function"]
        assert call["name"] == "add"
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS["add"])
