"""MoE layer: dispatch against the masked every-expert reference, hand-computed losses and drops,
aux-loss-free balancing, dense equivalence and upcycling."""

import math

import pytest
import torch

from lmforge.config import from_dict, to_dict
from lmforge.errors import ConfigError
from lmforge.model.layers import MLP
from lmforge.model.moe import (
    MoE,
    MoEConfig,
    capacity,
    keep_mask,
    moe_reference,
    route,
    upcycle_from_dense,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These shapes are tiny: a second intra-op thread only adds barrier waits (seen 3x slower on
    the shared 2-core CI machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


D = 24  # d_model: not a power of two, and 24·4 bytes is 16-byte aligned for the grouped-mm path


def _dense(d_ff: int, activation: str = "silu", glu: bool = True) -> MLP:
    mlp = MLP(D, d_ff, activation, glu)
    for m in (mlp.gate, mlp.up, mlp.down):
        if m is not None:
            m.reset_parameters(0.2)
    return mlp


@pytest.mark.parametrize("routing,normalize", [("softmax_topk", False), ("topk_softmax", False),
                                               ("sigmoid_topk", True)])
@pytest.mark.parametrize("activation,glu", [("silu", True), ("gelu", False)])
def test_one_expert_top1_equals_dense_mlp(routing, normalize, activation, glu):
    torch.manual_seed(0)
    dense = _dense(40, activation, glu)
    moe = MoE(D, MoEConfig(n_experts=1, top_k=1, d_expert=40, routing=routing, normalize_topk=normalize),
              activation, glu)
    upcycle_from_dense(moe, dense.state_dict())
    x = torch.randn(2, 7, D)
    y, _, metrics = moe(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)
    assert metrics["expert_load"].tolist() == [1.0]


CONFIGS = [
    dict(n_experts=6, top_k=2),
    dict(n_experts=5, top_k=3, routing="topk_softmax", n_shared_experts=1),
    dict(n_experts=7, top_k=2, routing="sigmoid_topk", normalize_topk=True, route_scale=2.5),
    dict(n_experts=6, top_k=2, capacity_factor=0.8),
    dict(n_experts=6, top_k=2, capacity_factor=0.6, drop_policy="score", n_shared_experts=2),
    dict(n_experts=6, top_k=2, aux_free_bias=True),
]


@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm"])
@pytest.mark.parametrize("kw", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_dispatch_matches_reference_forward_and_backward(kw, dispatch):
    if dispatch == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    torch.manual_seed(1)
    moe = MoE(D, MoEConfig(d_expert=20, dispatch=dispatch, **kw), init_std=0.3).double() \
        if dispatch == "loop" else MoE(D, MoEConfig(d_expert=20, dispatch=dispatch, **kw), init_std=0.3)
    if moe.cfg.aux_free_bias:
        moe.routing_bias.copy_(torch.linspace(-0.3, 0.3, moe.cfg.n_experts))
    x = torch.randn(3, 11, D, dtype=moe.w_in.dtype, requires_grad=True)
    y, _, _ = moe(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *moe.parameters()], g)
    y_ref = moe_reference(moe, x)
    grads_ref = torch.autograd.grad(y_ref, [x, *moe.parameters()], g)
    tol = dict(rtol=1e-9, atol=1e-10) if y.dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **tol)


# Probabilities for 4 tokens over 3 experts; the router maps one-hot token i to logits log p_i + c_i
# (the shift c_i changes no probability, only logsumexp = c_i, for the z-loss).
P = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.15, 0.8, 0.05], [0.2, 0.25, 0.55]], dtype=torch.float64)
SHIFT = torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=torch.float64)


def _hand_moe(**kw) -> tuple[MoE, torch.Tensor]:
    moe = MoE(5, MoEConfig(n_experts=3, d_expert=8, **kw)).double()
    with torch.no_grad():
        moe.router.zero_()
        moe.router[:, :4] = (P.log() + SHIFT[:, None]).t()
    x = torch.eye(5, dtype=torch.float64)[:4].view(2, 2, 5)  # B=2 sequences of T=2 one-hot tokens
    return moe, x


