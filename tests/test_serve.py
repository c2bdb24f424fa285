"""The OpenAI-compatible server: schema, streaming, batching, errors, disconnects, and the official openai client.

The tiny pretrained run (``tiny_run``) is served; it is no chat model, but the server must work with any model, and
greedy outputs are compared with :mod:`xiaolm.infer.generate` run directly, so the HTTP layer provably changes
nothing but the transport.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from xiaolm.infer.generate import SamplingConfig, generate, generate_ids  # noqa: E402
from serve_harness import BackgroundServer  # noqa: E402
from xiaolm.serve.app import create_app  # noqa: E402
from xiaolm.serve.engine import Engine  # noqa: E402
from xiaolm.serve.request import GenerationRequest, QueueFull, SamplingParams  # noqa: E402

from conftest import stop_process  # noqa: E402

MODEL = "tiny"
CHAT = [{"role": "system", "content": "你是一个讲故事的助手。"}, {"role": "user", "content": "讲一个关于小猫的故事。"}]


@pytest.fixture(scope="module")
def client(loaded):
    model, tokenizer = loaded
    with TestClient(create_app(model=model, tokenizer=tokenizer, model_name=MODEL, max_batch=4)) as c:
        yield c


@pytest.fixture(scope="module")
def live(loaded):
    """The same model behind uvicorn on a free 127.0.0.1 port."""
    model, tokenizer = loaded
    app = create_app(model=model, tokenizer=tokenizer, model_name=MODEL, max_batch=4)
    with BackgroundServer(app) as server:
        yield server


def sse_events(lines) -> list:
    """``data:`` payloads of an SSE body, JSON-decoded except the final ``[DONE]``."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    from xiaolm.infer.generate import chat_prompt_ids as encode_chat

    return encode_chat(tokenizer, messages)


# ------------------------------------------------------------------------------------------- basic API


def test_models_health_and_page(client, loaded):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == loaded[0].config.max_position_embeddings
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    # Everything the page loads is local: no absolute URL to another host anywhere in it.
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


def test_chat_completion_equals_library_generation(client, loaded):
    model, tokenizer = loaded
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "temperature": 0,
                                                  "max_tokens": 12, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL and body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    ids = chat_prompt_ids(tokenizer, CHAT)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}
    expected = generate(model, tokenizer, [""], SamplingConfig(max_new_tokens=12, temperature=0.0),
                        prompt_ids=[ids], eos_ids=[])[0]
    assert choice["message"]["content"] == expected


def test_completion_prepends_endoftext_and_echoes(client, loaded):
    model, tokenizer = loaded
    prompt = "从前，有一个小女孩"
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 10})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    expected = generate(model, tokenizer, [prompt], SamplingConfig(max_new_tokens=10, temperature=0.0))[0]
    assert body["choices"][0]["text"] == expected
    assert body["usage"]["prompt_tokens"] == 1 + len(tokenizer.encode(prompt))  # <|endoftext|> + prompt
    echoed = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "temperature": 0,
                                                  "max_tokens": 10, "echo": True}).json()
    assert echoed["choices"][0]["text"] == prompt + expected


def test_completion_list_prompts_and_token_prompts(client, loaded):
    _model, tokenizer = loaded
    prompts = ["小猫", "有一天"]
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": prompts, "n": 2, "temperature": 0,
                                                "max_tokens": 6, "ignore_eos": True}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in body["choices"]]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: both samples of a prompt agree
    assert body["usage"]["prompt_tokens"] == sum(1 + len(tokenizer.encode(p)) for p in prompts)  # once per prompt
    assert body["usage"]["completion_tokens"] == 4 * 6
    # The same first prompt given as token ids (we add nothing to a tokenised prompt).
    ids = [tokenizer.eot_id] + tokenizer.encode(prompts[0])
    by_ids = client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "temperature": 0, "max_tokens": 6,
                                                  "ignore_eos": True}).json()
    assert by_ids["choices"][0]["text"] == texts[0]


def test_streaming_chat_matches_non_streaming(client):
    req = {"model": MODEL, "messages": CHAT, "temperature": 0, "max_tokens": 24}
    whole = client.post("/v1/chat/completions", json=req).json()
    with client.stream("POST", "/v1/chat/completions",
                       json={**req, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] and c["model"] == MODEL
               and isinstance(c["created"], int) for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert "".join(deltas) == whole["choices"][0]["message"]["content"]
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_streaming_completion_never_sends_a_broken_character(client):
    """Byte-level tokens split Han characters; a delta must never carry half of one (U+FFFD) that the final
    text does not have at that place, and the deltas must add up to the whole text."""
    req = {"model": MODEL, "prompt": "小狗和小猫是好朋友。", "temperature": 1.0, "seed": 3, "max_tokens": 60}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["text"] for e in events[:-1]]
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert "".join(deltas) == whole
    assert sum(d.count("\ufffd") for d in deltas) == whole.count("\ufffd")


