"""IsoFLOP sweeps: train a grid of model shapes per FLOP budget with the Trainer, resumably.

`run_sweep(cfg, sweep_dir, train_shards, val_shards)` builds the grid (`shapes.isoflop_grid`),
then trains each run that the results table does not already hold, in sequence, through
`lmforge.train.pretrain` (the same Trainer as every other run: cosine schedule over the run's own
length, checkpoints, metrics.jsonl in `sweep_dir/runs/<run id>/`). After each run it rewrites, atomically,

- `results.jsonl` / `results.csv`: one row per finished run (run, budget, params, params_total,
  tokens, flops, flops_per_token, shape, steps, batch_size in tokens, lr, loss = final validation
  loss, train_loss), the input of `lmforge scaling fit`;
- `curves.csv`: each run's training-loss curve (run, params, tokens, flops, loss), the input of
  approach 1.

With `kind = "hparams"` the grid is one shape per budget trained at every (lr, batch size) pair,
and the same results table feeds `lmforge scaling fit --method hparams`.

Run ids hash everything that decides a result, so a rerun skips finished runs and a changed
config trains the runs it changes. With `parallel = k`, k runs train at once in separate processes
on the same device (small runs leave most of a GPU idle); the table is written by the parent.
`time_budget_s` stops starting new runs once that much time has passed (runs in flight finish), so
a sweep on a lent machine ends with whole runs in its table; a rerun trains the rest.

A run that sees its training tokens more than `max_epochs` times measures memorisation, not the
scaling of loss with data, so `run_sweep` refuses such a grid (`check_epochs`; 0 turns it off).
`fused_ops` / `fused_loss` (Triton RMSNorm, SwiGLU and linear+CE on CUDA) and `compile` are speed
options of every run; they are part of the run ids.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import ConfigError, DataError, LMForgeError
from lmforge.io import read_jsonl, write_json, write_text
from lmforge.scaling.shapes import GridRun, hparam_grid, isoflop_grid


@dataclass
class SweepConfig:
    budgets: list[float] = field(default_factory=lambda: [3e11, 1e12, 3e12])
    sizes_per_budget: int = 5
    span: float = 3.0  # sizes from N_guess/span to N_guess·span
    tokens_per_param: float = 20.0  # first guess of the optimum, centre of each profile
    param_kind: str = "non_embedding"
    seq_len: int = 64
    batch_size: int = 8  # sequences per step
    lr: float = 3e-3
    warmup_fraction: float = 0.05
    min_steps: int = 10
    seed: int = 0
    device: str = "auto"
    eval_batches: int = 8
    checkpoint_every: int = 0  # 0: no mid-run checkpoints (a run is the unit of resume)
    log_every: int = 1  # training-curve resolution (curves.csv, approach 1)
    sampler: str = "packed"  # "random": random windows (for corpora sorted by topic, like the embedded one)
    document_mask: bool = True  # attention stays inside documents (False: plain causal, the fastest kernels)
    time_budget_s: float = 0.0  # stop starting new runs after this many seconds (0: none); rerun to go on
    max_epochs: float = 1.0  # refuse runs that repeat their training tokens more often (0: no check)
    fused_ops: bool = False  # model.fused_ops: RMSNorm and SwiGLU through Triton kernels on CUDA
    fused_loss: bool = False  # model.fused_loss: chunked linear+CE, no [B, T, V] logits
    compile: bool = False  # train.compile: torch.compile each run (costs compile time per shape)
    progress: bool = False
    aspect_min: float = 32.0  # d_model / n_layers range of the shapes
    aspect_max: float = 128.0
    cpu_threads: int | None = None  # torch threads while training on CPU (1 is fastest on a busy machine)
    parallel: int = 1  # runs trained at once, each in its own process (several small runs share one GPU)
    # kind = "hparams": one shape per budget, every (lr, batch size) pair below (DeepSeek-LLM style)
    kind: str = "isoflop"
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    batch_sizes: list[int] = field(default_factory=lambda: [4, 8, 16])

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ConfigError("SweepConfig: budgets is empty")
        if self.parallel < 1:
            raise ConfigError(f"SweepConfig: parallel = {self.parallel} must be >= 1")
        if self.kind not in ("isoflop", "hparams"):
            raise ConfigError(f"SweepConfig: kind = {self.kind!r} must be 'isoflop' or 'hparams'")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"SweepConfig: warmup_fraction = {self.warmup_fraction} must be in [0, 1)")
        if self.sampler not in ("packed", "random"):
            raise ConfigError(f"SweepConfig: sampler = {self.sampler!r} must be 'packed' or 'random'")
        if self.log_every < 1:
            raise ConfigError(f"SweepConfig: log_every = {self.log_every} must be >= 1")
        if self.max_epochs < 0:
            raise ConfigError(f"SweepConfig: max_epochs = {self.max_epochs} must be >= 0 (0: no check)")

    def recipe(self) -> dict:
        """Training options that differ from their defaults: part of each run's id."""
        default = SweepConfig()
        return {k: getattr(self, k) for k in ("sampler", "document_mask", "compile")
                if getattr(self, k) != getattr(default, k)}


