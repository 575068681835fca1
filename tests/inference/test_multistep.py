"""Multi-step decoding (`Engine(decode_steps=k)`): k tokens per row per launch, read at once.
Outputs equal k = 1, the slow (seeded, unpipelined) path and naive recompute, stops trimmed
exactly mid-launch; streaming gets up to k tokens per request per step(); one host read per
launch; the compiled path's pieces (the k-step launch and the dynamic-shape prefill) traced on CPU;
the server streams a multi-step engine like a one-step one."""

import json

import pytest
import torch

from lmforge.inference import Engine, SamplingParams
from lmforge.inference.pipeline import HostSyncCounter
from lmforge.tokenizer import Tokenizer

from .helpers import (
    check_stops_trimmed_exactly,
    general_path,
    naive_greedy,
    prompts,
    stop_string_requests,
    tiny_model,
)


@pytest.mark.parametrize("kind,k", [("gqa", 3), ("gqa", 5), ("mqa-window", 4)])
def test_multistep_stops_are_trimmed_exactly(kind, k):
    """Rows stop (stop ids, max_tokens, a full cache) at any token of a launch while others go on
    and waiting requests take the freed slots (7 requests, 3 rows)."""
    check_stops_trimmed_exactly(kind, decode_steps=k)


def test_multistep_streams_k_tokens_per_step_with_stop_strings():
    tok, model, ps, params = stop_string_requests()

    def stream(engine, params):
        seen, per_step = {}, []
        ids = [engine.add_request(p, sp) for p, sp in zip(ps, params)]
        while engine.has_work():
            events = engine.step()
            per_step.append(max([sum(e.request_id == r for e in events) for r in ids]))
            for ev in events:
                seen.setdefault(ids.index(ev.request_id), []).append((ev.token_id, ev.text, ev.finish_reason))
        return [seen[i] for i in range(len(ps))], per_step

    k = 4
    fast, fast_steps = stream(Engine(model, tokenizer=tok, max_batch=3, max_len=40, decode_steps=k), params)
    ref, ref_steps = stream(Engine(model, tokenizer=tok, max_batch=3, max_len=40), [general_path(sp) for sp in params])
    assert fast == ref  # tokens, text pieces (no partial characters), finish reasons, in order
    assert any(e[2] == "stop" for f in fast for e in f)
    assert max(fast_steps) == k  # events come k tokens per request per step()
    assert len(fast_steps) <= len(ref_steps) // k + 3


def test_multistep_reads_the_host_once_per_launch():
    model = tiny_model("gqa")
    engine = Engine(model, max_batch=4, max_len=60, decode_steps=5)
    for p in prompts([3, 7, 5]):
        engine.add_request(p, SamplingParams(max_tokens=40, temperature=0))
    engine.step()
    for _ in range(3):
        with HostSyncCounter() as syncs:
            events = engine.step()
        assert syncs.counts == {"tolist": 1} and len(events) == 3 * 5


def test_compiled_path_pieces_trace_on_cpu():
    """What compile=True runs on CUDA, traced on CPU: the steady-state step (dynamo + AOT
    autograd, fullgraph, static shapes) launched k at a time through StepGraphs (which on CPU
    runs them instead of capturing), and the prefill forward compiled by dynamo with dynamic
    shapes, which serves prompts of several lengths and row ranges without recompiling per shape."""
    from torch._dynamo.utils import counters

    model = tiny_model("gqa", dtype=torch.float32)
    ps = prompts([3, 8, 5, 6], seed=4)
    engine = Engine(model, max_batch=3, max_len=300, decode_steps=3)
    for t in [b for layer in engine.cache.buffers for b in layer] + [engine.bufs.tokens, engine.bufs.positions]:
        torch._dynamo.mark_static_address(t)
    calls = []
    step = torch.compile(engine._sample_step, backend="aot_eager", dynamic=False, fullgraph=True)

    def counted(t, p, key, n):
        # the buffers themselves, not views (a compiled step guards on them: the captured call
        # and the warm-up before the capture must pass the same tensors)
        calls.append((t.shape[0], n, t is engine.bufs.tokens and p is engine.bufs.positions))
        return step(t, p, key, n)

    engine.compiled, engine._step_fn = True, counted
    torch._dynamo.reset()
    counters.clear()
    engine._prefill_fn = torch.compile(engine._forward_from, backend="eager", dynamic=True)
    sp = [SamplingParams(max_tokens=m, temperature=0) for m in (10, 4, 7, 9)]
    outs = engine.generate(ps, sp)
    assert [o[0].token_ids for o in outs] == [naive_greedy(model, p, s.max_tokens) for p, s in zip(ps, sp)]
    assert set(calls) == {(3, 256, True)}
    assert engine._prefill_fn is not None  # it did not fall back to eager
    # the step's graph, and for 4 prompts of 4 lengths in 3 row ranges two prefill graphs (one
    # row: dynamo specialises sizes of 1; several rows), not one per shape
    assert counters["stats"]["unique_graphs"] <= 3


def test_failed_prefill_compilation_falls_back_to_eager(caplog):
    """A compiler error in the compiled prefill is logged once and prefill runs eager from then on."""
    model = tiny_model("gqa")
    ps = prompts([3, 8])
    engine = Engine(model, max_batch=2, max_len=30)
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("inductor says no")

    engine._prefill_fn = broken
    outs = engine.generate(ps, SamplingParams(max_tokens=6, temperature=0))
    assert [o[0].token_ids for o in outs] == [naive_greedy(model, p, 6) for p in ps]
    assert len(calls) == 1 and engine._prefill_fn is None
    assert "compiled prefill failed" in caplog.text and "inductor says no" in caplog.text


def test_server_streams_multistep_engine_like_one_step():
    """The server delivers k events per request per step: a streamed greedy completion (with a stop
    string) from a decode_steps=3 engine equals the plain completion of a one-step engine."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lmforge.inference.server import create_app

    tok = Tokenizer.from_merges([], special_tokens=["<|endoftext|>"])
    model = tiny_model("gqa", vocab=257, dtype=torch.float32)
    body = {"prompt": "abcab", "max_tokens": 14, "temperature": 0, "n": 2}
    with TestClient(create_app(Engine(model, tokenizer=tok, max_batch=2, max_len=48), tok)) as c:
        plain = c.post("/v1/completions", json=body).json()
        text = plain["choices"][0]["text"]
        assert len(text) > 6
        body["stop"] = text[4:6]  # a stop string that occurs in the reply
        plain = c.post("/v1/completions", json=body).json()
        assert plain["choices"][0]["finish_reason"] == "stop"
    app = create_app(Engine(model, tokenizer=tok, max_batch=2, max_len=48, decode_steps=3), tok)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json=dict(body, stream=True, stream_options={"include_usage": True}))
    chunks = [json.loads(ln[6:]) for ln in r.text.split("\n\n") if ln.startswith("data: ") and ln[6:] != "[DONE]"]
    texts = ["", ""]
    for ch in chunks[:-1]:
        for choice in ch["choices"]:
            texts[choice["index"]] += choice["text"]
    assert texts == [ch["text"] for ch in plain["choices"]]
    assert chunks[-1]["usage"] == plain["usage"]
