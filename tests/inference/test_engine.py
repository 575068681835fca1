"""Engine vs naive full-recompute generation: greedy batches with different prompt lengths on every
cache layout (GQA, MQA + sliding-window ring buffers, MLA latent, learned positions, softcap, MoE);
continuous batching equals one-at-a-time; chunked prefill; n samples share a prefill; seeds; stop
ids; aborts; errors."""

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.inference import Engine, SamplingParams
from lmforge.inference.cache import StaticKVCache

from .helpers import KINDS, naive_greedy, prompts, tiny_model


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_greedy_batch_equals_naive(kind):
    model = tiny_model(kind)
    ps = prompts([3, 11, 1, 7])
    engine = Engine(model, max_batch=4, max_len=40)
    outs = engine.generate(ps, SamplingParams(max_tokens=12, temperature=0))
    for p, out in zip(ps, outs):
        assert out[0].token_ids == naive_greedy(model, p, 12)
        assert out[0].finish_reason == "length"


def test_continuous_batching_equals_one_at_a_time():
    model = tiny_model("gqa")
    ps = prompts([5, 2, 9, 4, 13, 6, 3])
    lengths = [3, 9, 5, 12, 2, 7, 4]  # different lengths, so requests leave and join mid-flight
    params = [SamplingParams(max_tokens=m, temperature=0.9, top_k=20, seed=i) for i, m in enumerate(lengths)]
    engine = Engine(model, max_batch=3, max_len=40)
    batched = engine.generate(ps, params)
    for p, sp, out in zip(ps, params, batched):
        alone = Engine(model, max_batch=1, max_len=40).generate([p], sp)[0][0]
        assert out[0].token_ids == alone.token_ids
        assert len(out[0].token_ids) == sp.max_tokens


def test_requests_join_while_others_decode():
    model = tiny_model("gqa")
    engine = Engine(model, max_batch=2, max_len=40)
    a = engine.add_request(prompts([4])[0], SamplingParams(max_tokens=10, temperature=0))
    seen = {a: []}
    for ev in engine.step() + engine.step():  # prefill's token, then the first decode step's, read
        seen[a].append(ev.token_id)  # one step late (the host reads step t while t+1 runs)
    assert len(seen[a]) == 2
    b = engine.add_request(prompts([6], seed=3)[0], SamplingParams(max_tokens=3, temperature=0))
    seen[b] = []
    while engine.has_work():
        for ev in engine.step():
            if ev.token_id is not None:
                seen[ev.request_id].append(ev.token_id)
    assert len(seen[b]) == 3 and len(seen[a]) == 10
    assert engine.n_running == 0 and all(s is None for s in engine.slots)


def test_n_samples_share_prefill_and_differ():
    model = tiny_model("gqa")
    p = prompts([6])[0]
    engine = Engine(model, max_batch=4, max_len=40)
    outs = engine.generate([p], SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=7))[0]
    assert len(outs) == 3
    assert len({tuple(o.token_ids) for o in outs}) > 1
    for i, o in enumerate(outs):  # sample i equals a lone request seeded seed + i
        alone = Engine(model, max_batch=1, max_len=40).generate(
            [p], SamplingParams(max_tokens=8, temperature=1.0, seed=7 + i))[0][0]
        assert o.token_ids == alone.token_ids


def test_seed_reproducible_and_stop_ids():
    model = tiny_model("gqa")
    p = prompts([5])[0]
    sp = SamplingParams(max_tokens=15, temperature=1.2, seed=3)
    a = Engine(model, max_batch=2, max_len=40).generate([p, p], [sp, sp])
    assert a[0][0].token_ids == a[1][0].token_ids
    ref = a[0][0].token_ids
    stop = ref[4]
    first = ref.index(stop)
    out = Engine(model, max_batch=2, max_len=40).generate(
        [p], SamplingParams(max_tokens=15, temperature=1.2, seed=3, stop_ids=[stop]))[0][0]
    assert out.token_ids == ref[:first] and out.finish_reason == "stop"


