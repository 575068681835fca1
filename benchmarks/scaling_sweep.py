"""An IsoFLOP sweep end to end on one device: tokenizer -> shards -> sweep -> fits -> plots -> plans.

1. trains a small-vocabulary BPE tokenizer on --tokenizer-corpus (default: the embedded one, ~10-30
   MB: enough text for the default 1024-token vocabulary, seconds) and encodes --corpus (files,
   dirs, globs; default: embedded) into train/val shards, once (kept in --work under a hash of both
   corpus specs, reused by a rerun);
2. prints the grid (per run: N, steps, tokens, tokens per parameter, passes over the training
   tokens) and its training time estimated from the counted FLOPs at --mfu of --peak-tflops, and
   refuses a grid whose runs would repeat their data more than `max_epochs` times (SweepConfig);
   with --probe it then times every shape (lmforge.scaling.probe: warm-up, then --probe-steps
   Trainer steps and the final evaluation) once per --probe-variant, prints tokens/s, TFLOP/s, MFU
   and the projected sweep time per variant (one run at a time), times `parallel` copies at once
   of the smallest and largest shape against one alone, writes probe.json, and stops;
3. trains the grid with `lmforge.scaling.sweep.run_sweep` (the Trainer; resumable; `parallel` runs
   at once; no new run starts after `time_budget_s`) and copies its tables to --out;
4. fits approach 2 (IsoFLOP parabolas: N_opt ∝ C^a, D_opt ∝ C^b, frontier L(C)), approach 3
   (L(N, D) = E + A/N^α + B/D^β) and approach 1 (envelope of the training curves) with bootstrap
   intervals and plots, through `lmforge scaling fit`;
5. plans --plan-flops budgets from the approach-3 and approach-2 fits (`lmforge scaling plan`).

Each step's output goes to a text file in --out as well as the console; summary.json collects the
timings, the measured TFLOP/s and the fitted exponents. On a lent machine: --no-fit stops after step 3,
--fit-from DIR runs steps 4-5 on another machine from DIR's results.csv / curves.csv, --resume-from DIR
continues an earlier call's sweep, --also OVERRIDES adds another grid (sizes, budgets) to the same table.

  # one H100 (the preset's header has the arithmetic); the probe (~1.5 minutes), the sweep (~4), the fits
  C1='/opt/torch/.venv/lib/python3.12/site-packages/**/*.py'; C2='/usr/lib/python3.12/**/*.py'  # the script globs
  python3 benchmarks/scaling_sweep.py --preset lmforge/scaling/presets/h100.toml --corpus "$C1" "$C2" \\
      --out $OUT/probe --probe --probe-variant "" --probe-variant "fused_ops=false fused_loss=false parallel=1"
  python3 benchmarks/scaling_sweep.py --preset lmforge/scaling/presets/h100.toml --corpus "$C1" "$C2" \\
      --out /tmp/scaling --no-fit    # then copy results.csv, curves.csv, results.jsonl to $OUT
  python benchmarks/scaling_sweep.py --preset lmforge/scaling/presets/h100.toml --out runs/h100_fit \\
      --fit-from DIR_WITH_THOSE_TABLES --plan-flops 1e18 1e20
  # the same on a CPU at a tiny budget (~6 minutes on the loaded 2-core development machine)
  python benchmarks/scaling_sweep.py --preset lmforge/scaling/presets/h100.toml --out runs/scaling_cpu \\
      --vocab-size 512 --plan-flops 1e15 --n-boot 50 budgets=[2e10,6e10,2e11] sizes_per_budget=4 \\
      span=2.5 tokens_per_param=5 seq_len=64 batch_size=8 device=cpu parallel=1 cpu_threads=1 \\
      aspect_min=8 log_every=5 time_budget_s=0 fused_ops=false fused_loss=false
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import hashlib
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

from lmforge.cli import main as cli
from lmforge.config import load
from lmforge.data.loader import TokenStream
from lmforge.errors import ConfigError
from lmforge.io import write_json, write_text
from lmforge.scaling.sweep import SweepConfig, build_grid, check_epochs, run_sweep


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def step(out: Path, name: str, argv: list[str], timings: dict) -> int:
    """Run one `lmforge` command, its output to the console and to out/<name>.txt."""
    print(f"\n$ lmforge {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    with open(out / f"{name}.txt", "w", encoding="utf-8") as f, \
            contextlib.redirect_stdout(_Tee(sys.stdout, f)), contextlib.redirect_stderr(_Tee(sys.stderr, f)):
        code = cli(argv)
    timings[name] = round(time.perf_counter() - start, 2)
    if code:
        print(f"[{name}] exited with {code}; see {out / (name + '.txt')}")
    return code


def complete_budgets(rows: list[dict], min_sizes: int = 3) -> tuple[list[dict], list[float]]:
    """The rows of budgets with at least `min_sizes` finished runs (an IsoFLOP parabola needs 3)."""
    count: dict[float, int] = {}
    for r in rows:
        count[r["budget"]] = count.get(r["budget"], 0) + 1
    keep = [r for r in rows if count[r["budget"]] >= min_sizes]
    return keep, sorted(b for b, n in count.items() if n < min_sizes)


def point_estimates(fit):
    """A saved fit without its bootstrap samples and per-run lists (for the summary)."""
    if isinstance(fit, dict):
        return {k: point_estimates(v) for k, v in fit.items() if k != "samples"}
    if isinstance(fit, list):
        return [point_estimates(v) for v in fit] if len(fit) <= 8 else f"[{len(fit)} values]"
    return fit


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


def spec_hash(spec: list[str]) -> str:
    return hashlib.sha256("\0".join(spec).encode()).hexdigest()[:8]


def probe(args, cfg: SweepConfig, grid, train_shards: str, val_shards: str, out: Path, data_s: float) -> None:
    """Time every shape under each variant; print per-run projections and each variant's total."""
    from lmforge.scaling.probe import probe_parallel, probe_sweep

    report = {"date": datetime.datetime.now(datetime.UTC).isoformat(), "host": platform.node(),
              "args": vars(args), "data_s": data_s, "variants": {}}
    summary = []
    for variant in args.probe_variant or [""]:
        vcfg = load(SweepConfig, args.preset, [*args.overrides, *variant.split()])  # variant last: it wins
        vgrid = build_grid(vcfg, grid[0].config.vocab_size)
        name = variant.strip() or "as configured"
        print(f"\n[probe] variant: {name}")
        start = time.perf_counter()
        rows = probe_sweep(vgrid, vcfg, train_shards, val_shards, warmup=args.probe_warmup, steps=args.probe_steps)
        total = sum(r["projected_s"] for r in rows)
        flops = sum(r.flops for r in vgrid)
        print(f"{'budget':>8} {'N':>11} {'steps':>6} {'ms/step':>8} {'tok/s':>11} {'TFLOP/s':>8} {'MFU':>6} "
              f"{'setup s':>7} {'run s':>7}")
        for r in rows:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            print(f"{r['budget']:>8.2g} {r['params']:>11,} {r['steps']:>6} {r['step_s'] * 1e3:>8.2f} "
                  f"{r['tokens_per_s']:>11,.0f} {r['tflops']:>8.3g} {mfu:>6} {r['setup_s']:>7.1f} "
                  f"{r['projected_s']:>7.1f}")
        line = (f"[probe] {name}: sweep projected {total:.0f} s of training, one run at a time ({flops:.3g} FLOPs: "
                f"{flops / total / 1e12:.3g} TFLOP/s overall); probe took {time.perf_counter() - start:.0f} s")
        print(line)
        summary.append(line)
        report["variants"][name] = {"projected_s": total, "flops": flops, "runs": rows, "parallel": []}
        k = args.probe_parallel if args.probe_parallel is not None else vcfg.parallel
        if k > 1:
            by_n = sorted(zip(vgrid, rows), key=lambda x: x[1]["params"])
            for run, single in by_n[:1] + by_n[-1:] if len(by_n) > 1 else by_n:
                par = probe_parallel(run, vcfg, train_shards, k, warmup=args.probe_warmup, steps=args.probe_steps)
                line = (f"[probe] {name}: {run.run_id} (N={single['params']:,}) {k} at once: "
                        f"{par['tokens_per_s']:,.0f} tokens/s together vs {single['tokens_per_s']:,.0f} alone "
                        f"({par['tokens_per_s'] / single['tokens_per_s']:.2f}x)")
                print(line)
                summary.append(line)
                report["variants"][name]["parallel"].append({**par, "alone_tokens_per_s": single["tokens_per_s"]})
    print(f"\n[probe] data (tokenizer + encode, or reuse) took {data_s:.0f} s; the fits and plans take ~1 minute")
    print("\n".join(summary))
    write_json(out / "probe.json", report)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", help="SweepConfig TOML (e.g. lmforge/scaling/presets/h100.toml)")
    ap.add_argument("--out", required=True, help="results: tables, fits, plots, plans, logs (small files)")
    ap.add_argument("--work", default="runs/scaling_work", help="tokenizer, shards and per-run directories")
    ap.add_argument("--corpus", nargs="+", default=["embedded"],
                    help="training text: files, dirs, globs (quote them; ** recurses) or embedded")
    ap.add_argument("--tokenizer-corpus", nargs="+", default=["embedded"],
                    help="text the BPE vocabulary is learned from (default: embedded, seconds to train)")
    ap.add_argument("--probe", action="store_true", help="time each shape, project the sweep time, and stop")
    ap.add_argument("--probe-steps", type=int, default=20, help="timed steps per shape (after the warm-up)")
    ap.add_argument("--probe-warmup", type=int, default=3, help="untimed steps first (compile, Triton JIT)")
    ap.add_argument("--probe-parallel", type=int, default=None, metavar="K",
                    help="also time K copies at once of the smallest and largest shape (default: the config's "
                         "parallel; 1: off)")
    ap.add_argument("--probe-variant", action="append", default=None, metavar="OVERRIDES",
                    help="space-separated SweepConfig overrides probed as one variant (repeatable; '' = as "
                         "configured), e.g. 'compile=true'")
    ap.add_argument("--vocab-size", type=int, default=1024,
                    help="BPE vocabulary (1024: a small LM head, so N is mostly transformer)")
    ap.add_argument("--mfu", type=float, default=0.25, help="MFU assumed for the time estimate (--probe measures it)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples of each fit")
    ap.add_argument("--plan-flops", type=float, nargs="+", default=[1.25e18, 1e20],
                    help="budgets to plan (default: one H100-hour at 35%% MFU, and 1e20)")
    ap.add_argument("--also", action="append", default=[], metavar="OVERRIDES",
                    help="space-separated SweepConfig overrides of a second grid trained with the first (e.g. more "
                         "sizes or budgets for a finished sweep); repeatable; runs of both go into one table")
    ap.add_argument("--no-fit", action="store_true",
                    help="stop after the sweep's tables (fit them elsewhere with --fit-from)")
    ap.add_argument("--fit-from", metavar="DIR",
                    help="skip data and training: fit and plan the results.csv / curves.csv in DIR")
    ap.add_argument("--resume-from", metavar="DIR",
                    help="results.jsonl / curves.csv of an earlier --out (e.g. another machine's): its runs "
                         "are skipped")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="SweepConfig overrides, e.g. budgets=[1e15]")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    if args.fit_from:
        fit_from(args, out, Path(args.fit_from), timings, t0)
        return

    # 1. tokenizer and shards, once per (tokenizer corpus, corpus, vocab)
    tok_key = spec_hash(args.tokenizer_corpus)
    tok = work / f"tokenizer_{args.vocab_size}_{tok_key}"
    shards = work / f"shards_{args.vocab_size}_{tok_key}_{spec_hash(args.corpus)}"
    if not (tok / "tokenizer.json").exists():
        if step(out, "tokenizer", ["tokenizer", "train", "--out", str(tok), "--vocab-size", str(args.vocab_size),
                                   "--corpus", *args.tokenizer_corpus, "--skip-bad"], timings):
            raise SystemExit(1)
    if not (shards / "val.json").exists():
        if step(out, "encode", ["tokenizer", "encode", "--tokenizer", str(tok), "--out", str(shards),
                                "--corpus", *args.corpus, "--skip-bad"], timings):
            raise SystemExit(1)
    train_shards, val_shards = str(shards / "train.bin"), str(shards / "val.bin")
    stream = TokenStream(train_shards)
    train_tokens, vocab = stream.total, stream.vocab_size
    print(f"[data] {train_tokens:,} training tokens, {TokenStream(val_shards).total:,} validation tokens; "
          f"tokenizer {timings.get('tokenizer', 0):.0f} s, encode {timings.get('encode', 0):.0f} s "
          f"(0 = reused from {work})")

    # 2. the grid and its estimated time
    cfg = load(SweepConfig, args.preset, args.overrides)
    grid = build_grid(cfg, vocab)
    for extra in args.also:  # union by run id: a run in two grids is trained once
        ids = {r.run_id for r in grid}
        grid += [r for r in build_grid(load(SweepConfig, args.preset, [*args.overrides, *extra.split()]), vocab)
                 if r.run_id not in ids]
    grid.sort(key=lambda r: (r.budget, r.row()["params"]))
    total = sum(r.flops for r in grid)
    rate = args.mfu * args.peak_tflops * 1e12
    lines = [f"corpus {args.corpus}: {train_tokens:,} training tokens, vocab {vocab}",
             f"{'budget':>8} {'run':>28} {'N':>11} {'steps':>6} {'tokens':>12} {'D/N':>6} {'epochs':>6} {'est s':>6}"]
    for r in grid:
        row = r.row()
        lines.append(f"{r.budget:>8.2g} {row['run']:>28} {row['params']:>11,} {r.steps:>6} {r.tokens:>12,} "
                     f"{r.tokens / row['params']:>6.1f} {r.tokens / train_tokens:>6.1f} {r.flops / rate:>6.1f}")
    lines.append(f"{len(grid)} runs, {sum(r.steps for r in grid):,} steps, {total:.3g} FLOPs: {total / rate:.0f} s "
                 f"at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s; most epochs of one run: "
                 f"{max(r.tokens for r in grid) / max(train_tokens, 1):.2f} (max_epochs = {cfg.max_epochs:g})")
    top = max(grid, key=lambda r: r.tokens)
    # a run's tokens grow ~ sqrt(C) along the grid, so the data allows budgets up to about this
    lines.append(f"the largest budget this corpus allows at max_epochs = {cfg.max_epochs or 1:g}: ~"
                 f"{top.budget * (train_tokens * (cfg.max_epochs or 1) / top.tokens) ** 2:.2g} FLOPs")
    print("\n".join(lines))
    write_text(out / "grid.txt", "\n".join(lines) + "\n")
    try:
        check_epochs(grid, train_tokens, cfg.max_epochs)
    except ConfigError as e:
        if not args.probe:
            raise SystemExit(f"error: {e}") from None
        print(f"WARNING (the sweep would refuse this grid): {e}")
    if args.probe:
        probe(args, cfg, grid, train_shards, val_shards, out, time.perf_counter() - t0)
        return

    # 3. the sweep
    sweep_dir = work / "sweep"
    start = time.perf_counter()
    def copy_tables(message: str = "") -> None:
        """After every finished run, so a command killed mid-sweep still leaves its table in --out."""
        if message:
            print(message, flush=True)
        for name in ("results.csv", "results.jsonl", "curves.csv", "grid.json", "sweep.toml"):
            if (sweep_dir / name).exists():
                shutil.copy(sweep_dir / name, out / name)

    if args.resume_from:
        seed_sweep_dir(Path(args.resume_from), sweep_dir)
    rows = run_sweep(cfg, sweep_dir, train_shards, val_shards, log=copy_tables, grid=grid)
    timings["sweep"] = round(time.perf_counter() - start, 2)
    copy_tables()
    in_grid = {r.run_id for r in grid}
    rows = [r for r in rows if r["run"] in in_grid]  # a reused work dir may hold other configs' runs
    flops_done = sum(r["flops"] for r in rows)
    print(f"[sweep] {len(rows)}/{len(grid)} runs, {flops_done:.3g} FLOPs in {timings['sweep']:.0f} s: "
          f"{flops_done / max(timings['sweep'], 1e-9) / 1e12:.3g} TFLOP/s overall")

    summary = {"date": datetime.datetime.now(datetime.UTC).isoformat(), "host": platform.node(),
               "args": vars(args), "config": json.loads(json.dumps(vars(cfg), default=str)),
               "train_tokens": train_tokens, "runs": len(rows), "grid_runs": len(grid), "flops": flops_done,
               "sweep_tflops_per_s": flops_done / max(timings["sweep"], 1e-9) / 1e12}
    try:
        import torch

        if torch.cuda.is_available():
            summary["device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    print_table(rows, cfg.parallel)
    if not args.no_fit:
        fit_and_plan(args, out, rows, vocab, cfg.seq_len, timings, summary)
    summary.update(timings_s=timings, wall_s=round(time.perf_counter() - t0, 2))
    write_json(out / "summary.json", summary)
    print(f"timings (s): {timings}; total {summary['wall_s']:.0f} s; outputs in {out}")
    if not math.isfinite(summary["sweep_tflops_per_s"]):
        raise SystemExit(1)


def seed_sweep_dir(src: Path, sweep_dir: Path) -> None:
    """Start a sweep directory from an earlier call's tables (the run ids say which runs are done)."""
    if (sweep_dir / "results.jsonl").exists():
        print(f"[resume] {sweep_dir} already has a results table; --resume-from {src} ignored")
        return
    if not (src / "results.jsonl").exists():
        raise SystemExit(f"error: --resume-from {src}: no results.jsonl there")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for name in ("results.jsonl", "curves.csv"):
        if (src / name).exists():
            shutil.copy(src / name, sweep_dir / name)
    print(f"[resume] {sum(1 for _ in open(src / 'results.jsonl', encoding='utf-8'))} finished runs from {src}")


def read_rows(path: Path) -> list[dict]:
    """A results.csv with its numbers as numbers."""
    def value(v: str):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    with open(path, newline="", encoding="utf-8") as f:
        return [{k: value(v) for k, v in r.items()} for r in csv.DictReader(f)]


def print_table(rows: list[dict], parallel) -> None:
    print(f"\nrun table (seconds per run include model build and the final evaluation; {parallel} at once)")
    print(f"{'budget':>8} {'N':>11} {'tokens':>12} {'D/N':>6} {'loss':>7} {'s':>6} {'TFLOP/s':>8}")
    for r in sorted(rows, key=lambda r: (r["budget"], r["params"])):
        print(f"{r['budget']:>8.2g} {r['params']:>11,} {r['tokens']:>12,} {r['tokens'] / r['params']:>6.1f} "
              f"{r['loss']:>7.4f} {r['seconds']:>6.1f} {r['flops'] / r['seconds'] / 1e12:>8.3g}")


def fit_from(args, out: Path, src: Path, timings: dict, t0: float) -> None:
    """--fit-from: fits and plans of a finished (or partial) sweep's tables, e.g. one trained on a GPU."""
    for name in ("results.csv", "curves.csv"):
        if not (src / name).exists():
            raise SystemExit(f"error: --fit-from {src}: no {name} there")
        if src.resolve() != out.resolve():
            shutil.copy(src / name, out / name)
    cfg = load(SweepConfig, args.preset, args.overrides)
    rows = read_rows(out / "results.csv")
    print_table(rows, "?")
    summary = {"date": datetime.datetime.now(datetime.UTC).isoformat(), "fit_from": str(src), "args": vars(args),
               "runs": len(rows)}
    fit_and_plan(args, out, rows, args.vocab_size, cfg.seq_len, timings, summary)
    summary.update(timings_s=timings, wall_s=round(time.perf_counter() - t0, 2))
    write_json(out / "summary_fit.json", summary)


def fit_and_plan(args, out: Path, rows: list[dict], vocab: int, seq_len: int, timings: dict, summary: dict) -> None:
    """Approaches 2, 3 and 1 with bootstrap intervals and plots, then plans from the 3 and 2 fits."""
    fit_rows, dropped = complete_budgets(rows)
    if dropped:
        print(f"approach 2 leaves out budgets with fewer than 3 finished runs: {dropped}")
    write_csv(out / "results_fit.csv", fit_rows)
    boot = ["--n-boot", str(args.n_boot)]
    plots = ["--plots", str(out / "plots")]
    fits = {}
    if len({r["budget"] for r in fit_rows}) >= 2:
        if not step(out, "fit2", ["scaling", "fit", "--runs", str(out / "results_fit.csv"), "--method", "2",
                                  "--out", str(out / "fit2.json"), *plots, *boot], timings):
            fits["2"] = out / "fit2.json"
    if len(rows) >= 6:
        if not step(out, "fit3", ["scaling", "fit", "--runs", str(out / "results.csv"), "--method", "3",
                                  "--out", str(out / "fit3.json"), *plots, *boot], timings):
            fits["3"] = out / "fit3.json"
        step(out, "fit1", ["scaling", "fit", "--runs", str(out / "curves.csv"), "--method", "1",
                           "--out", str(out / "fit1.json"), "--plots", str(out / "plots" / "approach1"),
                           "--n-boot", str(min(args.n_boot, 50))], timings)
    for method, path in sorted(fits.items(), reverse=True):
        for c in args.plan_flops:
            step(out, f"plan{method}_{c:.3g}", ["scaling", "plan", "--flops", str(c), "--fit", str(path),
                                                "--vocab-size", str(vocab), "--context-length", str(seq_len),
                                                "--json", str(out / f"plan{method}_{c:.3g}.json")], timings)
    for method, path in fits.items():
        summary[f"fit{method}"] = point_estimates(json.loads(Path(path).read_text()))


if __name__ == "__main__":
    main()
