"""Pipeline parallelism composed with the other forms through the one mesh builder, on 4 gloo ranks: a
training step's loss and every parameter's gradient equal single-process gradient accumulation over
the same micro-batches (float64): pp 2 × tp 2 (vocab + sequence parallel, tied embedding; 1F1B and
interleaved), pp 2 × dp 2 (own DDP; 1F1B and interleaved), pp 2 × cp 2 (ring attention inside
each stage), and pp 2 × dp 2 × ep 2 (MoE experts over the data-parallel replicas of each stage);
slow: the 3-D pp 2 × dp 2 × tp 2 on 8 ranks."""

import pytest
import torch

from lmforge.distributed.mesh import ParallelConfig, build_mesh, parallelize
from tests.distributed.parallel_workers import max_err, run_checks, shared_results

MOD = "tests.distributed.test_composed"
ROWS, T = 8, 8


def _cfg(**kw):
    from lmforge.model import ModelConfig

    return ModelConfig(**{**dict(vocab_size=43, context_length=16, d_model=24, n_layers=3, n_heads=4,
                                 n_kv_heads=2, d_ff=28, attention_backend="reference"), **kw})


def _batch():
    ids = torch.randint(0, 43, (ROWS, T + 1), generator=torch.Generator().manual_seed(9))
    y = ids[:, 1:].clone()
    y[1, :3] = -100  # ignored targets change the token count
    return ids[:, :-1], y


def _reference(cfg, x, y, replicas: int, n_micro: int):
    """Single-process: each data-parallel replica's rows in `n_micro` micro-batches (loss = Σ ce_sum
    / replica tokens + mean of the aux terms), the replicas' losses averaged. -> (grads, loss)."""
    from lmforge.model import Transformer

    torch.manual_seed(0)
    ref = Transformer(cfg).double()
    per = x.shape[0] // replicas
    rows = per // n_micro
    total = 0.0
    for r in range(replicas):
        xs, ys = x[r * per:(r + 1) * per], y[r * per:(r + 1) * per]
        n = (ys != -100).sum()
        for i in range(n_micro):
            out = ref(xs[i * rows:(i + 1) * rows], ys[i * rows:(i + 1) * rows])
            aux = sum(out.aux.values(), torch.zeros((), dtype=torch.float64))
            loss = (out.ce_sum / n + aux / n_micro) / replicas
            loss.backward()
            total += loss.item()
    return {n: p.grad for n, p in ref.named_parameters()}, total


def _step(pc: ParallelConfig, cfg, n_micro: int, expert_shard: int = 1) -> dict:
    """Build the mesh, run one pipelined step on this rank's replica, compare with the reference."""
    from lmforge.distributed.pipeline import run_pipeline
    from lmforge.distributed.tensor_parallel import tp_reference_shard
    from lmforge.model import Transformer

    x, y = _batch()
    ref, ref_loss = _reference(cfg, x, y, pc.dp, n_micro)
    mesh = build_mesh(pc, model_cfg=cfg)
    torch.manual_seed(0)
    stage, handle = parallelize(Transformer(cfg).double(), mesh)
    dp, per = mesh.coords["dp"], ROWS // pc.dp
    res = run_pipeline(stage, x[dp * per:(dp + 1) * per], y[dp * per:(dp + 1) * per], n_micro,
                       pc.pp_schedule, reducer=handle)
    err, n_params = 0.0, 0
    for name, p in stage.named_parameters():
        full = ref[stage.reference_name(name)]
        if name.endswith(("w_in", "w_out")):  # this rank's experts
            n_local = full.shape[0] // expert_shard
            full = full[mesh.coords["ep"] * n_local:(mesh.coords["ep"] + 1) * n_local]
        elif pc.tp > 1:
            full = tp_reference_shard(stage.reference_name(name), full, stage.model, mesh.coords["tp"], pc.tp)
        assert p.grad.shape == full.shape, (name, p.grad.shape, full.shape)
        err = max(err, max_err(p.grad, full))
        n_params += 1
    # the loss is the mean over replicas of each replica's loss; every replica reports its own
    loss = torch.tensor([res.loss], dtype=torch.float64)
    if pc.dp > 1:
        torch.distributed.all_reduce(loss, group=mesh.groups["dp" if pc.ep == 1 else "batch"])
    return {"grads": err, "loss": abs(loss.item() / pc.dp - ref_loss), "coords": mesh.coords, "params": n_params}


def pp_tp(rank, world):
    return _step(ParallelConfig(pp=2, tp=2), _cfg(tie_embeddings=True, qk_norm=True), n_micro=4)


def pp_tp_interleaved(rank, world):  # 4 virtual stages of 5 layers; stage boundaries hold T/tp positions
    pc = ParallelConfig(pp=2, tp=2, pp_schedule="interleaved", pp_virtual=2)
    return _step(pc, _cfg(n_layers=5), n_micro=4)


def pp_dp(rank, world):
    return _step(ParallelConfig(pp=2, dp=2, dp_kind="ddp"), _cfg(tie_embeddings=True), n_micro=2)


def pp_dp_interleaved(rank, world):  # DDP syncs in the last backward, which touches only chunk 0
    pc = ParallelConfig(pp=2, dp=2, dp_kind="ddp", pp_schedule="interleaved", pp_virtual=2)
    return _step(pc, _cfg(n_layers=4), n_micro=2)


def pp_cp(rank, world):
    return _step(ParallelConfig(pp=2, cp=2), _cfg(), n_micro=2)


def pp_ep(rank, world):
    from lmforge.model.moe import MoEConfig

    cfg = _cfg(moe=MoEConfig(n_experts=4, top_k=2, d_expert=10, dispatch="loop"), n_dense_layers=2)  # stage 0: dense only
    return _step(ParallelConfig(pp=2, dp=2, ep=2, dp_kind="ddp"), cfg, n_micro=2, expert_shard=2)


def pp_dp_tp(rank, world):
    return _step(ParallelConfig(pp=2, dp=2, tp=2, dp_kind="ddp"), _cfg(tie_embeddings=True), n_micro=2)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return shared_results(tmp_path_factory, world=4)


@pytest.mark.parametrize("check, dims", [
    ("pp_tp", ("pp", "tp")), ("pp_tp_interleaved", ("pp", "tp")), ("pp_dp", ("pp", "dp")),
    ("pp_dp_interleaved", ("pp", "dp")),
    ("pp_cp", ("pp", "cp")), ("pp_ep", ("pp", "dp")),
])
def test_composed_step_equals_single_process(results, check, dims):
    rs = results[f"{MOD}:{check}"]
    # rank layout: pp outermost, then dp, cp, tp
    assert [tuple(r["coords"][d] for d in dims) for r in rs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in rs:
        assert r["grads"] < 1e-10 and r["loss"] < 1e-10, (check, r)


@pytest.mark.slow
def test_pp_dp_tp_3d_step_equals_single_process(tmp_path):
    rs = run_checks([f"{MOD}:pp_dp_tp"], tmp_path, world=8)[f"{MOD}:pp_dp_tp"]
    assert [tuple(r["coords"][d] for d in ("pp", "dp", "tp")) for r in rs] == [
        (pp, dp, tp) for pp in range(2) for dp in range(2) for tp in range(2)]
    for r in rs:
        assert r["grads"] < 1e-10 and r["loss"] < 1e-10, r
