"""The steady-state decode step (pipeline.py): no host sync inside a step, exactly one read of the
previous step's tokens; pipelined stop trimming is exact (the slow path, taken by seeded rows, is
the reference, and so is naive full recompute); streamed tokens arrive at most one step late;
device-side sampling equals `sample`; the fixed-shape (CUDA graph) path's length buckets."""

import pytest
import torch

from lmforge.inference import Engine, SamplingParams
from lmforge.inference.pipeline import HostSyncCounter
from lmforge.inference.sampling import Row, draw, fast_key, probs, sample, sample_fast

from .helpers import (
    check_stops_trimmed_exactly,
    general_path,
    naive_greedy,
    prompts,
    stop_string_requests,
    tiny_model,
)


def test_steady_step_reads_the_host_once_and_syncs_nowhere_else():
    model = tiny_model("gqa")
    engine = Engine(model, max_batch=4, max_len=40)
    for p in prompts([3, 7, 5]):
        engine.add_request(p, SamplingParams(max_tokens=20, temperature=0))
    engine.step()  # prefill (its own reads) + the first launch
    per_step = []
    for _ in range(5):
        with HostSyncCounter() as syncs:
            events = engine.step()
        per_step.append(syncs.counts)
        assert len(events) == 3 and engine._inflight is not None  # step t read while t+1 is launched
    assert per_step == [{"tolist": 1}] * 5  # the read of the previous step's tokens, nothing else
    # the general path, for contrast: a tensor built from Python lists and element writes per step
    seeded = Engine(model, max_batch=4, max_len=40)
    for p in prompts([3, 7, 5]):
        seeded.add_request(p, general_path(SamplingParams(max_tokens=20, temperature=0)))
    seeded.step()
    with HostSyncCounter() as syncs:
        seeded.step()
    assert syncs.counts["__setitem__"] == 6 and syncs.counts["tensor"] >= 1


@pytest.mark.parametrize("kind", ["gqa", "mqa-window"])
def test_pipelined_stops_are_trimmed_exactly(kind):
    """Rows stop (stop ids, max_tokens, a full cache) at different steps while others go on and
    waiting requests take the freed slots; every output equals the slow path's and naive greedy."""
    check_stops_trimmed_exactly(kind)


def test_stop_strings_and_streaming_at_most_one_step_late():
    tok, model, ps, params = stop_string_requests()

    def stream(engine, params):
        seen = {}  # request index -> [(step, token, text)]
        ids = [engine.add_request(p, sp) for p, sp in zip(ps, params)]
        step = 0
        while engine.has_work():
            step += 1
            for ev in engine.step():
                seen.setdefault(ids.index(ev.request_id), []).append((step, ev.token_id, ev.text, ev.finish_reason))
        return [seen[i] for i in range(len(ps))]

    fast = stream(Engine(model, tokenizer=tok, max_batch=3, max_len=40), params)
    ref = stream(Engine(model, tokenizer=tok, max_batch=3, max_len=40), [general_path(sp) for sp in params])
    for f, r in zip(fast, ref):
        assert [e[1:] for e in f] == [e[1:] for e in r]  # tokens, text pieces, finish reasons
        assert all(0 <= a[0] - b[0] <= 1 for a, b in zip(f, r))  # each at most one step later
    assert any(e[3] == "stop" for f in fast for e in f)


def test_abort_and_mixed_settings_drain_the_pipeline():
    model = tiny_model("gqa")
    pa, pb, pc = prompts([4, 6, 5], seed=3)
    engine = Engine(model, max_batch=3, max_len=40)
    a = engine.add_request(pa, SamplingParams(max_tokens=20, temperature=0))
    b = engine.add_request(pb, SamplingParams(max_tokens=12, temperature=0))
    out = {a: [], b: []}
    for _ in range(3):
        for ev in engine.step():
            if ev.token_id is not None:
                out[ev.request_id].append(ev.token_id)
    engine.abort(a)  # while a step is in flight: its token for a is dropped
    # a row that needs `sample` (log-probs) joins: the next steps take the general path
    c = engine.add_request(pc, SamplingParams(max_tokens=5, temperature=0, logprobs=1))
    out[c] = []
    while engine.has_work():
        for ev in engine.step():
            if ev.request_id in out and ev.token_id is not None:
                out[ev.request_id].append(ev.token_id)
    assert out[a] == naive_greedy(model, pa, 3) and out[b] == naive_greedy(model, pb, 12)
    assert out[c] == naive_greedy(model, pc, 5)


def test_sample_fast_equals_sample():
    torch.manual_seed(0)
    logits = torch.randn(5, 37, dtype=torch.float64) * 3
    greedy = SamplingParams(temperature=0)
    assert torch.equal(sample_fast(logits, fast_key(greedy)), sample(logits, [Row(greedy)] * 5).tokens)
    sp = SamplingParams(temperature=0.7, top_k=9, top_p=0.8, min_p=0.05)
    torch.manual_seed(1)
    got = sample_fast(logits, fast_key(sp))
    torch.manual_seed(1)  # the same noise: the same tokens as the reference distribution's draw
    assert torch.equal(got, draw(probs(logits, sp)))
    assert fast_key(SamplingParams(seed=1)) is None and fast_key(SamplingParams(logprobs=0)) is None
    assert fast_key(SamplingParams(repetition_penalty=1.1)) is None


def test_fixed_shape_step_uses_length_buckets():
    """The CUDA-graph path on CPU (the compiled function swapped for the plain one): all rows, the
    attended length rounded up to a power of two >= 256 (one graph each), capped at max_len."""
    model = tiny_model("gqa", dtype=torch.float32)
    ps = prompts([3, 8])
    sp = SamplingParams(max_tokens=10, temperature=0)
    for max_len, want in ((300, 256), (40, 40)):
        engine = Engine(model, max_batch=3, max_len=max_len)
        calls = []

        def step(t, p, key, n, engine=engine, calls=calls):
            calls.append((t.shape[0], n))
            return engine._sample_step(t, p, key, n)

        engine.compiled, engine._step_fn = True, step
        outs = engine.generate(ps, sp)
        assert [o[0].token_ids for o in outs] == [naive_greedy(model, p, 10) for p in ps]
        assert set(calls) == {(3, want)}


def test_steady_step_traces_as_one_graph():
    """What compile=True captures on CUDA, traced on CPU by dynamo + AOT autograd (no inductor):
    forward, cache writes into the static buffers and sampling in one graph (fullgraph: a graph
    break would split the CUDA graph), tokens equal to naive greedy."""
    model = tiny_model("gqa", dtype=torch.float32)
    ps = prompts([3, 8])
    engine = Engine(model, max_batch=3, max_len=300)
    for t in [b for layer in engine.cache.buffers for b in layer] + [engine.bufs.tokens, engine.bufs.positions]:
        torch._dynamo.mark_static_address(t)
    engine.compiled = True
    engine._step_fn = torch.compile(engine._sample_step, backend="aot_eager", dynamic=False, fullgraph=True)
    outs = engine.generate(ps, SamplingParams(max_tokens=10, temperature=0))
    assert [o[0].token_ids for o in outs] == [naive_greedy(model, p, 10) for p in ps]