def build_grid(cfg: SweepConfig, vocab_size: int) -> list[GridRun]:
    from lmforge.model import ModelConfig

    template = ModelConfig(vocab_size=vocab_size, context_length=cfg.seq_len, fused_ops=cfg.fused_ops,
                           fused_loss=cfg.fused_loss)
    grid = _grid(cfg, template)
    for run in grid:
        run.recipe = cfg.recipe()
    return grid


def _grid(cfg: SweepConfig, template) -> list[GridRun]:
    if cfg.kind == "hparams":
        return hparam_grid(cfg.budgets, template, lrs=cfg.lrs, batch_sizes=cfg.batch_sizes, seq_len=cfg.seq_len,
                           tokens_per_param=cfg.tokens_per_param, seed=cfg.seed, min_steps=cfg.min_steps,
                           param_kind=cfg.param_kind, aspect_range=(cfg.aspect_min, cfg.aspect_max))
    return isoflop_grid(cfg.budgets, template, sizes_per_budget=cfg.sizes_per_budget, span=cfg.span,
                        tokens_per_param=cfg.tokens_per_param, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                        lr=cfg.lr, seed=cfg.seed, min_steps=cfg.min_steps, param_kind=cfg.param_kind,
                        aspect_range=(cfg.aspect_min, cfg.aspect_max))


def check_epochs(grid: list[GridRun], train_tokens: int, max_epochs: float) -> list[float]:
    """Passes over the training tokens of each run; a ConfigError naming the runs over `max_epochs`
    (0: no check) and the largest budget that stays under it."""
    epochs = [r.tokens / max(train_tokens, 1) for r in grid]
    over = [(r, e) for r, e in zip(grid, epochs) if e > max_epochs]
    if max_epochs and over:
        ok = sorted({r.budget for r in grid} - {r.budget for r, _ in over})
        runs = ", ".join(f"{r.run_id} (C={r.budget:.3g}, {r.tokens:,} tokens, {e:.2f} epochs)" for r, e in over[:4])
        raise ConfigError(
            f"{len(over)} sweep run(s) would see the {train_tokens:,} training tokens more than max_epochs = "
            f"{max_epochs:g} times: {runs}{' ...' if len(over) > 4 else ''}. Repeated data measures "
            f"memorisation, not scaling: give a bigger corpus, lower the budgets (these stay under: "
            f"{ok or 'none'}) or span, or set max_epochs = 0 to train anyway")
    return epochs