@torch.no_grad()
def test_logprobs_match_log_softmax():
    model = tiny_model("gqa")
    p = prompts([5])[0]
    out = Engine(model, max_batch=1, max_len=40).generate(
        [p], SamplingParams(max_tokens=4, temperature=0, logprobs=3))[0][0]
    ids = list(p)
    for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
        assert lp == pytest.approx(float(ref[tok]), abs=1e-6)
        vals, idx = ref.topk(3)
        assert list(top) == idx.tolist()
        assert list(top.values()) == pytest.approx(vals.tolist(), abs=1e-6)
        ids.append(tok)


def test_abort_frees_slot_and_cache_full_stops():
    model = tiny_model("gqa")
    engine = Engine(model, max_batch=1, max_len=12)
    rid = engine.add_request(prompts([5])[0], SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    engine.abort(rid)
    evs = engine.step()
    assert [e.finish_reason for e in evs] == ["abort"] and engine.n_running == 0
    out = engine.generate([prompts([5])[0]], SamplingParams(max_tokens=50, temperature=0))[0][0]
    assert out.finish_reason == "length" and len(out.token_ids) == 12 - 5


def test_errors():
    model = tiny_model("gqa")
    engine = Engine(model, max_batch=2, max_len=10)
    with pytest.raises(ConfigError, match="does not fit"):
        engine.add_request(list(range(10)))
    with pytest.raises(ConfigError, match="empty"):
        engine.add_request([])
    with pytest.raises(ConfigError, match=r"\[0, 61\)"):
        engine.add_request([61])
    with pytest.raises(ConfigError, match="max_batch"):
        engine.add_request([1], SamplingParams(n=3))
    with pytest.raises(ConfigError, match="tokenizer"):
        engine.add_request([1], SamplingParams(stop=["x"]))
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0)


def test_cache_layouts_and_bytes():
    cache = StaticKVCache.for_model(tiny_model("mla"), max_batch=3, max_len=20)
    assert [tuple(t.shape) for t in cache.buffers[0]] == [(3, 20, 10), (3, 20, 4)]
    cache = StaticKVCache.for_model(tiny_model("mqa-window"), max_batch=3, max_len=20)
    assert [tuple(t.shape) for t in cache.buffers[1]] == [(3, 1, 20, 8)] * 2
    assert cache.nbytes() == 2 * 2 * 3 * 20 * 8 * 8
    with pytest.raises(ConfigError, match="learned position table"):
        StaticKVCache.for_model(tiny_model("gpt2"), max_batch=1, max_len=49)


def test_fixed_shape_decode_path_equals_dynamic():
    """The CUDA-graph path decodes all rows over the whole cache; run that shape eagerly on CPU."""
    model = tiny_model("mqa-window")
    ps = prompts([3, 8, 5])
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (9, 4, 12)]
    ref = Engine(model, max_batch=4, max_len=30).generate(ps, params)
    fixed = Engine(model, max_batch=4, max_len=30)
    fixed.compiled, fixed._decode_fn, fixed._step_fn = True, fixed._forward_full, fixed._sample_step
    assert [o[0].token_ids for o in fixed.generate(ps, params)] == [o[0].token_ids for o in ref]


@pytest.mark.parametrize("kind", ["mqa-window", "mla"])
def test_ring_buffer_for_window_layers(kind):
    """Sliding-window layers keep window + slack slots; prompts longer than the ring, wrap-around
    in decode and n samples (ring rows copied) still match naive decoding."""
    model = tiny_model(kind, window=5, layer_pattern=["local", "global"])
    engine = Engine(model, max_batch=4, max_len=40)
    engine.cache = StaticKVCache.for_model(model, 4, 40, slack=2)  # ring of 7 slots
    assert engine.cache.buffers[0][0].shape[-2 if kind == "mqa-window" else 1] == 7
    assert engine.cache.key_positions[1] is None  # the global layer stays full length
    ps = prompts([13, 2, 9])
    outs = engine.generate(ps, [SamplingParams(max_tokens=14, temperature=0, n=n) for n in (1, 1, 2)])
    for p, out in zip(ps, outs):
        for o in out:
            assert o.token_ids == naive_greedy(model, p, 14)
    ps = prompts([4, 16], seed=9)  # rows reused: the old sequences' ring entries must not leak
    for p, out in zip(ps, engine.generate(ps, SamplingParams(max_tokens=10, temperature=0))):
        assert out[0].token_ids == naive_greedy(model, p, 10)


