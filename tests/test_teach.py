"""``xiaolm data teach`` end to end against ``xiaolm serve`` on 127.0.0.1: answers, translations, retries on a
server that fails some requests, the resumable cache, and token / cost accounting."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from xiaolm.cli import main  # noqa: E402
from serve_harness import BackgroundServer  # noqa: E402
from xiaolm.serve.app import create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Flaky:
    """ASGI wrapper: chat requests listed in ``fail`` (1-based request numbers) get 503 or 429 instead of an answer;
    ``always`` fails every request whose body contains that text with 500. Counts what reached it."""

    def __init__(self, app, fail: set[int] = frozenset(), always: str | None = None):
        self.app, self.fail, self.always = app, set(fail), always
        self.calls = 0
        self.answered = 0
        self.lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            return await self.app(scope, receive, send)
        with self.lock:
            self.calls += 1
            n = self.calls
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        status = None
        if n in self.fail:
            status = 429 if n % 2 else 503
        elif self.always and self.always.encode() in body:
            status = 500
        if status is not None:
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"0")]})
            await send({"type": "http.response.body", "body": b'{"error": {"message": "injected"}}'})
            return
        with self.lock:
            self.answered += 1
        sent = [False]

        async def replay():
            if sent[0]:
                return await receive()
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


@pytest.fixture(scope="module")
def model(tiny_run):
    from xiaolm.model.io import load_model

    return load_model(tiny_run, device="cpu")[:2]


def _serve(model, **flaky):
    m, tok = model
    app = Flaky(create_app(model=m, tokenizer=tok, model_name="teacher", max_batch=8), **flaky)
    return app, BackgroundServer(app)


def _alpaca(path: Path, n: int) -> Path:
    rows = [{"instruction": f"请用一句话介绍第{i}种水果。", "input": "" if i % 2 else "要简短。", "output": "苹果。"}
            for i in range(n)]
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def _teach(args: list[str]) -> int:
    return main(["data", "teach", *args])


COMMON = ["--model", "teacher", "--max-tokens", "8", "--temperature", "1.0", "--backoff", "0.01",
          "--price-input", "0.5", "--price-output", "2.0"]


def test_answers_through_a_flaky_server_with_retries_cache_and_cost(model, tmp_path):
    records = _alpaca(tmp_path / "alpaca.json", 12)
    out = tmp_path / "teach"
    app, server = _serve(model, fail={2, 3, 5, 8})
    with server:
        assert _teach([str(records), "--endpoint", server.url + "/v1", "--out", str(out), "--concurrency", "4",
                       *COMMON]) == 0
        answered_first = app.answered
        report = json.loads((out / "report.json").read_text())
        assert report["answered"] == 12 and report["failed_requests"] == 0
        assert report["http"]["retries"] == 4 and report["http"]["status_counts"]["429"] + \
            report["http"]["status_counts"]["503"] == 4
        assert answered_first == 12
        t = report["tokens"]
        assert t["completion"] > 0 and t["prompt"] > 0
        assert report["cost"] == pytest.approx((t["prompt"] * 0.5 + t["completion"] * 2.0) / 1e6, abs=1e-6)
        samples = [json.loads(x) for x in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
        source = json.loads(records.read_text(encoding="utf-8"))
        # Input order, the source record kept whole; an empty answer (a tiny teacher may end at once) is counted.
        assert report["samples"] + report["empty_answers"] == 12 and report["samples"] >= 6
        assert [s["source"] for s in samples] == [r for r in source if r in [s["source"] for s in samples]]
        first = samples[0]
        question = first["source"]["instruction"] + ("\n\n" + first["source"]["input"] if first["source"]["input"] else "")
        assert first["messages"][0] == {"role": "user", "content": question}
        assert samples[0]["messages"][1]["role"] == "assistant" and samples[0]["teacher"]["model"] == "teacher"
        # A rerun pays nothing: every answer comes from the cache, the server sees no request.
        assert _teach([str(records), "--endpoint", server.url + "/v1", "--out", str(out), *COMMON]) == 0
        again = json.loads((out / "report.json").read_text())
        assert app.answered == answered_first and again["cached"] == 12 and again["to_send"] == 0
        assert again["cost"] == 0 and again["cost_saved_by_cache"] == pytest.approx(report["cost"], abs=1e-6)
        assert (out / "train.jsonl").read_text(encoding="utf-8").splitlines() == \
            [json.dumps(s, ensure_ascii=False) for s in samples]
    # The output is SFT data as it is.
    from xiaolm.data.formats import load_conversations

    convs, _ = load_conversations([out / "train.jsonl"])
    assert len(convs) == report["samples"] and convs[0].meta["source"] == samples[0]["source"]


def test_failed_requests_are_reported_and_a_rerun_sends_only_those(model, tmp_path, capsys):
    records = _alpaca(tmp_path / "alpaca.json", 6)
    out = tmp_path / "teach"
    app, server = _serve(model, always="第3种")
    with server:
        code = _teach([str(records), "--endpoint", server.url + "/v1", "--out", str(out), "--max-retries", "2",
                       *COMMON])
        assert code == 1 and "1 requests failed" in capsys.readouterr().err
        report = json.loads((out / "report.json").read_text())
        assert report["samples"] + report["empty_answers"] == 5 and report["failed_requests"] == 1 and report["http"]["retries"] == 2
        assert len(report["failed_records"]) == 1
        assert "HTTP 500" in report["failures"][0]
        app.always = None  # the server recovers
        before = app.answered
        assert _teach([str(records), "--endpoint", server.url + "/v1", "--out", str(out), *COMMON]) == 0
        assert app.answered - before == 1  # only the missing answer was asked for
        final = json.loads((out / "report.json").read_text())
        assert final["samples"] + final["empty_answers"] == 6 and final["failed_requests"] == 0


def test_translate_tinystories_records_keeps_the_source(model, tmp_path):
    # Short texts: the test teacher has a 128-token context.
    recs = [{"story": f"Tom ran {i}.", "instruction": {"prompt:": "A story.",
                                                                         "words": ["ball"], "features": []},
             "summary": "A ball.", "source": "GPT-4"} for i in range(3)]
    path = tmp_path / "data00.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    out = tmp_path / "zh"
    app, server = _serve(model)
    with server:
        assert _teach([str(path), "--task", "translate", "--endpoint", server.url + "/v1", "--out", str(out),
                       "--system", "", *COMMON]) == 0
    assert app.answered == 6  # a story and an instruction per record
    samples = [json.loads(x) for x in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [s["source"] for s in samples] == [r for r in recs if r in [s["source"] for s in samples]]
    assert samples and all("story_zh" in s and s["messages"][1]["content"] == s["story_zh"] for s in samples)


def test_a_record_without_the_templates_field_is_named(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "x"}\n', encoding="utf-8")
    assert _teach([str(path), "--out", str(tmp_path / "o"), "--endpoint", "http://127.0.0.1:9/v1"]) == 2
    assert f"{path}:1: the template needs field 'instruction'" in capsys.readouterr().err


def test_against_a_real_xiaolm_serve_process(tiny_run, tmp_path):
    """The `xiaolm serve` command itself, started on 127.0.0.1; one unreachable moment is retried."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    records = _alpaca(tmp_path / "alpaca.json", 3)
    out = tmp_path / "teach"
    proc = subprocess.Popen([sys.executable, "-m", "xiaolm", "serve", str(tiny_run), "--port", str(port),
                             "--model-name", "teacher", "--log-level", "warning"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Started at once: the first requests hit a port nobody listens on yet and are retried with backoff.
        assert _teach([str(records), "--endpoint", f"http://127.0.0.1:{port}/v1", "--out", str(out),
                       "--max-retries", "12", "--model", "teacher", "--max-tokens", "8", "--backoff", "0.5"]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["answered"] == 3 and report["tokens"]["completion"] > 0
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)


def test_reason_task_stores_reasoning_and_answer(tmp_path):
    """A fake reasoning teacher: some answers carry ``reasoning_content`` (DeepSeek-R1's API), some spell a think
    block in the content, some have no reasoning at all (counted, not kept)."""
    from fastapi import FastAPI

    app = FastAPI()
    seen = []

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        question = body["messages"][-1]["content"]
        seen.append(body["messages"][0]["content"])
        n = int(question.split("第")[1].split("种")[0])
        if n % 3 == 0:
            message = {"role": "assistant", "content": f"答案{n}。", "reasoning_content": f"想一想第{n}个。"}
        elif n % 3 == 1:
            message = {"role": "assistant", "content": f"<think>\n推理{n}\n</think>\n\n答案{n}。"}
        else:
            message = {"role": "assistant", "content": f"直接答{n}。"}
        return {"choices": [{"message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 7}}

    records = _alpaca(tmp_path / "alpaca.json", 6)
    out = tmp_path / "reason"
    with BackgroundServer(app) as server:
        assert _teach([str(records), "--task", "reason", "--endpoint", server.url + "/v1", "--out", str(out),
                       "--model", "r1", "--backoff", "0.01"]) == 0
    assert all("<think>" in s for s in seen)  # the prompt asks for the think block
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 4 and report["without_reasoning"] == 2
    samples = [json.loads(x) for x in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    by_n = {int(s["source"]["instruction"].split("第")[1].split("种")[0]): s["messages"][1] for s in samples}
    assert by_n[0] == {"role": "assistant", "reasoning_content": "想一想第0个。", "content": "答案0。"}
    assert by_n[1] == {"role": "assistant", "reasoning_content": "推理1", "content": "答案1。"}
    assert set(by_n) == {0, 1, 3, 4}
    from xiaolm.data.formats import load_conversations
    from xiaolm.tokenizer.chat import render_conversation

    convs, _ = load_conversations([out / "train.jsonl"])
    assert render_conversation(convs[0].messages).endswith("<think>\n想一想第0个。\n</think>\n\n答案0。<|im_end|>\n")
