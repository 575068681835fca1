"""Prefix caching: outputs identical to no caching (greedy, several cache layouts, with continuous
batching, chunked prefill, n samples and speculation), the shared prefix is not prefilled again
(tokens fed to the model counted), a chat's next turn reuses the previous reply; the block pool
by hand: copies the right KV, LRU eviction order, pinned blocks never evicted; errors."""

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.inference import Engine, SamplingParams
from lmforge.inference.cache import StaticKVCache
from lmforge.inference.prefix import PrefixCache
from lmforge.inference.speculative import NGramDrafter

from .helpers import naive_greedy, prompts, tiny_model


def _counting(engine):
    """Count the tokens the engine feeds the target model (prefill + decode)."""
    fed = []
    forward = engine._forward

    def counted(ids, pos, rows, length):
        fed.append(ids.numel())
        return forward(ids, pos, rows, length)

    engine._forward = counted
    return fed


@pytest.mark.parametrize("kind", ["gqa", "mla", "mqa-window", "gpt2"])
def test_shared_prefix_outputs_identical_and_not_prefilled_again(kind):
    model = tiny_model(kind)
    system = prompts([13], seed=7)[0]
    ps = [system + p for p in prompts([3, 6, 1, 5])]
    sp = SamplingParams(max_tokens=6, temperature=0)
    engine = Engine(model, max_batch=2, max_len=40, prefix_blocks=12, block_size=4)
    fed = _counting(engine)
    first = engine.generate(ps[:1], sp)[0][0]
    n_first = sum(fed)
    rest = engine.generate(ps[1:], sp)
    for p, out in zip(ps, [[first]] + rest):
        assert out[0].token_ids == naive_greedy(model, p, 6)
    # the later prompts find the 12 cached positions (3 blocks of the 13-token prefix)
    assert engine.prefix.hit_tokens == 3 * 12
    assert sum(fed) < n_first * 4


def test_prefill_work_saved_exactly():
    model = tiny_model("gqa")
    system = prompts([17], seed=7)[0]
    a, b = system + [1, 2, 3], system + [4, 5]
    sp = SamplingParams(max_tokens=1, temperature=0)  # one token: the prefill is all the work
    cold = Engine(model, max_batch=1, max_len=40)
    warm = Engine(model, max_batch=1, max_len=40, prefix_blocks=8, block_size=4)
    fed_cold, fed_warm = _counting(cold), _counting(warm)
    for e in (cold, warm):
        assert e.generate([a], sp)[0][0].token_ids == naive_greedy(model, a, 1)
        assert e.generate([b], sp)[0][0].token_ids == naive_greedy(model, b, 1)
    assert fed_cold == [len(a), len(b)]
    assert fed_warm == [len(a), len(b) - 16]  # 4 blocks of the 17-token prefix were copied in


def test_with_continuous_batching_chunked_prefill_n_and_speculation():
    model = tiny_model("gqa")
    system = prompts([10], seed=3)[0]
    ps = [system + p for p in prompts([4, 2, 7, 3, 5])]
    lengths = [5, 9, 3, 7, 4]
    plain = Engine(model, max_batch=3, max_len=40).generate(
        ps, [SamplingParams(max_tokens=m, temperature=0) for m in lengths])
    for extra in (dict(prefill_chunk=5), dict(drafter=NGramDrafter(2), spec_k=3)):
        engine = Engine(model, max_batch=3, max_len=40, prefix_blocks=10, block_size=3, **extra)
        outs = engine.generate(ps, [SamplingParams(max_tokens=m, temperature=0) for m in lengths])
        assert [o[0].token_ids for o in outs] == [o[0].token_ids for o in plain]
        assert engine.prefix.hit_tokens > 0
    sp = SamplingParams(max_tokens=6, temperature=1.0, n=2, seed=4)
    ref = Engine(model, max_batch=2, max_len=40).generate([ps[0]], sp)[0]
    engine = Engine(model, max_batch=2, max_len=40, prefix_blocks=10, block_size=3)
    engine.generate([ps[1]], SamplingParams(max_tokens=2))
    got = engine.generate([ps[0]], sp)[0]
    assert [o.token_ids for o in got] == [o.token_ids for o in ref] and engine.prefix.hit_tokens == 9


