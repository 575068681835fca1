"""CLI: `lmforge scaling fit|plan|sweep`, thin wrappers over the scaling library.

- `fit --runs runs.csv --method 3 --out fit.json --plots DIR`: approach 1 (`envelope`), 2
  (`isoflop`), 3 (`parametric`), a one-variable `power` law, or `hparams` (LR and batch size).
- `plan --flops 1e21 [--fit fit.json] [--hparams hp.json]` or `--gpu-hours H --device H100 --mfu 0.4`.
- `sweep --train-shards DIR --val-shards DIR --out DIR [budgets=[1e12,3e12] ...]`: train the grid
  (resumable); `--dry-run` prints the grid only.
"""

from __future__ import annotations

import math
from pathlib import Path

from lmforge.cli_support import add_stage
from lmforge.errors import ConfigError

METHODS = {"1": "envelope", "2": "isoflop", "3": "parametric", "envelope": "envelope", "isoflop": "isoflop",
           "parametric": "parametric", "power": "power", "hparams": "hparams"}


def register(sub) -> None:
    verbs = add_stage(sub, "scaling", "scaling laws: fits, IsoFLOP sweeps and a compute-optimal planner")

    p = verbs.add_parser("fit", help="fit a scaling law to a table of runs (CSV/JSON/JSONL)")
    p.add_argument("--runs", required=True, help="runs table: columns params, tokens and/or flops, loss "
                                                 "(+ run for approach 1; lr, batch_size for hparams)")
    p.add_argument("--method", default="3", choices=sorted(METHODS),
                   help="1/envelope, 2/isoflop, 3/parametric (default), power, hparams")
    p.add_argument("--x", default="flops", choices=["params", "tokens", "flops"],
                   help="the variable of a one-variable power law (--method power)")
    p.add_argument("--params-column", default="params",
                   help="which column is N (e.g. params_total in a sweep table)")
    p.add_argument("--param-kind", choices=["non_embedding", "total"],
                   help="what N counts, for the planner (default: total for params_total, else non_embedding)")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples (0: no intervals)")
    p.add_argument("--level", type=float, default=0.95, help="interval level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-starts", type=int, default=64,
                   help="approach 3: L-BFGS from the best N grid starts; 0 = all 4,500 (slow)")
    p.add_argument("--tol", type=float, default=0.0025, help="hparams: near-optimal loss tolerance")
    p.add_argument("--flops-range", type=float, nargs=2, metavar=("MIN", "MAX"), help="approach 1: C range")
    p.add_argument("--out", help="write the fit as JSON (input of `plan --fit`)")
    p.add_argument("--plots", help="directory for plots")
    p.add_argument("--format", default="png", choices=["png", "svg", "pdf"], help="plot file format")
    p.set_defaults(func=cmd_fit)

    p = verbs.add_parser("plan", help="compute-optimal model, tokens, batch size, LR and loss for a budget")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--flops", type=float, help="training compute budget C in FLOPs")
    g.add_argument("--gpu-hours", type=float, help="budget in GPU-hours (with --device or --peak-tflops, --mfu)")
    p.add_argument("--device", help="GPU name for its dense bf16 peak, e.g. H100, A100")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per GPU (overrides --device)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    p.add_argument("--fit", help="fit JSON from `scaling fit` (default: published Chinchilla approach 3)")
    p.add_argument("--hparams", help="hparams fit JSON (default: published DeepSeek-LLM laws)")
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--context-length", type=int, default=2048)
    p.add_argument("--kv-ratio", type=int, default=1, help="query heads per KV head (GQA)")
    p.add_argument("--json", help="also write the plan as JSON here")
    p.set_defaults(func=cmd_plan)

    p = verbs.add_parser("sweep", help="train an IsoFLOP grid with the Trainer (resumable)")
    p.add_argument("--train-shards", required=True, help="token shards (dir or file) to train on")
    p.add_argument("--val-shards", help="token shards for the final loss (default: train loss at the end)")
    p.add_argument("--out", required=True, help="sweep directory (results.csv, curves.csv, runs/)")
    p.add_argument("--config", help="SweepConfig TOML")
    p.add_argument("--dry-run", action="store_true", help="print the grid and stop")
    p.add_argument("--max-runs", type=int, help="train at most this many runs now")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. budgets=[1e12,3e12] lr=1e-3")
    p.set_defaults(func=cmd_sweep)


def _plot_path(args, name: str) -> Path:
    return Path(args.plots) / f"{name}.{args.format}"


