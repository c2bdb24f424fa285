"""The chat page's thinking and tool calls: the model's reasoning (``reasoning_content``) streams into a dimmed,
collapsible block, tool calls show as name + arguments, and the thinking switch sends
``chat_template_kwargs.enable_thinking``.

The model is scripted: a real tiny model runs every pass (so the engine's cache works as usual) but its logits are
replaced so that each reply is a fixed thinking block and a tool call. The page's stream parser (``stream.js``) is run
under node on the server's real stream (split into small pieces) and must rebuild the server's non-streamed message;
the page itself runs in headless Chromium (skips without it, as test_serve_browser does).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

STATIC = Path(__file__).resolve().parents[1] / "src" / "xiaolm" / "serve" / "static"
NODE = shutil.which("node")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODEL = "tiny-agent"
REASONING = "用户问日期，先查一下。"
ARGUMENTS = {"date": "2026-12-07"}
SCRIPT = (f"<think>\n{REASONING}\n</think>\n\n<tool_call>\n"
          f'{json.dumps({"name": "weekday", "arguments": ARGUMENTS}, ensure_ascii=False)}\n</tool_call>')
WEEKDAY = {"type": "function", "function": {
    "name": "weekday", "description": "某一天是星期几",
    "parameters": {"type": "object", "properties": {"date": {"type": "string"}}, "required": ["date"]}}}
QUESTION = [{"role": "user", "content": "2026年12月7日是星期几？"}]
EMPTY_THINK = "<think>\n\n</think>\n\n"


class ScriptedModel(torch.nn.Module):
    """Runs the real model, then replaces its logits so that every reply is ``script`` (token ids, ending with
    <|im_end|>); pauses ``delay`` seconds per pass so a page sees the answer arrive in pieces. ``prompts``: every
    prompt it was given (a prefill: more than one token)."""

    def __init__(self, inner, script: list[int], delay: float = 0.0):
        super().__init__()
        self.inner, self.script, self.delay, self.config = inner, script, delay, inner.config
        self.step = 0
        self.prompts: list[list[int]] = []

    @property
    def device(self):
        return self.inner.device

    def forward(self, input_ids, *args, **kwargs):
        out = self.inner(input_ids, *args, **kwargs)
        if input_ids.shape[1] > 1:  # a prefill starts a reply (one request at a time here)
            self.step = 0
            self.prompts.append(input_ids[0].tolist())
        else:
            self.step += 1
        logits = torch.full_like(out.logits, -1e4)
        logits[..., self.script[min(self.step, len(self.script) - 1)]] = 1e4
        time.sleep(self.delay)
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def agent_model(tool_run):
    """The tiny tool-serving model (conftest's ``tool_run``: 2048 positions, room for schemas) and its tokenizer."""
    from xiaolm.model.io import load_model

    model, tokenizer, _ = load_model(tool_run, device="cpu")
    model.eval()
    return model, tokenizer


def _scripted(agent_model, delay: float = 0.0) -> ScriptedModel:
    model, tokenizer = agent_model
    return ScriptedModel(model, tokenizer.encode(SCRIPT, allow_special=True) + [tokenizer.im_end_id], delay)


def _run_parser(sse: str) -> dict:
    """stream.js under node: the SSE text fed in 7-character pieces, the deltas of choice 0 folded into a reply."""
    program = f"""
const s = require({json.dumps(str(STATIC / "stream.js"))});
let raw = ""; process.stdin.on("data", (d) => raw += d); process.stdin.on("end", () => {{
  const reply = s.newReply(); let buffer = "", finish = null, events = 0;
  for (let i = 0; i < raw.length; i += 7) {{
    buffer = s.takeEvents(buffer + raw.slice(i, i + 7), (data) => {{
      events += 1;
      if (data === "[DONE]") return;
      for (const c of JSON.parse(data).choices || []) {{
        if (c.index !== 0) continue;
        s.applyDelta(reply, c.delta);
        if (c.finish_reason) finish = c.finish_reason;
      }}
    }});
  }}
  const shown = reply.toolCalls.map((c) => s.formatArguments(c.arguments));
  console.log(JSON.stringify({{reply, finish, events, shown, history: s.historyTurn(reply)}}));
}});"""
    done = subprocess.run([NODE, "-e", program], input=sse, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(NODE is None, reason="node is not installed (apt-get install -y nodejs)")
def test_the_pages_stream_parser_rebuilds_the_servers_message(agent_model):
    from xiaolm.serve.app import create_app

    model, tokenizer = agent_model
    app = create_app(model=_scripted(agent_model), tokenizer=tokenizer, model_name=MODEL, max_batch=1)
    body = {"model": MODEL, "messages": QUESTION, "tools": [WEEKDAY], "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": True}}
    with TestClient(app) as client:
        whole = client.post("/v1/chat/completions", json=body)
        assert whole.status_code == 200, whole.text
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
        assert streamed.status_code == 200, streamed.text
    (choice,) = whole.json()["choices"]
    message = choice["message"]
    # the fields the page reads are there: reasoning beside the content, the call with its JSON-string arguments
    assert message["reasoning_content"].strip() == REASONING and choice["finish_reason"] == "tool_calls"
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "weekday" and json.loads(call["function"]["arguments"]) == ARGUMENTS

    got = _run_parser(streamed.text)
    reply = got["reply"]
    assert got["events"] > 5  # a real stream: many chunks, each cut across the 7-character pieces
    assert reply["reasoning"] == message["reasoning_content"]
    assert reply["content"] == (message["content"] or "")
    assert [(c["name"], c["arguments"]) for c in reply["toolCalls"]] == [
        (call["function"]["name"], call["function"]["arguments"])]
    call_id = reply["toolCalls"][0]["id"]  # each request gets its own ids: the streamed one is kept
    assert call_id.startswith("call_") and f'"id": "{call_id}"' in streamed.text
    assert got["finish"] == "tool_calls"
    assert got["shown"] == [json.dumps(ARGUMENTS, ensure_ascii=False, separators=(",", ":"))]
    # what the page sends back as the assistant turn: the call, not the thinking
    assert got["history"] == {"role": "assistant", "content": reply["content"].strip(), "tool_calls": [
        {"id": call_id, "type": "function", "function": call["function"]}]}


def test_the_page_has_the_thinking_switch_and_loads_the_parser_first(agent_model):
    from xiaolm.serve.app import create_app

    model, tokenizer = agent_model
    with TestClient(create_app(model=model, tokenizer=tokenizer, model_name=MODEL)) as client:
        page = client.get("/").text
        app_js = client.get("/static/app.js").text
        stream_js = client.get("/static/stream.js")
    assert stream_js.status_code == 200 and "function applyDelta" in stream_js.text
    assert 'id="thinking" type="checkbox" checked' in page and 'id="tools"' in page
    assert page.index("/static/stream.js") < page.index("/static/app.js")
    assert "chat_template_kwargs: { enable_thinking: els.thinking.checked }" in app_js
    for text in (page, app_js, stream_js.text):
        assert "http://" not in text and "https://" not in text


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_the_page_streams_thinking_shows_calls_and_switches_thinking(agent_model, tmp_path):
    from playwright.sync_api import sync_playwright
    from serve_harness import BackgroundServer
    from xiaolm.serve.app import create_app

    model, tokenizer = agent_model
    scripted = _scripted(agent_model, delay=0.03)
    sent: list[dict] = []
    problems: list[str] = []

    def capture(route):
        sent.append(json.loads(route.request.post_data))
        route.continue_()

    app = create_app(model=scripted, tokenizer=tokenizer, model_name=MODEL, max_batch=1)
    with BackgroundServer(app) as server, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1180, "height": 760}, locale="zh-CN", timeout=30_000)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(30_000)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.route("**/v1/chat/completions", capture)
            page.goto(server.url + "/")
            page.wait_for_function(f"() => document.getElementById('model-name').textContent === '{MODEL}'")
            page.fill("#tools", json.dumps([WEEKDAY], ensure_ascii=False))
            assert page.is_checked("#thinking")

            # thinking on: the reasoning streams into an open block, which folds once the call begins
            page.fill("#input", QUESTION[0]["content"])
            page.keyboard.press("Enter")
            page.wait_for_function("""() => { const b = document.querySelector(
                '.msg.assistant[data-state=streaming] details.reasoning[open] .reasoning-body');
                return b && b.textContent.length > 0; }""")
            page.wait_for_selector(".msg.assistant[data-state=done]")
            assert page.text_content(".reasoning-body") == REASONING
            assert page.evaluate("document.querySelector('details.reasoning').open") is False
            assert page.text_content(".tool-call .tool-name") == "weekday"
            assert json.loads(page.text_content(".tool-call .tool-args")) == ARGUMENTS
            assert "tool_calls" in page.text_content(".msg.assistant .msg-foot")
            assert sent[0]["chat_template_kwargs"] == {"enable_thinking": True}
            assert sent[0]["tools"] == [WEEKDAY]
            assert not tokenizer.decode(scripted.prompts[-1]).endswith(EMPTY_THINK)

            # thinking off: the switch reaches the prompt (an empty think block), and the call went back as history
            page.uncheck("#thinking")
            page.fill("#input", "谢谢")
            page.keyboard.press("Enter")
            page.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-state=done]').length === 2")
            assert sent[1]["chat_template_kwargs"] == {"enable_thinking": False}
            assert tokenizer.decode(scripted.prompts[-1]).endswith(EMPTY_THINK)
            assert sent[1]["messages"][1]["tool_calls"][0]["function"]["name"] == "weekday"
            assert page.locator(".msg.error").count() == 0 and not problems, problems
            page.evaluate("document.querySelector('details.reasoning').open = true")
            artefacts = Path(os.environ.get("XIAOLM_ARTIFACTS") or tmp_path)
            artefacts.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(artefacts / "chat-page-thinking-tools.png"))
        finally:
            context.close()
