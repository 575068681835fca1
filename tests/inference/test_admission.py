"""Admissions: the prompts admitted in one step are prefilled in one forward whatever their slots.

Requests that join a batch with holes (finished rows between running ones) land in scattered
slots; their outputs equal naive greedy generation (several prompt lengths, cache layouts, prefix
hits, n > 1 siblings, chunked prefill, the padded shapes of the compiled path) and each admitting
step runs exactly one prefill forward (rings: one per prompt, as documented). Under a compiler
(dynamo with the eager backend: guards and recompiles are dynamo's) one prefill graph serves every
admission, including single rows and single tokens."""

import pytest
import torch
from torch._dynamo.utils import counters

from lmforge.inference import Engine, SamplingParams
from lmforge.inference.cache import StaticKVCache

from .helpers import naive_greedy, prompts, tiny_model


def _with_holes(engine, model, second_lengths, seed=3):
    """5 requests fill 5 rows; rows 0, 2 and 4 finish early; then len(second_lengths) requests
    arrive at once and take the free slots. Checks every output against naive greedy and that the
    second wave's slots are scattered; returns the prefill forwards of each admitting step."""
    first = prompts([4, 7, 2, 9, 5], seed=seed)
    second = prompts(second_lengths, seed=seed + 1)
    reqs, forwards = [], []

    def add(ps, max_tokens):
        for p, m in zip(ps, max_tokens):
            rid = engine.add_request(p, SamplingParams(max_tokens=m, temperature=0))
            reqs.append((engine.requests[rid], p))

    def step():
        before, waiting = engine.prefill_forwards, len(engine.waiting)
        engine.step()
        if len(engine.waiting) < waiting:
            forwards.append(engine.prefill_forwards - before)

    add(first, [2, 14, 3, 14, 2])
    while engine.n_running > 2 or engine.waiting:
        step()
    free = [i for i, s in enumerate(engine.slots) if s is None]
    assert free == [0, 2, 4]  # holes between the running rows 1 and 3
    add(second, [6, 9, 4])
    step()
    assert sorted(r.sequences[0].slot for r, _ in reqs[5:]) == [0, 2, 4]
    while engine.has_work():
        step()
    for req, p in reqs:
        assert req.sequences[0].row.output_ids == naive_greedy(model, p, req.params.max_tokens), len(p)
    return forwards


@pytest.mark.parametrize("kind", ["gqa", "mla", "gpt2", "moe"])
def test_scattered_admissions_one_forward_equal_naive(kind):
    model = tiny_model(kind)
    engine = Engine(model, max_batch=5, max_len=40, eos_ids=[])
    assert _with_holes(engine, model, [3, 11, 1]) == [1, 1]  # the first wave, then the second into slots 0, 2, 4


def test_rings_prefill_each_prompt_alone():
    """Sliding-window rings keep a row's last tokens (padding would evict real ones): one forward
    per prompt, outputs still exact."""
    model = tiny_model("mqa-window")
    engine = Engine(model, max_batch=5, max_len=40, eos_ids=[])
    assert engine.cache.has_rings
    assert _with_holes(engine, model, [3, 11, 1]) == [5, 3]


def test_n_samples_and_prefix_hits_in_scattered_slots():
    """Greedy n = 2 siblings copy their first's row; prompts sharing a cached prefix load it into
    their (scattered) rows and feed only the rest, in the same single forward."""
    model = tiny_model("gqa")
    engine = Engine(model, max_batch=7, max_len=40, eos_ids=[], prefix_blocks=16, block_size=4)
    system = prompts([9], seed=11)[0]
    sp = SamplingParams(max_tokens=5, temperature=0)
    engine.generate([system + [1, 2]], sp)  # the shared prefix is cached now
    first = [engine.add_request(p, SamplingParams(max_tokens=m, temperature=0))
             for p, m in zip(prompts([3, 5, 2], seed=2), [2, 12, 2])]
    while engine.n_running > 1 or engine.waiting:
        engine.step()
    wave = [system + p for p in prompts([2, 6], seed=4)] + prompts([7], seed=5)
    hits = engine.prefix.hit_tokens
    before = engine.prefill_forwards
    ids = [engine.add_request(p, SamplingParams(max_tokens=6, temperature=0, n=2)) for p in wave]
    engine.step()
    assert engine.prefill_forwards - before == 1
    assert engine.prefix.hit_tokens - hits == 2 * 8  # two block-aligned hits of 8 tokens
    slots = sorted(s.slot for i in ids for s in engine.requests[i].sequences)
    assert slots != list(range(6))
    reqs = [engine.requests[i] for i in ids]
    while engine.has_work():
        engine.step()
    for req, p in zip(reqs, wave):
        assert [s.row.output_ids for s in req.sequences] == [naive_greedy(model, p, 6)] * 2
    assert all(rid not in engine.requests for rid in first)


