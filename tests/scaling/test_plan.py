"""Runs tables, hyperparameter laws, model shapes, the sweep grid and the planner."""

import json

import numpy as np
import pytest

from lmforge.errors import ConfigError, DataError, LMForgeError
from lmforge.model import ModelConfig, Transformer, count_params, flops_per_token
from lmforge.scaling.hparams import DEEPSEEK, fit_hparams, near_optimal_mask
from lmforge.scaling.parametric import fit_parametric
from lmforge.scaling.planner import chinchilla_fit, gpu_hours_to_flops, load_fit, plan, save_fit
from lmforge.scaling.runs import Runs, load_runs
from lmforge.scaling.shapes import _make, head_dim_for, hparam_grid, isoflop_grid, shape_for_params


def test_load_runs_formats_aliases_and_derived_columns(tmp_path):
    (tmp_path / "r.csv").write_text("# comment\nN,D,final_loss,params_total\n1e8,2e9,3.1,1.2e8\n2e8,1e9,3.0,2.3e8\n")
    r = load_runs(tmp_path / "r.csv")
    np.testing.assert_allclose(r["flops"], [6 * 1e8 * 2e9, 6 * 2e8 * 1e9])
    np.testing.assert_allclose(r["params_total"], [1.2e8, 2.3e8])
    (tmp_path / "r.json").write_text(json.dumps({"params": [1e8, 2e8], "compute": [1.2e18, 1.2e18],
                                                 "loss": [3.1, 3.0]}))
    np.testing.assert_allclose(load_runs(tmp_path / "r.json")["tokens"], [2e9, 1e9])
    (tmp_path / "r.jsonl").write_text('{"run": 7, "n_params": 5, "tokens": 10, "loss": 2}\n')
    r = load_runs(tmp_path / "r.jsonl")
    assert r["run"].tolist() == ["7"] and r["flops"][0] == 300
    (tmp_path / "bad.csv").write_text("params,tokens,loss\n1e8,2e9,3.1\n1e8,2e9,-1\n")
    with pytest.raises(DataError, match="'loss' row 1 is -1.0"):
        load_runs(tmp_path / "bad.csv")
    with pytest.raises(DataError, match=r"needs column\(s\) \['lr'\]"):
        load_runs(tmp_path / "r.csv").require("lr")
    with pytest.raises(DataError, match="unknown runs format"):
        (tmp_path / "r.txt").write_text("x")
        load_runs(tmp_path / "r.txt")


def _hparam_sweep(tol_grid=21):
    """Loss = L0 + κ(log lr − log lr*)² + κ(log B − log B*)² around DeepSeek's laws, on a grid."""
    rows = []
    for c in np.geomspace(1e17, 1e20, 5):
        lr_star = DEEPSEEK["lr"]["k"] * c ** DEEPSEEK["lr"]["a"]
        b_star = DEEPSEEK["batch_size"]["k"] * c ** DEEPSEEK["batch_size"]["a"]
        for lr in lr_star * np.geomspace(0.25, 4, tol_grid):
            for b in b_star * np.geomspace(0.25, 4, tol_grid):
                loss = 3.0 + 0.02 * np.log(lr / lr_star) ** 2 + 0.01 * np.log(b / b_star) ** 2
                rows.append((c, lr, b, loss))
    return map(np.array, zip(*rows))


def test_hparam_fit_recovers_deepseek_laws():
    c, lr, b, loss = _hparam_sweep()
    for tol in (0.0, 0.0025):  # arg-min and DeepSeek's near-optimal band (symmetric here)
        fit = fit_hparams(c, lr, b, loss, tol=tol, n_boot=20)
        assert fit.lr.params["a"] == pytest.approx(-0.125, abs=1e-6)
        assert fit.batch_size.params["a"] == pytest.approx(0.3271, abs=1e-6)
        assert fit.lr.params["k"] == pytest.approx(0.3118, rel=1e-4)
    mask = near_optimal_mask(c, loss, 0.0025)
    assert mask.sum() > 5 and np.all(loss[mask] <= 3.0 * 1.0025 + 1e-12)


def test_shape_for_params_matches_real_modules_and_is_the_closest_in_range():
    template = ModelConfig(vocab_size=515, context_length=48)
    target = 3.1e5
    shape = shape_for_params(target, template)
    cfg = shape.config
    assert shape.params["non_embedding"] == count_params(cfg)["non_embedding"]
    assert shape.params["total"] == sum(p.numel() for p in Transformer(cfg).parameters())
    assert 32 <= cfg.d_model / cfg.n_layers <= 128 and cfg.d_model % cfg.head_dim == 0
    # brute force over every in-range shape with the same rule
    best = None
    for n_layers in range(1, 12):
        for d in range(16, 128 * n_layers + 1, 16):
            if not 32 * n_layers <= d <= 128 * n_layers or d % head_dim_for(d):
                continue
            p = count_params(_make(template, n_layers, d, 1))["non_embedding"]
            key = abs(np.log(p / target)) + 0.02 * abs(np.log(d / n_layers / 64))
            best = min(best or (key, n_layers, d), (key, n_layers, d))
    assert (cfg.n_layers, cfg.d_model) == best[1:]
    big = shape_for_params(7e9, ModelConfig(vocab_size=32000, context_length=4096), param_kind="total")
    assert big.params["total"] == pytest.approx(7e9, rel=0.02) and big.config.head_dim == 128
    with pytest.raises(ConfigError, match="param_kind"):
        shape_for_params(1e6, param_kind="embedding")


