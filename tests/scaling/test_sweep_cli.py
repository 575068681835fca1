"""A tiny real IsoFLOP sweep on CPU (Trainer, resumable table), plots, and the CLI end to end."""

import csv
import hashlib
import json
import math
from dataclasses import asdict

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.data.shards import ShardWriter
from lmforge.errors import ConfigError
from lmforge.scaling.isoflop import fit_isoflop
from lmforge.scaling.parametric import published_chinchilla
from lmforge.scaling.runs import load_runs
from lmforge.scaling.sweep import SweepConfig, build_grid, check_epochs, read_results, run_config, run_sweep

VOCAB = 61


def _markov_shard(path, n_tokens, seed):
    """Documents of 150 tokens from one fixed sparse Markov chain: learnable, entropy well below log V."""
    chain = np.random.default_rng(1234).dirichlet(np.full(VOCAB - 1, 0.1), size=VOCAB - 1)
    rng = np.random.default_rng(seed)
    ids, x = [], 0
    for i in range(n_tokens):
        if i % 150 == 0:
            ids.append(VOCAB - 1)
            continue
        x = rng.choice(VOCAB - 1, p=chain[x])
        ids.append(x)
    with ShardWriter(path, VOCAB, "synthetic-markov", bos_id=VOCAB - 1) as w:
        w.write(np.array(ids), documents=n_tokens // 150)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    _markov_shard(d / "train", 30000, seed=1)
    _markov_shard(d / "val", 3000, seed=2)
    return d


def _tiny_config(**kw):
    base = dict(budgets=[3e8, 1e9], sizes_per_budget=3, span=2.5, tokens_per_param=1.0, seq_len=32,
                batch_size=4, lr=3e-3, eval_batches=2, device="cpu", aspect_min=8.0, cpu_threads=1)
    base.update(kw)
    return SweepConfig(**base)


@pytest.mark.filterwarnings("ignore:IsoFLOP profile")  # 3 toy sizes need not bracket the optimum
def test_tiny_sweep_trains_records_and_resumes(shards, tmp_path):
    cfg = _tiny_config()
    out = tmp_path / "sweep"
    # a spent time budget starts no run; the rerun below trains them all
    logs = []
    assert run_sweep(_tiny_config(time_budget_s=1e-9), out, str(shards / "train"), log=logs.append) == []
    assert "time budget of 1e-09s spent" in logs[-1] and not (out / "results.csv").exists()
    assert run_sweep(_tiny_config(time_budget_s=1e-9, parallel=2), out, str(shards / "train"), log=logs.append) == []
    rows = run_sweep(cfg, out, str(shards / "train"), str(shards / "val"), log=lambda m: None)
    grid = json.loads((out / "grid.json").read_text())
    assert [r["run"] for r in rows] == [g["run"] for g in grid] and len(rows) == 6
    for r in rows:
        assert r["loss_source"] == "val" and r["loss"] < math.log(VOCAB - 1)  # learned something
        assert r["flops"] == pytest.approx(r["flops_per_token"] * r["tokens"])
        assert r["tokens"] == r["steps"] * 4 * 32
        assert (out / "runs" / r["run"] / "metrics.jsonl").exists()
    # the bigger budget's best run beats the smaller budget's best run
    best = {b: min(r["loss"] for r in rows if r["budget"] == b) for b in cfg.budgets}
    assert best[1e9] < best[3e8]
    # resume: nothing left to train, same table
    logs = []
    again = run_sweep(cfg, out, str(shards / "train"), str(shards / "val"), log=logs.append)
    assert again == read_results(out) and len(again) == 6 and "0 to train" in logs[0]
    # the tables are fit inputs: approach 2 on results, approach 1 on curves
    table = load_runs(out / "results.csv")
    assert len(table) == 6 and np.all(table["params_total"] > table["params"])
    fit = fit_isoflop(table["params"], table["flops"], table["loss"], n_boot=0)
    assert len(fit.profiles) == 2 and all(len(p.n) == 3 for p in fit.profiles)
    curves = load_runs(out / "curves.csv")
    assert set(curves["run"]) == {r["run"] for r in rows}
    assert len(curves) == sum(r["steps"] for r in rows)


def test_sweep_recipe_reaches_the_trainer_and_the_run_id(shards, tmp_path):
    """sampler / document_mask / log_every go to the Trainer; a non-default recipe changes the run
    ids (a resume never mixes recipes) while default-recipe ids stay as before."""
    from lmforge.config import load
    from lmforge.scaling.sweep import build_grid
    from lmforge.train.pretrain import RunConfig

    default = build_grid(_tiny_config(), VOCAB)
    cfg = _tiny_config(sampler="random", document_mask=False, log_every=4)
    grid = build_grid(cfg, VOCAB)
    assert cfg.recipe() == {"sampler": "random", "document_mask": False} and _tiny_config().recipe() == {}
    assert [g.config for g in grid] == [d.config for d in default]
    assert not {g.run_id for g in grid} & {d.run_id for d in default}
    # default-recipe ids are the ids earlier versions gave (finished sweeps resume)
    d = default[0]
    key = json.dumps({"model": asdict(d.config), "steps": d.steps, "batch": d.batch_size, "seq": d.seq_len,
                      "lr": d.lr, "seed": d.seed}, sort_keys=True, default=str)
    assert d.run_id.endswith(hashlib.sha256(key.encode()).hexdigest()[:8])
    (row,) = run_sweep(cfg, tmp_path / "sw", str(shards / "train"), str(shards / "val"), log=lambda m: None,
                       max_runs=1)
    run_cfg = load(RunConfig, tmp_path / "sw" / "runs" / row["run"] / "config.toml")
    assert run_cfg.train.sampler == "random" and run_cfg.train.document_mask is False
    assert run_cfg.train.log_every == 4
    curve = load_runs(tmp_path / "sw" / "curves.csv")
    # logged every 4 steps, and the last step
    assert len(curve) == row["steps"] // 4 + (row["steps"] % 4 > 0)
    with pytest.raises(ConfigError, match="sampler"):
        _tiny_config(sampler="shuffled")


@pytest.mark.slow
def test_larger_cpu_sweep_gives_convex_profiles(shards, tmp_path):
    # up to ~10 epochs of the toy Markov data: its loss is the chain's entropy, there is nothing to memorise
    cfg = _tiny_config(budgets=[1e9, 3e9, 1e10], sizes_per_budget=5, span=4.0, tokens_per_param=2.0, max_epochs=0)
    rows = run_sweep(cfg, tmp_path / "sweep", str(shards / "train"), str(shards / "val"), log=lambda m: None)
    table = load_runs(tmp_path / "sweep" / "results.csv")
    fit = fit_isoflop(table["params"], table["flops"], table["loss"], n_boot=20)
    assert len(rows) >= 12 and len(fit.profiles) == 3
    mins = [min(p.loss) for p in fit.profiles]
    assert mins == sorted(mins, reverse=True)  # more compute, lower best loss


@pytest.mark.slow
def test_parallel_hparam_sweep_feeds_the_hparam_fit(shards, tmp_path):
    cfg = _tiny_config(kind="hparams", lrs=[1e-3, 1e-2], batch_sizes=[2, 4], parallel=2, max_epochs=0)
    rows = run_sweep(cfg, tmp_path / "hp", str(shards / "train"), str(shards / "val"), log=lambda m: None)
    assert len(rows) == 8 and {r["lr"] for r in rows} == {1e-3, 1e-2}
    table = load_runs(tmp_path / "hp" / "results.csv")
    from lmforge.scaling.hparams import fit_hparams

    fit = fit_hparams(table["flops"], table["lr"], table["batch_size"], table["loss"], tol=0.0, n_boot=0)
    best = {b: min(rows, key=lambda r: r["loss"] if r["budget"] == b else np.inf) for b in cfg.budgets}
    assert fit.lr.predict(best[3e8]["flops"]) == pytest.approx(best[3e8]["lr"], rel=1e-6)


def test_sweep_cli_dry_run_and_bad_override(shards, capsys):
    code = main(["scaling", "sweep", "--train-shards", str(shards / "train"), "--out", "unused", "--dry-run",
                 "budgets=[6e8,2e9]", "sizes_per_budget=3", "seq_len=32", "batch_size=4", "aspect_min=8",
                 "max_epochs=0"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("\n") >= 4 and "6e+08" in out
    assert main(["scaling", "sweep", "--train-shards", str(shards / "train"), "--out", "x", "--dry-run",
                 "budgets=[1e10]", "sizes_per_budget=3", "seq_len=32", "batch_size=4", "aspect_min=8"]) == 2
    assert "more than max_epochs = 1 times" in capsys.readouterr().err
    assert main(["scaling", "sweep", "--train-shards", str(shards / "train"), "--out", "x", "--dry-run",
                 "sizes=3"]) == 2
    assert "unknown key 'sizes'" in capsys.readouterr().err


def test_fit_and_plan_cli_with_plots(tmp_path, capsys):
    truth = published_chinchilla()
    rng = np.random.default_rng(0)
    rows = []
    for c in np.geomspace(1e18, 1e20, 4):
        n0, _ = truth.compute_optimal(c)
        for n in n0 * np.geomspace(1 / 4, 4, 5):
            rows.append({"N": n, "C": c, "loss": truth.predict(n, c / (6 * n)) * np.exp(rng.normal(0, 0.002))})
    with open(tmp_path / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["N", "C", "loss"])
        w.writeheader()
        w.writerows(rows)
    plots = tmp_path / "plots"
    assert main(["scaling", "fit", "--runs", str(tmp_path / "runs.csv"), "--method", "2", "--n-boot", "8",
                 "--out", str(tmp_path / "fit2.json"), "--plots", str(plots)]) == 0
    assert "parabola: N_opt ∝ C^0.4" in capsys.readouterr().out
    for name in ("isoflop", "optimal", "frontier"):
        assert (plots / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["scaling", "fit", "--runs", str(tmp_path / "runs.csv"), "--method", "3", "--n-boot", "4",
                 "--n-starts", "4", "--plots", str(plots), "--format", "svg"]) == 0
    assert "<svg" in (plots / "parametric.svg").read_text()
    capsys.readouterr()
    assert main(["scaling", "plan", "--flops", "1e21", "--fit", str(tmp_path / "fit2.json"),
                 "--json", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["six_n_d"] == pytest.approx(1e21, rel=1e-12)
    assert plan["loss_ci"][0] <= plan["loss"] <= plan["loss_ci"][1]
    assert main(["scaling", "plan", "--gpu-hours", "10", "--device", "A100", "--mfu", "0.5"]) == 0
    assert f"{10 * 3600 * 312e12 * 0.5:.4g} FLOPs" in capsys.readouterr().out
    assert main(["scaling", "fit", "--runs", str(tmp_path / "runs.csv"), "--method", "hparams"]) == 2
    assert "needs column(s) ['lr', 'batch_size']" in capsys.readouterr().err
    assert main(["scaling", "plan", "--gpu-hours", "10"]) == 2


def test_sweep_refuses_runs_that_repeat_their_data(shards, tmp_path):
    """Epochs = run tokens / training tokens; over max_epochs the sweep stops before training anything."""
    from lmforge.data.loader import TokenStream

    total = TokenStream(str(shards / "train")).total
    grid = build_grid(_tiny_config(), VOCAB)
    epochs = check_epochs(grid, total, 1.0)
    assert epochs == [r.tokens / total for r in grid] and 0.9 < max(epochs) < 1.0
    worst = grid[epochs.index(max(epochs))]
    with pytest.raises(ConfigError, match=f"max_epochs = 0.5 times: {worst.run_id} ") as e:
        check_epochs(grid, total, 0.5)
    assert "these stay under: [300000000.0]" in str(e.value)  # the 3e8 budget's runs all fit
    assert check_epochs(grid, total // 10, 0) == [r.tokens / (total // 10) for r in grid]  # 0: no check
    with pytest.raises(ConfigError, match="max_epochs"):
        run_sweep(_tiny_config(max_epochs=0.5), tmp_path / "sw", str(shards / "train"), log=lambda m: None)
    assert not (tmp_path / "sw" / "runs").exists()
    with pytest.raises(ConfigError, match="max_epochs = -1"):
        _tiny_config(max_epochs=-1)


def test_speed_options_reach_model_trainer_and_run_id(shards):
    fast = _tiny_config(fused_ops=True, fused_loss=True, compile=True)
    grid, default = build_grid(fast, VOCAB), build_grid(_tiny_config(), VOCAB)
    assert all(g.config.fused_ops and g.config.fused_loss for g in grid)
    assert [g.config.replace(fused_ops=False, fused_loss=False) for g in grid] == [d.config for d in default]
    assert fast.recipe() == {"compile": True} and not {g.run_id for g in grid} & {d.run_id for d in default}
    rc = run_config(grid[0], fast, "train", "val")
    assert rc.train.compile and rc.model.fused_ops and rc.data.val_shards == "val"


def test_probe_times_the_same_run_the_sweep_trains(shards, tmp_path):
    """The probe's first step is the sweep's first step (same model, data, optimizer): equal losses;
    its projection is setup + remaining steps at the timed rate + the evaluation."""
    from lmforge.scaling.probe import probe_sweep, project

    cfg = _tiny_config(budgets=[3e8], log_every=1)
    grid = build_grid(cfg, VOCAB)
    (row,) = run_sweep(cfg, tmp_path / "sw", str(shards / "train"), str(shards / "val"), log=lambda m: None,
                       max_runs=1)
    first = json.loads((tmp_path / "sw" / "runs" / row["run"] / "metrics.jsonl").read_text().splitlines()[0])
    probes = probe_sweep(grid, cfg, str(shards / "train"), str(shards / "val"), warmup=2, steps=3,
                         log=lambda m: None)
    p = probes[0]
    assert [q["run"] for q in probes] == [g.run_id for g in grid] and p["run"] == row["run"]
    assert p["first_loss"] == pytest.approx(first["loss"], rel=1e-6) and first["step"] == 1
    assert p["probe_steps"] == 5 and p["timed_steps"] == 3 and p["eval_s"] > 0
    assert p["tokens_per_s"] == pytest.approx(4 * 32 / p["step_s"])
    assert p["tflops"] == pytest.approx(grid[0].flops_per_token * p["tokens_per_s"] / 1e12)
    assert p["mfu"] is None  # no known peak on a CPU
    assert p["projected_s"] == pytest.approx(p["setup_s"] + (grid[0].steps - 2) * p["step_s"] + p["eval_s"])
    assert project(grid[0], p) == p["projected_s"]


def test_probe_parallel_runs_copies_at_once(shards):
    """k spawned copies of the same probe: each trains the same steps (equal losses, seeded), and the
    aggregate rate is the sum of theirs."""
    from lmforge.scaling.probe import probe_parallel, probe_run

    cfg = _tiny_config(budgets=[3e8])
    run = build_grid(cfg, VOCAB)[0]
    alone = probe_run(run, cfg, str(shards / "train"), warmup=1, steps=2)
    par = probe_parallel(run, cfg, str(shards / "train"), 2, warmup=1, steps=2)
    assert par["parallel"] == 2 and len(par["copies"]) == 2
    assert all(c["first_loss"] == alone["first_loss"] and c["last_loss"] == alone["last_loss"] for c in par["copies"])
    assert par["tokens_per_s"] == pytest.approx(sum(c["tokens_per_s"] for c in par["copies"]))


@pytest.mark.filterwarnings("ignore:IsoFLOP profile")
def test_an_added_grid_trains_only_its_new_runs_into_the_same_table(shards, tmp_path):
    cfg = _tiny_config(budgets=[3e8])
    out = tmp_path / "sw"
    first = run_sweep(cfg, out, str(shards / "train"), str(shards / "val"), log=lambda m: None)
    base = build_grid(cfg, VOCAB)
    extra = build_grid(_tiny_config(budgets=[6e8]), VOCAB)  # a budget added to a finished sweep
    assert not {r.run_id for r in extra} & {b.run_id for b in base}
    logs = []
    rows = run_sweep(cfg, out, str(shards / "train"), str(shards / "val"), log=logs.append, grid=base + extra)
    assert f"{len(base)} done, {len(extra)} to train" in logs[0]
    assert rows[:len(first)] == first  # the finished runs are kept, not retrained
    assert [r["run"] for r in rows[len(first):]] == [r.run_id for r in extra]
    assert [r["run"] for r in read_results(out)] == [r["run"] for r in rows]