def test_balance_losses_against_hand_computation():
    # k = 1: picks experts 0, 0, 1, 2 -> f = [1/2, 1/4, 1/4]; P_mean = [0.4125, 0.3875, 0.2]
    #   L = 3·(0.5·0.4125 + 0.25·0.3875 + 0.25·0.2) = 1.059375
    # per sequence: seq 0 picks 0, 0 (f = [1,0,0], P = [0.65, ...]) -> 3·0.65 = 1.95;
    #   seq 1 picks 1, 2 (f = [0, .5, .5], P = [.175, .525, .3]) -> 3·0.4125 = 1.2375; mean 1.59375
    # z-loss: logsumexp = shift -> mean(1, 4, 0, 1) = 1.5
    moe, x = _hand_moe(top_k=1, balance_loss_coef=0.1, seq_balance_loss_coef=0.01, router_z_loss_coef=0.001)
    _, aux, metrics = moe(x)
    assert aux["moe_balance"].item() == pytest.approx(0.1 * 1.059375, rel=1e-6)  # the router runs in fp32
    assert aux["moe_seq_balance"].item() == pytest.approx(0.01 * 1.59375, rel=1e-6)  # the router runs in fp32
    assert aux["router_z"].item() == pytest.approx(0.001 * 1.5, rel=1e-6)  # the router runs in fp32
    assert metrics["expert_load"].tolist() == [0.5, 0.25, 0.25]
    # k = 2: choices {0,1} {0,1} {1,0} {2,1} -> counts [3, 4, 1] of 8
    #   L = 3·(3/8·0.4125 + 4/8·0.3875 + 1/8·0.2) = 1.1203125
    moe, x = _hand_moe(top_k=2, balance_loss_coef=1.0)
    _, aux, metrics = moe(x)
    assert aux["moe_balance"].item() == pytest.approx(1.1203125, rel=1e-6)  # the router runs in fp32
    assert metrics["expert_load"].tolist() == [0.375, 0.5, 0.125]
    assert set(aux) == {"moe_balance"}  # disabled terms are left out


def test_gates_per_routing_mode_against_hand_computation():
    logits = (P.log() + SHIFT[:, None])[:1]  # token 0: p = [0.7, 0.2, 0.1]

    def gates(**kw):
        r = route(logits, MoEConfig(n_experts=3, top_k=2, **kw))
        order = r.expert_idx[0].argsort()
        return r.expert_idx[0][order].tolist(), r.gates[0][order].tolist()

    assert gates() == ([0, 1], pytest.approx([0.7, 0.2]))
    assert gates(normalize_topk=True) == ([0, 1], pytest.approx([0.7 / 0.9, 0.2 / 0.9]))
    assert gates(routing="topk_softmax") == ([0, 1], pytest.approx([0.7 / 0.9, 0.2 / 0.9]))
    sig = torch.sigmoid(logits[0])
    assert gates(routing="sigmoid_topk", route_scale=2.5) == ([0, 1], pytest.approx((2.5 * sig[:2]).tolist()))
    # the bias changes the choice (expert 2 instead of 1) but not the gate values
    r = route(logits, MoEConfig(n_experts=3, top_k=2), bias=torch.tensor([0.0, 0.0, 0.15], dtype=torch.float64))
    order = r.expert_idx[0].argsort()
    assert r.expert_idx[0][order].tolist() == [0, 2]
    assert r.gates[0][order].tolist() == pytest.approx([0.7, 0.1])


def test_capacity_drops_against_hand_computation():
    # 6 tokens, 2 experts, top-1, capacity_factor 1 -> capacity ceil(6·1/2) = 3 per expert.
    # Tokens 0-4 prefer expert 0 (gates rise with the position), token 5 expert 1:
    # expert 0 keeps 3 of 5 -> 2 of 6 assignments dropped.
    torch.manual_seed(2)
    p0 = torch.tensor([0.6, 0.9, 0.7, 0.95, 0.8, 0.1], dtype=torch.float64)
    for policy, dropped_tokens in [("position", [3, 4]), ("score", [0, 2])]:
        moe = MoE(7, MoEConfig(n_experts=2, top_k=1, d_expert=8, capacity_factor=1.0, drop_policy=policy)).double()
        with torch.no_grad():
            moe.router.zero_()
            moe.router[0, :6] = torch.log(p0)
            moe.router[1, :6] = torch.log(1 - p0)
        x = torch.zeros(1, 6, 7, dtype=torch.float64)
        x[0, :, :6] = torch.eye(6, dtype=torch.float64)
        x[0, :, 6] = torch.randn(6, dtype=torch.float64)  # token content the router ignores
        assert capacity(moe.cfg, 6) == 3
        y, _, metrics = moe(x)
        assert metrics["dropped_fraction"].item() == pytest.approx(2 / 6)
        r = route(moe.router_logits(x[0]), moe.cfg)
        keep = keep_mask(r.expert_idx, r.gates, moe.cfg)[:, 0]
        assert torch.nonzero(~keep).flatten().tolist() == dropped_tokens
        # dropped tokens get exactly zero (the residual carries them); kept ones their expert's output
        assert torch.all(y[0, dropped_tokens] == 0)
        kept = [t for t in range(6) if t not in dropped_tokens]
        e = r.expert_idx[kept, 0]
        manual = torch.stack([moe._ffn(x[0, t], moe.w_in[i], moe.w_out[i], torch.matmul)
                              for t, i in zip(kept, e.tolist())])
        torch.testing.assert_close(y[0, kept], r.gates[kept, 0:1] * manual)