def cmd_fit(args) -> int:
    from lmforge.scaling import hparams as hp
    from lmforge.scaling import isoflop, parametric, plots, powerlaw
    from lmforge.scaling.planner import save_fit
    from lmforge.scaling.runs import load_runs

    runs = load_runs(args.runs)
    method = METHODS[args.method]
    if args.params_column != "params":
        (runs.columns["params"],) = runs.require(args.params_column, what=f"--params-column {args.params_column}")
    kind = args.param_kind or ("total" if args.params_column == "params_total" else "non_embedding")
    common = {"n_boot": args.n_boot, "level": args.level, "seed": args.seed}
    meta = {"method": method, "runs": str(args.runs), "param_kind": kind, "n_runs": len(runs)}
    if method == "power":
        (x, loss) = runs.require(args.x, "loss", what="a power-law fit")
        fit = powerlaw.fit_power_law(x, loss, **common)
        meta["x"] = args.x
        print(f"L({args.x}) = E + A·{args.x}^-alpha")
        print("\n".join(fit.describe()))
        if args.plots:
            print("plot:", plots.plot_frontier(x, loss, _plot_path(args, "power_law"), frontier=fit))
    elif method == "parametric":
        n, d, loss = runs.require("params", "tokens", "loss", what="approach 3")
        fit = parametric.fit_parametric(n, d, loss, n_starts=args.n_starts or None, **common)
        print("L(N, D) = E + A/N^alpha + B/D^beta  (approach 3; N_opt ∝ C^a, D_opt ∝ C^b)")
        print("\n".join(fit.describe()))
        for c in (1e18, 1e21, 1e24):
            no, do = fit.compute_optimal(c)
            ci = fit.compute_optimal_ci(c)
            print(f"C={c:.0e}: N_opt={float(no):.3g} [{ci['N_opt'][0]:.3g}, {ci['N_opt'][1]:.3g}] "
                  f"D_opt={float(do):.3g} tokens/param={float(do / no):.1f} "
                  f"[{ci['tokens_per_param'][0]:.1f}, {ci['tokens_per_param'][1]:.1f}]")
        if args.plots:
            print("plot:", plots.plot_parametric(fit, _plot_path(args, "parametric"), n, d))
    elif method == "isoflop":
        n, c, loss = runs.require("params", "flops", "loss", what="approach 2")
        if "budget" in runs.columns:  # a sweep table: group by the nominal budget, not counted C
            c = runs.columns["budget"]
        fit = isoflop.fit_isoflop(n, c, loss, **common)
        for p in fit.profiles:
            print(f"C={p.flops:.3g}: {len(p.n)} runs, N_opt argmin={p.n_argmin:.3g} parabola={p.n_parabola:.3g}"
                  f"{'' if p.interior else ' (outside the sampled sizes!)'} min loss={p.loss_parabola:.4f}")
        for m in ("parabola", "argmin"):
            a, b = fit.n_opt[m], fit.d_opt[m]
            print(f"{m:>8}: N_opt ∝ C^{a.params['a']:.3f} {_ci(a, 'a')}, D_opt ∝ C^{b.params['a']:.3f} {_ci(b, 'a')}")
        cs = [p.flops for p in fit.profiles]
        _allocation(fit.n_opt["parabola"], fit.d_opt["parabola"], [min(cs), max(cs), 1e21, 1e24])
        if fit.frontier:
            print("frontier L(C) = E + A·C^-alpha:\n" + "\n".join(fit.frontier.describe()))
        if args.plots:
            print("plot:", plots.plot_isoflop(fit, _plot_path(args, "isoflop")))
            cs = [p.flops for p in fit.profiles if math.isfinite(p.n_parabola)]
            ns = [p.n_parabola for p in fit.profiles if math.isfinite(p.n_parabola)]
            print("plot:", plots.plot_optimal(cs, ns, fit.n_opt["parabola"], fit.d_opt["parabola"],
                                              _plot_path(args, "optimal"), "approach 2 (parabola minima)"))
            mins = ([p.flops for p in fit.profiles], [p.loss_parabola for p in fit.profiles])
            print("plot:", plots.plot_frontier(c, loss, _plot_path(args, "frontier"), fit.frontier, mins))
    elif method == "envelope":
        run, n, c, loss = runs.require("run", "params", "flops", "loss", what="approach 1 (training curves)")
        fit = isoflop.fit_envelope(run, n, c, loss, flops_range=tuple(args.flops_range) if args.flops_range else None,
                                   **common)
        print(f"approach 1 over {len(fit.flops)} envelope points, sizes {sorted(set(fit.n_best.tolist()))[:8]}...")
        print(f"N_opt ∝ C^{fit.n_opt.params['a']:.3f} {_ci(fit.n_opt, 'a')}, "
              f"D_opt ∝ C^{fit.d_opt.params['a']:.3f} {_ci(fit.d_opt, 'a')}")
        _allocation(fit.n_opt, fit.d_opt, [fit.flops.min(), fit.flops.max(), 1e21, 1e24])
        if args.plots:
            print("plot:", plots.plot_optimal(fit.flops, fit.n_best, fit.n_opt, fit.d_opt,
                                              _plot_path(args, "optimal"), "approach 1 (min-loss envelope)"))
            print("plot:", plots.plot_frontier(c, loss, _plot_path(args, "frontier"), None,
                                               (fit.flops, fit.loss_best)))
    else:
        c, lr, bs, loss = runs.require("flops", "lr", "batch_size", "loss", what="a hyperparameter fit")
        fit = hp.fit_hparams(c, lr, bs, loss, tol=args.tol, **common)
        print(f"{int(fit.near_optimal.sum())} near-optimal runs (loss within {args.tol:.2%} of each budget's best)")
        print(f"lr_opt = {fit.lr.params['k']:.4g}·C^{fit.lr.params['a']:.4f} {_ci(fit.lr, 'a')}")
        print(f"B_opt  = {fit.batch_size.params['k']:.4g}·C^{fit.batch_size.params['a']:.4f} {_ci(fit.batch_size, 'a')}")
    if args.out:
        save_fit(args.out, fit, meta)
        print(f"wrote {args.out}")
    return 0


