"""Where the time of a steady-state decode step goes: host loop, graph launch, GPU kernels.

For one model shape and batch, the engine decodes greedy rows (prompt --prompt tokens, every row
alive for the whole measurement); after warm-up (compilation, CUDA-graph capture) it times
--steps steady-state decode steps (`engine.step()` calls until each row made that many tokens),
then as many again under torch.profiler. Printed, per decode step (one token per row; an
`engine.step()` that decodes k tokens per row counts k):
  wall ms        wall time per step (host clock, synchronised at both ends, profiler off)
  host ms        host time inside step() that is neither the decode-step call (graph launch)
                 nor the wait for the GPU's tokens: the engine's Python (events, stop checks,
                 buffer updates)
  launch ms      host time launching the decode steps (compiled engine: the CUDA graph's
                 replay, or its capture the first time; eager: the whole forwards' Python)
  wait ms        host time blocked on the previous step's tokens (GPU still busy): when it is ~0
                 the loop is host-bound, when it is most of the wall time it is GPU-bound
  gpu ms         sum of kernel durations / steps (profiler)
  idle           share of the profiled window in which no kernel ran
  kernels        kernels per step, and the top kernels by time
  prefill ms     one step() that admits and prefills a fresh batch of prompts (after warm-up)

  python benchmarks/inference_profile.py                               # CPU, tiny shape
  python benchmarks/inference_profile.py --shape llama124m --batch 1 64 --compile   # lent GPU

Engine options can be varied (--engine-opt name=value, passed to Engine) to profile a new path
against the default in the same run: every --variant is one engine per batch size.
Prints a table and writes JSON (--out, default runs/bench/inference_profile_<device>.json).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import INFERENCE_SHAPES, inference_device, sync

from lmforge.inference import Engine, SamplingParams
from lmforge.inference import pipeline as pipeline_mod
from lmforge.io import write_json
from lmforge.model import ModelConfig, Transformer

SHAPES = {**INFERENCE_SHAPES, "gpt2s": INFERENCE_SHAPES["llama124m"]}


class StepTimer:
    """Splits the host time of engine.step() into the decode-step call, the wait for tokens and
    the rest, by wrapping the engine's decode function and InFlight.read (this process only)."""

    def __init__(self, engine: Engine):
        self.launch = self.wait = 0.0
        # compiled: the CUDA-graph replay of decode_steps steps; eager: the steps' forwards
        owner, name = (engine.graphs, "launch") if engine.compiled else (engine.bufs, "run")
        inner = getattr(owner, name)

        def timed_call(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.launch += time.perf_counter() - t0

        setattr(owner, name, timed_call)
        self._read = pipeline_mod.InFlight.read
        timer = self

        def timed_read(inflight):
            t0 = time.perf_counter()
            if inflight.event is not None:
                inflight.event.synchronize()
            timer.wait += time.perf_counter() - t0
            return timer._read(inflight)

        pipeline_mod.InFlight.read = timed_read

    def close(self) -> None:
        pipeline_mod.InFlight.read = self._read

    def reset(self) -> None:
        self.launch = self.wait = 0.0


def start(engine: Engine, B: int, prompt: int, max_tokens: int, vocab: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0)
    for _ in range(B):
        engine.add_request(torch.randint(0, vocab, (prompt,), generator=g).tolist(), sp)


def drain(engine: Engine) -> None:
    for rid in list(engine.requests):
        engine.abort(rid)
    while engine.has_work():
        engine.step()


def tokens_per_row(events) -> int:
    return sum(ev.token_id is not None for ev in events)


def kernel_stats(prof, steps: int) -> dict:
    """Kernel time, count and idle share from the profiler's device events."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    spans = []
    for e in kernels:
        dur = e.time_range.end - e.time_range.start  # us
        by_name[e.name][0] += dur
        by_name[e.name][1] += 1
        spans.append((e.time_range.start, e.time_range.end))
    busy, end = 0.0, None
    for s, t in sorted(spans):
        if end is None or s > end:
            busy += t - s
            end = t
        elif t > end:
            busy += t - end
            end = t
    window = (max(t for _, t in spans) - min(s for s, _ in spans)) if spans else 0.0
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return {"gpu_ms": sum(v[0] for v in by_name.values()) / steps / 1e3,
            "kernels": sum(v[1] for v in by_name.values()) / steps,
            "idle": 1 - busy / window if window else None,
            "top": [{"name": n[:90], "us_per_step": v[0] / steps, "per_step": v[1] / steps} for n, v in top[:12]]}


def run_tokens(engine: Engine, B: int, n: int) -> tuple[int, int]:
    """step() until every row made >= n tokens: (tokens per row, step() calls)."""
    made = calls = 0
    while made < n * B:
        made += tokens_per_row(engine.step())
        calls += 1
    return made // B, calls


def profile_one(model, B: int, args, opts: dict, device) -> dict:
    cfg = model.cfg
    # every row stays alive: warm-up, timed and profiled tokens, plus one launch (<= 16) of slack each
    budget = args.warmup + 2 * args.steps + 48
    engine = Engine(model, max_batch=B, max_len=args.prompt + budget + 2, eos_ids=[], compile=args.compile, **opts)
    # warm-up: compile / capture, and a whole generation so every graph exists
    t0 = time.perf_counter()
    start(engine, B, args.prompt, budget, cfg.vocab_size, seed=1)
    run_tokens(engine, B, args.warmup)
    drain(engine)
    print(f"batch {B}: warm-up (compilation, capture) {time.perf_counter() - t0:.1f} s", flush=True)
    # prefill: one step() that admits and prefills B fresh prompts
    start(engine, B, args.prompt, budget, cfg.vocab_size, seed=2)
    sync(device)
    t0 = time.perf_counter()
    engine.step()
    sync(device)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    run_tokens(engine, B, 2)  # into the steady state (pipelined)
    timer = StepTimer(engine)
    try:
        sync(device)
        t0 = time.perf_counter()
        steps, calls = run_tokens(engine, B, args.steps)  # decode steps (tokens per row)
        sync(device)
        wall = time.perf_counter() - t0
        launch, wait = timer.launch, timer.wait
    finally:
        timer.close()
    row = {"batch": B, "variant": args.label, "opts": opts, "decode_steps": engine.decode_steps, "steps": steps,
           "wall_ms": wall / steps * 1e3, "launch_ms": launch / steps * 1e3, "wait_ms": wait / steps * 1e3,
           "host_ms": (wall - launch - wait) / steps * 1e3, "prefill_ms": prefill_ms,
           "tok_s": B * steps / wall,
           # compiled paths in use (False: the logged fallback to eager prefill / uncaptured steps)
           "prefill_compiled": engine._prefill_fn is not None,
           "graphs_captured": sum(g is not None for g in engine.graphs.graphs.values())}
    print(f"measured: {row}", flush=True)  # before the profiler run, in case the command is cut short
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            steps, _ = run_tokens(engine, B, args.steps)
            sync(device)
        try:
            row.update(kernel_stats(prof, steps))
        except Exception as e:  # keep the timings (and the trace) if the event format differs
            print(f"kernel statistics failed: {type(e).__name__}: {e}")
        if args.trace:
            prof.export_chrome_trace(str(Path(args.trace) / f"trace_{args.shape}_b{B}_{args.label}.json"))
    drain(engine)
    return row


def parse_opts(items: list[str]) -> dict:
    opts = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            opts[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            opts[name] = value
    return opts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64, help="decode steps (tokens per row) timed, and as many profiled")
    ap.add_argument("--warmup", type=int, default=16, help="decode steps before the first measurement")
    ap.add_argument("--compile", action="store_true", help="Engine(compile=True) (CUDA graphs on CUDA)")
    ap.add_argument("--engine-opt", nargs="*", default=[], help="name=value passed to Engine")
    ap.add_argument("--inductor", nargs="*", default=[], help="name=value set on torch._inductor.config")
    ap.add_argument("--label", default="default", help="name of this variant in the table")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--trace", default=None, help="folder for chrome traces (CUDA)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device, dtype = inference_device(args.threads)
    cfg = ModelConfig(**SHAPES[args.shape], attention_backend="sdpa", tie_embeddings=False)
    model = Transformer(cfg).to(device, dtype).eval()
    opts = parse_opts(args.engine_opt)
    if args.inductor:
        import torch._inductor.config as inductor_config

        for name, value in parse_opts(args.inductor).items():
            setattr(inductor_config, name, value)
    rows = [profile_one(model, B, args, opts, device) for B in args.batch]
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.shape} on {dev_name}, compile={args.compile}, {args.label} {opts or ''} {args.inductor or ''}")
    print("per decode step (one token per row); decode_steps per launch:", [r["decode_steps"] for r in rows])
    print(f"{'batch':>5} {'tok/s':>9} {'wall ms':>8} {'host ms':>8} {'launch ms':>9} {'wait ms':>8} "
          f"{'gpu ms':>7} {'idle':>6} {'kernels':>7} {'prefill ms':>10}")
    for r in rows:
        gpu = f"{r['gpu_ms']:>7.3f} {(r['idle'] or 0):>6.1%} {r['kernels']:>7.1f}" if "gpu_ms" in r else f"{'-':>7} {'-':>6} {'-':>7}"
        print(f"{r['batch']:>5} {r['tok_s']:>9.0f} {r['wall_ms']:>8.3f} {r['host_ms']:>8.3f} {r['launch_ms']:>9.3f} "
              f"{r['wait_ms']:>8.3f} {gpu} {r['prefill_ms']:>10.2f}")
    for r in rows:
        for k in r.get("top", []):
            print(f"  b{r['batch']} {k['us_per_step']:>8.1f} us {k['per_step']:>5.1f}x  {k['name']}")
    out = Path(args.out or f"runs/bench/inference_profile_{device.type}.json")
    write_json(out, {"device": dev_name, "inductor": args.inductor, "torch": torch.__version__, "shape": args.shape, "prompt": args.prompt,
                     "command": " ".join(sys.argv), "date": datetime.date.today().isoformat(), "results": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