def test_capacity_with_top2_counts():
    # 4 tokens, 3 experts, top-2, cf 0.75 -> capacity ceil(0.75·8/3) = 2; choices {0,1} {0,1} {1,0} {2,1}:
    # expert 0 has 3 (drops 1), expert 1 has 4 (drops 2), expert 2 has 1 -> 3 of 8 dropped.
    moe, x = _hand_moe(top_k=2, capacity_factor=0.75)
    assert capacity(moe.cfg, 4) == 2
    _, _, metrics = moe(x)
    assert metrics["dropped_fraction"].item() == pytest.approx(3 / 8)
    assert metrics["expert_load"].tolist() == [0.375, 0.5, 0.125]  # load is counted before dropping


def test_routing_bias_update_rule():
    moe = MoE(D, MoEConfig(n_experts=3, top_k=1, d_expert=8, aux_free_bias=True, bias_update_rate=0.01))
    moe.load_counts.copy_(torch.tensor([5.0, 1.0, 0.0]))  # mean 2: expert 0 over, 1 and 2 under
    moe.update_routing_bias()
    assert moe.routing_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01])
    assert moe.load_counts.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("routing", ["softmax_topk", "sigmoid_topk"])
def test_aux_free_bias_moves_skewed_load_toward_uniform(routing):
    torch.manual_seed(3)
    e = 8
    moe = MoE(D, MoEConfig(n_experts=e, top_k=2, d_expert=8, routing=routing, aux_free_bias=True,
                           bias_update_rate=0.015, balance_loss_coef=0.0), init_std=0.3)
    with torch.no_grad():
        moe.router[:, 0] = torch.linspace(2.0, -2.0, e)  # input feature 0 (always ~ +1) favours expert 0
    moe.train()

    def batch():
        x = torch.randn(4, 16, D)
        x[..., 0] = 1.0 + 0.1 * x[..., 0]
        return x

    loads = []
    with torch.no_grad():
        for _ in range(120):
            loads.append(moe(batch())[2]["expert_load"])
            moe.update_routing_bias()
    # load relative to uniform (1.0 = balanced); later loads are averaged over 40 batches of 64
    # tokens, since one batch's 128 assignments alone have sampling noise of about ±25%
    first = loads[0] * e
    last = torch.stack(loads[-40:]).mean(0) * e
    assert first.max() > 3.0
    assert last.max() < 1.2 and last.min() > 0.8
    assert moe.routing_bias[0] < moe.routing_bias[-1]  # over-loaded expert pushed down, starved one up
    # in eval mode, forwards do not count load
    moe.eval()
    moe(batch())
    assert moe.load_counts.sum() == 0


