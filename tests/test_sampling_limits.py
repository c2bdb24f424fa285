"""Issue 26, defect 1: every sampling parameter has one safe range (``xiaolm.infer.limits``), which the server
(a 400 naming the parameter; Infinity and NaN too, which Python's JSON parser accepts) and the sampling verbs (one
``xiaolm: error:`` line, exit 2) both enforce, and which the README documents."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from xiaolm.infer.limits import SAMPLING_LIMITS, limits_table  # noqa: E402
from xiaolm.serve.app import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny"
CHAT = [{"role": "user", "content": "你好"}]


def test_the_readmes_carry_the_table_as_defined():
    table = limits_table()
    for readme in ("README.md", "README_zh.md"):
        assert table in (ROOT / readme).read_text(encoding="utf-8"), f"{readme}: regenerate with limits_table()"


@pytest.mark.parametrize("name,good,bad", [
    ("temperature", [0, 0.01, 2], [0.001, 2.5, -1]), ("top_p", [0, 1], [-0.1, 1.5]), ("top_k", [0, 7], [-1, 1.5]),
    ("repetition_penalty", [0.01, 1, 100], [1e-300, 0, 101]), ("frequency_penalty", [-2, 2], [-2.1, 3]),
    ("n", [1, 16], [0, 17]), ("seed", [-(2 ** 63), 2 ** 63 - 1], [2 ** 63, -(2 ** 63) - 1]),
    ("top_logprobs", [0, 20], [21, -1]), ("max_tokens", [1], [0, True]),
])
def test_each_limit_accepts_its_edges_and_refuses_beyond_them(name, good, bad):
    limit = SAMPLING_LIMITS[name]
    assert all(limit.problem(v) is None for v in good)
    assert all(limit.problem(v) for v in bad)
    assert limit.problem(float("inf")) and limit.problem(float("nan")) and limit.problem(float("-inf"))


@pytest.fixture(scope="module")
def client(loaded):
    model, tokenizer = loaded
    with TestClient(create_app(model=model, tokenizer=tokenizer, model_name=MODEL, max_batch=2)) as c:
        yield c


OUT_OF_RANGE = [("repetition_penalty", "1e-300"), ("repetition_penalty", "Infinity"), ("temperature", "NaN"),
                ("temperature", "0.001"), ("top_p", "-Infinity"), ("frequency_penalty", "Infinity"),
                ("presence_penalty", "NaN"), ("top_k", "-1"), ("n", "17"), ("max_tokens", "0"),
                ("max_completion_tokens", "0"), ("top_logprobs", "21")]


@pytest.mark.parametrize("field,raw", OUT_OF_RANGE, ids=[f"{f}={v}" for f, v in OUT_OF_RANGE])
def test_the_server_refuses_out_of_range_and_non_finite_numbers_by_name(client, field, raw):
    body = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (MODEL, field, raw)
    r = client.post("/v1/chat/completions", content=body.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["code"] == "invalid_value" and field in error["message"], error


def test_completions_apply_the_same_table(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "从前", "repetition_penalty": 1e-300})
    assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty"
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "从前", "logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "从前", "max_tokens": 2,
                                              "repetition_penalty": 100, "temperature": 0.01})
    assert r.status_code == 200, r.text  # the edges themselves generate fine


@pytest.mark.parametrize("verb", ["generate", "chat"])
@pytest.mark.parametrize("flag,value", [("--repetition-penalty", "1e-300"), ("--repetition-penalty", "inf"),
                                        ("--temperature", "nan"), ("--temperature", "1e-300"), ("--top-p", "inf"),
                                        ("--seed", str(2 ** 63))])
def test_the_sampling_verbs_refuse_the_same_values_in_one_line(tiny_run, capsys, verb, flag, value):
    from xiaolm.cli import main

    argv = [verb, str(tiny_run), flag, value] + (["--prompt", "小猫"] if verb == "generate" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("xiaolm: error:") and flag in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