def read_results(sweep_dir: str | Path) -> list[dict]:
    return _read_jsonl(Path(sweep_dir) / "results.jsonl")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        return read_jsonl(path, what="sweep table")
    except LMForgeError as e:
        raise DataError(f"{e}; fix or remove it to resume") from None


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _write_tables(sweep_dir: Path, rows: list[dict], curves: list[dict]) -> None:
    write_text(sweep_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_text(sweep_dir / "results.csv", _csv(rows))
    write_text(sweep_dir / "curves.csv", _csv(curves))


def run_config(run: GridRun, cfg: SweepConfig, train_shards: str, val_shards: str | None):
    """The `RunConfig` that trains one grid run (also what `lmforge.scaling.probe` times)."""
    from lmforge.train.config import TrainConfig
    from lmforge.train.pretrain import RunConfig

    t = TrainConfig(seed=run.seed, batch_size=run.batch_size, seq_len=run.seq_len, max_steps=run.steps,
                    lr=run.lr, warmup_steps=int(cfg.warmup_fraction * run.steps), schedule="cosine",
                    compile=cfg.compile, device=cfg.device, eval_every=0, eval_batches=cfg.eval_batches,
                    log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, progress=cfg.progress,
                    sampler=cfg.sampler, document_mask=cfg.document_mask)
    rc = RunConfig(model=run.config, train=t)
    rc.data.train_shards, rc.data.val_shards = train_shards, val_shards
    return rc


def train_one(run: GridRun, cfg: SweepConfig, run_dir: Path, train_shards: str, val_shards: str | None) -> dict:
    """Train one grid run with the Trainer; returns its results row (plus its curve under '_curve')."""
    import torch

    from lmforge.train.pretrain import pretrain

    rc = run_config(run, cfg, train_shards, val_shards)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        summary = pretrain(rc, run_dir, resume=True)
    finally:
        torch.set_num_threads(threads)
    # metrics.jsonl holds every step, also those before a resume (trainer.history starts at the resume)
    history = [r for r in _read_jsonl(run_dir / "metrics.jsonl") if "loss" in r and "tokens" in r]
    history = history or summary["trainer"].history
    tail = history[-max(1, len(history) // 20):]
    train_loss = sum(r["loss"] for r in tail) / len(tail)
    row = run.row()
    final = summary.get("final_eval") or {}
    row.update({"loss": final.get("val_loss", train_loss), "loss_source": "val" if final else "train",
                "train_loss": train_loss, "seconds": round(time.perf_counter() - start, 3),
                "device": summary.get("device")})
    per_token = run.flops_per_token
    n = row["params"]
    row["_curve"] = [{"run": row["run"], "params": n, "tokens": r["tokens"], "flops": per_token * r["tokens"],
                      "loss": r["loss"]} for r in history]
    return row


def run_sweep(cfg: SweepConfig, sweep_dir: str | Path, train_shards: str, val_shards: str | None = None,
              log=print, max_runs: int | None = None, grid: list[GridRun] | None = None) -> list[dict]:
    """Train every grid run not yet in sweep_dir/results.jsonl; returns all result rows.

    `grid` replaces the config's own grid (e.g. the union of several configs' grids, to add sizes or
    budgets to a finished sweep); `cfg` still sets the training options of every run."""
    from lmforge.config import save_toml
    from lmforge.data.loader import TokenStream

    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    stream = TokenStream(train_shards)
    vocab = stream.vocab_size
    if not vocab:
        raise DataError(f"{train_shards}: the shard header has no vocab_size")
    grid = grid if grid is not None else build_grid(cfg, vocab)
    if not grid:
        raise ConfigError("the sweep grid is empty: every shape got fewer than min_steps steps; raise the budgets")
    check_epochs(grid, stream.total, cfg.max_epochs)
    save_toml(cfg, sweep_dir / "sweep.toml")
    write_json(sweep_dir / "grid.json", [r.row() for r in grid])
    rows = read_results(sweep_dir)
    curves_path = sweep_dir / "curves.csv"
    curves = list(csv.DictReader(curves_path.open(encoding="utf-8"))) if curves_path.exists() else []
    done = {r["run"] for r in rows}
    todo = [r for r in grid if r.run_id not in done]
    log(f"[sweep] {len(grid)} runs in the grid over {len({r.budget for r in grid})} budgets; {len(grid) - len(todo)} done, "
        f"{len(todo)} to train -> {sweep_dir}")
    todo = todo[:max_runs] if max_runs is not None else todo

    def record(i: int, run: GridRun, row: dict) -> None:
        curves.extend(row.pop("_curve"))
        rows.append(row)
        _write_tables(sweep_dir, rows, curves)
        log(f"[sweep] {i + 1}/{len(todo)} {row['run']} (C={run.budget:.3g}, N={row['params']:,}, "
            f"steps={run.steps}): loss {row['loss']:.4f} ({row['loss_source']}) in {row['seconds']:.1f}s")

    start, stopped = time.perf_counter(), []

    def time_left() -> bool:
        if cfg.time_budget_s and time.perf_counter() - start > cfg.time_budget_s and not stopped:
            stopped.append(True)
            log(f"[sweep] time budget of {cfg.time_budget_s:g}s spent: no new runs started; rerun to continue")
        return not stopped

    if cfg.parallel == 1:
        for i, run in enumerate(todo):
            if not time_left():
                break
            record(i, run, train_one(run, cfg, sweep_dir / "runs" / run.run_id, train_shards, val_shards))
    else:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        # spawn, not fork: a forked child must not inherit an initialised CUDA context
        with ProcessPoolExecutor(cfg.parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
            # Biggest budgets first (most steps first within one): the short runs fill the gaps at the
            # end, and a time budget that runs out drops the cheapest runs. Submitted as workers free
            # up (not all at once), so that the time budget can stop the rest.
            queue = sorted(todo, key=lambda r: (-r.budget, -r.steps))
            running, finished = {}, 0
            while queue or running:
                while queue and len(running) < cfg.parallel and time_left():
                    run = queue.pop(0)
                    running[pool.submit(train_one, run, cfg, sweep_dir / "runs" / run.run_id, train_shards,
                                        val_shards)] = run
                if not running:
                    break
                done_now, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done_now:
                    record(finished, running.pop(fut), fut.result())
                    finished += 1
    return rows