def test_upcycled_many_experts_equals_dense_when_gates_sum_to_one():
    torch.manual_seed(4)
    dense = _dense(36)
    x = torch.randn(2, 9, D)
    moe = MoE(D, MoEConfig(n_experts=5, top_k=2, d_expert=36, routing="topk_softmax"), init_std=0.5)
    upcycle_from_dense(moe, dense.state_dict())
    torch.testing.assert_close(moe(x)[0], dense(x), rtol=1e-5, atol=1e-6)
    # un-normalised softmax_topk: dense output times the sum of the two kept probabilities
    moe = MoE(D, MoEConfig(n_experts=5, top_k=2, d_expert=36), init_std=0.5)
    upcycle_from_dense(moe, dense.state_dict())
    r = route(moe.router_logits(x.reshape(-1, D)), moe.cfg)
    torch.testing.assert_close(moe(x)[0], dense(x) * r.gates.sum(-1).view(2, 9, 1), rtol=1e-5, atol=1e-6)
    # noise breaks the symmetry between experts
    upcycle_from_dense(moe, dense.state_dict(), noise=0.01, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(moe.w_in[0], moe.w_in[1])


def test_upcycle_refuses_what_cannot_be_exact():
    dense = _dense(36)
    with pytest.raises(ConfigError, match="d_expert = 20"):
        upcycle_from_dense(MoE(D, MoEConfig(n_experts=4, d_expert=20)), dense.state_dict())
    with pytest.raises(ConfigError, match="n_shared_experts = 1"):
        upcycle_from_dense(MoE(D, MoEConfig(n_experts=4, d_expert=36, n_shared_experts=1)), dense.state_dict())
    with pytest.raises(ConfigError, match="gate.weight"):
        upcycle_from_dense(MoE(D, MoEConfig(n_experts=4, d_expert=36)), _dense(36, glu=False).state_dict())


def test_config_validation_and_round_trip():
    with pytest.raises(ConfigError, match="top_k = 9 must be in \\[1, n_experts = 8\\]"):
        MoEConfig(n_experts=8, top_k=9)
    with pytest.raises(ConfigError, match="capacity_factor = 0"):
        MoEConfig(capacity_factor=0)
    with pytest.raises(ConfigError, match="'routing' = 'softmax'"):
        from_dict(MoEConfig, {"routing": "softmax"}, "test.toml")
    cfg = MoEConfig(n_experts=64, top_k=8, granularity=4, n_shared_experts=1, capacity_factor=1.25)
    assert from_dict(MoEConfig, to_dict(cfg)) == cfg


def test_expert_width_and_param_counts_match_module():
    cfg = MoEConfig(n_experts=6, top_k=2, granularity=4, n_shared_experts=2)
    # dense GLU width for d_model 24: 8/3·24 = 64 -> 64; fine-grained by 4 -> 16
    assert cfg.expert_width(24, glu=True) == 16
    assert cfg.expert_width(24, glu=False) == math.ceil(96 / 4)
    for glu in (True, False):
        moe = MoE(24, cfg, "silu", glu)
        counts = cfg.param_counts(24, glu)
        assert counts["total"] == sum(p.numel() for p in moe.parameters())
        per_expert = moe.w_in[0].numel() + moe.w_out[0].numel()
        assert counts["active"] == counts["total"] - (cfg.n_experts - cfg.top_k) * per_expert


def test_dispatch_and_combine_are_adjoint_with_drops():
    """_Combine is the transpose of _Dispatch (so each one's backward is the other), dropped slots included."""
    from lmforge.model.moe import _Combine, _Dispatch

    torch.manual_seed(5)
    n, k, d = 5, 2, 3
    order = torch.tensor([7, 0, 3, 9, 4, 1, 8])  # 7 of the 10 slots kept, in "expert order"
    source = torch.full((n * k,), order.numel())
    source[order] = torch.arange(order.numel())
    token = order // k
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(order.numel(), d, dtype=torch.float64, requires_grad=True)
    # <Dispatch(x), rows> == <x, Combine(rows)>
    lhs = (_Dispatch.apply(x, token, source, k) * rows).sum()
    rhs = (x * _Combine.apply(rows, token, source, k)).sum()
    torch.testing.assert_close(lhs, rhs)
    torch.testing.assert_close(_Dispatch.apply(x, token, source, k), x[token])
    assert torch.autograd.gradcheck(lambda a: _Dispatch.apply(a, token, source, k), (x,))
    assert torch.autograd.gradcheck(lambda r: _Combine.apply(r, token, source, k), (rows,))


@pytest.mark.gpu
def test_cuda_bf16_router_matches_fp32_and_grouped_mm_matches_loop():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(6)
    moe = MoE(256, MoEConfig(n_experts=16, top_k=4, d_expert=96), init_std=0.05).cuda().bfloat16()
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    flat = x.reshape(-1, 256)
    logits = moe.router_logits(flat)
    ref = flat.detach().double() @ moe.router.detach().double().t()
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-5)  # exact products, fp32 sums
    (gx,) = torch.autograd.grad(logits.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(_linear_fp32(flat, moe.router).square().sum(), x)
    torch.testing.assert_close(gx.float(), gx_ref.float(), rtol=2e-2, atol=2e-2)
    assert moe.dispatch_mode(x) == "grouped_mm"
    g = torch.randn_like(x)
    y, _, _ = moe(x)
    grads = torch.autograd.grad(y, [x, *moe.parameters()], g)
    moe.cfg.dispatch = "loop"
    y_loop, _, _ = moe(x)
    grads_loop = torch.autograd.grad(y_loop, [x, *moe.parameters()], g)
    for a, b in zip((y, *grads), (y_loop, *grads_loop)):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2


def _linear_fp32(x, w):
    return torch.nn.functional.linear(x.float(), w.float())


def test_autocast_runs_experts_in_bf16_and_keeps_the_router_in_fp32():
    torch.manual_seed(7)
    moe = MoE(D, MoEConfig(n_experts=5, top_k=2, d_expert=40), init_std=0.2)  # fp32 weights, as in training
    x = torch.randn(2, 9, D, requires_grad=True)
    y32, _, _ = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe.dispatch_mode(x) == "grouped_mm"
        logits = moe.router_logits(x.reshape(-1, D))
        y, aux, _ = moe(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, torch.nn.functional.linear(x.reshape(-1, D), moe.router))
    assert y.dtype == torch.bfloat16
    assert ((y.float() - y32).norm() / y32.norm()).item() < 2e-2
    (y.float().square().sum() + aux["moe_balance"]).backward()
    assert moe.w_in.grad.dtype == torch.float32 and moe.w_in.grad.abs().sum() > 0
    assert moe.router.grad.abs().sum() > 0
