"""The mesh builder: refusals, rank layout, and composed training steps equal to single-process
(dp × ep on 2 gloo ranks by default; FSDP2 × TP on 4 ranks, slow; the pipeline compositions are in
test_composed.py)."""

import pytest
import torch
import torch.distributed as dist

from lmforge.distributed.mesh import ParallelConfig, build_mesh, check_parallel, parallelize, rank_grid
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig
from lmforge.model.moe import MoEConfig
from tests.distributed.parallel_workers import max_err, run_checks, shared_results

MOD = "tests.distributed.test_mesh"


def _cfg(**kw):
    return ModelConfig(**{**dict(vocab_size=31, context_length=16, d_model=24, n_layers=2, n_heads=4,
                                 n_kv_heads=2, d_ff=28, attention_backend="reference"), **kw})


def _batch(rows=4, t=8):
    ids = torch.randint(0, 31, (rows, t + 1), generator=torch.Generator().manual_seed(9))
    return ids[:, :-1], ids[:, 1:]


def _ref_grads(cfg, x, y, n_dp):
    """Single-process gradient of the mean over dp ranks of each rank's mean loss."""
    from lmforge.model import Transformer

    torch.manual_seed(0)
    ref = Transformer(cfg).double()
    rows = x.shape[0] // n_dp
    for r in range(n_dp):
        (ref(x[r * rows:(r + 1) * rows], y[r * rows:(r + 1) * rows]).loss / n_dp).backward()
    return {n: p.grad for n, p in ref.named_parameters()}


def dp_ep(rank, world):
    from lmforge.model import Transformer

    cfg = _cfg(moe=MoEConfig(n_experts=4, top_k=2, d_expert=10, dispatch="loop"))
    x, y = _batch()
    ref = _ref_grads(cfg, x, y, 2)
    mesh = build_mesh(ParallelConfig(dp=2, ep=2, dp_kind="ddp"), model_cfg=cfg)
    torch.manual_seed(0)
    model, handle = parallelize(Transformer(cfg).double(), mesh)
    model(x[rank * 2:(rank + 1) * 2], y[rank * 2:(rank + 1) * 2]).loss.backward()
    handle.finish()
    err = 0.0
    for name, p in model.named_parameters():
        full = ref[name]
        if name.endswith(("w_in", "w_out")):
            full = full[rank * 2:(rank + 1) * 2]  # this rank's 2 of the 4 experts
        err = max(err, max_err(p.grad, full))
    return {"grads": err, "coords": mesh.coords}


def fsdp_tp(rank, world):
    from lmforge.distributed.tensor_parallel import tp_reference_shard
    from lmforge.model import Transformer

    cfg = _cfg(qk_norm=True)
    x, y = _batch()
    ref = _ref_grads(cfg, x, y, 2)
    mesh = build_mesh(ParallelConfig(dp=2, tp=2, dp_kind="fsdp"), model_cfg=cfg)
    torch.manual_seed(0)
    model, handle = parallelize(Transformer(cfg).double(), mesh)
    dp = mesh.coords["dp"]
    model(x[dp * 2:(dp + 1) * 2], y[dp * 2:(dp + 1) * 2]).loss.backward()
    handle.finish()  # the TP partial sums (FSDP2 reduced over dp inside the backward)
    err = 0.0
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor()  # gather FSDP's dp shards of this tp shard
        err = max(err, max_err(grad, tp_reference_shard(name, ref[name], model, mesh.coords["tp"], 2)))
    return {"grads": err, "coords": mesh.coords}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return shared_results(tmp_path_factory)


def test_dp_ep_step_equals_single_process(results):
    rs = results[f"{MOD}:dp_ep"]
    assert [r["coords"]["ep"] for r in rs] == [0, 1]
    for r in rs:
        assert r["grads"] < 1e-10, r