def test_next_chat_turn_reuses_the_reply():
    model = tiny_model("gqa")
    turn1 = prompts([9], seed=2)[0]
    engine = Engine(model, max_batch=1, max_len=48, prefix_blocks=16, block_size=4)
    reply = engine.generate([turn1], SamplingParams(max_tokens=8, temperature=0))[0][0].token_ids
    turn2 = turn1 + reply + [5, 6, 7]
    fed = _counting(engine)
    out = engine.generate([turn2], SamplingParams(max_tokens=4, temperature=0))[0][0]
    assert out.token_ids == naive_greedy(model, turn2, 4)
    # the first turn's cache held 9 + 7 positions (the last reply token was never fed): 4 blocks
    assert fed[0] == len(turn2) - 16


def _pool(n_blocks, block_size=4):
    model = tiny_model("gqa")
    cache = StaticKVCache.for_model(model, 3, 24, ring=False)
    for layer in cache.buffers:  # recognisable values: row r, position s holds 100 r + s
        for buf in layer:
            vals = (100 * torch.arange(3)[:, None] + torch.arange(24)[None]).to(buf.dtype)
            buf.copy_(vals.view(3, *([1] * (buf.dim() - 3)), 24, 1).expand(buf.shape))
    return cache, PrefixCache(cache, n_blocks, block_size)


def test_pool_copies_the_right_kv():
    cache, pc = _pool(6)
    ids = list(range(10, 21))  # 11 tokens: 2 full blocks
    assert pc.store(ids, row=1) == 2 and pc.store(ids, row=1) == 0  # already there
    chain = pc.match(ids + [99])
    assert len(chain) == 2 and [b.refs for b in chain] == [1, 1]
    assert pc.load(chain, row=2) == 8
    for layer in cache.buffers:
        for buf in layer:
            assert torch.equal(buf[2].narrow(-2, 0, 8), buf[1].narrow(-2, 0, 8))
            assert float(buf[2].narrow(-2, 8, 1).flatten()[0]) == 208  # untouched beyond
    assert len(pc.match(ids[:8])) == 1  # at most len - 1 tokens: the last one must be computed
    assert pc.match([10, 11, 12, 99, 14]) == []


def test_lru_eviction_and_pins():
    cache, pc = _pool(3)
    A, B, C = list(range(9)), list(range(50, 59)), list(range(80, 89))  # 2 full blocks each

    def hits(ids):
        chain = pc.match(ids)
        pc.release(chain)
        return len(chain)

    assert pc.store(A, 0) == 2  # A1, A2 (A1 touched last)
    assert pc.store(B, 1) == 2  # B1 takes the free block, B2 evicts the least recently used: A2
    assert hits(A) == 1 and hits(B) == 2 and len(pc.blocks) == 3
    pins = pc.match(B)  # B1, B2 in use
    assert pc.store(C, 2) == 1  # C1 evicts the only unpinned block (A1); C2 finds none
    assert hits(B) == 2 and hits(A) == 0 and hits(C) == 1
    pc.release(pins)
    assert pc.store(C, 2) == 1  # now C2 may evict a B block
    assert hits(C) == 2 and hits(B) == 1


def test_errors():
    model = tiny_model("mqa-window")
    ring = StaticKVCache.for_model(model, 1, 40)
    with pytest.raises(ConfigError, match="full-length cache rows"):
        PrefixCache(ring, 4)
    with pytest.raises(ConfigError, match="n_blocks >= 1"):
        Engine(model, max_batch=1, max_len=40, prefix_blocks=-2)
    assert not Engine(model, max_batch=1, max_len=40, prefix_blocks=2).cache.has_rings
