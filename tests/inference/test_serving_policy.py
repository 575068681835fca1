"""Server batching policies (`lmforge serve --batching static|continuous`) and `--ignore-eos`.

Static batching must really wait: a request that arrives while another is decoding gets its first
token only after the running one's last (continuous: long before), and both policies give the
engine's own greedy tokens. A request aborted while held never reaches the engine. `--ignore-eos`
builds an engine that samples past the end-of-text token."""

import argparse
import asyncio
import json
import time

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.inference import Engine, SamplingParams
from lmforge.inference.commands import _engine, register
from lmforge.inference.server import EngineWorker
from lmforge.model.checkpoint import save_model
from lmforge.tokenizer import Tokenizer, save_tokenizer

from .helpers import prompts, tiny_model


def _worker(batching: str):
    """A worker over a tiny engine (2 rows) whose steps are slowed down and logged."""
    engine = Engine(tiny_model("gqa", vocab=61, dtype=torch.float32), max_batch=2, max_len=48, eos_ids=[])
    step, log = engine.step, []

    def logged_step():
        time.sleep(0.01)  # so the second request arrives while the first decodes, even on a loaded machine
        events = step()
        log.append([(e.request_id, e.token_id, e.finish_reason) for e in events])
        return events

    engine.step = logged_step
    return EngineWorker(engine, max_queue=8, batching=batching), engine, log


async def _two_requests(worker, ps, params):
    """Submit A; once A's first token is out, submit B; drain both. Returns their token ids."""
    rid_a, qa = worker.submit(ps[0], params)
    first = await qa.get()  # a list: the request's events of one engine step
    rid_b, qb = worker.submit(ps[1], params)
    toks = {rid_a: [e.token_id for e in first if e.token_id is not None], rid_b: []}

    async def drain(rid, q, done):
        while not done:
            for ev in await q.get():
                if ev.token_id is not None:
                    toks[rid].append(ev.token_id)
                done = ev.finish_reason is not None

    await asyncio.gather(drain(rid_a, qa, first[-1].finish_reason is not None), drain(rid_b, qb, False))
    return rid_a, rid_b, toks


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_static_batching_waits_for_the_running_batch(batching):
    worker, engine, log = _worker(batching)
    ps = prompts([5, 7], seed=3)
    params = SamplingParams(max_tokens=20, temperature=0)
    try:
        rid_a, rid_b, toks = asyncio.run(_two_requests(worker, ps, params))
    finally:
        worker.close()
    step_of = lambda rid, pred: next(i for i, evs in enumerate(log) for r, t, f in evs if r == rid and pred(t, f))  # noqa: E731
    a_last = step_of(rid_a, lambda t, f: f is not None)
    b_first = step_of(rid_b, lambda t, f: t is not None)
    if batching == "static":
        assert b_first > a_last  # B started only after A's last token
    else:
        assert b_first < a_last  # B joined while A was still decoding
    ref = Engine(engine.model, max_batch=2, max_len=48, eos_ids=[]).generate(ps, params)
    assert [toks[rid_a], toks[rid_b]] == [r[0].token_ids for r in ref]
    assert len(toks[rid_a]) == 20 and not engine.requests and worker.n_held == 0


def test_static_batch_takes_what_fits_and_held_aborts_never_start():
    worker, engine, log = _worker("static")
    ps = prompts([4, 6, 5, 3], seed=4)

    async def go():
        long = worker.submit(ps[0], SamplingParams(max_tokens=30, temperature=0))
        await long[1].get()  # A runs; the next three are held
        held = [worker.submit(p, SamplingParams(max_tokens=4, temperature=0, n=n)) for p, n in zip(ps[1:], (1, 2, 1))]
        await asyncio.sleep(0.05)
        assert worker.n_held == 3 and not engine.waiting and engine.n_running == 1
        worker.abort(held[0][0])  # aborted while held: it must never reach the engine
        for rid, q in [long] + held[1:]:
            n_fin = 0
            while n_fin < (2 if rid == held[1][0] else 1):
                n_fin += sum(ev.finish_reason is not None for ev in await q.get())
        return held

    try:
        held = asyncio.run(go())
    finally:
        worker.close()
    started = [r for evs in log for r, t, f in evs if t is not None]
    assert held[0][0] not in started
    # after A, the n=2 request fills both rows; the last one waits for that batch to finish
    b, c = held[1][0], held[2][0]
    last_b = max(i for i, evs in enumerate(log) for r, t, f in evs if r == b)
    first_c = min(i for i, evs in enumerate(log) for r, t, f in evs if r == c)
    assert first_c > last_b


def test_bad_batching_is_refused():
    with pytest.raises(ConfigError, match="batching"):
        EngineWorker(Engine(tiny_model("gqa", vocab=61, dtype=torch.float32), max_batch=1, max_len=16),
                     batching="dynamic")


def test_serve_flags_build_the_engine(tmp_path):
    model = tiny_model("gqa", vocab=257, dtype=torch.float32)
    save_model(tmp_path / "m", model, model.cfg)
    save_tokenizer(Tokenizer.from_merges([], special_tokens=["<|endoftext|>"]), tmp_path / "m" / "tokenizer")
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["serve", str(tmp_path / "m"), "--device", "cpu", "--batching", "static", "--ignore-eos"])
    assert args.batching == "static"
    engine, tok, _ = _engine(args)
    assert engine.eos_ids == set()
    default, _, _ = _engine(p.parse_args(["serve", str(tmp_path / "m"), "--device", "cpu"]))
    assert default.eos_ids == {tok.eot_id}


def test_stream_of_multi_token_steps_has_one_event_per_token():
    """With several tokens per engine step the worker hands a request's events over as one list
    and the SSE stream writes them together: still one `data:` event per token, same text."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lmforge.inference.server import create_app

    tok = Tokenizer.from_merges([], special_tokens=["<|endoftext|>"])
    engine = Engine(tiny_model("gqa", vocab=257, dtype=torch.float32), tokenizer=tok, max_batch=2, max_len=48,
                    eos_ids=[], decode_steps=3)
    body = {"prompt": [5, 66, 67, 68], "max_tokens": 13, "temperature": 0}
    with TestClient(create_app(engine, tok)) as c:
        plain = c.post("/v1/completions", json=body).json()
        r = c.post("/v1/completions", json=dict(body, stream=True, stream_options={"include_usage": True}))
    events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: ") and x != "data: [DONE]"]
    token_chunks = [e for e in events if e["choices"]]
    assert plain["usage"]["completion_tokens"] == 13 == events[-1]["usage"]["completion_tokens"]
    assert "".join(e["choices"][0]["text"] for e in token_chunks) == plain["choices"][0]["text"]
    ref = Engine(engine.model, tokenizer=tok, max_batch=2, max_len=48, eos_ids=[]).generate(
        [body["prompt"]], SamplingParams(max_tokens=13, temperature=0))[0][0]
    assert plain["choices"][0]["text"] == ref.text and token_chunks[-1]["choices"][0]["finish_reason"] == "length"