def test_chunked_prefill_feeds_several_prompts_in_one_forward():
    model = tiny_model("gqa")
    ps = prompts([9, 3, 14, 6], seed=8)
    engine = Engine(model, max_batch=4, max_len=40, eos_ids=[], prefill_chunk=10)
    per_step, shapes = [], []
    forward = engine._forward_prefill
    engine._forward_prefill = lambda ids, *a: shapes.append(tuple(ids.shape)) or forward(ids, *a)
    for p in ps:
        engine.add_request(p, SamplingParams(max_tokens=5, temperature=0))
    outs = []
    reqs = list(engine.requests.values())
    while engine.has_work():
        before = engine.prefill_forwards
        engine.step()
        per_step.append(engine.prefill_forwards - before)
    outs = [r.sequences[0].row.output_ids for r in reqs]
    assert outs == [naive_greedy(model, p, 5) for p in ps]
    assert max(per_step) == 1
    # the bound counts padded tokens (rows x widest chunk): 9 | 3+5 | 9 | 6, never 9+1 in 2 rows of 9
    assert all(r * t <= 10 for r, t in shapes) and any(r > 1 for r, _ in shapes), shapes
    assert sum(per_step) == len(shapes) == 4


def test_chunk_budget_counts_padding():
    """One long prompt beside many short ones: a step's forward stays within prefill_chunk padded
    tokens (before: 5 rows x 16 tokens for a budget of 24)."""
    model = tiny_model("gqa")
    ps = prompts([40] + [2] * 15, seed=10)
    engine = Engine(model, max_batch=16, max_len=64, eos_ids=[], prefill_chunk=24)
    shapes = []
    forward = engine._forward_prefill
    engine._forward_prefill = lambda ids, *a: shapes.append(tuple(ids.shape)) or forward(ids, *a)
    outs = engine.generate(ps, SamplingParams(max_tokens=2, temperature=0))
    assert [o[0].token_ids for o in outs] == [naive_greedy(model, p, 2) for p in ps]
    assert all(r * t <= 24 for r, t in shapes), shapes


def test_token_cap_splits_the_batch():
    """Above PREFILL_TOKENS padded tokens the admitted prompts are fed in several forwards
    (longest first); outputs unchanged."""
    model = tiny_model("gqa")
    ps = prompts([12, 3, 10, 5], seed=9)
    engine = Engine(model, max_batch=4, max_len=40, eos_ids=[])
    engine.PREFILL_TOKENS = 24  # 12 + 10 fit as 2 rows of 12; then 5 + 3 as 2 rows of 5
    outs = engine.generate(ps, SamplingParams(max_tokens=4, temperature=0))
    assert [o[0].token_ids for o in outs] == [naive_greedy(model, p, 4) for p in ps]
    assert engine.prefill_forwards == 2