def test_sse_lines_survive_clients_that_split_on_unicode_line_breaks():
    """httpx's aiter_lines (and anything using str.splitlines) also breaks lines at U+2028, U+2029 and U+0085;
    a model can emit those, so the server escapes them and a data line always arrives whole."""
    from xiaolm.serve.sse import sse_event

    text = "一\u2028二\x85三\u2029四\n五\x1c六"
    event = sse_event({"choices": [{"text": text}]})
    assert event.endswith("\n\n") and event.startswith("data: ")
    line = event[:-2]
    assert line.splitlines() == [line]
    assert json.loads(line[len("data: "):])["choices"][0]["text"] == text


def test_stop_strings_end_the_text(client):
    req = {"model": MODEL, "prompt": "从前，有一只小兔子", "temperature": 0, "max_tokens": 40, "ignore_eos": True}
    full = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    assert len(full) > 6, full
    stop = full[4:6]
    cut = full[: full.index(stop)]
    body = client.post("/v1/completions", json={**req, "stop": [stop, "不会出现的停止串"]}).json()
    assert body["choices"][0]["text"] == cut
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 40  # generation stopped early, not just the text
    with client.stream("POST", "/v1/completions", json={**req, "stop": stop, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut


def test_n_choices_and_seed_reproducibility(client):
    req = {"model": MODEL, "messages": CHAT, "n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 16}
    a = client.post("/v1/chat/completions", json=req).json()
    b = client.post("/v1/chat/completions", json=req).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in a["choices"]]
    assert texts == [c["message"]["content"] for c in b["choices"]]  # same seed, same samples
    assert len(set(texts)) > 1  # three samples, not one copied
    assert a["usage"]["completion_tokens"] <= 3 * 16


def test_default_max_tokens_is_clamped_to_the_context(client, loaded):
    model, _tokenizer = loaded
    ctx = model.config.max_position_embeddings
    body = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "temperature": 0,
                                                     "ignore_eos": True}).json()
    assert body["usage"]["total_tokens"] == ctx  # default 512 does not fit a 128-token context: clamped
    assert body["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------------------------------------- errors

BAD_REQUESTS = [
    # (endpoint, body, status, code, param)
    ("chat", b"{not json", 400, "invalid_json", None),
    ("chat", b"[1, 2]", 400, "invalid_json", None),
    ("chat", {"model": MODEL}, 400, "missing_required_parameter", "messages"),
    ("chat", {"model": MODEL, "messages": []}, 400, "invalid_value", "messages"),
    ("chat", {"messages": CHAT}, 400, "missing_required_parameter", "model"),
    ("chat", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value",
     "messages.0.role"),
    ("chat", {"model": MODEL, "messages": CHAT, "temperature": "hot"}, 400, "invalid_value", "temperature"),
    ("chat", {"model": MODEL, "messages": CHAT, "temperature": 3}, 400, "invalid_value", "temperature"),
    ("chat", {"model": MODEL, "messages": CHAT, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("chat", {"model": MODEL, "messages": CHAT, "n": 0}, 400, "invalid_value", "n"),
    ("chat", {"model": MODEL, "messages": CHAT, "stop": 7}, 400, "invalid_type", "stop"),
    ("chat", {"model": MODEL, "messages": CHAT, "max_tokens": 100000}, 400, "context_length_exceeded", "max_tokens"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "很长的话" * 400}]}, 400,
     "context_length_exceeded", "messages"),
    ("chat", {"model": "gpt-4o", "messages": CHAT}, 404, "model_not_found", "model"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "invalid_value", "messages.0.content"),
    ("completions", {"model": MODEL, "prompt": {"a": 1}}, 400, "invalid_type", "prompt"),
    ("completions", {"model": MODEL, "prompt": []}, 400, "invalid_value", "prompt"),
    ("completions", {"model": MODEL, "prompt": [5, 10 ** 7]}, 400, "invalid_value", "prompt"),
    ("completions", {"model": MODEL, "prompt": "故事" * 300}, 400, "context_length_exceeded", "prompt"),
    ("completions", {"model": "nope", "prompt": "hi"}, 404, "model_not_found", "model"),
]


