"""The web chat page in headless Chromium (Playwright driving /usr/bin/chromium): a typed message
gets a streamed reply equal to the API's answer to the same conversation; a screenshot is written
to the test's temporary directory (an artifact, not part of the repository)."""

import shutil
import socket
import threading
import time

import pytest
import torch

from lmforge.inference import Engine
from lmforge.tokenizer import Tokenizer

from .helpers import tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_chat_page_streams_a_reply(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    uvicorn = pytest.importorskip("uvicorn")
    import httpx

    from lmforge.inference.server import create_app

    tok = Tokenizer.from_merges([], special_tokens=["<|endoftext|>"])
    engine = Engine(tiny_model("gqa", vocab=257, dtype=torch.float32), tokenizer=tok, max_batch=2, max_len=48)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tok, model_name="tiny"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        expect = httpx.post(url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 8}
        ).json()["choices"][0]["message"]["content"]
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "8")
            page.fill("#input", "hello")
            page.press("#input", "Enter")
            page.wait_for_function("!document.getElementById('send').disabled && "
                                   "document.querySelectorAll('.assistant').length === 1", timeout=20000)
            page.wait_for_function("!document.getElementById('send').disabled", timeout=20000)
            reply = page.inner_text(".assistant .content")
            page.screenshot(path=str(tmp_path / "chat_page.png"))
            browser.close()
        assert (tmp_path / "chat_page.png").stat().st_size > 1000
        assert reply == expect
    finally:
        server.should_exit = True
        t.join(timeout=5)
