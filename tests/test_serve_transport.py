"""Issue 26: what the server does with the bytes of a request. A body in the charset its Content-Type names
(defect 6), API keys no client could send (defect 8), half-sent requests and oversized bodies (defect 10)."""
from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from xiaolm.serve.app import create_app  # noqa: E402

MODEL = "tiny"
TEXT = "一丌丐专丕业"  # its GBK bytes are valid UTF-8 too: decoded as UTF-8 they read "һآؤרاҵ"


@pytest.fixture(scope="module")
def client(loaded):
    model, tokenizer = loaded
    with TestClient(create_app(model=model, tokenizer=tokenizer, model_name=MODEL, max_batch=2)) as c:
        yield c


def _echo(client, charset, body_text=None, encoding=None):
    body = body_text or '{"model": "%s", "prompt": "%s", "echo": true, "max_tokens": 0}' % (MODEL, TEXT)
    ctype = "application/json" + (f"; charset={charset}" if charset else "")
    return client.post("/v1/completions", content=body.encode(encoding or charset or "utf-8"),
                       headers={"Content-Type": ctype})


def test_gbk_bytes_that_are_also_valid_utf8_are_read_as_the_declared_gbk(client):
    raw = TEXT.encode("gbk")
    assert raw.decode("utf-8") != TEXT  # the trap: valid UTF-8, different text
    r = _echo(client, "gbk")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == TEXT


@pytest.mark.parametrize("charset", ["GB18030", "utf-16", '"utf-8"', "UTF-16LE"])
def test_other_declared_charsets_decode_too(client, charset):
    r = _echo(client, charset, encoding=charset.strip('"'))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == TEXT


def test_an_unknown_charset_is_415_and_bytes_wrong_for_the_charset_are_400(client):
    for charset in ("x-klingon", "rot13", "base64"):
        r = _echo(client, charset, encoding="utf-8")
        assert r.status_code == 415 and charset in r.json()["error"]["message"], r.text
    r = client.post("/v1/completions", content=b'{"model": "tiny", "prompt": "\xff\xfe\xfd"}',
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 400 and "utf-8" in r.json()["error"]["message"], r.text


def test_without_a_charset_json_keeps_utf8(client):
    r = _echo(client, None)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == TEXT


# ------------------------------------------------------------------------------- defect 8: the API key


@pytest.mark.parametrize("key,says", [("密钥", "U+5BC6"), ("   ", "whitespace"), ("\t", "whitespace"),
                                      (" key", "whitespace"), ("ke\x01y", "U+0001"), ("clé", "U+00E9")])
def test_serve_refuses_an_api_key_no_client_could_send_at_start(tmp_path, capsys, monkeypatch, key, says):
    from xiaolm.cli import main

    # the run directory does not exist: the key is refused before anything is loaded
    assert main(["serve", str(tmp_path / "no-run"), "--api-key", key]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xiaolm: error: --api-key") and says in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("XIAOLM_API_KEY", key)
    assert main(["serve", str(tmp_path / "no-run")]) == 2
    assert "$XIAOLM_API_KEY" in capsys.readouterr().err


def test_create_app_refuses_such_a_key_too(loaded):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match="api_key"):
        create_app(model=model, tokenizer=tokenizer, api_key="密钥")
    create_app(model=model, tokenizer=tokenizer, api_key="sk-a b~!").state.engine.close()  # visible ASCII is fine


# ------------------------------------------------------------- defect 10: oversized bodies, half-sent requests


@pytest.fixture(scope="module")
def live(loaded):
    from serve_harness import BackgroundServer

    model, tokenizer = loaded
    app = create_app(model=model, tokenizer=tokenizer, model_name=MODEL, max_batch=2, max_body_mb=0.25)
    with BackgroundServer(app, read_timeout=1.0) as server:
        yield server


BIG = b'{"model": "tiny", "prompt": "' + b"x" * 8_000_000 + b'"}'  # far past the socket buffers of loopback


def test_a_client_that_writes_the_whole_body_first_reads_the_413_urllib(live):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(live.url + "/v1/completions", data=BIG,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 413
    assert b"--max-body-mb" in caught.value.read()


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_client_that_writes_the_whole_body_first_reads_the_413_httpx(live, declared):
    import httpx

    content = BIG if declared else iter([BIG[i:i + 65536] for i in range(0, len(BIG), 65536)])
    r = httpx.post(live.url + "/v1/completions", content=content, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]["message"]


def _half_sent(url: str, data: bytes, bound: float):
    """Send ``data`` and nothing more; what comes back within ``bound`` seconds (b"" once closed), and when."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=bound) as sock:
        started = time.monotonic()
        if data:
            sock.sendall(data)
        got = b""
        while True:
            chunk = sock.recv(65536)  # raises socket.timeout past the bound: the server never closed
            if not chunk:
                return got, time.monotonic() - started
            got += chunk


@pytest.mark.parametrize("data", [
    b"", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl",
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    b'{"model": "tiny", ',
], ids=["nothing", "half-the-headers", "half-the-body"])
def test_a_half_sent_request_gets_408_and_is_closed_within_the_read_timeout(live, data):
    got, seconds = _half_sent(live.url, data, bound=10.0)
    assert 0.9 < seconds < 5.0, seconds  # read_timeout=1.0 in this fixture
    assert got.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in got, got[:200]


def test_a_slow_but_whole_request_and_a_kept_alive_connection_are_not_cut(live):
    import httpx

    with httpx.Client(base_url=live.url, timeout=30) as http:
        for _ in range(2):  # the same connection, idle in between for longer than the read timeout
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "从前", "max_tokens": 2})
            assert r.status_code == 200, r.text
            time.sleep(1.5)
        assert http.get("/health").status_code == 200


@pytest.mark.parametrize("flag,value", [("--read-timeout", "nan"), ("--read-timeout", "0"), ("--max-body-mb", "inf"),
                                        ("--request-timeout", "nan")])
def test_serve_refuses_non_finite_limits_in_one_line(tmp_path, capsys, flag, value):
    from xiaolm.cli import main

    assert main(["serve", str(tmp_path / "no-run"), flag, value]) == 2
    err = capsys.readouterr().err
    # refused while the options are read (config: every float option refuses NaN and infinity) or by serve's own
    # check (--read-timeout 0): either way one line that names the flag
    assert err.startswith("xiaolm: error: ") and flag in err.splitlines()[0], err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
