"""``xiaolm eval judge``: strict parsing, retry once then unparsed, retries with backoff, the cache (a rerun sends
nothing), exact statistics, the report; against a local fake judge (well-formed grades, garbage, 500s, stalls) and a
real ``xiaolm serve`` whose grades are meaningless."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from xiaolm.cli import main
from xiaolm.eval.judge import AGE_GROUPS, CRITERIA, REMINDER, parse_grade, reference_items, split_sentences
from xiaolm.eval.judge_openings import OPENINGS

GOOD = "评价：故事通顺，结尾完整。\n语法：8\n创造力：6\n一致性：7\n年龄组：C"


# ------------------------------------------------------------------------------------------------ parsing


def test_parse_grade_is_strict_and_never_guesses():
    assert parse_grade(GOOD) == {"assessment": "故事通顺，结尾完整。", "grammar": 8, "creativity": 6,
                                 "consistency": 7, "age_group": "C"}
    tolerant = "**评价**: 不错。\n续写接上了开头。\n\n- **语法**：8分\n创造力: 6/10\n一致性：7\n年龄组：C：6-7岁"
    assert parse_grade(tolerant)["assessment"] == "不错。\n续写接上了开头。"
    assert parse_grade(tolerant)["grammar"] == 8 and parse_grade(tolerant)["age_group"] == "C"
    for bad in ("", "语法：8\n创造力：6\n一致性：7\n年龄组：C",                      # no assessment
                GOOD.replace("语法：8", "语法：11"), GOOD.replace("语法：8", "语法：八"),
                GOOD.replace("语法：8", "语法：7或8"), GOOD.replace("年龄组：C", "年龄组：G"),
                GOOD.replace("年龄组：C", "年龄组：CD"), GOOD + "\n语法：8",           # repeated
                "好的，下面是我的评分：\n" + GOOD,                                     # a line before the format
                GOOD.replace("\n创造力：6", "")):
        assert parse_grade(bad) is None, bad


def test_reference_rows_split_after_the_first_sentence_and_the_floor_shuffles_sentences():
    items = reference_items(6, 300, seed=0)
    corpus = [i for i in items if i.row == "corpus"]
    floor = [i for i in items if i.row == "shuffled"]
    assert len(corpus) == len(floor) >= 5
    for c, f in zip(corpus, floor):
        assert c.opening == f.opening and len(c.completion) <= 300
        assert sorted(split_sentences(c.completion)) == sorted(split_sentences(f.completion))
        assert c.completion != f.completion
    assert split_sentences("他说：“好的。”然后走了。最后") == ["他说：“好的。”", "然后走了。", "最后"]


def test_openings_are_held_out_from_the_built_in_corpus(stories_file):
    """Sixty openings, and none shares ten characters in a row with 1,500 synthesised stories or the templates
    (measured on 3,000: none shares even eight)."""
    from pathlib import Path

    import xiaolm.data.synth as synth

    assert len(OPENINGS) >= 50 and len(set(OPENINGS)) == len(OPENINGS)
    n = 10
    seen: set[str] = set()
    for line in stories_file.read_text(encoding="utf-8").splitlines():
        t = "".join(json.loads(line)["story_zh"].split())
        seen.update(t[j:j + n] for j in range(len(t) - n + 1))
    assets = "".join(p.read_text(encoding="utf-8") for p in (Path(synth.__file__).parents[1] / "synth_assets").iterdir())
    for o in OPENINGS:
        grams = [o[j:j + n] for j in range(len(o) - n + 1)]
        assert not [g for g in grams if g in seen or g in assets], o


# ------------------------------------------------------------------------------------------------ a fake judge

_SAMPLE = re.compile(r"\n\n(.*?)\*\*\*(.*?)\n\n请先对学生", re.S)


def fake_grade(opening: str, completion: str) -> dict:
    h = hashlib.sha256((opening + "|" + completion).encode()).digest()
    return {"grammar": h[0] % 10 + 1, "creativity": h[1] % 10 + 1, "consistency": h[2] % 10 + 1,
            "age_group": "ABCDEF"[h[3] % 6]}


class FakeJudge:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 that grades, talks nonsense, fails or stalls."""

    def __init__(self):
        self.mode, self.requests, self.stall_s = "grade", [], 1.0
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                user = body["messages"][-1]["content"]
                judge.requests.append(user)
                mode = judge.mode
                if mode == "stall":
                    time.sleep(judge.stall_s)
                if mode in ("500", "stall"):
                    self.send_response(500)
                    self.end_headers()
                    return
                opening, completion = _SAMPLE.search(user).groups()
                g = fake_grade(opening, completion)
                text = (f"评价：第{len(completion)}字。\n语法：{g['grammar']}\n创造力：{g['creativity']}\n"
                        f"一致性：{g['consistency']}\n年龄组：{g['age_group']}")
                if mode == "garbage" or (mode == "garbage_once" and not user.endswith(REMINDER)):
                    text = "这个故事写得很好，我给它打八分。"
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text},
                                                "finish_reason": "stop"}],
                                   "usage": {"prompt_tokens": 100, "completion_tokens": 20}}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeJudge()
    yield server
    server.close()


