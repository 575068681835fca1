"""GPU-only: the CUDA-graph (torch.compile reduce-overhead) decode step gives the eager engine's tokens."""

import pytest
import torch

from lmforge.inference import Engine, SamplingParams

from .helpers import prompts, tiny_model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_decode_equals_eager():
    model = tiny_model("gqa", dtype=torch.float32).cuda()
    ps = prompts([3, 9, 5])
    sp = SamplingParams(max_tokens=20, temperature=0)
    eager = Engine(model, max_batch=4, max_len=40).generate(ps, sp)
    compiled = Engine(model, max_batch=4, max_len=40, compile=True)
    assert compiled.compiled and compiled.decode_steps == 8
    assert [o[0].token_ids for o in compiled.generate(ps, sp)] == [o[0].token_ids for o in eager]
    # the k-step launches ran as captured CUDA graphs and prefill compiled (no logged fallback)
    assert compiled.graphs.graphs and all(g is not None for g in compiled.graphs.graphs.values())
    assert compiled._prefill_fn is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_speculation_and_prefix_cache_on_cuda_equal_cpu():
    """Batched speculation (draft model, n-gram) and prefix caching run on CUDA (generators,
    drafts, verification and block copies on the device) and give the CPU engine's greedy tokens."""
    from lmforge.inference.speculative import DraftModel, NGramDrafter

    model = tiny_model("gqa", dtype=torch.float32)
    draft = tiny_model("gqa", seed=5, n_layers=1, dtype=torch.float32)
    system = prompts([9], seed=7)[0]
    ps = [system + p for p in prompts([3, 6, 2, 5])]
    sp = SamplingParams(max_tokens=12, temperature=0)
    ref = [o[0].token_ids for o in Engine(model, max_batch=4, max_len=40).generate(ps, sp)]
    for kw in (dict(drafter=DraftModel(draft.cuda()), spec_k=3), dict(drafter=NGramDrafter(2), spec_k=3),
               dict(prefix_blocks=8, block_size=4)):
        engine = Engine(model.cuda(), max_batch=2, max_len=40, **kw)
        assert [o[0].token_ids for o in engine.generate(ps, sp)] == ref
    assert engine.prefix.hit_tokens == 2 * 8  # the first two requests start together, the last two hit
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=3)
    a = Engine(model, max_batch=2, max_len=40, drafter=NGramDrafter(2)).generate(ps[:2], seeded)
    b = Engine(model, max_batch=2, max_len=40, drafter=NGramDrafter(2)).generate(ps[:2], seeded)
    assert [o[0].token_ids for o in a] == [o[0].token_ids for o in b]  # seeded rows reproduce on the device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_speculative_round_equals_eager():
    """With compile=True the target's verify forward [max_batch, k+1] is a CUDA graph too."""
    from lmforge.inference.speculative import NGramDrafter

    model = tiny_model("gqa", dtype=torch.float32).cuda()
    ps = [p * 2 for p in prompts([3, 9, 5])]
    sp = SamplingParams(max_tokens=20, temperature=0)
    eager = Engine(model, max_batch=4, max_len=60, drafter=NGramDrafter(2), spec_k=3).generate(ps, sp)
    compiled = Engine(model, max_batch=4, max_len=60, drafter=NGramDrafter(2), spec_k=3, compile=True)
    assert [o[0].token_ids for o in compiled.generate(ps, sp)] == [o[0].token_ids for o in eager]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pipelined_step_on_cuda_equals_cpu():
    """The steady-state step on CUDA (pinned host copies + events, eager with 1 and 3 steps per
    launch and 8 per captured CUDA graph with a length bucket below max_len) gives the CPU
    engine's greedy tokens, stops trimmed exactly; rows
    that sample (the captured draw) and seeded rows (the general path) run in the same engine."""
    model = tiny_model("gqa", dtype=torch.float32)
    ps = prompts([3, 9, 5, 7, 2])
    base = [o[0].token_ids for o in Engine(model, max_batch=3, max_len=300).generate(
        ps, SamplingParams(max_tokens=24, temperature=0))]
    params = [SamplingParams(max_tokens=m, temperature=0, stop_ids=[b[5]] if i % 2 else [])
              for i, (m, b) in enumerate(zip((24, 20, 11, 24, 7), base))]
    ref = [o[0].token_ids for o in Engine(model, max_batch=3, max_len=300).generate(ps, params)]
    model = model.cuda()
    for compile, k in ((False, None), (False, 3), (True, None)):  # eager 1 and 3 steps per launch; compiled 8
        engine = Engine(model, max_batch=3, max_len=300, compile=compile, decode_steps=k)
        assert [o[0].token_ids for o in engine.generate(ps, params)] == ref
        sampled = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, top_p=0.9)
        seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=1)
        for rows in ([sampled] * 3, [sampled, sampled, seeded]):  # captured draw; then the general path
            outs = engine.generate(ps[:3], rows)
            assert all(len(o[0].token_ids) == 12 and max(o[0].token_ids) < model.cfg.vocab_size for o in outs)
            assert not engine.has_work() and engine._inflight is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_decode_step_on_cuda_equals_cpu():
    """The compiled engine with the fused decode step (Triton kernels captured in the 8-step CUDA
    graphs; the default on CUDA for small batches) gives the CPU engine's greedy tokens, stops
    trimmed; batches above MAX_ROWS fall back to the compiled model step."""
    from lmforge.inference.fused_decode import MAX_ROWS, FusedDecoder

    model = tiny_model("gqa", dtype=torch.float32)
    ps = prompts([3, 9, 5, 7])
    base = [o[0].token_ids for o in Engine(model, max_batch=3, max_len=300).generate(
        ps, SamplingParams(max_tokens=24, temperature=0))]
    params = [SamplingParams(max_tokens=24, temperature=0, stop_ids=[b[5]] if i % 2 else [])
              for i, b in enumerate(base)]
    ref = [o[0].token_ids for o in Engine(model, max_batch=3, max_len=300).generate(ps, params)]
    model = model.cuda()
    engine = Engine(model, max_batch=3, max_len=300, compile=True)
    assert engine.fused is not None
    assert [o[0].token_ids for o in engine.generate(ps, params)] == ref
    assert engine.graphs.graphs and all(g is not None for g in engine.graphs.graphs.values())
    sampled = engine.generate(ps[:3], [SamplingParams(max_tokens=12, temperature=0.8, top_k=1)] * 3)
    assert [o[0].token_ids for o in sampled] == [b[:12] for b in base[:3]]  # the sampled path's fp32 logits
    for impl, splits in (("dot", None), ("head", 4), ("sum", 2)):  # each attention kernel, splits fixed or tuned
        other = Engine(model, max_batch=3, max_len=300, fused_decode=True)  # eager: no inductor compile to wait for
        other.fused = FusedDecoder(model, other.cache, attn_impl=impl, attn_splits=splits)
        assert [o[0].token_ids for o in other.generate(ps, params)] == ref, impl
    assert Engine(model, max_batch=MAX_ROWS + 1, max_len=64, compile=True).fused is None