def test_isoflop_grid_spends_each_budget():
    template = ModelConfig(vocab_size=97, context_length=40)
    grid = isoflop_grid([4e10, 1.2e11], template, sizes_per_budget=5, span=3, seq_len=40, batch_size=3,
                        lr=1e-3, aspect_range=(16, 128))
    assert len({r.run_id for r in grid}) == len(grid) >= 6
    for r in grid:
        fpt = flops_per_token(r.config, 40)["total"]
        assert abs(r.flops - r.budget) <= fpt * 3 * 40 / 2 + 1  # within half a step
        assert r.tokens == r.steps * 3 * 40
    for b in (4e10, 1.2e11):
        sizes = [count_params(r.config)["non_embedding"] for r in grid if r.budget == b]
        assert sizes == sorted(sizes) and len(sizes) >= 3


def test_plan_spends_the_budget_and_round_trips_a_saved_fit(tmp_path):
    template = ModelConfig(vocab_size=32000, context_length=2048)
    p = plan(5.76e23, template=template)
    assert 6 * p.params * p.tokens == pytest.approx(5.76e23, rel=1e-12)
    assert p.params == pytest.approx(p.n_opt, rel=0.05)  # the concrete shape is close to N_opt
    assert p.param_kind == "total" and np.isnan(p.loss_ci[0])  # published values: no interval
    assert p.loss == pytest.approx(chinchilla_fit().parametric.predict(p.params, p.tokens))
    assert p.batch_tokens % 2048 == 0
    assert p.lr == pytest.approx(0.3118 * 5.76e23**-0.125, rel=1e-12)
    assert "6·N·D = 5.76e+23" in p.describe()

    rng = np.random.default_rng(0)
    n = np.repeat(np.geomspace(1e7, 1e9, 6), 6)
    d = np.tile(np.geomspace(1e8, 1e10, 6), 6)
    truth = chinchilla_fit().parametric
    fit = fit_parametric(n, d, truth.predict(n, d) * np.exp(rng.normal(0, 0.003, n.size)), n_boot=10, n_starts=4)
    save_fit(tmp_path / "fit.json", fit, {"param_kind": "non_embedding"})
    loaded = load_fit(tmp_path / "fit.json")
    assert loaded.param_kind == "non_embedding"
    q = plan(1e20, loaded, template=ModelConfig(vocab_size=300, context_length=256))
    assert 6 * q.params * q.tokens == pytest.approx(1e20, rel=1e-12)
    assert q.loss_ci[0] <= q.loss <= q.loss_ci[1]
    n_opt, _ = fit.compute_optimal(1e20)
    assert q.n_opt == pytest.approx(float(n_opt), rel=1e-12)


def test_gpu_hours_to_flops():
    assert gpu_hours_to_flops(1000, 989e12, 0.4) == pytest.approx(1000 * 3600 * 989e12 * 0.4)
    with pytest.raises(ConfigError, match="MFU"):
        gpu_hours_to_flops(10, 989e12, 1.5)


def test_runs_table_from_rows_rejects_mismatched_lengths():
    with pytest.raises(DataError, match="different lengths"):
        Runs({"params": np.ones(3), "loss": np.ones(2)})


def test_hparam_grid_one_shape_per_budget_every_pair_spends_it():
    template = ModelConfig(vocab_size=97, context_length=40)
    grid = hparam_grid([4e10, 1.2e11], template, lrs=[1e-3, 4e-3], batch_sizes=[2, 5], seq_len=40,
                       aspect_range=(16, 128))
    assert len(grid) == 8 and len({r.run_id for r in grid}) == 8
    for b in (4e10, 1.2e11):
        runs = [r for r in grid if r.budget == b]
        assert len({(r.config.n_layers, r.config.d_model) for r in runs}) == 1
        assert {(r.lr, r.batch_size) for r in runs} == {(1e-3, 2), (4e-3, 2), (1e-3, 5), (4e-3, 5)}
        for r in runs:
            assert abs(r.flops - b) <= r.flops_per_token * r.batch_size * 40 / 2 + 1
    with pytest.raises(ConfigError, match="positive lrs"):
        hparam_grid([1e9], template, lrs=[], batch_sizes=[2], seq_len=40)


def test_saved_hparam_fit_drives_the_plan(tmp_path):
    c, lr, b, loss = _hparam_sweep(tol_grid=9)
    fit = fit_hparams(c, lr * 2.0, b, loss, tol=0.0, n_boot=5)  # a law twice DeepSeek's LR
    save_fit(tmp_path / "hp.json", fit)
    loaded = load_fit(tmp_path / "hp.json")
    assert loaded.lr.params == pytest.approx(fit.lr.params) and len(loaded.lr.samples["a"]) == 5
    p = plan(1e21, hparams=loaded, template=ModelConfig(vocab_size=1000, context_length=512))
    assert p.lr == pytest.approx(2 * 0.3118 * 1e21**-0.125, rel=1e-6)
    assert p.batch_sequences == round(0.2920 * 1e21**0.3271 / 512)
    with pytest.raises(LMForgeError, match="not a saved scaling fit"):
        (tmp_path / "x.json").write_text("[1, 2]")
        load_fit(tmp_path / "x.json")
