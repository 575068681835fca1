"""One admission's prefill forward: eager vs the engine's compiled prefill, and where its time goes.

The serving benchmark (inference_serving_http.py) measured ~75-80 ms per compiled prefill forward
on an H100 for 6-14 rows of <= 256 tokens of llama124m (docs/benchmarks.md), a few ms of tensor
work. This script times exactly that call, `Engine._forward_prefill(ids, pos, row_ids, length)`
as `_prefill_batch` makes it (rows in scattered slots, right-padded), for a few (rows, tokens)
shapes: eager (`Engine._forward`) and compiled (the engine's dynamic-shape graph, one for all
shapes), wall time with the device synchronized around each call (what an admitting step waits),
median of --iters. Then it profiles one compiled and one eager call of the largest shape
(torch.profiler): the top ops by device time and by host time, and the number of kernels.

  python benchmarks/inference_prefill.py                         # CPU, tiny model (eager only)
  python benchmarks/inference_prefill.py --shape llama124m --max-batch 64 --max-len 385   # GPU

Prints tables and writes JSON (--out, default runs/bench/inference_prefill_<device>.json).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from common import INFERENCE_SHAPES, inference_device, sync

from lmforge.inference import Engine
from lmforge.io import write_json
from lmforge.model import ModelConfig, Transformer


def inputs(eng: Engine, rows: int, tokens: int, device):
    """What _prefill_batch passes for `rows` prompts of `tokens` tokens in every other slot."""
    g = torch.Generator().manual_seed(rows * 1000 + tokens)
    ids = torch.randint(0, eng.model.cfg.vocab_size, (rows, tokens), generator=g)
    pos = torch.arange(tokens).repeat(rows, 1)
    row_ids = torch.arange(rows) * 2 % eng.max_batch
    return ids.to(device), pos.to(device), row_ids.to(device), min(eng.max_len, tokens + 1)


def wall_ms(fn, device, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def profile(fn, device, top: int = 12) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    sync(device)
    with prof(activities=acts) as p:
        fn()
        sync(device)
    events = p.key_averages()
    dev_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"

    def rows(key):
        ev = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:top]
        return [{"op": e.key[:80], "calls": e.count, "ms": getattr(e, key, 0) / 1e3} for e in ev]

    kernels = sum(e.count for e in events if device.type == "cuda" and getattr(e, "device_type", None) is not None
                  and "CUDA" in str(e.device_type))
    return {"by_device_time": rows(dev_key), "by_host_time": rows("self_cpu_time_total"), "kernels": kernels}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(INFERENCE_SHAPES), default="tiny")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--shapes", default="1x64,6x128,6x256,14x256", help="rows x tokens, comma-separated")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device, dtype = inference_device(args.threads)
    model = Transformer(ModelConfig(**INFERENCE_SHAPES[args.shape], attention_backend="sdpa")).to(device, dtype).eval()
    eng = Engine(model, max_batch=args.max_batch, max_len=args.max_len, eos_ids=[], compile=device.type == "cuda")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    results = []
    with torch.inference_mode():
        for rows, tokens in shapes:
            x = inputs(eng, rows, tokens, device)
            r = {"rows": rows, "tokens": tokens, "eager_ms": wall_ms(lambda x=x: eng._forward(*x), device, args.iters)}
            if eng._prefill_fn is not None:
                t = time.perf_counter()
                eng._forward_prefill(*x)  # the first call compiles
                r["first_compiled_call_s"] = time.perf_counter() - t
                r["compiled_ms"] = wall_ms(lambda x=x: eng._forward_prefill(*x), device, args.iters)
                r["still_compiled"] = eng._prefill_fn is not None
            results.append(r)
            print(r)
        ids, pos, row_ids, length = inputs(eng, *shapes[-1], device)
        profiles = {"eager": profile(lambda: eng._forward(ids, pos, row_ids, length), device)}
        if eng._prefill_fn is not None:
            profiles["compiled"] = profile(lambda: eng._forward_prefill(ids, pos, row_ids, length), device)
    from torch._dynamo.utils import counters

    print(f"\n{'rows':>4} {'tokens':>6} {'eager ms':>9} {'compiled ms':>11} {'compiled/eager':>14}")
    for r in results:
        c, e = r.get("compiled_ms"), r["eager_ms"]
        tail = "" if c is None else f"{c:11.2f} {c / e:14.2f}"
        print(f"{r['rows']:>4} {r['tokens']:>6} {e:>9.2f} {tail}")
    for name, p in profiles.items():
        print(f"\n{name} {shapes[-1]}: {p['kernels']} kernels; top ops by device time / host time:")
        for a, b in zip(p["by_device_time"], p["by_host_time"]):
            print(f"  {a['ms']:8.3f} ms {a['calls']:5d}x {a['op'][:48]:<48} | {b['ms']:8.3f} ms {b['calls']:5d}x {b['op'][:40]}")
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out = Path(args.out or f"runs/bench/inference_prefill_{device.type}.json")
    write_json(out, {"device": dev_name, "torch": torch.__version__, "args": vars(args), "command": " ".join(sys.argv),
                     "date": datetime.date.today().isoformat(), "graphs": counters["stats"]["unique_graphs"],
                     "results": results, "profiles": profiles})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