def test_compiled_prefill_one_graph_for_every_admission():
    """The compiled path's shapes (a dummy row, 2 tokens at least, one extra attended slot) keep
    one dynamo graph for admissions of 1..k rows of 1..T tokens in any slots, with prefix hits
    that leave a single token to feed; outputs equal naive greedy."""
    model = tiny_model("gqa")
    engine = Engine(model, max_batch=5, max_len=40, eos_ids=[], prefix_blocks=16, block_size=4)
    torch._dynamo.reset()
    counters.clear()
    engine._prefill_fn = torch.compile(engine._forward_from, backend="eager", dynamic=True, fullgraph=True)
    assert _with_holes(engine, model, [3, 11, 1]) == [1, 1]
    one = prompts([9], seed=12)[0]  # 8 tokens cached by the first request: the second feeds 1
    for p in (one, one):
        assert engine.generate([p], SamplingParams(max_tokens=3, temperature=0))[0][0].token_ids == \
            naive_greedy(model, p, 3)
    assert engine._prefill_fn is not None
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("kind", ["gpt2", "moe"])
def test_data_dependent_models_stay_compiled_with_graph_breaks(kind, caplog):
    """Learned positions (int(positions.max())) and MoE dispatch (per-expert counts) cannot be one
    fullgraph: dynamo raises UserError / GuardOnDataDependentSymNode, not Unsupported. The prefill
    is compiled again with graph breaks, not dropped to eager; outputs equal naive greedy."""
    model = tiny_model(kind)
    engine = Engine(model, max_batch=3, max_len=40, eos_ids=[])
    torch._dynamo.reset()
    engine._prefill_backend = {"backend": "eager"}
    engine._prefill_fn = torch.compile(engine._forward_from, backend="eager", dynamic=True, fullgraph=True)
    ps = prompts([4, 9, 6], seed=7)
    outs = engine.generate(ps, SamplingParams(max_tokens=3, temperature=0))
    assert [o[0].token_ids for o in outs] == [naive_greedy(model, p, 3) for p in ps]
    assert engine._prefill_fn is not None and not engine._prefill_fullgraph
    assert "compiling it with graph breaks" in caplog.text and "runs eager" not in caplog.text


def test_row_ids_view_equals_slice_view():
    """cache.view with a tensor of row ids writes the same entries and returns the same keys as
    with the equivalent slice (and refuses a cache with rings)."""
    model = tiny_model("gqa")
    a = StaticKVCache.for_model(model, 4, 12)
    b = StaticKVCache.for_model(model, 4, 12)
    torch.manual_seed(0)
    pos = torch.tensor([[3, 4, 5], [0, 1, 2]])
    new = [torch.randn(2, 2, 3, 6, dtype=torch.float64) for _ in range(2)]
    ka = a.view(slice(1, 3), 6, pos).layer(0).update(*new)
    kb = b.view(torch.tensor([1, 2]), 6, pos).layer(0).update(*new)
    for x, y, buf_a, buf_b in zip(ka, kb, a.buffers[0], b.buffers[0]):
        assert torch.equal(x, y) and torch.equal(buf_a, buf_b)
    # reversed, scattered ids: row 3 gets what was fed first
    c = StaticKVCache.for_model(model, 4, 12)
    kc = c.view(torch.tensor([3, 0]), 6, pos).layer(0).update(*new)
    assert torch.equal(c.buffers[0][0][3, :, 3:6], new[0][0]) and torch.equal(kc[0][0], c.buffers[0][0][3, :, :6])
    ring = StaticKVCache.for_model(tiny_model("mqa-window"), 2, 40)
    with pytest.raises(Exception, match="rings"):
        ring.view(torch.tensor([0]), 4, pos[:1])


def test_graph_break_compiles_again_without_fullgraph(monkeypatch, caplog):
    """A graph break under fullgraph (e.g. a model's log call) is logged and the prefill compiled
    again with breaks allowed, not dropped to eager; a recompile-limit hit goes eager, logged."""
    model = tiny_model("gqa")
    ps = prompts([3, 8], seed=6)
    engine = Engine(model, max_batch=2, max_len=30, eos_ids=[])
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda f, **kw: compiled.append(kw) or f)

    def breaks(*args):
        raise torch._dynamo.exc.Unsupported("logging.Logger method not supported")

    engine._prefill_fn = breaks
    outs = engine.generate(ps, SamplingParams(max_tokens=4, temperature=0))
    assert [o[0].token_ids for o in outs] == [naive_greedy(model, p, 4) for p in ps]
    assert compiled == [{"dynamic": True}] and engine._prefill_fn is not None
    assert "not one graph" in caplog.text and "logging.Logger" in caplog.text

    class FailOnRecompileLimitHit(Exception):  # what dynamo raises under fullgraph at the limit
        pass

    def limit(*args):
        raise FailOnRecompileLimitHit("Hard failure due to fullgraph=True")

    engine._prefill_fn, engine._prefill_fullgraph = limit, True
    outs = engine.generate(ps, SamplingParams(max_tokens=4, temperature=0))
    assert [o[0].token_ids for o in outs] == [naive_greedy(model, p, 4) for p in ps]
    assert engine._prefill_fn is None and "runs eager from now on: FailOnRecompileLimitHit" in caplog.text
