"""Pipeline parallelism: GPipe, 1F1B and interleaved 1F1B over 2 gloo stages equal the single-process
step; schedules' bubble under the timing model equals (p − 1)/(v·m + p − 1)."""

import pytest
import torch
import torch.distributed as dist

from lmforge.distributed.pipeline import (
    PipelineStage,
    bubble_formula,
    interleaved_1f1b,
    one_f_one_b,
    run_pipeline,
    simulate,
    split_layers,
    stage_layers,
)
from lmforge.errors import ConfigError
from tests.distributed.parallel_workers import max_err, shared_results

MOD = "tests.distributed.test_pipeline"
ROWS, T, MICRO = 8, 7, 4


def _model(tied: bool, moe: bool = False, n_layers: int = 3):
    from lmforge.model import ModelConfig, Transformer

    extra = {}
    if moe:
        from lmforge.model.moe import MoEConfig
        extra["moe"] = MoEConfig(n_experts=4, top_k=2)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=41, context_length=16, d_model=20, n_layers=n_layers, n_heads=2, d_ff=36,
                      tie_embeddings=tied, attention_backend="reference", **extra)
    return Transformer(cfg).double()


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 41, (ROWS, T + 1), generator=g)
    y = ids[:, 1:].clone()
    y[0, :3] = -100  # ignored targets change the token count
    return ids[:, :-1], y


def check(rank, world, schedule, tied, moe=False, virtual=1, n_layers=3, split=None):
    x, y = _batch()
    ref_model = _model(tied, moe, n_layers)
    rows = ROWS // MICRO
    n = (y != -100).sum()
    ref_loss = 0.0
    for i in range(MICRO):  # single-process gradient accumulation over the same micro-batches
        out = ref_model(x[i * rows:(i + 1) * rows], y[i * rows:(i + 1) * rows])
        loss = out.ce_sum / n + sum(out.aux.values(), torch.zeros((), dtype=torch.float64)) / MICRO
        loss.backward()
        ref_loss += loss.item()
    ref = {name: p.grad for name, p in ref_model.named_parameters() if p.grad is not None}
    stage = PipelineStage(_model(tied, moe, n_layers), rank, world, virtual=virtual, split=split)
    res = run_pipeline(stage, x, y, MICRO, schedule)
    grad_err, n_params = 0.0, 0
    for name, p in stage.named_parameters():
        grad_err = max(grad_err, max_err(p.grad, ref[stage.reference_name(name)]))
        n_params += p.numel()
    total = torch.tensor([n_params])
    dist.all_reduce(total)
    return {"loss": abs(res.loss - ref_loss), "grads": grad_err, "params": total.item(),
            "ref_params": sum(p.numel() for p in ref_model.parameters()) + (ref_model.tok_emb.weight.numel()
                                                                             if tied else 0),
            "peak": res.peak_live_micro, "bubble": res.bubble}


def gpipe_tied(rank, world):
    return check(rank, world, "gpipe", tied=True)


def f1b_untied(rank, world):  # with an explicit split: 1 layer on stage 0, 2 on the last (default 2 + 1)
    return check(rank, world, "1f1b", tied=False, split=[1, 2])


def f1b_moe(rank, world):
    return check(rank, world, "1f1b", tied=True, moe=True)


def interleaved_tied(rank, world):  # 5 layers in 4 virtual stages: chunks of 2, 1, 1, 1 layers
    return check(rank, world, "interleaved", tied=True, virtual=2, n_layers=5)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return shared_results(tmp_path_factory)


@pytest.mark.parametrize("check_name", ["gpipe_tied", "f1b_untied", "f1b_moe", "interleaved_tied"])
def test_pipeline_step_equals_single_process(results, check_name):
    for r in results[f"{MOD}:{check_name}"]:
        assert r["loss"] < 1e-8 and r["grads"] < 1e-10, r  # MoE aux terms are float32 sums
        # every parameter lives on exactly one stage (the tied embedding on the first and the last)
        assert r["params"] == r["ref_params"], r
        assert 0.0 <= r["bubble"] < 1.0


