"""Time a sweep's runs before training them: a few Trainer steps of each grid shape, and the sweep's
projected wall time from them.

`probe_run(run, cfg, train_shards, val_shards)` builds the run exactly as the sweep does (same
`RunConfig`, model, optimizer, sampler, Prefetcher and `Trainer.train_step`, so the per-step host
sync for the loss / NaN check and the data sampler are inside the timing), runs `warmup` steps
(these include torch.compile and Triton JIT time when enabled), then times `steps` more and one
final evaluation. `project(run, probe)` turns that into the run's seconds: setup + remaining steps at
the measured step time + the evaluation. `probe_sweep` does it for every distinct shape of a grid.
`probe_parallel(run, ..., k)` runs k copies at once in spawned processes (as `parallel = k` would),
their timed windows aligned by a barrier, and returns their aggregate tokens/s.

It writes no run directory and trains nothing to completion. `probe_sweep` times one run at a
time; `probe_parallel` shows what sharing the device between processes gives for one shape.
"""

from __future__ import annotations

import time

from lmforge.scaling.shapes import GridRun
from lmforge.scaling.sweep import SweepConfig, run_config


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_run(run: GridRun, cfg: SweepConfig, train_shards: str, val_shards: str | None = None, *,
              warmup: int = 3, steps: int = 20, before_timing=None) -> dict:
    """Seconds of setup (model build + `warmup` steps), per step after it, and of the final evaluation.
    `before_timing()` is called after the warm-up (probe_parallel aligns its processes there)."""
    import torch

    from lmforge.data.loader import DocumentPacker, Prefetcher, TokenStream
    from lmforge.model import Transformer
    from lmforge.train.metrics import mfu, peak_flops
    from lmforge.train.optim import optimizer_from_config
    from lmforge.train.pretrain import evaluate_lm, make_batches
    from lmforge.train.trainer import Trainer, autocast_context, lm_loss, resolve_device

    rc = run_config(run, cfg, train_shards, val_shards)
    t = rc.train
    threads = torch.get_num_threads()
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        start = time.perf_counter()
        device = resolve_device(t.device)
        torch.manual_seed(t.seed)
        model = Transformer(rc.model).to(device)
        optimizer = optimizer_from_config(model, t, rc.model.vocab_size)
        batches = make_batches(rc, train_shards, run.seq_len)
        if device.type == "cuda":
            batches = Prefetcher(batches, device)
        trainer = Trainer(model, optimizer, batches, lm_loss, t, flops_per_token=run.flops_per_token)
        losses = [trainer.train_step()["loss"] for _ in range(warmup)]
        _sync(device)
        setup = time.perf_counter() - start
        if before_timing is not None:
            before_timing()
        begin = time.perf_counter()
        losses += [trainer.train_step()["loss"] for _ in range(steps)]
        _sync(device)
        step_s = (time.perf_counter() - begin) / steps
        eval_s = 0.0
        if val_shards:
            begin = time.perf_counter()
            packer = DocumentPacker(TokenStream(val_shards), t.batch_size, run.seq_len, loop=False)
            model.eval()
            with torch.no_grad(), autocast_context(device, t.precision):
                evaluate_lm(model, (b for _, b in zip(range(t.eval_batches), packer)), device)
            _sync(device)
            eval_s = time.perf_counter() - begin
    finally:
        torch.set_num_threads(threads)
    tokens_per_s = run.batch_size * run.seq_len / step_s
    peak = peak_flops(device)
    result = {"run": run.run_id, "budget": run.budget, "params": run.row()["params"], "steps": run.steps,
              "setup_s": setup, "step_s": step_s, "eval_s": eval_s, "tokens_per_s": tokens_per_s,
              "tflops": run.flops_per_token * tokens_per_s / 1e12, "mfu": mfu(run.flops_per_token, tokens_per_s, peak),
              "probe_steps": trainer.step, "timed_steps": steps, "first_loss": losses[0], "last_loss": losses[-1]}
    del trainer, model, optimizer, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def project(run: GridRun, probe: dict) -> float:
    """The run's projected seconds: its setup, its remaining steps at the probed rate, its evaluation."""
    warmup = probe["probe_steps"] - probe["timed_steps"]  # these are inside setup_s
    return probe["setup_s"] + max(run.steps - warmup, 0) * probe["step_s"] + probe["eval_s"]


def probe_sweep(grid: list[GridRun], cfg: SweepConfig, train_shards: str, val_shards: str | None = None, *,
                warmup: int = 3, steps: int = 20, log=print) -> list[dict]:
    """`probe_run` for each run of the grid (shapes that repeat across budgets are probed once, their
    timing reused), with `projected_s` per run."""
    by_shape: dict[str, dict] = {}
    rows = []
    for run in grid:
        key = repr(run.config)
        if key not in by_shape:
            p = probe_run(run, cfg, train_shards, val_shards, warmup=warmup, steps=steps)
            by_shape[key] = p
            log(f"[probe] {run.run_id}: {p['step_s'] * 1e3:.1f} ms/step, {p['tokens_per_s']:,.0f} tokens/s, "
                f"{p['tflops']:.3g} TFLOP/s, setup {p['setup_s']:.1f} s, eval {p['eval_s']:.2f} s")
        p = by_shape[key]
        row = {**p, "run": run.run_id, "budget": run.budget, "steps": run.steps,
               "params": run.row()["params"], "projected_s": project(run, p)}
        rows.append(row)
    return rows


def _probe_worker(run, cfg, train_shards, warmup, steps, barrier, queue) -> None:
    try:
        queue.put(probe_run(run, cfg, train_shards, warmup=warmup, steps=steps,
                            before_timing=lambda: barrier.wait(timeout=600)))
    except BaseException as e:  # noqa: BLE001 (reported to the parent, which raises)
        barrier.abort()  # the others stop waiting
        queue.put({"error": f"{type(e).__name__}: {e}"})


def probe_parallel(run: GridRun, cfg: SweepConfig, train_shards: str, k: int, *, warmup: int = 3,
                   steps: int = 20) -> dict:
    """k copies of `probe_run` at once, each in a spawned process (like the sweep's `parallel = k`);
    the timed steps start together. Returns the aggregate tokens/s and TFLOP/s and each copy's result."""
    import multiprocessing as mp

    from lmforge.errors import LMForgeError

    ctx = mp.get_context("spawn")  # as the sweep: a forked child must not inherit a CUDA context
    barrier, queue = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_probe_worker, args=(run, cfg, train_shards, warmup, steps, barrier, queue))
             for _ in range(k)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1200) for _ in procs]
    for p in procs:
        p.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise LMForgeError(f"probe_parallel({run.run_id}, k={k}): {errors[0]}")
    tokens_per_s = sum(r["tokens_per_s"] for r in results)
    return {"run": run.run_id, "parallel": k, "tokens_per_s": tokens_per_s,
            "tflops": run.flops_per_token * tokens_per_s / 1e12, "copies": results}
