"""Tiny random models and the naive full-recompute generation the engine is checked against."""

from __future__ import annotations

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.model.mla import MLAConfig
from lmforge.model.moe import MoEConfig

KINDS = {
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mqa-window": dict(n_heads=3, n_kv_heads=1, window=5, layer_pattern=["local", "global"]),
    "mla": dict(n_heads=3, mla=MLAConfig(q_lora_rank=None, kv_lora_rank=10, qk_nope_head_dim=6,
                                          qk_rope_head_dim=4, v_head_dim=5)),
    "gpt2": dict(n_heads=3, positions="learned", norm="layernorm", activation="gelu", glu=False, bias=True),
    "softcap": dict(n_heads=2, attn_softcap=5.0, final_softcap=10.0, qk_norm=True, tie_embeddings=True),
    "moe": dict(n_heads=4, n_kv_heads=2, moe=MoEConfig(n_experts=4, top_k=2, d_expert=16), n_dense_layers=1),
}


def tiny_model(kind: str = "gqa", vocab: int = 61, seed: int = 0, dtype=torch.float64, **over) -> Transformer:
    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, context_length=48, d_model=24, n_layers=2, attention_backend="sdpa",
              init_std=0.2)
    kw.update(KINDS[kind])
    kw.update(over)
    return Transformer(ModelConfig(**kw)).to(dtype).eval()


@torch.no_grad()
def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Re-run the whole sequence for every token (no cache): the spec."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def prompts(lengths, vocab: int = 61, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def general_path(sp):
    """The same greedy settings with a seed: greedy tokens do not depend on it, but a seed keeps
    the row on the general (unpipelined, per-step `sample`) path."""
    return type(sp)(**{**sp.__dict__, "seed": 0})



def check_stops_trimmed_exactly(kind: str, **engine_options) -> None:
    """7 requests through 3 rows: rows stop (stop ids that occur in their output, max_tokens, a full
    cache) at different tokens while others go on and waiting requests take the freed slots. Every
    output equals the general (unpipelined) path's and naive greedy cut at its stop; the engine is
    reusable after a run that ended with a step in flight."""
    from lmforge.inference import Engine, SamplingParams

    model = tiny_model(kind)
    ps = prompts([3, 9, 2, 6, 4, 11, 5], seed=5)
    refs = [naive_greedy(model, p, 30 - len(p)) for p in ps]
    params = [SamplingParams(max_tokens=m, temperature=0, stop_ids=[ref[3 + i]] if i % 2 == 0 else [])
              for i, (ref, m) in enumerate(zip(refs, [25, 4, 9, 30, 7, 12, 6]))]
    engine = Engine(model, max_batch=3, max_len=30, eos_ids=[], **engine_options)
    got = engine.generate(ps, params)
    want = Engine(model, max_batch=3, max_len=30, eos_ids=[]).generate(ps, [general_path(sp) for sp in params])
    for sp, ref, g, w in zip(params, refs, got, want):
        assert g[0].token_ids == w[0].token_ids and g[0].finish_reason == w[0].finish_reason
        expect = ref[:sp.max_tokens]
        if sp.stop_ids and sp.stop_ids[0] in expect:
            expect = expect[:expect.index(sp.stop_ids[0])]
        assert g[0].token_ids == expect
    assert not engine.has_work() and all(s is None for s in engine.slots)
    again = engine.generate(ps[:2], [SamplingParams(max_tokens=8, temperature=0)] * 2)
    assert [a[0].token_ids for a in again] == [r[:8] for r in refs[:2]]


def stop_string_requests():
    """A byte-level tokenizer, a tiny float32 model, 3 prompts and greedy params (20 tokens) whose
    stop strings are 2 characters of the row's own plain output, so rows stop mid-output."""
    from lmforge.inference import Engine, SamplingParams
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_merges([], special_tokens=["<|endoftext|>"])
    model = tiny_model("gqa", vocab=257, dtype=torch.float32)
    ps = prompts([4, 6, 3], vocab=256, seed=2)
    base = Engine(model, tokenizer=tok, max_batch=3, max_len=40).generate(
        ps, SamplingParams(max_tokens=20, temperature=0))
    stops = [[b[0].text[5:7]] if len(b[0].text) > 7 else [] for b in base]
    return tok, model, ps, [SamplingParams(max_tokens=20, temperature=0, stop=s) for s in stops]