@pytest.mark.slow
def test_fsdp_tp_2d_step_equals_single_process(tmp_path):
    rs = run_checks([f"{MOD}:fsdp_tp"], tmp_path, world=4)[f"{MOD}:fsdp_tp"]
    assert [(r["coords"]["dp"], r["coords"]["tp"]) for r in rs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in rs:
        assert r["grads"] < 1e-6, r  # apply_fsdp reduces gradients in fp32 (reduce_dtype) on this fp64 model


def test_rank_layout_tp_innermost():
    grid = rank_grid(ParallelConfig(dp=3, tp=2, pp=2))
    assert grid[0, :, 0, :].tolist() == [[0, 1], [2, 3], [4, 5]]  # tp neighbours are adjacent ranks
    assert grid[1, 0, 0, :].tolist() == [6, 7]


@pytest.mark.parametrize("pc, world, cfg_kw, message", [
    (ParallelConfig(dp=2, tp=2), 8, {}, "must equal the number of processes 8"),
    (ParallelConfig(dp=3, ep=2), 3, {"moe": MoEConfig(n_experts=4)}, "ep = 2 must divide dp × cp = 3"),
    (ParallelConfig(tp=3), 3, {}, "tp = 3 must divide n_heads = 4"),
    (ParallelConfig(tp=2), 2, {"moe": MoEConfig(n_experts=4)}, "use ep for the experts"),
    (ParallelConfig(pp=2, dp=2), 4, {}, "pp > 1 with dp_kind = 'fsdp' is not supported"),
    (ParallelConfig(pp=3), 3, {}, "pp = 3 stages × pp_virtual = 1 chunks need at least as many layers"),
    (ParallelConfig(pp=2, pp_schedule="interleaved", pp_virtual=2), 2, {"n_layers": 3}, "need at least as many"),
    (ParallelConfig(pp=2, pp_schedule="interleaved"), 2, {}, "needs pp >= 2 and pp_virtual >= 2"),
    (ParallelConfig(pp=2, pp_virtual=2), 2, {"n_layers": 4}, "pp_virtual = 2 needs pp_schedule = 'interleaved'"),
    (ParallelConfig(cp=2, tp=2), 4, {}, "cp > 1 together with tp > 1 is not supported"),
    (ParallelConfig(tp=2), 2, {"fused_loss": True}, "set fused_loss = false"),
    (ParallelConfig(tp=2), 2, {"mtp_depth": 1}, "tp > 1 with multi-token prediction"),
    (ParallelConfig(cp=3), 3, {}, "context_length = 16 must be a multiple of 2 × cp"),
    (ParallelConfig(cp=2), 2, {"window": 4}, "sliding windows"),
    (ParallelConfig(ep=2, dp=2), 2, {}, "needs a MoE model"),
    (ParallelConfig(dp=2, ep=2), 2, {"moe": MoEConfig(n_experts=4)}, "use dp_kind = 'ddp'"),
])
def test_refusals(pc, world, cfg_kw, message):
    with pytest.raises(ConfigError, match=message):
        check_parallel(pc, world, _cfg(**cfg_kw))


def test_valid_combinations_pass():
    check_parallel(ParallelConfig(dp=2, tp=2), 4, _cfg())
    check_parallel(ParallelConfig(dp=2, ep=2, dp_kind="ddp"), 2, _cfg(moe=MoEConfig(n_experts=4)))
    check_parallel(ParallelConfig(pp=2, dp=2, dp_kind="ddp"), 4, _cfg())
    check_parallel(ParallelConfig(pp=2, tp=2, dp=2, dp_kind="ddp"), 8, _cfg())
    check_parallel(ParallelConfig(pp=2, cp=2), 4, _cfg())
    check_parallel(ParallelConfig(pp=2, dp=2, ep=2, dp_kind="ddp"), 4, _cfg(moe=MoEConfig(n_experts=4)))
    check_parallel(ParallelConfig(pp=2, tp=2, pp_schedule="interleaved", pp_virtual=2), 4, _cfg(n_layers=4))
    assert not dist.is_initialized()