@pytest.mark.parametrize("kind", ["gqa", "mqa-window"])
def test_chunked_prefill_equals_whole_prompts(kind):
    model = tiny_model(kind)
    ps = prompts([17, 3, 11, 26])
    params = [SamplingParams(max_tokens=8, temperature=0, n=n) for n in (1, 2, 1, 1)]
    ref = Engine(model, max_batch=3, max_len=40).generate(ps, params)
    chunked = Engine(model, max_batch=3, max_len=40, prefill_chunk=5)
    rid = chunked.add_request(ps[3], SamplingParams(max_tokens=8))
    chunked.step()
    chunked.abort(rid)  # aborted mid-prefill: leaves the queue and frees its slot
    chunked.step()
    assert not chunked.prefilling and chunked.n_running == 0
    out = chunked.generate(ps, params)
    assert [[o.token_ids for o in r] for r in out] == [[o.token_ids for o in r] for r in ref]


def test_chunked_prefill_row_below_running_rows_is_not_overwritten():
    """A prompt being prefilled in slot 0 while slot 1 decodes must not receive the idle-row write."""
    model = tiny_model("gqa")
    engine = Engine(model, max_batch=2, max_len=40, prefill_chunk=4)
    pa, pb, pc = prompts([3, 3, 21], seed=4)
    engine.add_request(pa, SamplingParams(max_tokens=1, temperature=0))  # slot 0, done in step 1
    b = engine.add_request(pb, SamplingParams(max_tokens=30, temperature=0))  # slot 1, keeps decoding
    engine.step()
    engine.step()
    c = engine.add_request(pc, SamplingParams(max_tokens=6, temperature=0, logprobs=0))
    assert engine.requests[b].sequences[0].slot == 1
    out, lps = {b: [], c: []}, []
    while engine.has_work():
        for ev in engine.step():
            if ev.token_id is not None and ev.request_id in out:
                out[ev.request_id].append(ev.token_id)
                if ev.request_id == c:
                    lps.append(ev.logprob)
    assert out[c] == naive_greedy(model, pc, 6)
    with torch.no_grad():  # log-probs are sensitive where greedy tokens might not be
        ref = torch.log_softmax(model(torch.tensor([pc + out[c]])).logits[0, len(pc) - 1:-1], -1)
    assert lps == pytest.approx(ref.gather(-1, torch.tensor(out[c])[:, None]).squeeze(-1).tolist(), abs=1e-6)
    assert engine.requests == {} and len(out[b]) == 29  # steps 1-2 gave 1 token (decode read one step late)


@pytest.mark.parametrize("spec", [False, True])
def test_fixed_shape_path_with_chunked_prefill(spec):
    """The CUDA-graph path's logic on CPU (the compiled function swapped for the plain one): a
    forward over all rows and the whole cache, idle rows fed junk. Rows still being prefilled in
    chunks, also beyond the highest running row, must not be touched (they wait for the eager path)."""
    from lmforge.inference.speculative import NGramDrafter

    model = tiny_model("gqa")
    ps = [p * 2 for p in prompts([2, 2, 11, 4])]
    kw = dict(drafter=NGramDrafter(2), spec_k=3) if spec else {}
    engine = Engine(model, max_batch=3, max_len=44, prefill_chunk=4, **kw)
    engine.compiled, engine._decode_fn, engine._step_fn = True, engine._forward_full, engine._sample_step
    calls = []
    if spec:
        full = engine._forward_graph
        engine._forward_graph = lambda t, p: calls.append(t.shape) or full(t, p)
    else:  # greedy rows take the steady-state step
        step = engine._step_fn
        engine._step_fn = lambda t, p, key, n: calls.append(t.shape) or step(t, p, key, n)
    outs = engine.generate(ps, SamplingParams(max_tokens=9, temperature=0))
    for p, out in zip(ps, outs):
        assert out[0].token_ids == naive_greedy(model, p, 9)
    assert calls and all(c[1] == (4 if spec else 1) and (spec or c[0] == 3) for c in calls)