def _args(tiny_run, url, out, *extra):
    return ["eval", "judge", str(tiny_run), "--endpoint", url, "--model", "fake", "--openings", "3", "--samples",
            "2", "--references", "4", "--max-new-tokens", "24", "--out", str(out), "--backoff", "0.01",
            "--max-retries", "1", "--device", "cpu", "--concurrency", "3", *extra]


def _expected(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def test_grades_statistics_cache_and_report_against_a_fake_judge(tiny_run, fake, tmp_path, capsys):
    out = tmp_path / "judge"
    assert main(_args(tiny_run, fake.url, out)) == 0
    result = json.loads((out / "judge.json").read_text())
    graded = {}   # what the judge was shown and what it answered, by row
    refs = reference_items(4, 300, seed=0)
    ref_row = {(i.opening, i.completion): i.row for i in refs}
    for user in fake.requests:
        opening, completion = _SAMPLE.search(user).groups()
        row = ref_row.get((opening, completion), "model")
        graded.setdefault(row, []).append(fake_grade(opening, completion))
    assert len(graded["model"]) == 6 and len(graded["corpus"]) == len(graded["shuffled"]) == len(refs) // 2
    assert len(fake.requests) == 6 + len(refs)       # each story asked once: every reply parsed
    for row, grades in graded.items():
        r = result["rows"][row]
        assert (r["graded"], r["unparsed"], r["failed"]) == (len(grades), 0, 0)
        for c in CRITERIA:
            mean, low, high = _expected([g[c] for g in grades])
            got = r["criteria"][c]
            assert got["mean"] == pytest.approx(mean) and got["low"] == pytest.approx(low)
            assert got["high"] == pytest.approx(high)
        assert r["age_groups"] == {a: sum(g["age_group"] == a for g in grades) for a in AGE_GROUPS}
    model = result["rows"]["model"]
    means = sorted(sum(g[c] for c in CRITERIA) / 3 for g in graded["model"])
    assert [s["mean"] for s in model["worst"]] == pytest.approx(means[:3])
    assert [s["mean"] for s in model["best"]] == pytest.approx(means[::-1][:3])
    tokens = result["accounting"]["tokens"]
    assert (tokens["prompt"], tokens["completion"]) == (100 * len(fake.requests), 20 * len(fake.requests))
    md = (out / "judge.md").read_text()
    assert "| the model | 6 | 0 | 0 |" in md and "built-in corpus (ceiling)" in md and "## Worst stories" in md
    assert all("\ufffd" not in s["completion"] for s in model["worst"] + model["best"])
    # a rerun costs nothing: every grade comes from the cache, and the figures are the same
    sent = len(fake.requests)
    assert main(_args(tiny_run, fake.url, out)) == 0
    again = json.loads((out / "judge.json").read_text())
    assert len(fake.requests) == sent and again["accounting"]["requests"]["sent"] == 0
    assert again["rows"] == result["rows"]
    assert again["accounting"]["tokens"]["cached_prompt"] == 100 * sent and again["accounting"]["tokens"]["prompt"] == 0


def test_a_reply_that_does_not_parse_is_asked_again_once_then_counted_unparsed(tiny_run, fake, tmp_path):
    fake.mode = "garbage"
    out = tmp_path / "garbage"
    assert main(_args(tiny_run, fake.url, out, "--references", "0")) == 0
    result = json.loads((out / "judge.json").read_text())
    r = result["rows"]["model"]
    assert (r["graded"], r["unparsed"], r["failed"]) == (0, 6, 0)
    assert all(c["mean"] is None for c in r["criteria"].values()) and sum(r["age_groups"].values()) == 0
    assert len(fake.requests) == 12 and sum(u.endswith(REMINDER) for u in fake.requests) == 6
    # the second answer counts when it parses
    fake.mode, fake.requests = "garbage_once", []
    out = tmp_path / "garbage_once"
    assert main(_args(tiny_run, fake.url, out, "--references", "0")) == 0
    r = json.loads((out / "judge.json").read_text())["rows"]["model"]
    assert (r["graded"], r["unparsed"]) == (6, 0) and len(fake.requests) == 12


def test_a_failing_judge_is_retried_with_backoff_then_reported_and_a_rerun_asks_only_those(tiny_run, fake, tmp_path,
                                                                                          capsys):
    fake.mode = "500"
    out = tmp_path / "failing"
    assert main(_args(tiny_run, fake.url, out, "--references", "0")) == 1
    assert "6 stories could not be graded" in capsys.readouterr().err
    result = json.loads((out / "judge.json").read_text())
    assert len(fake.requests) == 12 and result["accounting"]["requests"]["retries"] == 6   # --max-retries 1
    assert result["rows"]["model"]["failed"] == 6
    fake.mode, fake.requests = "grade", []
    assert main(_args(tiny_run, fake.url, out, "--references", "0")) == 0
    assert len(fake.requests) == 6
    assert json.loads((out / "judge.json").read_text())["rows"]["model"]["graded"] == 6


def test_a_stalling_judge_times_out_and_is_counted_failed(tiny_run, fake, tmp_path):
    fake.mode, fake.stall_s = "stall", 1.5
    out = tmp_path / "stall"
    started = time.monotonic()
    code = main(_args(tiny_run, fake.url, out, "--references", "0", "--openings", "1", "--samples", "1",
                      "--timeout", "0.3"))
    assert code == 1 and time.monotonic() - started < 30
    result = json.loads((out / "judge.json").read_text())
    assert result["rows"]["model"]["failed"] == 1 and len(fake.requests) == 2
    assert "Timeout" in result["accounting"]["failures"][0]


def test_the_api_key_comes_from_the_environment(monkeypatch):
    from xiaolm.eval.judge import JudgeConfig, api_key_env

    monkeypatch.delenv("XIAOLM_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert api_key_env(JudgeConfig()) == "OPENAI_API_KEY"
    monkeypatch.setenv("XIAOLM_JUDGE_API_KEY", "j")
    assert api_key_env(JudgeConfig()) == "XIAOLM_JUDGE_API_KEY"


def test_judge_without_an_endpoint_is_one_clear_error(tiny_run, capsys):
    assert main(["eval", "judge", str(tiny_run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xiaolm: error: eval judge needs a judge: --endpoint") and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ a real server


@pytest.fixture(scope="module")
def judge_run(tmp_path_factory, shards_dir):
    """A tiny model with a context long enough for the grading prompt (about 700 tokens): two training steps."""
    out = tmp_path_factory.mktemp("judge_run")
    assert main(["pretrain", "--data", str(shards_dir), "--out", str(out), "--preset", "tiny", "--seq-len", "1024",
                 "--micro-batch-size", "1", "--max-steps", "2", "--eval-every", "0", "--sample-tokens", "0",
                 "--no-progress", "--no-tensorboard"]) == 0
    return out


def test_a_real_xiaolm_serve_as_the_judge(tiny_run, judge_run, tmp_path):
    """Its grades are meaningless; the mechanics are what is checked: every story is asked once or, when the reply
    does not parse, twice and counted unparsed; the report is written; a rerun sends nothing."""
    from conftest import stop_process

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "xiaolm", "serve", str(judge_run), "--host", "127.0.0.1",
                             "--port", str(port), "--model-name", "judge"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        out = tmp_path / "real"
        args = ["eval", "judge", str(tiny_run), "--endpoint", f"http://127.0.0.1:{port}/v1", "--model", "judge",
                "--openings", "2", "--samples", "1", "--references", "2", "--max-new-tokens", "16",
                "--judge-max-tokens", "24", "--out", str(out), "--device", "cpu", "--max-retries", "1"]
        assert main(args) == 0
        result = json.loads((out / "judge.json").read_text())
        cache = [json.loads(line) for line in (out / "cache.jsonl").read_text().splitlines()]
        stories = sum(r["stories"] for r in result["rows"].values())
        assert len(cache) == stories and stories >= 4
        for rec in cache:
            assert rec["asked"] == (1 if rec["grade"] is not None else 2) == len(rec["replies"])
        assert result["accounting"]["requests"]["sent"] == sum(rec["asked"] for rec in cache)
        assert sum(r["graded"] + r["unparsed"] for r in result["rows"].values()) == stories
        assert result["accounting"]["tokens"]["completion"] > 0
        assert (out / "judge.md").read_text().startswith("# Story grades")
        assert main(args) == 0
        again = json.loads((out / "judge.json").read_text())
        assert again["accounting"]["requests"]["sent"] == 0 and again["rows"] == result["rows"]
    finally:
        stop_process(proc)


def test_the_pipeline_report_shows_the_judges_table_or_says_how_to_get_it(tiny_run, fake, tmp_path):
    from types import SimpleNamespace

    from xiaolm.pipeline.evaluate import judge_stories
    from xiaolm.pipeline.report import judge_section

    (line,) = judge_section(None, "work/pretrain")
    assert "xiaolm eval judge work/pretrain --endpoint URL --model NAME" in line
    cfg = SimpleNamespace(eval=SimpleNamespace(judge_endpoint=fake.url, judge_model="fake", judge_samples=1,
                                               device="cpu"))
    judged = judge_stories(cfg, str(tiny_run), tmp_path / "judge", openings=2, references=2, max_new_tokens=16)
    json.dumps(judged)   # kept in eval.json
    text = "\n".join(judge_section(judged, "work/pretrain"))
    assert "| the model | 2 | 0 | 0 |" in text and "corpus, sentences shuffled (floor)" in text
    assert "graded by `fake`" in text and (tmp_path / "judge" / "judge.md").is_file()


def test_the_quickstart_prints_the_judges_table_or_says_how_to_get_it(tiny_run, fake, tmp_path):
    import io

    from xiaolm.quickstart import QuickstartConfig, show_judge_grades

    screen = io.StringIO()
    assert show_judge_grades(tiny_run, QuickstartConfig(), "cpu", screen) is None
    assert screen.getvalue() == ("Graded like the TinyStories paper (grammar, creativity, consistency, by a judge "
                                 f"model): xiaolm eval judge {tiny_run} --endpoint URL --model NAME\n")
    screen = io.StringIO()
    cfg = QuickstartConfig(judge_endpoint=fake.url, judge_model="fake")
    judged = show_judge_grades(tiny_run, cfg, "cpu", screen, openings=2, references=2, max_new_tokens=16,
                               out=str(tmp_path / "judge"))
    printed = screen.getvalue()
    assert "Stories graded by fake" in printed and "| the model | 2 | 0 | 0 |" in printed
    assert judged["rows"]["model"]["graded"] == 2 and len(fake.requests) == 2 + 2 * 2
