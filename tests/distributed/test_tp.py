"""Tensor parallelism (+ sequence and vocab parallelism) on 2 gloo ranks equals the single-process
model: logits (gathered over the vocabulary shards), loss and every parameter's gradient (compared on
this rank's shard)."""

import pytest
import torch

from lmforge.distributed.tensor_parallel import apply_tp, sync_tp_grads, tp_reference_shard
from lmforge.distributed.vocab_parallel import gather_vocab
from tests.distributed.parallel_workers import max_err, shared_results

MOD = "tests.distributed.test_tp"


def _model(**kw):
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=43, context_length=16, d_model=20, n_layers=2, n_heads=4,
                                n_kv_heads=2, head_dim=6, d_ff=30, qk_norm=True, qkv_bias=True, bias=True,
                                attention_backend="reference"), **kw})
    return Transformer(cfg).double()


def check(rank, world, sp, vocab_parallel=True, **kw):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 43, (3, 11), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    ref_model = _model(**kw)
    ref = ref_model(x, y)
    ref.loss.backward()
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}
    model = apply_tp(_model(**kw), sequence_parallel=sp, vocab_parallel=vocab_parallel)
    out = model(x, y)
    out.loss.backward()
    sync_tp_grads(model)
    grad_err, names = 0.0, 0
    for name, p in model.named_parameters():
        shard = tp_reference_shard(name, ref_grads[name], model, rank, world)
        assert shard.shape == p.shape, (name, shard.shape, p.shape)
        grad_err = max(grad_err, max_err(p.grad, shard))
        names += 1
    logits = gather_vocab(out.logits, None, 43) if vocab_parallel else out.logits
    return {"logits": max_err(logits, ref.logits), "loss": abs(out.loss.item() - ref.loss.item()),
            "grads": grad_err, "params": names, "ref_params": len(ref_grads)}


def tp_sp(rank, world):
    return check(rank, world, True)


def tp_plain(rank, world):  # no sequence parallelism, replicated head (no vocab parallelism)
    return check(rank, world, False, vocab_parallel=False)


def tp_sp_sandwich_gelu(rank, world):  # extra norms between the regions, a non-gated MLP, MHA, tied
    return check(rank, world, True, norm_placement="sandwich", glu=False, activation="gelu", n_kv_heads=4,
                 qk_norm=False, bias=False, tie_embeddings=True, final_softcap=15.0, z_loss=1e-2)


def tp_sp_replicated_head(rank, world):  # sequence parallel with the last block's output gathered
    return check(rank, world, True, vocab_parallel=False)


def tp_vocab_no_sp(rank, world):
    return check(rank, world, False)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return shared_results(tmp_path_factory)


@pytest.mark.parametrize("check_name", ["tp_sp", "tp_plain", "tp_sp_sandwich_gelu", "tp_sp_replicated_head",
                                        "tp_vocab_no_sp"])
def test_tp_equals_single_process(results, check_name):
    for r in results[f"{MOD}:{check_name}"]:
        assert r["params"] == r["ref_params"]
        assert r["logits"] < 1e-10 and r["loss"] < 1e-10 and r["grads"] < 1e-10, r
