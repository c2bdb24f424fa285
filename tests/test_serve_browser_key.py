"""The chat page against a server started with an API key: it asks for the key once and keeps it in the tab.

Headless Chromium through Playwright, as in test_serve_browser.py; skips where Debian's chromium is absent.
"""
from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium fonts-noto-cjk)")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "sk-page-test"


def test_page_asks_for_the_api_key_once_and_keeps_it_in_the_tab(tiny_run, tmp_path):
    pytest.importorskip("fastapi")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is needed for the browser test: pip install playwright")
    from serve_harness import BackgroundServer
    from xiaolm.serve.app import create_app
    from xiaolm.serve.guard import LOOPBACK_HOSTS
    from xiaolm.model.io import load_model

    model, tokenizer, _info = load_model(tiny_run, device="cpu")
    app = create_app(model=model, tokenizer=tokenizer, model_name="tiny", api_key=KEY,
                     allowed_hosts=list(LOOPBACK_HOSTS))
    prompts: list[str] = []
    auth: list[str] = []
    with BackgroundServer(app) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)

            def on_dialog(dialog):
                prompts.append(dialog.message)
                dialog.accept(KEY)

            page.on("dialog", on_dialog)
            page.on("request", lambda r: auth.append(r.headers.get("authorization", ""))
                    if "/v1/chat/completions" in r.url else None)
            page.goto(server.url + "/")
            page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny'")
            assert len(prompts) == 1 and "API key" in prompts[0]
            page.reload()  # same tab: the key is remembered
            page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny'")
            page.fill("#max-tokens", "8")
            page.fill("#input", "你好")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-state=done]")
            assert len(prompts) == 1, prompts
            assert auth and all(a == f"Bearer {KEY}" for a in auth), auth
            assert "HTTP 401" not in page.text_content("#messages")
        finally:
            browser.close()