@pytest.mark.parametrize("endpoint,body,status,code,param", BAD_REQUESTS,
                         ids=[f"{e}-{c}-{p}-{i}" for i, (e, _b, _s, c, p) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, endpoint, body, status, code, param):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param and error["message"]
    assert error["type"] == "invalid_request_error"
    ok = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2})
    assert ok.status_code == 200


def test_unknown_fields_are_tolerated(client):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 3,
                                                  "frequency_penalty": 0.5, "response_format": {"type": "text"},
                                                  "some_future_option": [1, 2]})
    assert r.status_code == 200


def test_unknown_route_and_full_queue_use_the_error_shape(loaded):
    model, tokenizer = loaded
    with TestClient(create_app(model=model, tokenizer=tokenizer, model_name=MODEL, max_queue=2)) as c:
        r = c.get("/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        # 3 rows can never fit a queue of 2: waiting would not help, so it is a 400, not a 429 "retry shortly"
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "n": 3, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_rows", r.text
        assert r.json()["error"]["param"] == "n"
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b", "c"], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert c.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "n": 2,
                                                    "max_tokens": 2}).status_code == 200


# ---------------------------------------------------------------------------------------------- engine


def _greedy(engine_tokenizer, prompts, limits, **params):
    return GenerationRequest(engine_tokenizer, prompts, limits, SamplingParams(temperature=0.0, **params))


def test_engine_batches_waiting_requests_and_batching_changes_nothing(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=8, autostart=False, scheduler="static")
    prompts = [[tokenizer.eot_id] + tokenizer.encode(t) for t in ("小猫", "从前有一个小女孩", "有一天，小明", "狗")]
    limits = [5, 9, 12, 7]
    requests = [engine.submit(_greedy(tokenizer, [p], [m], ignore_eos=True)) for p, m in zip(prompts, limits)]
    engine.start()
    try:
        results = [r.result(timeout=60)[0] for r in requests]
    finally:
        engine.close()
    (batch,) = engine.stats.recent_batches
    assert batch.size == 4 and batch.requests == 4  # four requests, one forward pass per step
    for seq, p, m in zip(results, prompts, limits):
        alone = generate_ids(model, [p], m, pad_id=tokenizer.pad_id, eos_ids=[], temperature=0.0)[0]
        assert seq.decoder.ids == alone and seq.tokens == m and seq.finish_reason == "length"


def test_engine_groups_by_sampling_settings_and_context(loaded):
    model, tokenizer = loaded
    ctx = model.config.max_position_embeddings
    engine = Engine(model, tokenizer, max_batch=8, autostart=False, scheduler="static")
    short = [tokenizer.eot_id] + tokenizer.encode("小猫")
    long = ([tokenizer.eot_id] + tokenizer.encode("从前，有一个小女孩叫莉莉。" * 20))[: ctx - 10]
    a = engine.submit(_greedy(tokenizer, [short], [ctx - len(short)]))  # needs the whole context
    b = engine.submit(_greedy(tokenizer, [long], [5]))  # fits alone, but not beside a's budget
    c = engine.submit(GenerationRequest(tokenizer, [short], [4], SamplingParams(temperature=0.9)))
    d = engine.submit(_greedy(tokenizer, [short], [3]))  # joins a
    engine.start()
    try:
        for r in (a, b, c, d):
            r.result(timeout=60)
    finally:
        engine.close()
    sizes = [b.size for b in engine.stats.recent_batches]
    assert sizes == [2, 1, 1]  # {a, d}, then b, then c (oldest first, compatible rows join it)


def test_engine_queue_limit_and_cancelled_rows_in_the_queue(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=1, max_queue=2, autostart=False, scheduler="static")
    prompt = [tokenizer.eot_id] + tokenizer.encode("小猫")
    keep = engine.submit(_greedy(tokenizer, [prompt], [4]))
    drop = engine.submit(_greedy(tokenizer, [prompt], [4]))
    with pytest.raises(QueueFull):
        engine.submit(_greedy(tokenizer, [prompt], [4]))
    drop.cancel()
    engine.start()
    try:
        assert keep.result(timeout=60)[0].finish_reason in ("stop", "length")
        assert drop.result(timeout=60)[0].finish_reason == "cancelled"
    finally:
        engine.close()
    assert drop.sequences[0].tokens == 0 and engine.stats.rows_cancelled == 1
    assert [b.size for b in engine.stats.recent_batches] == [1]  # the cancelled row never ran


class SlowModel(torch.nn.Module):
    """The real model with a pause before each forward pass, so a disconnect lands mid-generation."""

    def __init__(self, inner, delay: float):
        super().__init__()
        self.inner, self.delay, self.config = inner, delay, inner.config

    @property
    def device(self):
        return self.inner.device

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner(*args, **kwargs)


