"""Expert parallelism on 2 gloo ranks equals the single-process MoE on each rank's batch (same
routing, capacity per rank): outputs, aux losses, gradients; load statistics over the group."""

import pytest
import torch
import torch.distributed as dist

from lmforge.distributed.expert_parallel import ExpertParallelMoE, apply_ep, expert_major
from lmforge.errors import ConfigError
from lmforge.model.moe import MoE, MoEConfig
from tests.distributed.parallel_workers import max_err, shared_results

MOD = "tests.distributed.test_expert_parallel"


def _moe(**kw):
    torch.manual_seed(0)
    cfg = MoEConfig(**{**dict(n_experts=6, top_k=2, d_expert=10, n_shared_experts=1, router_z_loss_coef=1e-3,
                              seq_balance_loss_coef=0.01, dispatch="loop"), **kw})
    return MoE(14, cfg).double()


def _data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(3, 7, 14, generator=g, dtype=torch.float64), torch.randn(3, 7, 14, generator=g,
                                                                                 dtype=torch.float64)


def check(rank, world, **kw):
    ref = _moe(**kw)
    ref_y = ref_aux = None
    for src in range(world):  # the single-process layer on every rank's batch; gradients summed
        x, dy = _data(src)
        x.requires_grad_()
        y, aux, metrics = ref(x)
        ((y * dy).sum() + sum(aux.values())).backward()
        if src == rank:
            ref_y, ref_aux, ref_dx, ref_load = y.detach(), {a: v.item() for a, v in aux.items()}, x.grad, metrics
    ep = ExpertParallelMoE.from_moe(_moe(**kw))
    x, dy = _data(rank)
    x.requires_grad_()
    y, aux, metrics = ep(x)
    ((y * dy).sum() + sum(aux.values())).backward()
    for p in (ep.router, ep.shared_in, ep.shared_out):  # replicated: sum the per-rank gradients
        dist.all_reduce(p.grad)
    local = slice(rank * 3, rank * 3 + 3)
    grads = max(max_err(ep.w_in.grad, ref.w_in.grad[local]), max_err(ep.w_out.grad, ref.w_out.grad[local]),
                max_err(ep.router.grad, ref.router.grad), max_err(ep.shared_in.grad, ref.shared_in.grad))
    global_load = torch.zeros(6)
    for src in range(world):
        _, _, mt = ref(_data(src)[0])
        global_load += mt["expert_load"] / world
    return {"y": max_err(y, ref_y), "dx": max_err(x.grad, ref_dx), "grads": grads,
            "aux": max(abs(aux[a].item() - ref_aux[a]) for a in ref_aux), "n_aux": len(aux),
            "dropped": abs(metrics["dropped_fraction"].item() - ref_load["dropped_fraction"].item()),
            "dropped_value": metrics["dropped_fraction"].item(),
            "load_global": max_err(metrics["expert_load_global"], global_load),
            "rank_load_sum": metrics["rank_load"].sum().item()}


def ep_no_drop(rank, world):
    return check(rank, world)


def ep_capacity(rank, world):
    return check(rank, world, capacity_factor=0.7, routing="sigmoid_topk", normalize_topk=True)


def ep_model(rank, world):
    """apply_ep on a whole MoE Transformer: logits equal the single-process model's on this batch."""
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=29, context_length=16, d_model=18, n_layers=2, n_heads=3,
                      moe=MoEConfig(n_experts=4, top_k=2, d_expert=12, dispatch="loop"))
    ref = Transformer(cfg).double()
    ids = torch.randint(0, 29, (2, 9), generator=torch.Generator().manual_seed(rank))
    ref_logits = ref(ids).logits
    torch.manual_seed(0)
    model = apply_ep(Transformer(cfg).double())
    return {"logits": max_err(model(ids).logits, ref_logits), "ep_layers": len(model.moe_layers())}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return shared_results(tmp_path_factory)


@pytest.mark.parametrize("check_name", ["ep_no_drop", "ep_capacity"])
def test_ep_equals_single_process_moe(results, check_name):
    for r in results[f"{MOD}:{check_name}"]:
        assert r["y"] < 1e-10 and r["dx"] < 1e-10 and r["grads"] < 1e-10, r
        assert r["n_aux"] == 3 and r["aux"] < 1e-10 and r["dropped"] == 0.0, r
        assert r["load_global"] < 1e-6 and r["rank_load_sum"] == pytest.approx(1.0), r
    drops = [r["dropped_value"] for r in results[f"{MOD}:{check_name}"]]
    assert (max(drops) > 0) == (check_name == "ep_capacity")  # the capacity case really drops


def test_ep_transformer(results):
    for r in results[f"{MOD}:ep_model"]:
        assert r["logits"] < 1e-10 and r["ep_layers"] == 2, r


def test_expert_major_permutation():
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]])  # rows from source 0: e0 e0 e2; source 1: e0 e1 e1 e1
    assert expert_major(counts).tolist() == [0, 1, 3, 4, 5, 6, 2]


def test_ep_refuses_a_model_without_moe():
    with pytest.raises(ConfigError, match="no MoE layers"):
        apply_ep(torch.nn.Linear(2, 2))
