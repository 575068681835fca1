"""The fused decode step (inference/fused_decode.py) against the model's own forward with the engine's
cache, and the engine with it against naive greedy decoding; kernels under TRITON_INTERPRET=1."""

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before lmforge.kernels.decode defines its kernels

import pytest  # noqa: E402
import torch  # noqa: E402

from lmforge.inference import Engine, SamplingParams  # noqa: E402
from lmforge.inference.cache import StaticKVCache  # noqa: E402
from lmforge.inference.fused_decode import FusedDecoder, supports  # noqa: E402
from lmforge.model.positions import RopeScaling  # noqa: E402
from lmforge.model.transformer import pack_projections  # noqa: E402

from .helpers import naive_greedy, prompts, tiny_model  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def prefilled(model, lengths, max_len=30):
    """A cache whose row b holds a prompt of lengths[b] tokens (prefilled by the model)."""
    cache = StaticKVCache.for_model(model, len(lengths), max_len)
    for b, (p, n) in enumerate(zip(prompts(lengths, vocab=model.cfg.vocab_size), lengths)):
        pos = torch.arange(n)[None]
        model(torch.tensor([p]), positions=pos, kv_cache=cache.view(slice(b, b + 1), n, pos))
    return cache


@pytest.mark.parametrize("kind,over", [("gqa", {}), ("gqa", dict(n_kv_heads=5, d_model=30, n_heads=5)),
                                       ("gqa", dict(n_kv_heads=1, tie_embeddings=True,
                                                    rope_scaling=RopeScaling(factor=4.0, original_context_length=8)))])
@pytest.mark.parametrize("impl", ["triton", "torch"])
@torch.no_grad()
def test_fused_step_equals_model_forward(kind, over, impl):
    """One decode step of rows at different lengths (GQA 4/2, MHA 5/5, MQA with a tied head and
    Llama-3 RoPE scaling): logits and the whole cache equal the model's forward with the cache."""
    model = tiny_model(kind, dtype=torch.float32, **over)
    pack_projections(model)
    lengths = [5, 1, 12]
    cache = prefilled(model, lengths)
    assert supports(model, cache, 3) is None
    mine = StaticKVCache([[t.clone() for t in layer] for layer in cache.buffers], cache.max_len)
    tokens = torch.tensor([[7], [3], [50]])
    pos = torch.tensor(lengths)[:, None]
    want = model(tokens, positions=pos, kv_cache=cache.view(slice(0, 3), max(lengths) + 1, pos)).logits[:, -1]
    attn = "dot" if over.get("n_kv_heads") == 1 else "sum"  # the tl.dot attention on the MQA case
    step = FusedDecoder(model, mine, impl=impl, attn_splits=2 if impl == "triton" else None, attn_impl=attn)
    got = step(tokens, pos, 16).clone()
    assert rel(got, want) < 1e-5
    assert torch.equal(step(tokens, pos, 16, greedy=True), got.argmax(dim=-1))  # the head kernel's argmax
    for a, b in zip(mine.buffers, cache.buffers):
        for x, y in zip(a, b):
            assert rel(x, y) < 1e-5


def test_supports_names_what_falls_back():
    model = tiny_model("gqa", dtype=torch.float32)
    cache = StaticKVCache.for_model(model, 2, 20)
    assert "not packed" in supports(model, cache, 2)
    pack_projections(model)
    assert supports(model, cache, 2) is None
    assert "batch of 9 rows" in supports(model, StaticKVCache.for_model(model, 9, 20), 9)
    for kind, words in [("mla", "latent"), ("moe", "experts"), ("gpt2", "norm 'layernorm'"),
                        ("softcap", "QK-norm"), ("mqa-window", "RoPE")]:
        m = tiny_model(kind, dtype=torch.float32)
        pack_projections(m)
        assert words in supports(m, StaticKVCache.for_model(m, 2, 20, ring=False), 2), kind
    m64 = tiny_model("gqa")  # float64
    pack_projections(m64)
    assert "float64" in supports(m64, StaticKVCache.for_model(m64, 2, 20), 2)


@torch.no_grad()
def test_engine_with_fused_step_equals_naive_greedy():
    """The engine's steady-state step through the fused kernels (the uncompiled path, 3 decode
    steps per launch) gives naive greedy's tokens for rows of different lengths, a stop included,
    with a waiting request joining when a row frees."""
    model = tiny_model("gqa", dtype=torch.float32)
    ps = prompts([3, 9, 5])
    refs = [naive_greedy(model, p, 7) for p in ps]
    stop = refs[1].index(refs[1][4])  # the first occurrence of the stop id
    params = [SamplingParams(max_tokens=7, temperature=0, stop_ids=[refs[1][4]] if i == 1 else []) for i in range(3)]
    engine = Engine(model, max_batch=2, max_len=20, eos_ids=[], fused_decode=True, decode_steps=3)
    assert engine.fused is not None
    outs = engine.generate(ps, params)
    assert outs[1][0].token_ids == refs[1][:stop] and outs[1][0].finish_reason == "stop"
    assert outs[0][0].token_ids == refs[0] and outs[2][0].token_ids == refs[2]
    # a packing dropped after the engine was built (as an eager forward does after a `.to()`):
    # the engine goes back to the model's forward, same tokens
    model.blocks[1].mlp.packed = None
    again = engine.generate(ps[:1], params[:1])
    assert engine.fused is None and again[0][0].token_ids == refs[0]
    assert Engine(model, max_batch=2, max_len=20).fused is None  # CPU default: the model's forward
    unpacked = copy.deepcopy(model)  # a deep copy is not packed
    assert Engine(unpacked, max_batch=2, max_len=20, fused_decode=True, pack=False).fused is None  # logged
