"""Server protocol: /v1/models, completions and chat completions (plain and streamed SSE ending in
[DONE], usage, n, seed, stop, logprobs), the results equal the engine's, OpenAI-style 400s for bad
and over-long requests, 429 when the queue is full, the chat page; a live uvicorn server on
loopback with the official `openai` client and a disconnecting client that frees its slot."""

import contextlib
import json
import socket
import threading
import time

import pytest
import torch

from lmforge.inference import Engine, SamplingParams
from lmforge.inference.chat import apply_chat_template
from lmforge.inference.speculative import DraftModel, NGramDrafter
from lmforge.tokenizer import Tokenizer

from .helpers import tiny_model

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lmforge.inference.server import create_app  # noqa: E402


def _tok():
    return Tokenizer.from_merges([], special_tokens=["<|endoftext|>"])


def _engine(max_batch=4, max_len=48):
    return Engine(tiny_model("gqa", vocab=257, dtype=torch.float32), tokenizer=_tok(), max_batch=max_batch,
                  max_len=max_len)


@pytest.fixture(scope="module")
def client():
    app = create_app(_engine(), _tok(), model_name="tiny")
    with TestClient(app) as c:
        yield c


def _sse(text):
    lines = [ln[6:] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_models(client):
    d = client.get("/v1/models").json()
    assert d["object"] == "list" and d["data"][0]["id"] == "tiny"


def test_completion_matches_engine(client):
    tok = _tok()
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 8,
                                             "temperature": 0, "logprobs": 2})
    assert r.status_code == 200, r.text
    d = r.json()
    ids = [tok.eot_id] + tok.encode("hello")
    ref = _engine().generate([ids], SamplingParams(max_tokens=8, temperature=0, logprobs=2))[0][0]
    c = d["choices"][0]
    assert c["text"] == ref.text and c["finish_reason"] == ref.finish_reason
    assert d["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(ref.token_ids),
                          "total_tokens": len(ids) + len(ref.token_ids)}
    assert c["logprobs"]["token_logprobs"] == pytest.approx(ref.logprobs, abs=1e-5)
    assert all(len(t) <= 2 for t in c["logprobs"]["top_logprobs"])


def test_streamed_completion_equals_plain(client):
    body = {"prompt": "abc", "max_tokens": 10, "temperature": 0.9, "seed": 5, "n": 2}
    plain = client.post("/v1/completions", json=body).json()
    r = client.post("/v1/completions", json=dict(body, stream=True, stream_options={"include_usage": True}))
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(r.text)
    texts = ["", ""]
    for ch in chunks[:-1]:
        for c in ch["choices"]:
            texts[c["index"]] += c["text"]
    assert texts == [c["text"] for c in plain["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_chat_and_stream(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    d = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 6, "temperature": 0,
                                                  "logprobs": True, "top_logprobs": 1}).json()
    assert d["object"] == "chat.completion"
    msg = d["choices"][0]["message"]
    assert msg["role"] == "assistant"
    assert len(d["choices"][0]["logprobs"]["content"]) == d["usage"]["completion_tokens"]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 6, "temperature": 0,
                                                  "stream": True})
    chunks = _sse(r.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == msg["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_string(client):
    full = client.post("/v1/completions", json={"prompt": "xy", "max_tokens": 12, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    if len(text) < 4:
        pytest.skip("greedy text too short to pick a stop string")
    stop = text[2:4]
    d = client.post("/v1/completions", json={"prompt": "xy", "max_tokens": 12, "temperature": 0,
                                             "stop": stop}).json()
    assert d["choices"][0]["text"] == text[:text.index(stop)]
    assert d["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body,match", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": "high"}, "top_p"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x" * 60}, "context is 48 tokens"),
    ({"prompt": "x", "n": 9}, "batch size"),
    ({"prompt": "x", "stop": [1]}, "stop"),
])
def test_bad_requests_get_openai_style_400(client, body, match):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert match in err["message"] and err["type"] == "invalid_request_error"


def test_nulls_mean_defaults(client):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": None, "n": None,
                                             "top_p": None, "stop": None, "seed": None})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


def test_bad_chat_and_json(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and "messages[0]" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_queue_full_gets_429():
    app = create_app(_engine(max_batch=1), _tok(), max_queue=0)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"


def test_chat_page(client):
    r = client.get("/")
    assert r.status_code == 200 and "/v1/chat/completions" in r.text and "getReader" in r.text


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(engine):
    uvicorn = pytest.importorskip("uvicorn")
    app = create_app(engine, _tok(), model_name="tiny")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(timeout=5)


@pytest.fixture(scope="module")
def live():
    engine = Engine(tiny_model("gqa", vocab=257, dtype=torch.float32), tokenizer=_tok(), max_batch=2,
                    max_len=48)
    with _serving(engine) as url:
        yield url, engine


def test_openai_client_against_live_server(live):
    openai = pytest.importorskip("openai")
    url, _ = live
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    assert [m.id for m in client.models.list()] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="hi", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens <= 5 and r.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "yo"}],
                                            max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 5
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", temperature=-3)


def test_disconnect_frees_slot(live):
    import httpx

    url, engine = live
    step, reasons = engine.step, []

    def slow_step():  # ~4.5 s for the whole reply, so the hang-up comes first even on a loaded machine
        time.sleep(0.1)
        events = step()
        reasons.extend(e.finish_reason for e in events if e.finish_reason)
        return events

    engine.step = slow_step
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", url + "/v1/completions",
                      json={"prompt": "z", "max_tokens": 45, "temperature": 0, "stream": True}) as r:
            for _ in r.iter_lines():
                break  # read one event, then hang up
    for _ in range(600):
        if reasons:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    engine.step = step
    assert engine.n_running == 0 and not engine.requests
    assert reasons == ["abort"]


@pytest.mark.parametrize("drafter", ["ngram", "draft"])
def test_speculative_server_gives_plain_greedy_text(drafter):
    """`lmforge serve --ngram N` / `--draft DIR`: the openai client gets the same greedy text (plain
    and streamed, completions and chat) as from an engine without speculation."""
    openai = pytest.importorskip("openai")
    model = tiny_model("gqa", vocab=257, dtype=torch.float32)
    d = NGramDrafter(3) if drafter == "ngram" else DraftModel(tiny_model("gqa", vocab=257, seed=4, n_layers=1,
                                                                          dtype=torch.float32))
    spec = Engine(model, tokenizer=_tok(), max_batch=2, max_len=48, drafter=d, spec_k=3)
    plain = Engine(model, tokenizer=_tok(), max_batch=2, max_len=48)
    tok = _tok()
    prompt = "abcabcabc"
    msgs = [{"role": "user", "content": "xyxyxy"}]
    ref = plain.generate([[tok.eot_id] + tok.encode(prompt)], SamplingParams(max_tokens=20, temperature=0))[0][0]
    cp = apply_chat_template(msgs, tok)
    ref_chat = plain.generate([cp.ids], SamplingParams(max_tokens=20, temperature=0, stop=cp.stop,
                                                       stop_ids=cp.stop_ids))[0][0]
    with _serving(spec) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
        assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids)
        stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref_chat.text
        import httpx

        stats = httpx.get(url + "/health").json()["speculative"]
    assert len(ref.token_ids) == 20
    assert stats["drafted"] > 0 and stats == spec.spec_stats