def test_1f1b_keeps_fewer_activations(results):
    assert [r["peak"] for r in results[f"{MOD}:gpipe_tied"]] == [MICRO, MICRO]
    assert [r["peak"] for r in results[f"{MOD}:f1b_untied"]] == [2, 1]  # p − s micro-batches alive
    # interleaved: 2(p − s − 1) + (v − 1)p warm-up units (+1 in the steady state) on stage s
    assert [r["peak"] for r in results[f"{MOD}:interleaved_tied"]] == [5, 3]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_simulated_bubble_equals_formula(schedule):
    for p, m in [(2, 1), (2, 5), (3, 4), (4, 7), (5, 3)]:
        for t_f, t_b in [(1.0, 1.0), (1.0, 2.0)]:
            for b in simulate(schedule, p, m, t_f, t_b):
                assert b == pytest.approx(bubble_formula(p, m)), (schedule, p, m, t_f, t_b)


@pytest.mark.parametrize("p, m, v", [(2, 2, 2), (2, 4, 3), (3, 6, 2), (4, 8, 2), (4, 4, 3), (3, 3, 4)])
def test_interleaved_bubble_equals_formula(p, m, v):
    """Narayanan et al. 2021: bubble/ideal = (1/v)(p − 1)/m, i.e. (p − 1)/(v·m + p − 1) of the step."""
    for t_f, t_b in [(1.0, 1.0), (1.0, 2.0)]:
        for b in simulate("interleaved", p, m, t_f, t_b, virtual=v):
            assert b == pytest.approx(bubble_formula(p, m, v)), (p, m, v, t_f, t_b)
    assert bubble_formula(p, m, v) < bubble_formula(p, m)


def test_simulated_bubble_with_unequal_stages():
    """Per-stage costs: the lighter stage waits for the heavier one. GPipe and 1F1B, p = 2, m = 2,
    stage 1 twice as slow (by hand: stage 1 runs F0 [1, 3], F1 [3, 5] or B0 [3, 7], ..., stage 0's
    last backward ends at 15; busy 2·(1 + 2) = 6 and 2·(2 + 4) = 12)."""
    for schedule in ("gpipe", "1f1b"):
        assert simulate(schedule, 2, 2, [1.0, 2.0], [2.0, 4.0]) == pytest.approx([1 - 6 / 15, 1 - 12 / 15])
    assert simulate("1f1b", 3, 4, [1.0] * 3, [2.0] * 3) == simulate("1f1b", 3, 4, 1.0, 2.0)
    # a stage 20% heavier: the lighter one idles well above the formula's 1/9 at m = 8
    light, heavy = simulate("1f1b", 2, 8, [1.0, 1.2], [2.0, 2.4])
    assert light > 0.2 > bubble_formula(2, 8) > heavy - 0.01


def test_schedules_and_split():
    f = lambda *ids: [("F", i, 0) for i in ids]  # noqa: E731
    assert one_f_one_b(0, 3, 4) == f(0, 1, 2) + [("B", 0, 0)] + f(3) + [("B", 1, 0), ("B", 2, 0), ("B", 3, 0)]
    assert one_f_one_b(2, 3, 2) == [("F", 0, 0), ("B", 0, 0), ("F", 1, 0), ("B", 1, 0)]
    # p = 2, m = 2, v = 2: groups of p micro-batches per chunk; stage 1 warms up with (v − 1)p = 2 units
    assert interleaved_1f1b(1, 2, 2, 2) == [("F", 0, 0), ("F", 1, 0), ("F", 0, 1), ("B", 0, 1), ("F", 1, 1),
                                            ("B", 1, 1), ("B", 0, 0), ("B", 1, 0)]
    with pytest.raises(ConfigError, match="n_micro = 3 must be a multiple of pp = 2"):
        interleaved_1f1b(0, 2, 3, 2)
    assert [list(stage_layers(7, 3, s)) for s in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ConfigError, match="4 stages for 3 layers"):
        stage_layers(3, 4, 0)
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_layers(8, 2, [5, 3]) == [range(0, 5), range(5, 8)]
    with pytest.raises(ConfigError, match=r"split \[4, 3\]: needs 2 stage sizes .* summing to n_layers = 8"):
        split_layers(8, 2, [4, 3])
    with pytest.raises(ConfigError, match=r"split \[8, 0\]"):
        split_layers(8, 2, [8, 0])