def _allocation(n_law, d_law, budgets) -> None:
    """Print the compute-optimal N, D and tokens per parameter (with intervals) at some budgets."""
    import numpy as np

    for c in sorted({float(f"{c:.6g}") for c in budgets}):
        n, d = float(n_law.predict(c)), float(d_law.predict(c))
        extra = ""
        if n_law.samples:
            ratio = d_law.predict_samples(c) / n_law.predict_samples(c)
            q = 1 - n_law.level
            lo, hi = np.quantile(ratio, [q / 2, 1 - q / 2])
            extra = f" [{lo:.1f}, {hi:.1f}]"
        print(f"C={c:.3g}: N_opt={n:.3g} D_opt={d:.3g} tokens/param={d / n:.1f}{extra}")


def _ci(law, name: str) -> str:
    lo, hi = law.ci(name)
    return "" if math.isnan(lo) else f"[{lo:.3f}, {hi:.3f}]"


def cmd_plan(args) -> int:
    from lmforge.model import ModelConfig
    from lmforge.scaling.hparams import HparamFit
    from lmforge.scaling.planner import LoadedFit, gpu_hours_to_flops, load_fit, plan

    if args.flops is not None:
        flops = args.flops
    else:
        if args.peak_tflops:
            peak = args.peak_tflops * 1e12
        elif args.device:
            from lmforge.train.metrics import PEAK_BF16_FLOPS

            match = [v for k, v in PEAK_BF16_FLOPS if k.lower() in args.device.lower()]
            if not match:
                raise ConfigError(f"--device {args.device!r}: unknown peak; known: "
                                  f"{', '.join(k for k, _ in PEAK_BF16_FLOPS)} (or give --peak-tflops)")
            peak = match[0]
        else:
            raise ConfigError("--gpu-hours needs --device NAME or --peak-tflops")
        flops = gpu_hours_to_flops(args.gpu_hours, peak, args.mfu)
        print(f"{args.gpu_hours:g} GPU-hours x {peak / 1e12:.0f} TFLOP/s x MFU {args.mfu:g} = {flops:.4g} FLOPs")
    fit = load_fit(args.fit) if args.fit else None
    if fit is not None and not isinstance(fit, LoadedFit):
        raise ConfigError(f"--fit {args.fit} is a hyperparameter fit; pass it as --hparams")
    hparams = load_fit(args.hparams) if args.hparams else None
    if hparams is not None and not isinstance(hparams, HparamFit):
        raise ConfigError(f"--hparams {args.hparams} is not a hyperparameter fit (method hparams)")
    template = ModelConfig(vocab_size=args.vocab_size, context_length=args.context_length)
    p = plan(flops, fit, hparams, template, kv_ratio=args.kv_ratio)
    print(p.describe())
    if args.json:
        from lmforge.io import write_json

        write_json(args.json, p.to_dict())
    return 0


def cmd_sweep(args) -> int:
    from lmforge.config import load
    from lmforge.scaling.sweep import SweepConfig, build_grid, check_epochs, run_sweep

    cfg = load(SweepConfig, args.config, args.overrides)
    if args.dry_run:
        from lmforge.data.loader import TokenStream

        stream = TokenStream(args.train_shards)
        grid = build_grid(cfg, stream.vocab_size or 0)
        print(f"{'budget':>10} {'run':>28} {'N':>10} {'steps':>7} {'tokens':>11} {'C (counted)':>12} {'epochs':>6}")
        for r in grid:
            row = r.row()
            print(f"{r.budget:>10.3g} {row['run']:>28} {row['params']:>10,} {r.steps:>7,} {r.tokens:>11,} "
                  f"{r.flops:>12.4g} {r.tokens / max(stream.total, 1):>6.2f}")
        check_epochs(grid, stream.total, cfg.max_epochs)  # the same refusal as the sweep itself
        return 0
    rows = run_sweep(cfg, args.out, args.train_shards, args.val_shards, max_runs=args.max_runs)
    print(f"{len(rows)} runs in {Path(args.out) / 'results.csv'}; fit with: lmforge scaling fit --runs "
          f"{Path(args.out) / 'results.csv'} --method 2")
    return 0