def test_client_disconnect_mid_stream_frees_its_slot(loaded):
    model, tokenizer = loaded
    app = create_app(model=SlowModel(model, 0.03), tokenizer=tokenizer, model_name=MODEL, max_batch=2)
    engine = app.state.engine
    budget = model.config.max_position_embeddings - len(chat_prompt_ids(tokenizer, CHAT))  # all the room left
    assert budget >= 40
    with BackgroundServer(app) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            req = {"model": MODEL, "messages": CHAT, "stream": True, "max_tokens": budget, "ignore_eos": True,
                   "temperature": 0}
            with http.stream("POST", "/v1/chat/completions", json=req) as r:
                assert r.status_code == 200
                seen = 0
                for line in r.iter_lines():
                    if line.startswith("data: ") and '"content"' in line:
                        seen += 1
                    if seen >= 4:
                        break  # leave mid-stream: closing the response drops the connection
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (engine.stats.rows_cancelled == 1
                                                        and engine.snapshot()["running_rows"] == 0):
                time.sleep(0.05)
            assert engine.stats.rows_cancelled == 1, engine.snapshot()
            row = engine.stats.recent_rows[-1]
            assert row["finish_reason"] == "cancelled"
            assert row["tokens"] < budget // 2, row  # it stopped soon after the client left, not at the budget
            assert engine.snapshot()["running_rows"] == 0
            # The slot is free: the next request is served at once and in full.
            after = http.post("/v1/chat/completions", json={**req, "stream": False, "max_tokens": 3}).json()
            assert after["usage"]["completion_tokens"] == 3


# ---------------------------------------------------------------------------------- the openai client


@pytest.fixture(scope="module")
def openai_client(live):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=live.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)


def test_openai_client_chat_stream_completions_models_and_n(openai_client, loaded):
    import openai

    models = openai_client.models.list()
    assert [m.id for m in models.data] == [MODEL]

    chat = openai_client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=16)
    text = chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 16
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    stream = openai_client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=16,
                                                   stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text and finish == chat.choices[0].finish_reason
    assert usage.completion_tokens == chat.usage.completion_tokens

    many = openai_client.chat.completions.create(model=MODEL, messages=CHAT, n=3, temperature=1.0, seed=5,
                                                 max_tokens=8)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]

    comp = openai_client.completions.create(model=MODEL, prompt=["小猫", "小狗"], temperature=0, max_tokens=8)
    assert len(comp.choices) == 2 and all(c.text for c in comp.choices)
    streamed = "".join(c.choices[0].text for c in openai_client.completions.create(
        model=MODEL, prompt="小猫", temperature=0, max_tokens=8, stream=True) if c.choices)
    assert streamed == comp.choices[0].text

    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="gpt-4o", messages=CHAT)
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10 ** 6)
    assert info.value.code == "context_length_exceeded"


def test_concurrent_streams_over_loopback(live):
    """Several clients at once: every stream completes, and the engine batched some of them together."""
    import asyncio

    async def one(http, i):
        req = {"model": MODEL, "messages": [{"role": "user", "content": f"第{i}个问题"}], "stream": True,
               "max_tokens": 20, "ignore_eos": True, "temperature": 0.8, "top_p": 0.9}
        async with http.stream("POST", "/v1/chat/completions", json=req) as r:
            lines = [line async for line in r.aiter_lines()]
        events = sse_events(lines)
        assert r.status_code == 200 and events[-1] == "[DONE]"
        return sum(1 for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"] == "length")

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
            return await asyncio.gather(*(one(http, i) for i in range(6)))

    assert asyncio.run(main()) == [1] * 6
    engine_batches = httpx.get(live.url + "/health").json()["batches"]
    assert engine_batches >= 1


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_serve_starts_and_answers(tiny_run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "xiaolm", "serve", str(tiny_run), "--host", "127.0.0.1",
                             "--port", str(port), "--model-name", "cli-model", "--log-level", "info"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health is not None and health["model"] == "cli-model", proc.poll()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                       json={"model": "cli-model", "prompt": "小猫", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
    finally:
        log = stop_process(proc)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal (so the exit status says "terminated").
    assert proc.returncode in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log and "Traceback" not in log, log


def test_cli_serve_reports_a_missing_run(tmp_path, capsys):
    from xiaolm.cli import main

    assert main(["serve", str(tmp_path / "no-such-run")]) == 2
    assert "no-such-run" in capsys.readouterr().err
