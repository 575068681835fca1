"""Ring attention (context parallelism) equals full attention, forward and backward, on 2 gloo ranks."""

import pytest
import torch
import torch.distributed as dist

from lmforge.distributed.ring_attention import (
    apply_context_parallel,
    merge,
    ring_attention,
    shard_sequence,
    unshard_sequence,
    zigzag_indices,
)
from lmforge.errors import ConfigError
from lmforge.model.attention import reference_attention
from tests.distributed.parallel_workers import max_err, shared_results

MOD = "tests.distributed.test_ring_attention"


def _gather(x):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return parts


def check_ring(rank, world, causal, hq, hkv, T=12, B=2, D=5, Dv=7):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, hq, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, hkv, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, hkv, T, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(B, hq, T, Dv, generator=g, dtype=torch.float64)
    ref = reference_attention(q, k, v, causal=causal)
    ref.backward(dout)
    ql, kl, vl = (shard_sequence(t.detach(), 2, rank, world, causal).requires_grad_() for t in (q, k, v))
    out = ring_attention(ql, kl, vl, causal=causal)
    out.backward(shard_sequence(dout, 2, rank, world, causal))
    full = lambda x: unshard_sequence(_gather(x), 2, causal)  # noqa: E731
    return {"out": max_err(full(out.detach()), ref), "dq": max_err(full(ql.grad), q.grad),
            "dk": max_err(full(kl.grad), k.grad), "dv": max_err(full(vl.grad), v.grad)}


def ring_causal_gqa(rank, world):
    return check_ring(rank, world, causal=True, hq=4, hkv=2)


def ring_full_mha(rank, world):
    return check_ring(rank, world, causal=False, hq=3, hkv=3, T=10)


def ring_transformer(rank, world):
    """A whole Transformer with its attention layers on the ring: logits and gradients."""
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=37, context_length=16, d_model=24, n_layers=2, n_heads=3, n_kv_heads=1,
                      d_ff=40, attention_backend="reference")
    model = Transformer(cfg).double()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 37, (2, 13), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    ref = model(x, y)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    apply_context_parallel(model)
    pos = zigzag_indices(12, rank, world).expand(2, -1)
    out = model(shard_sequence(x, 1, rank, world), shard_sequence(y, 1, rank, world), positions=pos)
    ce, n = out.ce_sum.clone(), out.n_tokens.clone().double()
    dist.all_reduce(n)
    (out.ce_sum / n).backward()  # the global mean CE's share of this rank
    dist.all_reduce(ce)
    grad_err = 0.0
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad)
        grad_err = max(grad_err, max_err(p.grad, ref_grads[name]))
    logits = unshard_sequence(_gather(out.logits.detach()), 1)
    return {"logits": max_err(logits, ref.logits), "loss": abs((ce / n).item() - ref.loss.item()),
            "grads": grad_err}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return shared_results(tmp_path_factory)


@pytest.mark.parametrize("check", ["ring_causal_gqa", "ring_full_mha"])
def test_ring_matches_full_attention(results, check):
    for r in results[f"{MOD}:{check}"]:
        for key, err in r.items():
            assert err < 1e-10, (check, key, err)


def test_context_parallel_transformer_matches_single_process(results):
    for r in results[f"{MOD}:ring_transformer"]:
        assert r["logits"] < 1e-10 and r["loss"] < 1e-10 and r["grads"] < 1e-10, r


def test_zigzag_layout_and_merge():
    assert zigzag_indices(12, 0, 2).tolist() == [0, 1, 2, 9, 10, 11]
    assert zigzag_indices(12, 1, 2).tolist() == [3, 4, 5, 6, 7, 8]
    x = torch.arange(24).view(2, 12)
    parts = [shard_sequence(x, 1, r, 3) for r in range(3)]
    assert torch.equal(unshard_sequence(parts, 1), x)
    with pytest.raises(ConfigError, match="multiple of 2 × cp size"):
        zigzag_indices(10, 0, 3)
    # merging two halves of the keys by LSE equals softmax over all keys
    torch.manual_seed(0)
    s, v = torch.randn(3, 9, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    part = lambda a, b: (torch.softmax(s[:, a:b], -1) @ v[a:b], torch.logsumexp(s[:, a:b], -1))  # noqa: E731
    out, _ = merge(*part(0, 4), *part(4, 9))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)
