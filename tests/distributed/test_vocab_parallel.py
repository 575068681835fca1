"""Vocab parallelism on 2 and 3 gloo ranks (a vocabulary that does not divide evenly): the cross-entropy
and log-sum-exp, their gradients (CE alone and CE + z-loss), the embedding and its weight gradient
equal torch's single-process ops in float64; a whole 3-way tensor-parallel Transformer (vocab
parallel head, tied embedding, sequence parallel) equals the unsharded model."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.distributed.vocab_parallel import (
    VocabParallelEmbedding,
    gather_vocab,
    vocab_parallel_cross_entropy,
    vocab_range,
)
from lmforge.errors import ConfigError
from tests.distributed.parallel_workers import max_err, shared_results

MOD = "tests.distributed.test_vocab_parallel"
V = 29  # 15 + 14 on 2 ranks, 10 + 10 + 9 on 3


def check_ops(group) -> dict:
    from lmforge.model.layers import Embedding

    w, r = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(3, 5, V, dtype=torch.float64, generator=g)
    targets = torch.randint(0, V, (3, 5), generator=g)
    targets[0, :2] = -100
    targets[1, 0], targets[1, 1] = 0, V - 1  # the first and last rows of the vocabulary
    valid = targets != -100
    start, end = vocab_range(V, r, w)
    res = {"rows": end - start}
    for z in (0.0, 0.1):  # CE alone (no gradient reaches lse), and with a z-loss term
        full = logits.clone().requires_grad_()
        ce_ref = F.cross_entropy(full.view(-1, V), targets.view(-1), reduction="none").view(3, 5)
        lse_ref = torch.logsumexp(full, -1)
        (ce_ref.sum() / valid.sum() + z * (lse_ref.square() * valid).sum()).backward()
        local = logits[..., start:end].clone().requires_grad_()
        ce, lse = vocab_parallel_cross_entropy(local, targets, start, group)
        loss = ce.sum() / valid.sum() + (z * (lse.square() * valid).sum() if z else 0.0)
        loss.backward()
        res[f"ce{z}"] = max_err(ce, ce_ref)
        res[f"lse{z}"] = max_err(lse, lse_ref)
        res[f"grad{z}"] = max_err(local.grad, full.grad[..., start:end])
    res["gather"] = max_err(gather_vocab(logits[..., start:end], group, V), logits)

    torch.manual_seed(1)
    emb = Embedding(V, 6).double()
    emb.reset_parameters(1.0)
    ids = torch.randint(0, V, (4, 7), generator=g)
    ids[0, 0], ids[0, 1] = 0, V - 1
    upstream = torch.randn(4, 7, 6, dtype=torch.float64, generator=g)
    (emb(ids) * upstream).sum().backward()
    vp = VocabParallelEmbedding(emb, group)
    out = vp(ids)
    (out * upstream).sum().backward()
    res["emb"] = max_err(out, emb(ids))
    res["emb_grad"] = max_err(vp.weight.grad, emb.weight.grad[start:end])
    return res


def check_model(group) -> dict:
    """tp = 3: heads, MLP, vocabulary (tied embedding, final soft-cap, z-loss) and sequence parallel."""
    from lmforge.distributed.tensor_parallel import apply_tp, sync_tp_grads, tp_reference_shard
    from lmforge.model import ModelConfig, Transformer

    w, r = dist.get_world_size(group), dist.get_rank(group)
    cfg = ModelConfig(vocab_size=V, context_length=16, d_model=18, n_layers=2, n_heads=3, n_kv_heads=3,
                      d_ff=21, tie_embeddings=True, final_softcap=20.0, z_loss=1e-2, attention_backend="reference")
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (2, 10), generator=g)
    x, y = ids[:, :-1], ids[:, 1:].clone()  # T = 9: 3 positions per rank
    y[1, 4] = -100
    torch.manual_seed(0)
    ref_model = Transformer(cfg).double()
    ref = ref_model(x, y)
    ref.loss.backward()
    torch.manual_seed(0)
    model = apply_tp(Transformer(cfg).double(), group, sequence_parallel=True)
    out = model(x, y)
    out.loss.backward()
    sync_tp_grads(model, group)
    grads = dict(ref_model.named_parameters())
    grad_err = max(max_err(p.grad, tp_reference_shard(n, grads[n].grad, model, r, w))
                   for n, p in model.named_parameters())
    return {"logits": max_err(gather_vocab(out.logits, group, V), ref.logits),
            "loss": abs(out.loss.item() - ref.loss.item()), "grads": grad_err,
            "emb_rows": model.tok_emb.weight.shape[0]}


def vocab_ce_2(rank, world):
    return check_ops(None)


def vocab_3(rank, world):
    """On the first 3 of the 4 ranks (every rank must enter new_group)."""
    group = dist.new_group([0, 1, 2])
    if rank == 3:
        return {}
    return {**check_ops(group), **{f"model_{k}": v for k, v in check_model(group).items()}}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return shared_results(tmp_path_factory)


@pytest.fixture(scope="module")
def results4(tmp_path_factory):
    return shared_results(tmp_path_factory, world=4)


def _assert_ops(rs, rows):
    assert [r["rows"] for r in rs] == rows
    for r in rs:
        for key in ("ce0.0", "lse0.0", "grad0.0", "ce0.1", "lse0.1", "grad0.1", "gather", "emb", "emb_grad"):
            assert r[key] < 1e-12, (key, r)


def test_vocab_parallel_ops_2_ranks(results):
    _assert_ops(results[f"{MOD}:vocab_ce_2"], [15, 14])


def test_vocab_parallel_ops_3_ranks(results4):
    _assert_ops(results4[f"{MOD}:vocab_3"][:3], [10, 10, 9])


def test_vocab_parallel_model_3_ranks(results4):
    rs = results4[f"{MOD}:vocab_3"][:3]
    assert [r["model_emb_rows"] for r in rs] == [10, 10, 9]
    for r in rs:
        assert r["model_logits"] < 1e-10 and r["model_loss"] < 1e-10 and r["model_grads"] < 1e-10, r


def test_vocab_range():
    assert [vocab_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    with pytest.raises(ConfigError, match="vocab_size = 3 is smaller than tp = 4"):
        vocab_range(3, 0, 4)


@pytest.mark.parametrize("field, message", [("fused_loss", "set model.fused_loss = false"),
                                            ("mtp_depth", "multi-token prediction")])
def test_vocab_parallel_refusals(field, message):
    from lmforge.distributed.vocab_parallel import apply_vocab_parallel
    from lmforge.model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=V, context_length=8, d_model=12, n_layers=1, n_heads=2, d_ff=16,
                      **{field: True if field == "fused_loss" else 1})
    with pytest.raises(ConfigError, match=message):
        apply_vocab_parallel(Transformer(cfg))  # refused before any process group is needed
